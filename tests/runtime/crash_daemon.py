"""Run the daemon on a sim:// pump in virtual time, continuing an existing audit log (for SIGKILL tests).

usage: crash_daemon.py AUDIT_DIR KEY_DIR
First run pushes a signed demo schedule; a restart recovers from the log, resumes as a clinician would, and
runs until the course stops. Prints "ready" once started, "done" when the course has stopped.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from driverd.audit.reader import iter_records
from driverd.audit.segments import list_segments
from driverd.core.state import Phase
from driverd.runtime.clock import VirtualClock
from driverd.runtime.config import AuditSettings, DaemonConfig, PumpConfig
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import CONFIG_DIR, DEMO_TRUST, START, demo_schedule
from simulators.world import World


def last_time(audit_dir: Path) -> datetime | None:
    segs = list_segments(audit_dir) if audit_dir.is_dir() else []
    last = None
    for _, path in segs:
        for rec in iter_records(path):
            last = rec.get("ts")
    return datetime.fromisoformat(last) if last else None


async def main(audit_dir: Path, key_dir: Path) -> None:
    resumed_from = last_time(audit_dir)
    clock = VirtualClock((resumed_from + timedelta(seconds=1)) if resumed_from else START)
    world = World(clock)
    world.pump("bed-1", diameter_mm=Decimal("21.59"), fill_volume_ml=Decimal("22"))
    config = DaemonConfig(
        path=key_dir / "x.toml", sha256="crash-test", protocol=CONFIG_DIR / "protocols" / "ketamine-burst.toml",
        audit_dir=audit_dir, audit_key=key_dir / "audit.key", trust_dir=DEMO_TRUST,
        control_socket=key_dir / "sock", socket_mode=0o660, poll_period_s=600, link_timeout_s=1200,
        deadman_s=0, driver_timeout_s=1.0, pumps=(PumpConfig("bed-1", "sim://bed-1"),),
        audit=AuditSettings(checkpoint_every_records=50, checkpoint_every_s=3600, group_commit_ms=1,
                            group_commit_records=4),
    )
    daemon = Daemon(config, clock, world=world)
    await daemon.start()
    print("ready", flush=True)
    if resumed_from is None:
        reply = await daemon.push_schedule(demo_schedule("bed-1", 1, START))
        print(json.dumps({"push": reply.get("ok")}), flush=True)
    else:
        await asyncio.sleep(0)
        reply = await daemon.command("bed-1", "resume", "test-nurse", "after restart")
        print(json.dumps({"resume": reply}), flush=True)
    ch = daemon.channels["bed-1"]
    clock.register()  # this loop is a participant: virtual time waits for its real-time pause each step
    while ch.state.phase is not Phase.STOPPED and clock.now() < START + timedelta(days=12):
        await clock.sleep_until(clock.now() + timedelta(seconds=600))
        daemon.tick_audit()
        if ch.state.phase in (Phase.PAUSED, Phase.ALARM) and ch.state.pending is None:
            await daemon.command("bed-1", "resume", "test-nurse", "checked")
        await asyncio.sleep(0.005)  # real time passes (~4 s a course), so a SIGKILL lands mid-course
    clock.unregister()
    await daemon.stop()
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
