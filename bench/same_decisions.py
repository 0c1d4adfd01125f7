"""Bench helper (issue #12, section 22): two synth logs compared record by record, leaving out the snapshots, the
deltas, the writer's own records and the chain fields (prev, hash): what is left is every decision.

usage: python bench/same_decisions.py AUDIT_A AUDIT_B
"""

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from driverd.audit.segments import list_segments
from driverd.audit.writer import WRITER_EVENTS

SKIP = [b'"event":"state_snapshot"', b'"event":"state_delta"'] + [f'"event":"{e}"'.encode() for e in WRITER_EVENTS]


def records(audit: str) -> Iterator[dict[str, Any]]:
    for _, path in list_segments(Path(audit)):
        with path.open("rb") as f:
            for line in f:
                if any(s in line for s in SKIP):
                    continue
                rec = json.loads(line)
                rec.pop("prev", None)
                rec.pop("hash", None)
                yield rec


def main() -> None:
    n = diff = 0
    for a, b in itertools.zip_longest(records(sys.argv[1]), records(sys.argv[2])):
        n += 1
        if a != b:
            diff += 1
            if diff <= 3:
                print("differ:", json.dumps(a)[:400], "|", json.dumps(b)[:400])
    print(f"{n:,} records compared (snapshots, deltas and writer records left out), {diff:,} differ")


if __name__ == "__main__":
    main()
