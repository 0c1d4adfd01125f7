"""Virtual-time course speed: wall time of a whole 5-day burst course vs the 432,300 s it represents.

Runs the real demo path (daemon, channels, safety kernel, audit log with fdatasync and signed checkpoints, the
simulator on its real transport) once per driver and round, and prints the ratio to virtual time.

usage: python bench/course_speed.py [sim newera modbus] [--rounds N] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, say, table

from driverd.runtime.demo import DemoOptions, run_demo


def run_once(driver: str) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = asyncio.run(run_demo(DemoOptions(driver=driver)))
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("drivers", nargs="*", default=["sim", "newera", "modbus"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--profile", type=Path, help="cProfile one run (the first driver) into FILE")
    args = ap.parse_args()
    say("machine:", machine())
    if args.profile is not None:
        prof = cProfile.Profile()
        prof.enable()
        run_once(args.drivers[0])
        prof.disable()
        prof.dump_stats(args.profile)
        say(f"profile written to {args.profile}")
        return
    rows = []
    for driver in args.drivers:
        walls: list[float] = []
        result: Any = None
        for _ in range(args.rounds):
            wall, result = run_once(driver)
            walls.append(wall)
            say(f"  {driver:7s} wall {wall:6.2f} s  phase {result.pumps[0]['phase']}  "
                f"delivered {result.pumps[0]['delivered_ml']} mL")
        polls = result.pumps[0]["polls"]
        w = median(walls)
        rows.append([driver, f"{w:.2f} s (min {min(walls):.2f})", f"{result.virtual_seconds / w:,.0f}x",
                     f"{w / polls * 1e3:.3f} ms", polls, result.pumps[0]["phase"]])
    say()
    say(table(["driver", f"wall (median of {args.rounds})", "speed-up vs virtual", "per poll", "polls",
               "final phase"], rows))
    say("load at end:", machine())


if __name__ == "__main__":
    main()
