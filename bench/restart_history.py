"""Restart time vs history: start-up on logs of the same ward at 5, 30, 90 and 365 days (issue #12 item 1).

Reads the copies `bench/synth_log.py --restart-at ...` kept (OUT/at-<D>d/clean: right after a clean stop;
OUT/at-<D>d/crash: just before a periodic snapshot, the most records since a sealed one). For each, in the same
run: `recover()` as `Daemon.start` runs it (verify from the newest sealed snapshot's segment on, replay what
follows), median wall and CPU of R rounds; and the whole `Daemon.start` (writer open with its torn-tail check,
recover, start records, every pump's channel, the start-up snapshot, signed and synced) on a scratch copy, once
per round, on model pumps (bench/synth_log.py) — the time from start to every pump supervised. The reference is
the same measurement on the 5-day log. With --check, recovery's states are compared with replay of the whole log
(slow: use on the short logs).

usage: python bench/restart_history.py OUT [--rounds 5] [--check 5d 30d]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, say, table
from synth_log import StepClock, config_for, copy_log, model_pumps

from driverd.audit.reader import iter_records
from driverd.audit.replay import Replayer
from driverd.audit.segments import list_segments
from driverd.audit.snapshot import SNAPSHOT_EVENT
from driverd.runtime import daemon as daemon_module
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import DEMO_TRUST
from driverd.runtime.recovery import recover
from driverd.signing import TrustStore


def timed_recover(audit: Path, trust: TrustStore, rounds: int) -> tuple[float, float, Any]:
    walls, cpus, out = [], [], None
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        out = recover(audit, trust)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return median(walls), median(cpus), out


async def _start_once(out: Path, audit: Path, pumps: list[str], scratch: Path) -> tuple[float, float]:
    copy_log(audit, scratch / "audit")
    config = config_for(scratch, pumps, 60.0, out / "keys" / "audit.key")
    last = daemon_module._last_logged_ts(scratch / "audit")
    assert last is not None
    clock = StepClock(last)  # course time goes on from the log's last record (no clock step at start)
    with model_pumps(clock, {}):
        daemon = Daemon(config, clock)
        t0, c0 = time.perf_counter(), time.process_time()
        await daemon.start()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        await daemon.stop_channels()
        assert daemon.audit is not None
        daemon.audit.close()
    return wall, cpu


def timed_start(out: Path, audit: Path, pumps: list[str], rounds: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(rounds):
        scratch = Path(tempfile.mkdtemp(prefix="restart-", dir=out))
        try:
            wall, cpu = asyncio.run(_start_once(out, audit, pumps, scratch))
        finally:
            shutil.rmtree(scratch)
        walls.append(wall)
        cpus.append(cpu)
    return median(walls), median(cpus)


def replay_states(audit: Path) -> dict[str, Any]:
    replayer = Replayer()
    for rec in iter_records(audit):
        replayer.add(rec)
    assert replayer.finish().ok
    return replayer.states()


def newest_snapshot_bytes(audit: Path) -> int:
    for _, path in reversed(list_segments(audit)):
        sizes = [len(line) for line in path.read_bytes().splitlines() if b'"event":"state_snapshot"' in line]
        if sizes:
            return sizes[-1]
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="bench/synth_log.py's output directory")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check", nargs="*", default=[], help="labels (e.g. 5d) whose recovery is checked vs replay")
    args = ap.parse_args()
    say("machine:", machine(args.out))
    trust = TrustStore.load(DEMO_TRUST)
    labels = sorted((p.name.removeprefix("at-") for p in args.out.glob("at-*d")), key=lambda s: float(s[:-1]))
    rows = []
    for label in labels:
        for kind in ("clean", "crash"):
            audit = args.out / f"at-{label}" / kind
            if not audit.is_dir():
                continue  # e.g. bench/upgrade_once.py keeps only the clean copy
            segs = list_segments(audit)
            if not segs:
                continue
            size = sum(p.stat().st_size for _, p in segs)
            pumps = sorted({p for snap in [_last_snapshot(audit)] for p in snap.get("states", {})})
            wall, cpu, rec = timed_recover(audit, trust, args.rounds)
            s_wall, s_cpu = timed_start(args.out, audit, pumps, args.rounds)
            checked = ""
            if label in args.check:
                assert rec.states == replay_states(audit), f"{label} {kind}: recovery differs from replay"
                checked = " (= replay)"
            rows.append([label, kind, len(pumps), f"{size / 1e6:,.1f} MB", len(segs),
                         f"{newest_snapshot_bytes(audit) / 1e6:.2f} MB", f"{rec.records:,}",
                         f"{wall:.3f} s (CPU {cpu:.3f}){checked}", f"{s_wall:.3f} s (CPU {s_cpu:.3f})"])
            say(rows[-1])
    say()
    say(table(["history", "stop", "pumps", "log", "segments", "newest snapshot", "records replayed",
               "recover()", "Daemon.start (to every pump supervised)"], rows))
    say("load at end:", machine())


def _last_snapshot(audit: Path) -> dict[str, Any]:
    for _, path in reversed(list_segments(audit)):
        found = None
        for rec in iter_records(path):
            if rec.get("event") == SNAPSHOT_EVENT:
                found = rec
        if found is not None:
            return found
    return {}


if __name__ == "__main__":
    main()
