"""Audit log growth per pump-day at the shipped 1-s poll, compacted telemetry vs every report logged.

Runs the real demo path (daemon, channel, safety kernel, audit writer with signed checkpoints, the sim pump) for
one whole 5-day course in virtual time, twice in the same process: with telemetry compaction (the shipped 60-s
heartbeat, `driverd.runtime.telemetry`) and with the heartbeat set to 0, which logs every pump report as before
issue 12. Reports bytes per pump-day and records by kind, and the bytes of the state snapshots and deltas in
them, and replays both logs (decisions must match the log, every snapshot and delta must equal replay's states).
--before DIR runs the compacted course with the code in DIR too (a `git archive` of the code before), in a
subprocess, for its bytes per pump-day side by side; --skip-full leaves out the every-report run.

usage: python bench/log_growth.py [--poll 1.0] [--pumps 1] [--before DIR] [--skip-full]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, say, table

from driverd.audit.reader import iter_lines
from driverd.audit.replay import Replayer
from driverd.audit.segments import list_segments
from driverd.runtime import telemetry
from driverd.runtime.demo import DemoOptions, run_demo

BEFORE_SNIPPET = """
import asyncio, json, sys
from driverd.runtime.demo import DemoOptions, run_demo
from driverd.audit.segments import list_segments
r = asyncio.run(run_demo(DemoOptions(driver="sim", pumps=int(sys.argv[2]), poll_period_s=float(sys.argv[1]))))
size = snap = 0
for _, p in list_segments(r.audit_dir):
    for line in p.open("rb"):
        size += len(line)
        snap += len(line) if b'"event":"state_snapshot"' in line or b'"event":"state_delta"' in line else 0
print(json.dumps([size, snap, r.virtual_seconds / 86400]))
"""


def before(src: Path, poll: float, pumps: int) -> tuple[int, int, float]:
    done = subprocess.run([sys.executable, "-c", BEFORE_SNIPPET, str(poll), str(pumps)], cwd=src, check=True,
                          env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    size, snap, days = json.loads(done.stdout.strip().splitlines()[-1])
    return int(size), int(snap), float(days)


def run(poll: float, pumps: int, heartbeat: timedelta) -> dict[str, object]:
    telemetry.HEARTBEAT = heartbeat
    t0 = time.perf_counter()
    result = asyncio.run(run_demo(DemoOptions(driver="sim", pumps=pumps, poll_period_s=poll)))
    wall = time.perf_counter() - t0
    size = sum(p.stat().st_size for _, p in list_segments(result.audit_dir))
    kinds: collections.Counter[str] = collections.Counter()
    snap_bytes = 0
    replayer = Replayer()
    for _, path in list_segments(result.audit_dir):
        for line in iter_lines(path):
            event = str(line.record.get("event"))
            kinds[event] += 1
            snap_bytes += len(line.raw) + 1 if event in ("state_snapshot", "state_delta") else 0
            replayer.add(line.record)
    replay = replayer.finish()
    days = result.virtual_seconds / 86_400
    return {"bytes": size, "per_pump_day": size / days / pumps, "kinds": kinds, "wall": wall, "days": days,
            "snap_per_pump_day": snap_bytes / days / pumps,
            "replay_ok": replay.ok, "outputs": replay.outputs_checked,
            "phase": result.pumps[0]["phase"], "delivered_ml": result.pumps[0]["delivered_ml"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--pumps", type=int, default=1)
    ap.add_argument("--before", type=Path, help="a checkout of the code before: its compacted run, side by side")
    ap.add_argument("--skip-full", action="store_true", help="leave out the every-report run")
    args = ap.parse_args()
    say("machine:", machine())
    shipped = telemetry.HEARTBEAT
    full = None if args.skip_full else run(args.poll, args.pumps, timedelta(0))
    compact = run(args.poll, args.pumps, shipped)
    telemetry.HEARTBEAT = shipped
    rows = []
    runs = [("every report (before)", full), (f"compacted, heartbeat {shipped.total_seconds():.0f} s", compact)]
    for name, r in runs:
        if r is None:
            continue
        kinds = r["kinds"]
        assert isinstance(kinds, collections.Counter)
        rows.append([name, f"{r['bytes']:,}", f"{r['per_pump_day'] / 1e6:.3f} MB",
                     f"{r['snap_per_pump_day'] / 1e6:.3f} MB ({kinds['state_snapshot']} + {kinds['state_delta']})",
                     f"{kinds['pump_report']:,}", f"{sum(kinds.values()):,}", f"{r['days']:.2f}",
                     "ok" if r["replay_ok"] else "DIVERGES", f"{r['outputs']:,}", r["phase"], r["delivered_ml"],
                     f"{r['wall']:.1f} s"])
    if args.before is not None:
        t0 = time.perf_counter()
        size, snap, days = before(args.before.resolve(), args.poll, args.pumps)
        rows.append(["compacted, code before", f"{size:,}", f"{size / days / args.pumps / 1e6:.3f} MB",
                     f"{snap / days / args.pumps / 1e6:.3f} MB", "", "", f"{days:.2f}", "", "", "", "",
                     f"{time.perf_counter() - t0:.1f} s"])
    say()
    say(table(["log", "bytes", "per pump-day", "of which snapshots (full + deltas)", "pump_report", "records",
               "course days", "replay", "outputs compared", "final phase", "delivered mL", "wall"], rows))
    if full is not None:
        ratio = float(compact["bytes"]) / float(full["bytes"])  # type: ignore[arg-type]
        say(f"\ncompacted / every report: {ratio:.4f} ({1 / ratio:.0f}x smaller)")
    say("load at end:", machine())


if __name__ == "__main__":
    main()
