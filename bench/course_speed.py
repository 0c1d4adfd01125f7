"""Virtual-time course speed: wall time of a whole 5-day burst course vs the 432,000 s it represents.

Runs the real demo path (daemon + audit log with fdatasync + simulators) once per driver and prints the ratio.
usage: python bench/course_speed.py [sim newera modbus]
"""

from __future__ import annotations

import asyncio
import sys
import time

from driverd.runtime.demo import DemoOptions, run_demo


def main(drivers: list[str]) -> None:
    for driver in drivers:
        t0 = time.perf_counter()
        result = asyncio.run(run_demo(DemoOptions(driver=driver)))
        wall = time.perf_counter() - t0
        ratio = result.virtual_seconds / wall
        polls = result.pumps[0]["polls"]
        print(f"{driver:7s} virtual {result.virtual_seconds:>9.0f} s  wall {wall:6.2f} s  speed-up {ratio:>9.0f}x  "
              f"polls {polls}  ({wall / polls * 1e3:.3f} ms per poll incl. audit)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["sim", "newera", "modbus"])
