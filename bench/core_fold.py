"""The core's fold alone: every logged input of a real log stepped through `machine.step`, per pump, as replay does,
without reading, decoding or comparing anything (the events are decoded before the clock starts).

This is the part of `audit replay`, recovery and the per-poll path that the core owns. With --before DIR (an
earlier checkout) that version's core folds the same log in the same rounds, in a subprocess. CPU seconds, best
of --rounds (the machine is shared: the best round is the one least disturbed by others).

usage: python bench/core_fold.py LOG_DIR [--rounds R] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SNIPPET = r"""
import json, sys, time
from pathlib import Path
from driverd.audit.reader import iter_lines
from driverd.core import machine, records
from driverd.core.protocol import parse_protocol
recs = [line.record for line in iter_lines(Path(sys.argv[1]))]
proto = parse_protocol(next(r for r in recs if r["event"] == "library_loaded")["text"])
events = [(r["pump_id"], records.event_from_record(r)) for r in recs if r.get("event") in records.INPUT_EVENTS]
best = None
for _ in range(int(sys.argv[2])):
    states = {}
    c = time.process_time()
    for pump, event in events:
        state = states.get(pump)
        states[pump], _ = machine.step(state if state is not None else machine.initial_state(pump), event, proto)
    took = time.process_time() - c
    best = took if best is None else min(best, took)
print(json.dumps([len(events), best]))
"""


def fold(src: Path, log: Path, rounds: int) -> tuple[int, float]:
    done = subprocess.run([sys.executable, "-c", SNIPPET, str(log), str(rounds)], cwd=src, check=True,
                          env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    n, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return int(n), float(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", type=Path)
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    n, cpu = fold(here, args.log, args.rounds)
    print(f"this checkout: {n:,} inputs, CPU {cpu:.3f} s, {cpu / n * 1e6:.1f} us/input, {n / cpu:,.0f} inputs/s")
    if args.before is not None:
        bn, bcpu = fold(args.before, args.log, args.rounds)
        print(f"before ({args.before}): {bn:,} inputs, CPU {bcpu:.3f} s, {bcpu / bn * 1e6:.1f} us/input, "
              f"{bn / bcpu:,.0f} inputs/s; this checkout is {bcpu / cpu:.2f}x faster")
    print("load:", os.getloadavg())


if __name__ == "__main__":
    main()
