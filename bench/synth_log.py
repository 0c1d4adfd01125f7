"""A long, real audit log fast: N pumps running burst courses back to back for D days (issue #12 item 1's year).

Not a record forger: the log is written by the daemon's own code, only without the event loop's timers and the
simulator's wire. `Daemon.start` opens the writer and recovers (as at any start-up), the channels it builds feed
the pure core and log every input and command (`Channel.cycle`: clock check, poll with telemetry compaction, tick,
prime, syringe load; setpoints written ahead), schedules are signed with the DEMO key and pushed through
`Daemon.push_schedule` (signature, replay protection, exposure checks, served by the channel's own task),
snapshots come from `Daemon.maybe_snapshot` (every `daemon.SNAPSHOT_EVERY` of course time), a clean stop is
`Daemon.stop`. What is synthetic:

- the clock (`StepClock`): course time is set by this script, from poll to poll (the channels' own tasks only
  serve requests: their timers never fire);
- the pump (`ModelPump`, a `PumpDriver`): it does exactly what it is told (the programmed rate, read back as
  set), and its delivered counter integrates the rate over course time, shown at the New Era resolution like
  `sim://`. With `--faults R`, each course of a pump gets an occlusion with probability R (seeded): the pump
  stops in alarm and a clinician resumes an hour later through `Daemon.command`, as the demo's fault script does.

Each pump runs one whole course after another (titrate, hold, taper, stop: the shipped example re-dated, a new
schedule id, patient and signature per course, `runtime.demo.demo_schedule`), the first ones staggered across
the first course's length. `--restart-at DAYS...`: at each of those days the daemon stops cleanly and starts
again on the same log (as a maintenance restart does), and copies of the log are kept in OUT/at-<D>d/: `clean/`
right after the stop, `crash/` just before the first snapshot (or state delta) the daemon writes from that day on
(the worst point for a crash: the most records since the newest sealed state). Copies hard-link the sealed
segments (they never change).

usage: python bench/synth_log.py OUT --pumps 32 --days 365 [--poll 60] [--faults 0.1] [--restart-at 5 30 90]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest import mock

from driverd import resources
from driverd.audit.segments import list_segments
from driverd.core.quantities import NEW_ERA_RESOLUTION, quantize_down
from driverd.core.state import Phase
from driverd.core.syringe_limits import NE1000_PLUNGER
from driverd.runtime import daemon as daemon_module
from driverd.runtime.config import AuditSettings, DaemonConfig, PumpConfig
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import DEMO_TRUST, SYRINGE, demo_schedule
from driverd.signing import generate_keypair
from drivers.base import (
    AlarmKind,
    DriverOptions,
    Identity,
    PumpAlarm,
    PumpDriver,
    PumpRejected,
    PumpState,
    PumpStatus,
)
from drivers.url import DriverURL, parse_url

START = datetime(2026, 1, 1, 8, 55, tzinfo=UTC)
COURSE = timedelta(days=5, minutes=5)  # push to stop of the example course (steps every 24 h, 5 min after push)
HOUR = Decimal(3600)


class StepClock:
    """Course time as this script sets it. Sleeping participants (the channels' tasks, between requests) are woken
    only by a request (`wake`), never by time: the script runs each poll itself."""

    def __init__(self, start: datetime) -> None:
        self.at = start

    def now(self) -> datetime:
        return self.at

    def wall(self) -> datetime:
        return self.at

    def floor(self, at_least: datetime) -> None:
        self.at = max(self.at, at_least)

    def register(self) -> None:
        pass

    def unregister(self) -> None:
        pass

    async def sleep_until(self, when: datetime, *, wake: asyncio.Future[Any] | None = None) -> None:
        await (wake if wake is not None else asyncio.get_running_loop().create_future())


class ModelPump(PumpDriver):
    """A pump that does what it is told: the programmed rate, a counter integrating it over course time."""

    scheme = "synth"
    resolution = NEW_ERA_RESOLUTION

    def __init__(self, url: DriverURL, options: DriverOptions | None, clock: StepClock) -> None:
        super().__init__(url, options)
        self.clock = clock
        self.state = PumpState.STOPPED
        self.rate = Decimal(0)
        self.diameter = Decimal(SYRINGE["inner_diameter_mm"])
        self.alarms: frozenset[AlarmKind] = frozenset()
        self._base = Decimal(0)  # delivered at `_since` (exact)
        self._since = clock.now()

    def _delivered(self) -> Decimal:
        if self.state is not PumpState.INFUSING:
            return self._base
        seconds = Decimal(int((self.clock.now() - self._since).total_seconds()))
        return self._base + self.rate * seconds / HOUR

    def _settle(self, state: PumpState) -> None:
        """Change state: the volume so far becomes the new base."""
        self._base, self._since, self.state = self._delivered(), self.clock.now(), state

    def occlude(self) -> None:
        self._settle(PumpState.ALARM)
        self.alarms = frozenset({AlarmKind.OCCLUSION})

    def _accepts(self) -> None:
        if self.state is PumpState.ALARM:
            raise PumpAlarm("pump in alarm", alarms=self.alarms)

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def identify(self) -> Identity:
        return Identity(model="NE-1000", firmware="synth", address=self.url.path)

    async def configure_syringe(self, diameter_mm: Decimal) -> Decimal:
        self._accepts()
        self.diameter = diameter_mm
        return diameter_mm

    def rate_range(self, diameter_mm: Decimal) -> tuple[Decimal, Decimal]:
        # An NE-1000's mechanism (the daemon primes no course on a pump whose driver states no range).
        return NE1000_PLUNGER.range_ml_per_h(diameter_mm, NEW_ERA_RESOLUTION)

    async def clear_delivered(self) -> Decimal:
        # The channel clears the counter at every prime and syringe load (a stopped pump), so it never runs on
        # from course to course into the 0.1 mL steps a 4-significant-digit display shows past 100 mL.
        self._accepts()
        if self.state is PumpState.INFUSING:
            raise PumpRejected("clear_delivered: infusing", code="NA")
        self._settle(self.state)
        self._base = Decimal(0)
        return quantize_down(self._delivered(), self.resolution)

    async def set_rate(self, rate_ml_per_h: Decimal) -> Decimal:
        self._accepts()
        self._settle(self.state)
        self.rate = rate_ml_per_h
        return rate_ml_per_h

    async def run(self) -> None:
        self._accepts()
        self._settle(PumpState.INFUSING)

    async def stop(self) -> None:
        if self.state is not PumpState.ALARM:
            self._settle(PumpState.STOPPED)

    async def clear_alarm(self) -> None:
        if self.state is PumpState.ALARM:
            self._settle(PumpState.STOPPED)
            self.alarms = frozenset()

    async def read_status(self) -> PumpStatus:
        return PumpStatus(self.state, self.rate, quantize_down(self._delivered(), self.resolution), self.diameter,
                          self.alarms)


@dataclass
class Plan:
    """One pump's courses: when the next is pushed, and the occlusion (if any) of the running one."""

    next_push: datetime
    courses: int = 0
    occlude_at: datetime | None = None
    resume_at: datetime | None = None


@dataclass
class Stats:
    courses: int = 0
    occlusions: int = 0
    restarts: list[dict[str, Any]] = field(default_factory=list)
    polls: int = 0


@contextmanager
def model_pumps(clock: StepClock, pumps: dict[str, ModelPump]) -> Iterator[None]:
    """`Daemon.start` opens each pump's driver by URL: here every URL gets (and keeps across restarts) its model."""

    def opened(url: str | DriverURL, options: DriverOptions | None = None) -> PumpDriver:
        parsed = parse_url(url) if isinstance(url, str) else url
        if parsed.path not in pumps:
            pumps[parsed.path] = ModelPump(parsed, options, clock)
        return pumps[parsed.path]

    with mock.patch.object(daemon_module, "open_driver", opened):
        yield


def copy_log(src: Path, dst: Path) -> None:
    """Sealed segments hard-linked, the open (last) one copied: the writer appends to it after a reopen."""
    dst.mkdir(parents=True)
    segs = list_segments(src)
    for i, (_, path) in enumerate(segs):
        if i < len(segs) - 1:
            os.link(path, dst / path.name)
        else:
            shutil.copy2(path, dst / path.name)


def config_for(out: Path, names: list[str], poll_s: float, key: Path) -> DaemonConfig:
    return DaemonConfig(
        path=out / "driverd.toml", sha256="synth", protocol=resources.PROTOCOL, audit_dir=out / "audit",
        audit_key=key, trust_dir=DEMO_TRUST, control_socket=out / "control.sock", socket_mode=0o660,
        poll_period_s=poll_s, link_timeout_s=poll_s * 2, deadman_s=180, driver_timeout_s=1.0,
        pumps=tuple(PumpConfig(n, f"sim://{n}") for n in names),
        audit=AuditSettings(),  # the daemon's defaults (driverd.toml without an [audit] table)
        mode="bench",
    )


async def generate(out: Path, pumps: int, days: float, poll_s: float, faults: float, restart_at: list[float],
                   seed: int = 1, progress: bool = False, sync: bool = True) -> Stats:
    """`sync=False`: the writer's fdatasync calls do nothing (the bytes written are the same; a generated log need
    not survive a power cut while it is made, and each signed checkpoint would otherwise wait for the disk)."""
    if not sync:
        with mock.patch("os.fdatasync", lambda _fd: None):
            return await generate(out, pumps, days, poll_s, faults, restart_at, seed, progress, True)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (nothing else runs on this loop: blocking is fine)
    key, _ = generate_keypair(out / "keys", "audit")
    names = [f"bed-{i + 1}" for i in range(pumps)]
    config = config_for(out, names, poll_s, key)
    clock = StepClock(START)
    models: dict[str, ModelPump] = {}
    rng = random.Random(seed)
    stats = Stats()
    poll = timedelta(seconds=poll_s)
    end = START + timedelta(days=days)
    stagger = COURSE / max(pumps, 1)
    plans = {n: Plan(START + i * stagger) for i, n in enumerate(names)}
    stops = sorted(START + timedelta(days=d) for d in restart_at)
    started = time.perf_counter()
    with model_pumps(clock, models):
        daemon = Daemon(config, clock)
        await daemon.start()
        while clock.at < end or stops:  # a restart at the last day is taken after it
            clock.at += poll
            now = clock.at
            for name in names:
                await course_events(daemon, models, plans[name], name, now, rng, faults, stats)
            for ch in daemon.channels.values():
                await ch.cycle()
            stats.polls += len(names)
            due = stops[0] if stops else None
            assert daemon.audit is not None
            crash_due = due is not None and now >= due
            if crash_due:
                # Until the daemon next writes a snapshot (or delta): the log as it is now, kept each round, is the
                # worst crash point when that write comes (the most records since the newest sealed state).
                daemon.audit.flush()
                crash = out / f"at-{label(due)}" / "crash"
                if crash.exists():
                    shutil.rmtree(crash)
                copy_log(config.audit_dir, crash)
            before = daemon.audit.seq
            daemon.maybe_snapshot()  # the daemon's own policy decides (interval, deltas)
            daemon.audit.flush_due()
            if due is not None and crash_due and daemon.audit.seq != before:
                stops.pop(0)
                await daemon.stop()
                copy_log(config.audit_dir, out / f"at-{label(due)}" / "clean")
                t0 = time.perf_counter()
                daemon = Daemon(config, clock)
                await daemon.start()  # recovery from the log as written so far
                stats.restarts.append({"day": label(due), "start_s": time.perf_counter() - t0,
                                       "at_s": time.perf_counter() - started})
            if progress and stats.polls % (len(names) * 1440) == 0:
                print(f"  {(now - START) / timedelta(days=1):.0f} d, {time.perf_counter() - started:.0f} s",
                      file=sys.stderr, flush=True)
        await daemon.stop()
    return stats


def label(at: datetime) -> str:
    days = (at - START) / timedelta(days=1)
    return f"{days:g}d"


async def course_events(daemon: Daemon, models: dict[str, ModelPump], plan: Plan, name: str, now: datetime,
                        rng: random.Random, faults: float, stats: Stats) -> None:
    """The ward around one pump: the next course pushed once the last has ended; an occlusion and its resume."""
    state = daemon.channels[name].state
    if state.phase is Phase.ALARM and plan.resume_at is None:
        # Only the occlusions drawn here are expected: anything else would leave the pump idle (not the worst case).
        raise RuntimeError(f"{name}: unexpected alarm at {now}: {', '.join(state.alarm_causes)}")
    if plan.occlude_at is not None and now >= plan.occlude_at:
        plan.occlude_at = None
        if state.phase in (Phase.TITRATING, Phase.HOLDING, Phase.TAPERING):
            models[name].occlude()
            plan.resume_at = now + timedelta(hours=1)
            stats.occlusions += 1
    if plan.resume_at is not None and now >= plan.resume_at:
        plan.resume_at = None
        reply = await daemon.command(name, "resume", "synth-nurse", "line checked, occlusion cleared")
        if not reply.get("ok"):
            raise RuntimeError(f"{name}: resume refused at {now}: {reply}")
    idle = state.schedule is None or (state.phase is Phase.STOPPED and not state.summary_due)
    if now >= plan.next_push and idle and plan.resume_at is None:
        plan.courses += 1
        stats.courses += 1
        # The example course re-dated to now: a new schedule id (per pump and start date), patient and signature.
        doc = demo_schedule(name, stats.courses, now)
        doc_id = doc["schedule_id"]
        reply = await daemon.push_schedule(doc)
        if not reply.get("ok"):
            raise RuntimeError(f"{name}: course {doc_id} refused at {now}: {reply}")
        plan.next_push = now + COURSE
        if faults and rng.random() < faults:
            plan.occlude_at = now + timedelta(seconds=rng.randrange(6 * 3600, 4 * 86400))


def main() -> None:
    global START  # --start: generate() and label() read it
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a new directory (the log is OUT/audit)")
    ap.add_argument("--pumps", type=int, default=32)
    ap.add_argument("--days", type=float, default=5)
    ap.add_argument("--poll", type=float, default=60.0, help="poll period, seconds (the daemon's poll_period_s)")
    ap.add_argument("--faults", type=float, default=0.0, help="probability of an occlusion per course")
    ap.add_argument("--restart-at", type=float, nargs="*", default=[], help="days: clean restart, copies kept")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=date.fromisoformat, default=START.date(),
                    help=f"first day, YYYY-MM-DD (default {START.date()}); bench/restart_exec.py needs a log that "
                    "ends before the wall clock (a daemon started behind its log's last record raises a clock fault)")
    ap.add_argument("--no-sync", action="store_true", help="skip the writer's fdatasync calls (same bytes, faster)")
    args = ap.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"{args.out} is not empty")
    START = datetime.combine(args.start, START.timetz())
    t0, c0 = time.perf_counter(), time.process_time()
    stats = asyncio.run(generate(args.out, args.pumps, args.days, args.poll, args.faults, args.restart_at,
                                 args.seed, progress=True, sync=not args.no_sync))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    segs = list_segments(args.out / "audit")
    size = sum(p.stat().st_size for _, p in segs)
    records = sum(p.read_bytes().count(b"\n") for _, p in segs)
    print(f"{args.pumps} pumps x {args.days:g} days at a {args.poll:g} s poll: {stats.courses} courses, "
          f"{stats.occlusions} occlusions, {stats.polls:,} polls")
    print(f"log: {len(segs)} segments, {records:,} records, {size / 1e6:.1f} MB "
          f"({size / 1e6 / (args.pumps * args.days):.2f} MB per pump-day)")
    print(f"generation: wall {wall:.1f} s, CPU {cpu:.1f} s ({stats.polls / wall:,.0f} polls/s, "
          f"{records / wall:,.0f} records/s)")
    for r in stats.restarts:
        print(f"restart at {r['day']}: Daemon.start {r['start_s']:.3f} s (at {r['at_s']:.0f} s into the run)")


if __name__ == "__main__":
    main()
