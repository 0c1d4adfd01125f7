"""Restart time after a clean stop and after a crash at the worst point between snapshots, side by side with the code
before (issue 12 item 1).

Makes logs with the real demo path (daemon, sim pumps, audit writer with signed checkpoints, state snapshots and,
in the code after, state deltas; virtual time): N pumps through a whole 5-day course. For each log, times
`recover()` (what `Daemon.start` runs after opening the writer: find the newest sealed snapshot, verify from its
segment, replay what follows), median of --rounds, wall and CPU seconds:

- after a clean stop: the whole log (it ends with the stop's full snapshot);
- after a crash at the worst point between snapshots: the log cut at the end of the segment with the most records
  among those followed by a periodic snapshot or delta (each opens its segment), from the second day of the
  courses on (full 24-h histories), i.e. just before that snapshot or delta was written: start-up then replays
  that whole segment from the snapshot or delta that opens it.

With --before DIR (a `git archive` of the code before), the same is done for logs made by that code, timed by
that code (in a subprocess, its imports excluded), and that code's logs are also recovered by the code after
(the format-1 path). Both codes' recoveries are checked to give the same states as replay of the whole log from
the first record (--check). --breakdown times the parts of one recovery: imports (a fresh interpreter), finding
the snapshot (and rebuilding a delta's chain), verify, the rest (schedules, replay).

usage: python bench/restart.py [--pumps 2 8 32] [--poll 60] [--rounds 3] [--work DIR] [--before DIR]
                               [--check] [--breakdown]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, say, table

from driverd.audit.segments import list_segments
from driverd.runtime import recovery
from driverd.runtime.demo import DEMO_TRUST, DemoOptions, run_demo
from driverd.signing import TrustStore

MAKE_SNIPPET = """
import asyncio, sys
from pathlib import Path
from driverd.runtime.demo import DemoOptions, run_demo
asyncio.run(run_demo(DemoOptions(driver="sim", pumps=int(sys.argv[1]), poll_period_s=float(sys.argv[2]),
                                 audit_dir=Path(sys.argv[3]))))
"""

TIME_SNIPPET = """
import json, sys, time
from pathlib import Path
from driverd.runtime import recovery
from driverd.runtime.demo import DEMO_TRUST
from driverd.signing import TrustStore
trust = TrustStore.load(DEMO_TRUST)
out, cpu = [], []
for _ in range(int(sys.argv[2])):
    t0, c0 = time.perf_counter(), time.process_time()
    r = recovery.recover(Path(sys.argv[1]), trust)
    out.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
print(json.dumps([sorted(out)[len(out) // 2], r.records, sorted(cpu)[len(cpu) // 2],
                  {p: repr(s) for p, s in r.states.items()}]))
"""

EVENTS = (b'"event":"state_snapshot"', b'"event":"state_delta"')
HERE = Path(__file__).resolve().parents[1]


def in_code(src: Path | None, snippet: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(src)} if src is not None else dict(os.environ)
    done = subprocess.run([sys.executable, "-c", snippet, *args], cwd=src or Path.cwd(), check=True, env=env,
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def make_log(audit: Path, pumps: int, poll: float, src: Path | None) -> None:
    if audit.is_dir() and list_segments(audit):
        return
    if src is None:
        asyncio.run(run_demo(DemoOptions(driver="sim", pumps=pumps, poll_period_s=poll, audit_dir=audit)))
    else:
        in_code(src, MAKE_SNIPPET, str(pumps), str(poll), str(audit))


def opens_with_snapshot(path: Path) -> bool:
    with path.open("rb") as f:
        for _, line in zip(range(4), f, strict=False):
            if any(e in line for e in EVENTS):
                return True
    return False


def crash_log(audit: Path, dest: Path) -> int:
    """The log cut just before the periodic snapshot or delta that follows the most records (see above).
    Returns the records replayed from the one before."""
    segs = list_segments(audit)
    counts = [sum(1 for _ in p.open("rb")) for _, p in segs]
    # From the second day on (the first third of the log): every pump's 24-h history is full, so the snapshot
    # start-up decodes is as large as it gets, as well as the records it replays.
    worst = max((i for i in range(len(segs) // 3, len(segs) - 2) if opens_with_snapshot(segs[i + 1][1])),
                key=lambda i: counts[i])
    if not dest.is_dir():
        dest.mkdir()
        for _, p in segs[: worst + 1]:
            shutil.copy(p, dest / p.name)
    return counts[worst]


def whole_states(audit: Path, trust: TrustStore) -> dict[str, str]:
    with mock.patch.object(recovery, "newest_snapshot", lambda _d: None):
        r = recovery.recover(audit, trust)
    return {p: repr(s) for p, s in r.states.items()}


def breakdown(audit: Path, trust: TrustStore, rounds: int) -> dict[str, float]:
    """CPU seconds of each part of recover() (median of rounds), and the import of the daemon in a fresh
    interpreter."""
    parts: dict[str, list[float]] = {"find snapshot": [], "verify": [], "total": []}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            c0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                parts[name].append(time.process_time() - c0)
        return run

    with mock.patch.object(recovery, "newest_snapshot", wrap("find snapshot", recovery.newest_snapshot)), \
            mock.patch.object(recovery, "verify_log", wrap("verify", recovery.verify_log)):
        for _ in range(rounds):
            c0 = time.process_time()
            recovery.recover(audit, trust)
            parts["total"].append(time.process_time() - c0)
    out = {k: median(v) for k, v in parts.items()}
    out["replay, schedules, rest"] = out["total"] - out["find snapshot"] - out["verify"]
    imports = in_code(None, "import time; c=time.process_time(); import driverd.runtime.daemon, driverd.runtime."
                      "service; print(time.process_time() - c)")
    out["imports (fresh interpreter)"] = float(imports)
    return out


def log_stats(audit: Path, pumps: int) -> tuple[str, str, str]:
    size = sum(p.stat().st_size for _, p in list_segments(audit))
    snap = sum(len(line) for _, p in list_segments(audit) for line in p.open("rb") if any(e in line for e in EVENTS))
    return f"{size / 1e6:.1f} MB", f"{snap / 1e6 / (pumps * 5):.3f} MB", f"{snap / size:.0%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pumps", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--poll", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, help="keep (and reuse) the logs in DIR")
    ap.add_argument("--before", type=Path, help="a checkout of the code before, to run side by side")
    ap.add_argument("--check", action="store_true", help="check states against replay of the whole log")
    ap.add_argument("--breakdown", action="store_true", help="time the parts of the clean-stop recovery")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="driverd-restart-"))
    work.mkdir(parents=True, exist_ok=True)
    say("machine:", machine(work))
    trust = TrustStore.load(DEMO_TRUST)
    rows, parts = [], []
    for pumps in sorted(args.pumps):
        codes: list[tuple[str, Path | None, Path]] = [("after", None, work / "after")]
        if args.before is not None:
            codes.append(("before", args.before.resolve(), work / "before"))
        for name, src, base in codes:
            base.mkdir(exist_ok=True)
            audit, crash = base / f"audit-{pumps}", base / f"crash-{pumps}"
            make_log(audit, pumps, args.poll, src)
            crashed_records = crash_log(audit, crash)
            size, per_day, share = log_stats(audit, pumps)
            # Each code is timed in a fresh interpreter (this one holds the heap of the demo that made the log,
            # which the cyclic GC would walk).
            timers: list[tuple[str, Path]] = [(name, src or HERE)]
            if src is not None:
                timers.append(("after (its log)", HERE))  # the code after recovering the format-1 log
            for who, code in timers:
                got = {}
                for label, log in (("clean", audit), ("crash", crash)):
                    w, n, c, st = json.loads(in_code(code, TIME_SNIPPET, str(log), str(args.rounds)))
                    got[label] = (w, c, n, st)
                    if args.check:
                        assert got[label][3] == whole_states(log, trust), (who, label, pumps)
                rows.append([pumps, f"{name} code's log", who, size, per_day, share,
                             f"{got['clean'][0]:.3f} s", f"{got['clean'][1]:.3f} s", f"{got['crash'][2]:,}",
                             f"{got['crash'][0]:.3f} s", f"{got['crash'][1]:.3f} s"])
                say(rows[-1])
                assert got["crash"][2] <= crashed_records + 8, (got["crash"][2], crashed_records)
            if args.breakdown and src is None:
                for label, log in (("clean", audit), ("crash", crash)):
                    b = breakdown(log, trust, args.rounds)
                    parts.append([pumps, label, *(f"{b[k]:.3f}" for k in (
                        "imports (fresh interpreter)", "find snapshot", "verify", "replay, schedules, rest",
                        "total"))])
                    say(parts[-1])
    say()
    say(table(["pumps", "log", "recovered by", "log size", "snapshots+deltas per pump-day", "their share",
               "clean stop: wall", "CPU", "crash: records replayed", "wall", "CPU"], rows))
    if parts:
        say()
        say("CPU seconds of the parts of one recovery (code after, its own log):")
        say(table(["pumps", "restart", "imports (not in recover)", "find snapshot (+ rebuild delta chain)",
                   "verify", "replay, schedules, rest", "recover total"], parts))
    say("load at end:", machine())


if __name__ == "__main__":
    main()
