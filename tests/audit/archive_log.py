"""A log for the archive tests and bench, made by the real demo path: `run_demo` (what `driverd demo --audit` runs)
gives finished courses on `pumps` simulated pumps; then a daemon restarted on the same log (same key) takes a new
signed course on bed-1 a day after they ended and runs it for `live_hours`: that course is live."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from driverd.runtime.clock import VirtualClock
from driverd.runtime.config import AuditSettings, DaemonConfig, PumpConfig
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import CONFIG_DIR, DEMO_TRUST, START, SYRINGE, DemoOptions, demo_schedule, run_demo
from simulators.world import World

LIVE_START = START + timedelta(days=6)  # the live course's push (the demo's courses end on day 5)


@dataclass(frozen=True)
class ArchiveLog:
    audit: Path
    key: Path  # the daemon's audit key (PEM private)
    pub: Path
    live_course: str


def make_log(work: Path, pumps: int = 2, live_hours: int = 13, *, snapshot_every: timedelta | None = None,
             poll_s: int = 60, deltas: bool = True) -> ArchiveLog:
    """Takes a few seconds (a 5-day course per pump in virtual time). snapshot_every: full snapshots this often
    (default 6 h, more often than the shipped 24 h: the live course of 13 h then has full snapshots, the only
    segments archive may cut at, besides its start); poll_s: the demo's poll (a longer one writes fewer records);
    deltas=False: no state deltas (each opens a segment: far fewer segments)."""
    from driverd.runtime import daemon as daemon_module

    audit = work / "audit"
    shipped = daemon_module.SNAPSHOT_EVERY
    shipped_deltas = daemon_module.DELTA_RECORDS, daemon_module.DELTA_EVERY
    daemon_module.SNAPSHOT_EVERY = snapshot_every or timedelta(hours=6)
    if not deltas:
        daemon_module.DELTA_RECORDS, daemon_module.DELTA_EVERY = 10**12, timedelta(days=10**4)
    try:
        result = asyncio.run(run_demo(DemoOptions(pumps=pumps, audit_dir=audit, poll_period_s=poll_s,
                                                  deadman_s=max(180, 3 * poll_s))))
        key = result.audit_public_key.with_suffix(".key")
        course = asyncio.run(run_daemon(audit, key, pumps, LIVE_START, live_hours, push=True))
    finally:
        daemon_module.SNAPSHOT_EVERY = shipped
        daemon_module.DELTA_RECORDS, daemon_module.DELTA_EVERY = shipped_deltas
    return ArchiveLog(audit, key, result.audit_public_key, course)


async def run_daemon(audit: Path, key: Path, pumps: int, start: datetime, hours: int, *, push: bool) -> str:
    """A daemon on the sim pumps started on `audit` at `start` (its start-up recovers every course from the log),
    run for `hours`, then stopped. push: a new course on bed-1 first (returns its id)."""
    clock = VirtualClock(start)
    clock.register()  # time moves only while this waits
    world = World(clock)
    names = [f"bed-{i + 1}" for i in range(pumps)]
    for n in names:
        world.pump(n, diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]), fill_volume_ml=Decimal("22"))
    config = DaemonConfig(
        path=audit.parent / "driverd.toml", sha256="archive-test", protocol=CONFIG_DIR / "protocols" /
        "ketamine-burst.toml", audit_dir=audit, audit_key=key, trust_dir=DEMO_TRUST,
        control_socket=audit.parent / "control.sock", socket_mode=0o600, poll_period_s=60.0, link_timeout_s=120.0,
        deadman_s=180, driver_timeout_s=1.0, pumps=tuple(PumpConfig(n, f"sim://{n}") for n in names),
        audit=AuditSettings(checkpoint_every_records=1000, checkpoint_every_s=3600, group_commit_ms=200,
                            group_commit_records=512),
        mode="bench",
    )
    daemon = Daemon(config, clock, world=world)
    await daemon.start()
    course = ""
    try:
        if push:
            doc = demo_schedule("bed-1", pumps + 1, start)  # another patient (the exposure gap)
            reply = await daemon.push_schedule(doc)
            assert reply.get("ok"), reply
            course = str(doc["schedule_id"])
        for h in range(1, hours + 1):
            await asyncio.wait_for(clock.sleep_until(start + timedelta(hours=h, seconds=30)), 60)
            daemon.tick_audit()  # the runtime's audit timer: group commit, and a snapshot when one is due
    finally:
        clock.unregister()
        with contextlib.suppress(Exception):
            await daemon.stop()
    return course


def snapshot_times(audit: Path) -> list[datetime]:
    from driverd.audit.canonical import parse_ts
    from driverd.audit.reader import iter_records

    return [parse_ts(r["ts"]) for r in iter_records(audit) if r["event"] == "state_snapshot"]
