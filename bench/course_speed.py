"""Virtual-time course speed: wall time of a whole 5-day burst course vs the 432,300 s it represents.

Runs the real demo path (daemon + audit log with fdatasync + simulators) per driver and prints the ratio.
Runs alternate between variants (and repeat --rounds times) so that load from other users hits all alike.

Variants:
  as-is      the code in this checkout.
  flush      the same, with the runtime change proposed in bench/results/audit.md applied in-process for the
             measurement only: the demo's wait loop calls Daemon.tick_audit() on every wake-up (every poll in
             virtual time), i.e. one fdatasync per poll; the proposal makes it group-commit only when due
             (AuditWriter.flush_due(): the oldest unsynced record is group_commit_ms old). Setpoints and
             alarms stay fdatasync'd before the wire; this only changes how often telemetry is synced.
  flush+bisect  also the proposed core change (bench/common.py: the 24-h sample window trimmed by bisect).

usage: python bench/course_speed.py [sim newera modbus] [--rounds N] [--proposed] [--profile FILE]
(--proposed adds the flush and flush+bisect variants; --profile FILE profiles one run, the last variant)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ProposedCoreBisect, machine, median, say, table

from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import DemoOptions, run_demo

_ORIGINAL_TICK = Daemon.tick_audit


def _tick_when_due(self: Daemon) -> None:
    if self.audit is not None:
        self.audit.flush_due()


def run_once(driver: str, variant: str) -> tuple[float, Any]:
    Daemon.tick_audit = _ORIGINAL_TICK if variant == "as-is" else _tick_when_due  # type: ignore[method-assign]
    try:
        with ProposedCoreBisect() if variant == "flush+bisect" else contextlib.nullcontext():
            t0 = time.perf_counter()
            result = asyncio.run(run_demo(DemoOptions(driver=driver)))
            return time.perf_counter() - t0, result
    finally:
        Daemon.tick_audit = _ORIGINAL_TICK  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("drivers", nargs="*", default=["sim", "newera", "modbus"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--proposed", action="store_true", help="also run the proposed variants")
    ap.add_argument("--only", choices=["as-is", "flush", "flush+bisect"], help="run just this variant")
    ap.add_argument("--profile", type=Path, help="cProfile one run into FILE")
    args = ap.parse_args()
    say("machine:", machine())
    if args.profile is not None:
        prof = cProfile.Profile()
        prof.enable()
        run_once(args.drivers[0], "flush+bisect" if args.proposed else "as-is")
        prof.disable()
        prof.dump_stats(args.profile)
        say(f"profile written to {args.profile}")
        return
    variants = ["as-is", "flush", "flush+bisect"] if args.proposed else ["as-is"]
    if args.only:
        variants = [args.only]
    rows = []
    for driver in args.drivers:
        walls: dict[str, list[float]] = {v: [] for v in variants}
        info: dict[str, Any] = {}
        for _ in range(args.rounds):
            for v in variants:
                wall, result = run_once(driver, v)
                walls[v].append(wall)
                info[v] = result
                say(f"  {driver:7s} {v:12s} wall {wall:6.2f} s  phase {result.pumps[0]['phase']}  "
                    f"delivered {result.pumps[0]['delivered_ml']} mL")
        for v in variants:
            result = info[v]
            polls = result.pumps[0]["polls"]
            w = median(walls[v])
            rows.append([driver, v, f"{w:.2f} s (min {min(walls[v]):.2f})", f"{result.virtual_seconds / w:,.0f}x",
                         f"{w / polls * 1e3:.3f} ms", polls, result.pumps[0]["phase"]])
    say()
    say(table(["driver", "variant", f"wall (median of {args.rounds})", "speed-up vs virtual", "per poll", "polls",
               "final phase"], rows))
    say("load at end:", machine())


if __name__ == "__main__":
    main()
