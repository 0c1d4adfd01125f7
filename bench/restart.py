"""Restart time vs log size: start-up recovery from the newest signed state snapshot vs from the whole log.

Makes logs with the real demo path (daemon, sim pumps, audit writer with signed checkpoints and state snapshots,
virtual time): N pumps through a whole 5-day course, for several N (the log grows with pumps x days). For each
log, times `recover()` (what `Daemon.start` runs after opening the writer: verify + replay) in the same run from
the newest snapshot (as shipped) and from the first record (before snapshots), and checks both give the same
states, schedule versions and exposure ledger.

--work DIR keeps the logs there and reuses them on the next run (making a 32-pump log takes minutes);
--whole-rounds 0 skips the (slow) recovery from the first record; --before DIR (an earlier checkout) times that
version's recover() on the same logs in the same rounds, in a subprocess (its imports excluded).

usage: python bench/restart.py [--pumps 4 8 16 32] [--poll 60] [--rounds R] [--whole-rounds R] [--work DIR]
                               [--before DIR]
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
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, say, table

from driverd.audit.segments import list_segments
from driverd.runtime import recovery
from driverd.runtime.demo import DEMO_TRUST, DemoOptions, run_demo
from driverd.signing import TrustStore

BEFORE_SNIPPET = """
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
print(json.dumps([sorted(out)[len(out) // 2], r.records, sorted(cpu)[len(cpu) // 2]]))
"""


def before_timed(src: Path, audit: Path, rounds: int) -> tuple[float, int, float]:
    done = subprocess.run([sys.executable, "-c", BEFORE_SNIPPET, str(audit), str(rounds)], cwd=src, check=True,
                          env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    wall, records, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return float(wall), int(records), float(cpu)


def timed(audit: Path, trust: TrustStore, *, snapshots: bool, rounds: int) -> tuple[float, recovery.Recovered]:
    walls, cpus = [], []
    out = None
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        if snapshots:
            out = recovery.recover(audit, trust)
        else:
            with mock.patch.object(recovery, "newest_snapshot", lambda _d: None):
                out = recovery.recover(audit, trust)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    assert out is not None
    CPU[audit] = median(cpus)  # CPU seconds next to wall: on a shared machine wall time also measures others
    return median(walls), out


CPU: dict[Path, float] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pumps", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--poll", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--whole-rounds", type=int, default=None, help="rounds from the first record (0: skip)")
    ap.add_argument("--work", type=Path, help="keep (and reuse) the logs in DIR")
    ap.add_argument("--before", type=Path, help="an earlier checkout to time side by side")
    args = ap.parse_args()
    whole_rounds = args.rounds if args.whole_rounds is None else args.whole_rounds
    work = args.work or Path(tempfile.mkdtemp(prefix="driverd-restart-"))
    work.mkdir(parents=True, exist_ok=True)
    say("machine:", machine(work))
    trust = TrustStore.load(DEMO_TRUST)
    rows = []
    for pumps in sorted(args.pumps):
        audit = work / f"audit-{pumps}"
        if not (audit.is_dir() and list_segments(audit)):
            asyncio.run(run_demo(DemoOptions(driver="sim", pumps=pumps, poll_period_s=args.poll, audit_dir=audit)))
        size = sum(p.stat().st_size for _, p in list_segments(audit))
        snap_wall, snap = timed(audit, trust, snapshots=True, rounds=args.rounds)
        if whole_rounds:
            full_wall, full = timed(audit, trust, snapshots=False, rounds=whole_rounds)
            assert snap.states == full.states and snap.versions == full.versions
            assert snap.ledger.to_fields() == full.ledger.to_fields()
        snap_bytes = sum(len(line) for _, p in list_segments(audit) for line in p.read_bytes().splitlines()
                         if b'"event":"state_snapshot"' in line)
        # A crash just before a periodic snapshot: the newest sealed one is SNAPSHOT_EVERY old (the log less its
        # last two segments, each opened by a snapshot: the clean stop's and the last periodic one's).
        crash = work / f"crash-{pumps}"
        if not crash.is_dir():
            crash.mkdir()
            for _, p in list_segments(audit)[:-2]:
                shutil.copy(p, crash / p.name)
        crash_wall, crashed = timed(crash, trust, snapshots=True, rounds=args.rounds)
        whole = ""
        if whole_rounds:
            crash_full_wall, crash_full = timed(crash, trust, snapshots=False, rounds=whole_rounds)
            assert crashed.states == crash_full.states
            whole = f" (whole: {crash_full_wall:.3f} s)"
        rows.append([pumps, f"{pumps * 5} pump-days", f"{size / 1e6:.1f} MB", f"{snap_bytes / size:.0%}",
                     f"{full.records:,}" if whole_rounds else "-", f"{full_wall:.3f} s" if whole_rounds else "-",
                     f"{snap.records:,}", f"{snap_wall:.3f} s (CPU {CPU[audit]:.3f})", f"{crashed.records:,}",
                     f"{crash_wall:.3f} s (CPU {CPU[crash]:.3f}){whole}"])
        say(rows[-1])
        if args.before is not None:
            b_clean, b_clean_n, b_clean_cpu = before_timed(args.before, audit, args.rounds)
            b_crash, b_crash_n, b_crash_cpu = before_timed(args.before, crash, args.rounds)
            rows.append([f"{pumps} before", "", "", "", "", "", f"{b_clean_n:,}",
                         f"{b_clean:.3f} s (CPU {b_clean_cpu:.3f})", f"{b_crash_n:,}",
                         f"{b_crash:.3f} s (CPU {b_crash_cpu:.3f})"])
            say(rows[-1])
    say()
    say(table(["pumps", "history", "log", "snapshots' share", "records", "recover: whole log",
               "after clean stop: records replayed", "recover", "crash before a periodic snapshot: replayed",
               "recover"], rows))
    say("load at end:", machine())


if __name__ == "__main__":
    main()
