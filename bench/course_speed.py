"""Virtual-time course speed: wall time of a whole 5-day burst course vs the 432,300 s it represents.

Runs the real demo path (daemon, channels, safety kernel, audit log with fdatasync and signed checkpoints, the
simulator on its real transport) once per driver and round, and prints the ratio to virtual time.

With --poll S the pump is polled every S seconds of virtual time (the shipped default is 1 s; the demo's 60 s
is this script's default, as in its earlier figures). With --before DIR (an earlier checkout, e.g. `git archive
main | tar -x -C DIR`) that version runs the same course in the same rounds, in a subprocess.

usage: python bench/course_speed.py [sim newera modbus] [--rounds N] [--poll S] [--profile FILE] [--before DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, say, table

from driverd.runtime.demo import DemoOptions, run_demo


def run_once(driver: str, poll: float = 60.0) -> tuple[float, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    result = asyncio.run(run_demo(DemoOptions(driver=driver, poll_period_s=poll)))
    result.cpu_s = time.process_time() - c0  # this process's CPU: on a shared machine wall time also measures others
    return time.perf_counter() - t0, result


BEFORE_SNIPPET = """
import asyncio, json, sys, time
from driverd.runtime.demo import DemoOptions, run_demo
t0, c0 = time.perf_counter(), time.process_time()
r = asyncio.run(run_demo(DemoOptions(driver=sys.argv[1], poll_period_s=float(sys.argv[2]))))
print(json.dumps([time.perf_counter() - t0, r.virtual_seconds, r.pumps[0]["polls"], r.pumps[0]["phase"],
                  time.process_time() - c0]))
"""


def run_before(src: Path, driver: str, poll: float) -> list[Any]:
    """The same course by the checkout in src, timed inside its own process (its imports excluded)."""
    done = subprocess.run([sys.executable, "-c", BEFORE_SNIPPET, driver, str(poll)], cwd=src, check=True,
                          env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    out: list[Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# Where a poll's CPU goes: (label, function name, file it is in). Cumulative time, so the rows overlap (the channel's
# poll holds the core step, the simulated pump and the compactor).
SHARES = [
    ("channel task (everything a poll does)", "run", "runtime/channel.py"),
    ("  core steps (machine.step: report + tick)", "step", "core/machine.py"),
    ("  compactor's shortcut (report_replay)", "replay_step_agrees", "core/report_replay.py"),
    ("  simulated pump + sim:// driver (read_status)", "read_status", "drivers/sim.py"),
    ("    of which quantize_down (the counter's display)", "quantize_down", "core/quantities.py"),
    ("  audit appends (records logged)", "append", "audit/writer.py"),
    ("  virtual clock sleep_until (waiter heap)", "sleep_until", "runtime/clock.py"),
    ("  wall-clock step check", "check", "runtime/clock.py"),
    ("demo course watch (its loop)", "_watch_courses", "runtime/demo.py"),
    ("demo watch gate (per change)", "on_change", "runtime/demo.py"),
    ("demo watch callback (snapshot if due, group commit)", "_audit_turn", "runtime/demo.py"),
]


def profile_shares(path: Path, polls: int) -> str:
    """The profile as shares of the whole and profiled microseconds per poll (cProfile adds ~2x overhead)."""
    import pstats

    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    raw = stats.stats  # type: ignore[attr-defined]
    rows = []
    for label, name, where in SHARES:
        cum = sum(v[3] for (f, _, n), v in raw.items() if n == name and f.endswith(where))
        rows.append([label, f"{cum / total * 100:.1f} %", f"{cum / polls * 1e6:.1f}"])
    rows.append(["total (profiled)", "100 %", f"{total / polls * 1e6:.1f}"])
    return table(["where (cumulative)", "share", "profiled µs per poll"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("drivers", nargs="*", default=["sim", "newera", "modbus"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--poll", type=float, default=60.0, help="poll period in virtual seconds (shipped: 1)")
    ap.add_argument("--profile", type=Path, help="cProfile one run (the first driver) into FILE")
    ap.add_argument("--before", type=Path, help="an earlier checkout to run side by side")
    args = ap.parse_args()
    say("machine:", machine())
    if args.profile is not None:
        prof = cProfile.Profile()
        prof.enable()
        _, result = run_once(args.drivers[0], args.poll)
        prof.disable()
        prof.dump_stats(args.profile)
        say(f"profile written to {args.profile}")
        say(profile_shares(args.profile, result.pumps[0]["polls"]))
        return
    rows = []
    ratios: list[str] = []
    for driver in args.drivers:
        walls: list[float] = []
        result: Any = None
        cpus: list[float] = []
        before: list[list[Any]] = []
        for _ in range(args.rounds):
            wall, result = run_once(driver, args.poll)
            walls.append(wall)
            cpus.append(result.cpu_s)
            say(f"  {driver:7s} wall {wall:6.2f} s  CPU {result.cpu_s:6.2f} s  phase {result.pumps[0]['phase']}  "
                f"delivered {result.pumps[0]['delivered_ml']} mL  polls {result.pumps[0]['polls']}")
            if args.before is not None:
                before.append(run_before(args.before, driver, args.poll))
                say(f"  {driver:7s} before: wall {before[-1][0]:6.2f} s  CPU {before[-1][4]:6.2f} s  "
                    f"phase {before[-1][3]}  polls {before[-1][2]}")
        if before:
            bw = median([b[0] for b in before])
            bc = median([b[4] for b in before])
            rows.append([f"{driver} (before: {args.before})", f"{bw:.2f} s (min {min(b[0] for b in before):.2f})",
                         f"{bc:.2f} s", f"{before[0][1] / bw:,.0f}x", f"{before[0][1] / bc:,.0f}x",
                         f"{bw / before[0][2] * 1e6:.1f} µs", f"{bc / before[0][2] * 1e6:.1f} µs", before[0][2],
                         before[0][3]])
        polls = result.pumps[0]["polls"]
        w = median(walls)
        c = median(cpus)
        rows.append([driver, f"{w:.2f} s (min {min(walls):.2f})", f"{c:.2f} s", f"{result.virtual_seconds / w:,.0f}x",
                     f"{result.virtual_seconds / c:,.0f}x", f"{w / polls * 1e6:.1f} µs", f"{c / polls * 1e6:.1f} µs",
                     polls, result.pumps[0]["phase"]])
        if before:
            # Same rounds, same machine load: the ratio is the figure to compare on a shared machine.
            ratios.append(f"{driver}: before/after, medians of {args.rounds} rounds: wall {bw / w:.2f}x, "
                          f"CPU {bc / c:.2f}x (per round: "
                          + ", ".join(f"{b[4] / a:.2f}" for b, a in zip(before, cpus, strict=True)) + " CPU)")
    say()
    say(f"poll period {args.poll:g} s (virtual)")
    say(table(["driver", f"wall (median of {args.rounds})", "CPU", "speed-up vs virtual (wall)", "(CPU)",
               "wall per poll", "CPU per poll", "polls", "final phase"], rows))
    for line in ratios:
        say(line)
    say("load at end:", machine())


if __name__ == "__main__":
    main()
