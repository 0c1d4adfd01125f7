"""Audit log growth per pump-day at the shipped 1-s poll, compacted telemetry vs every report logged.

Runs the real demo path (daemon, channel, safety kernel, audit writer with signed checkpoints, the sim pump) for
one whole 5-day course in virtual time, twice in the same process: with telemetry compaction (the shipped 60-s
heartbeat, `driverd.runtime.telemetry`) and with the heartbeat set to 0, which logs every pump report as before
issue 12. Reports bytes per pump-day and records by kind, and replays both logs (decisions must match the log).

usage: python bench/log_growth.py [--poll 1.0] [--pumps 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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


def run(poll: float, pumps: int, heartbeat: timedelta) -> dict[str, object]:
    telemetry.HEARTBEAT = heartbeat
    t0 = time.perf_counter()
    result = asyncio.run(run_demo(DemoOptions(driver="sim", pumps=pumps, poll_period_s=poll)))
    wall = time.perf_counter() - t0
    size = sum(p.stat().st_size for _, p in list_segments(result.audit_dir))
    kinds: collections.Counter[str] = collections.Counter()
    replayer = Replayer()
    for _, path in list_segments(result.audit_dir):
        for line in iter_lines(path):
            kinds[str(line.record.get("event"))] += 1
            replayer.add(line.record)
    replay = replayer.finish()
    days = result.virtual_seconds / 86_400
    return {"bytes": size, "per_pump_day": size / days / pumps, "kinds": kinds, "wall": wall, "days": days,
            "replay_ok": replay.ok, "outputs": replay.outputs_checked,
            "phase": result.pumps[0]["phase"], "delivered_ml": result.pumps[0]["delivered_ml"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--pumps", type=int, default=1)
    args = ap.parse_args()
    say("machine:", machine())
    shipped = telemetry.HEARTBEAT
    full = run(args.poll, args.pumps, timedelta(0))
    compact = run(args.poll, args.pumps, shipped)
    telemetry.HEARTBEAT = shipped
    rows = []
    runs = (("every report (before)", full), (f"compacted, heartbeat {shipped.total_seconds():.0f} s", compact))
    for name, r in runs:
        kinds = r["kinds"]
        assert isinstance(kinds, collections.Counter)
        rows.append([name, f"{r['bytes']:,}", f"{r['per_pump_day'] / 1e6:.3f} MB", f"{kinds['pump_report']:,}",
                     f"{sum(kinds.values()):,}", f"{r['days']:.2f}", "ok" if r["replay_ok"] else "DIVERGES",
                     f"{r['outputs']:,}", r["phase"], r["delivered_ml"], f"{r['wall']:.1f} s"])
    say()
    say(table(["log", "bytes", "per pump-day", "pump_report", "records", "course days", "replay",
               "outputs compared", "final phase", "delivered mL", "wall"], rows))
    ratio = float(compact["bytes"]) / float(full["bytes"])  # type: ignore[arg-type]
    say(f"\ncompacted / every report: {ratio:.4f} ({1 / ratio:.0f}x smaller)")
    say("load at end:", machine())


if __name__ == "__main__":
    main()
