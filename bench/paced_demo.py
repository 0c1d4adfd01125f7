"""Paced demo (`driverd demo --speed N`): wall time of a whole 5-day course on the PacedClock against the N x
real-time pace it must never beat, and whether the run is still honest (demo_checks) at that pace.

The reference is the pace itself: 432,600 virtual seconds / N. A ratio below 1 would mean the clock ran ahead of
the pace (a bug); a ratio above 1 is the cost of the run (start-up, the course's work, the end-of-course wait).

usage: python bench/paced_demo.py [--speed N ...] [--driver sim|newera|modbus]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, say, table

from driverd.audit.reader import iter_records
from driverd.runtime.demo import DemoOptions, run_demo
from driverd.runtime.demo_checks import DemoJudge


def run_once(speed: float, driver: str) -> tuple[float, float, list[str]]:
    work = Path(tempfile.mkdtemp(prefix="driverd-bench-paced-"))
    try:
        opts = DemoOptions(driver=driver, speed=speed, work_dir=work)
        t0 = time.perf_counter()
        result = asyncio.run(run_demo(opts))
        wall = time.perf_counter() - t0
        judge = DemoJudge([p["pump_id"] for p in result.pumps], poll_period_s=Decimal(60), deadman_s=opts.deadman_s)
        for rec in iter_records(result.audit_dir):
            judge.add(rec)
        return wall, result.virtual_seconds, judge.reasons()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed", type=float, nargs="+", default=[3600.0, 36000.0])
    ap.add_argument("--driver", default="sim")
    args = ap.parse_args()
    say("machine:", machine())
    rows = []
    for speed in args.speed:
        wall, virtual, reasons = run_once(speed, args.driver)
        pace = virtual / speed
        rows.append([f"{speed:g}", f"{virtual:.0f}", f"{pace:.1f}", f"{wall:.1f}", f"{wall / pace:.3f}",
                     f"{virtual / wall:.0f}", "OK" if not reasons else "FAILED: " + "; ".join(reasons)])
    say(table(["speed", "virtual s", "pace s", "wall s", "wall/pace", "effective x", "demo_checks"], rows))
    say("machine:", machine())


if __name__ == "__main__":
    main()
