"""Bench helper (issue #12, section 21): compare two synth logs record by record, leaving out snapshots, deltas and the writer's own records, and the
chain fields (prev, hash). usage: same_decisions.py AUDIT_A AUDIT_B"""
import itertools
import json
import sys
from pathlib import Path

from driverd.audit.segments import list_segments
from driverd.audit.writer import WRITER_EVENTS

SKIP = [b'"event":"state_snapshot"', b'"event":"state_delta"'] + [f'"event":"{e}"'.encode() for e in WRITER_EVENTS]

def lines(audit):
    for _, p in list_segments(Path(audit)):
        with p.open("rb") as f:
            for line in f:
                if any(s in line for s in SKIP):
                    continue
                rec = json.loads(line)
                rec.pop("prev", None); rec.pop("hash", None)
                yield rec

n = diff = 0
for a, b in itertools.zip_longest(lines(sys.argv[1]), lines(sys.argv[2])):
    n += 1
    if a != b:
        diff += 1
        if diff <= 3:
            print("differ:", json.dumps(a)[:400], "|", json.dumps(b)[:400])
print(f"{n:,} records compared (snapshots, deltas and writer records left out), {diff:,} differ")
