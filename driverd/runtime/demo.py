"""`driverd demo`: simulators + the daemon in one process, a whole burst course on the real driver path.

Each simulated pump gets its own schedule, generated from the shipped example schedule (config/schedules/ in the
repo) and signed with the DEMO key at start (the key is for demos only). The daemon sees exactly what a ward
system would push.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from driverd import resources
from driverd.core.records import fmt_time
from driverd.core.schedule_parse import load_json
from driverd.core.state import Phase
from driverd.hl7.settings import Address, Hl7Settings
from driverd.runtime.channel import Channel
from driverd.runtime.clock import PacedClock, RuntimeClock, VirtualClock
from driverd.runtime.config import AuditSettings, DaemonConfig, PumpConfig
from driverd.runtime.daemon import Daemon
from driverd.signing import generate_keypair, sign_document
from simulators.world import World

CONFIG_DIR = resources.DATA_DIR  # the shipped data (driverd/resources.py): works from a wheel as from a checkout
DEMO_KEY = resources.DEMO_PRIVATE_KEY
DEMO_TRUST = resources.DEMO_TRUST_DIR
START = datetime(2026, 12, 1, 8, 55, tzinfo=UTC)  # five minutes before the first step is due
# A 30 mL syringe at 100 mg/mL holds the whole course (about 19 mL): what `demo_schedule` (and the tests' rig) use.
SYRINGE = {"model": "BD Plastipak 30 mL", "inner_diameter_mm": "21.59", "fill_volume_ml": "22"}
CONCENTRATION = "100"
# The demo itself runs the course as a ward would: 8 mL syringes, changed when driverd warns that one is about to
# run empty (issue 13): the course needs 18.97 mL, so two changes per pump.
DEMO_FILL = "8"
DRIVERS = ("sim", "newera", "modbus", "harvard")
HL7_DRAIN_S = 120.0  # real seconds the demo waits for an HL7 receiver to ACK what is still queued
NUDGE_S = 5.0  # real seconds: the course watch looks at least this often, even when no course changes


@dataclass
class DemoOptions:
    driver: str = "sim"
    pumps: int = 1
    speed: float | None = None  # None = as fast as the CPU allows (virtual time); N = never faster than N x real
    audit_dir: Path | None = None
    faults: bool = False
    poll_period_s: float = 60.0
    deadman_s: int = 180
    hl7_to: Address | None = None  # send PCD-01/PCD-04 to this MLLP receiver (an integrator's engine)
    # Where the demo's keys, config and (without audit_dir) log go; None: a new temp dir that the caller owns
    # (`driverd demo` makes it and removes it at exit, see driverd.cli.demo).
    work_dir: Path | None = None


@dataclass
class DemoResult:
    audit_dir: Path
    audit_public_key: Path
    virtual_seconds: float
    pumps: list[dict[str, Any]] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    syringe_log: list[str] = field(default_factory=list)  # the ward's syringe changes, as they happened
    timed_out: bool = False
    hl7: dict[str, Any] | None = None  # what the HL7 gateway queued and delivered (with --hl7-to)


def demo_schedule(pump_id: str, index: int, start: datetime, fill_ml: str | None = None) -> dict[str, Any]:
    """The example schedule re-dated to `start`, for `pump_id`, signed with the DEMO key. With `fill_ml`, syringes
    of that fill, replaced when empty (as many as the course needs)."""
    doc = load_json(resources.EXAMPLE_SCHEDULE.read_bytes())
    assert isinstance(doc, dict)
    first = start + timedelta(minutes=5)
    doc["schedule_id"] = f"demo-{pump_id}-{start:%Y%m%d}"
    doc["pump_id"] = pump_id
    doc["patient_ref"] = f"DEMO-PATIENT-{index:04d}"
    doc["drug"] = {"name": "ketamine", "concentration_mg_per_ml": CONCENTRATION}
    doc["syringe"] = dict(SYRINGE)
    if fill_ml is not None:
        doc["syringe"]["fill_volume_ml"] = fill_ml
        doc["syringes"] = [{"fill_volume_ml": fill_ml}] * 4
    for i, step in enumerate(doc["steps"]):
        step["not_before"] = fmt_time(first + timedelta(hours=24 * i))
    doc["approved_at"] = fmt_time(start - timedelta(hours=1))
    doc["expires_at"] = fmt_time(start + timedelta(days=30))
    doc.pop("signature", None)
    return sign_document(doc, DEMO_KEY)


async def run_demo(opts: DemoOptions, progress: Callable[[float, str], None] | None = None) -> DemoResult:
    if opts.driver not in DRIVERS:
        raise ValueError(f"driver must be one of {', '.join(DRIVERS)}")
    # One clock for the daemon and the simulated pumps. With --speed N it is paced, not scaled: time still jumps
    # from wake-up to wake-up (a late poll cannot fall behind the pump's dead-man), only never faster than N x real.
    clock: RuntimeClock = VirtualClock(START) if opts.speed is None else PacedClock(START, opts.speed)
    world = World(clock)
    names = [f"bed-{i + 1}" for i in range(opts.pumps)]
    resolution_kw: dict[str, Any] = {}
    if opts.driver == "modbus":
        from drivers.modbus.regmap import load_map
        from simulators.modbus import SIM_FIRMWARE, SIM_MODEL

        # The simulated device the shipped map names (the driver checks its model register against the map's
        # product_code): serve_modbus takes these pumps as they are made here.
        resolution_kw.update(rate_resolution=load_map().rate_resolution(), model=SIM_MODEL, firmware=SIM_FIRMWARE)
    if opts.driver == "harvard":
        from simulators.harvard import elite_model_kwargs

        resolution_kw.update(elite_model_kwargs())
    for name in names:
        world.pump(name, diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]), fill_volume_ml=Decimal(DEMO_FILL),
                   **resolution_kw)
    work = opts.work_dir if opts.work_dir is not None else Path(tempfile.mkdtemp(prefix="driverd-demo-"))
    audit_dir = opts.audit_dir or work / "audit"
    key_path, pub_path = generate_keypair(work / "keys", "audit")
    async with contextlib.AsyncExitStack() as stack:
        urls = await _start_simulators(stack, opts.driver, world, names)
        config = DaemonConfig(
            path=work / "driverd.toml", sha256="demo", protocol=resources.PROTOCOL,
            audit_dir=audit_dir, audit_key=key_path, trust_dir=DEMO_TRUST, control_socket=work / "control.sock",
            socket_mode=0o660, poll_period_s=opts.poll_period_s, link_timeout_s=opts.poll_period_s * 2,
            deadman_s=opts.deadman_s, driver_timeout_s=1.0,
            pumps=tuple(PumpConfig(n, urls[n]) for n in names),
            audit=AuditSettings(checkpoint_every_records=1000, checkpoint_every_s=3600, group_commit_ms=200,
                                group_commit_records=512),
            mode="bench",  # simulated pumps and the DEMO key
            hl7=None if opts.hl7_to is None else Hl7Settings(queue_dir=work / "hl7", observations_to=opts.hl7_to,
                                                             sending_application="DRIVERD-DEMO"),
        )
        daemon = Daemon(config, clock, world=world)
        await daemon.start()
        try:
            for i, name in enumerate(names):
                reply = await daemon.push_schedule(demo_schedule(name, i + 1, START, DEMO_FILL))
                if not reply.get("ok"):
                    raise RuntimeError(f"demo schedule refused for {name}: {json.dumps(reply)}")
            fault_log: list[str] = []
            script = asyncio.create_task(_fault_script(daemon, world, clock, names[0], fault_log,
                                                       ack_at_pump=opts.driver == "harvard")) if opts.faults else None
            syringe_log: list[str] = []
            nurse = asyncio.create_task(_nurse(daemon, world, clock, names, syringe_log))
            timed_out = await _wait_for_courses(daemon, clock, progress)
            for task in (script, nurse):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            hl7 = await _drain_hl7(daemon)
        finally:
            await daemon.stop()
    elapsed = (clock.now() - START).total_seconds()
    result = DemoResult(audit_dir=audit_dir, audit_public_key=pub_path, virtual_seconds=elapsed, timed_out=timed_out,
                        faults=fault_log, syringe_log=syringe_log, hl7=hl7)
    for name in names:
        ch = daemon.channels[name]
        result.pumps.append({"pump_id": name, "phase": ch.state.phase.value, "url": ch.driver.url.raw,
                             "delivered_ml": ch.state.delivered_ml, "delivered_mg": ch.state.delivered_mg,
                             "syringe_changes": ch.state.syringe_changes, "polls": ch.polls})
    return result


async def _start_simulators(stack: contextlib.AsyncExitStack, driver: str, world: World, names: list[str]) -> dict[
        str, str]:
    if driver == "sim":
        return {n: f"sim://{n}" for n in names}
    if driver == "newera":
        from simulators.newera import serve_newera

        urls = {}
        for n in names:
            ep = await stack.enter_async_context(serve_newera(world.pump(n), world.faults(n), pty=True))
            urls[n] = ep.url
        return urls
    if driver == "harvard":
        from simulators.harvard import serve_harvard

        urls = {}
        for n in names:
            elite = await stack.enter_async_context(serve_harvard(world.pump(n), world.faults(n), pty=True))
            # The Pump 11 Elite has no dead-man: a bench may run it, with the driver's loud warning on every connect.
            urls[n] = elite.url + "&without_deadman=allow"
        return urls
    from simulators.modbus import serve_modbus

    units = {i + 1: n for i, n in enumerate(names)}
    gateway = await stack.enter_async_context(serve_modbus(world, units, tcp_port=0))
    return {n: gateway.url(u) for u, n in units.items()}


async def _wait_for_courses(daemon: Daemon, clock: RuntimeClock, progress: Callable[[float, str], None] | None) -> bool:
    """Until every course has stopped and its end-of-course record is out (the first report of the stopped pump),
    so the run is judged on its whole record. True if it gave up at the virtual limit (two days past the plan)."""
    limit = START + timedelta(days=7)
    total = timedelta(days=5, minutes=5).total_seconds()
    return await _watch_courses(daemon, clock, progress, limit, total)


class _CourseWatch:
    """What the demo does after each course change (a daemon listener), at the turn of the event loop where its
    watch loop, woken by the change, used to do it: the same work at the same points, without a task switch per
    poll when there is nothing to decide.

    After a change the loop checks whether every course is over or the 7-day limit is reached (then the demo ends),
    writes a state snapshot if one is due and syncs telemetry if the group commit is due. The loop itself is woken
    only when its check can end the demo: a stopped course, or within a poll period of the limit (virtual time
    moves at most one poll period between a change and that turn: the changing channel sleeps until its next poll
    at the latest). Otherwise the snapshot and the group commit run in a callback queued where the loop's wake-up
    would have been (`tests/runtime/test_demo_watch.py`: the same run and log, record for record). With a progress
    display every change wakes the loop, as before."""

    def __init__(self, daemon: Daemon, clock: RuntimeClock, every_change: bool, limit: datetime) -> None:
        self.daemon, self.clock, self.every_change = daemon, clock, every_change
        self.loop = asyncio.get_running_loop()
        self.wake: asyncio.Future[bool] | None = None  # the loop's wait (the result is unused)
        margin = max((ch.poll_period for ch in daemon.channels.values()), default=timedelta(0))
        self.gate_at = limit - margin
        self._queued = False  # an audit turn is queued

    def on_change(self, channel: Channel) -> None:
        wake = self.wake
        if wake is None or wake.done():
            return  # the loop is awake: it does the work itself
        if self.every_change or channel.state.phase is Phase.STOPPED or self.clock.now() >= self.gate_at:
            wake.set_result(True)
        elif not self._queued:
            self._queued = True
            self.loop.call_soon(self._audit_turn)

    def nudge(self) -> None:
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(True)

    def _audit_turn(self) -> None:
        self._queued = False
        wake = self.wake
        if wake is None or wake.done() or self.daemon.audit is None:
            return
        try:
            self.daemon.maybe_snapshot()
            self.daemon.audit.flush_due()
        except BaseException as exc:  # the loop raises it, as when it did this work itself
            wake.set_exception(exc)


async def _watch_courses(daemon: Daemon, clock: RuntimeClock, progress: Callable[[float, str], None] | None,
                         limit: datetime, total: float) -> bool:
    watch = _CourseWatch(daemon, clock, progress is not None, limit)
    daemon.listeners.append(watch.on_change)
    loop = asyncio.get_running_loop()
    # At least every NUDGE_S real seconds even when no course changes (the loop's old 5-s timeout).
    timer: asyncio.TimerHandle

    def repeat() -> None:
        nonlocal timer
        watch.nudge()
        timer = loop.call_later(NUDGE_S, repeat)

    timer = loop.call_later(NUDGE_S, repeat)
    try:
        while True:
            phases = [ch.state.phase for ch in daemon.channels.values()]
            if progress is not None:
                done = min((clock.now() - START).total_seconds() / total, 1.0)
                progress(done, ", ".join(sorted({p.value for p in phases})))
            if all(p is Phase.STOPPED and not ch.state.summary_due for p, ch in zip(phases, daemon.channels.values(),
                                                                                   strict=True)):
                return False
            if clock.now() >= limit:
                return True
            watch.wake = loop.create_future()
            await watch.wake
            # Sync telemetry only when the group-commit delay has passed, not on every wake-up. Setpoints and
            # alarms are synced before they act.
            if daemon.audit is not None:
                daemon.maybe_snapshot()
                daemon.audit.flush_due()
    finally:
        watch.wake = None
        daemon.listeners.remove(watch.on_change)
        timer.cancel()


async def _drain_hl7(daemon: Daemon) -> dict[str, Any] | None:
    """--hl7-to: wait (real time, bounded) until the receiver has ACKed every queued message."""
    gw = daemon.gateway
    if gw is None or gw.sender is None:
        return None
    # The courses are over: stop the pumps' channels first, or virtual time (and the periodic observations it
    # drives) would run on while the receiver catches up in real time. The final observations are queued.
    await daemon.stop_channels()
    gw.stop_observing()
    for ch in daemon.channels.values():
        gw.on_change(ch)
    drained = await gw.drain(HL7_DRAIN_S)
    c = gw.sender.counters
    # Delivered means every message reached the receiver and was accepted: none refused by our outbox (dropped)
    # and none refused by the receiver.
    return {"to": str(gw.settings.observations_to), "delivered": drained and gw.dropped == 0 and c.rejected == 0,
            "sent": c.sent, "resent": c.resent, "acked": c.acked, "rejected": c.rejected, "dropped": gw.dropped,
            "pending": len(gw.outbox.pending()) if gw.outbox is not None else 0}


async def _fault_script(daemon: Daemon, world: World, clock: RuntimeClock, name: str, log: list[str], *,
                        ack_at_pump: bool = False) -> None:
    """--faults: an occlusion on day 2 and a cut link on day 3 (a pump with a dead-man stops itself); a clinician
    resumes each after checking.

    ``ack_at_pump``: the pump's stall is acknowledged on the pump itself before the resume (Harvard Elite: its
    stall cannot be acknowledged over the wire)."""
    from drivers.base import AlarmKind

    clock.register()
    try:
        await clock.sleep_until(START + timedelta(hours=36))
        world.pump(name).inject_alarm(AlarmKind.OCCLUSION)
        log.append(f"{fmt_time(clock.now())} {name}: occlusion injected at the pump")
        await clock.sleep_until(START + timedelta(hours=37))
        if ack_at_pump:
            world.pump(name).clear_alarm()
            log.append(f"{fmt_time(clock.now())} {name}: stall acknowledged on the pump's screen")
        reply = await daemon.command(name, "resume", "demo-nurse", "line checked, occlusion cleared")
        log.append(f"{fmt_time(clock.now())} {name}: clinician resume -> {_reply(reply)}")
        await clock.sleep_until(START + timedelta(hours=60))
        plan = world.faults(name)
        plan.cut()  # a pulled cable: nothing reaches the pump, so its dead-man stops it
        log.append(f"{fmt_time(clock.now())} {name}: link cut (nothing reaches the pump or comes back)")
        # Ten minutes: well past the link timeout and the pump's dead-man. Not longer, because over a real
        # transport every request lost to the cut waits out its driver timeout in real time.
        await clock.sleep_until(START + timedelta(hours=60, minutes=10))
        plan.restore()
        log.append(f"{fmt_time(clock.now())} {name}: link restored ({plan.lost_requests} requests lost)")
        await clock.sleep_until(START + timedelta(hours=61))
        reply = await daemon.command(name, "resume", "demo-nurse", "pump checked after link loss")
        log.append(f"{fmt_time(clock.now())} {name}: clinician resume -> {_reply(reply)}")
        await clock.sleep_until(START + timedelta(days=30))
    finally:
        clock.unregister()


async def _nurse(daemon: Daemon, world: World, clock: RuntimeClock, names: list[str], log: list[str]) -> None:
    """The ward's syringe changes: when driverd warns that a syringe is about to run empty (or it ran empty), a
    nurse asks for the change (the pump is stopped), swaps the syringe at the pump, and confirms."""
    clock.register()
    try:
        while True:
            await clock.sleep_until(clock.now() + timedelta(minutes=10))
            for name in names:
                state = daemon.channels[name].state
                empty = state.phase is Phase.ALARM and set(state.alarm_causes) == {"syringe_empty"}
                if state.syringe_change is not None or not (state.empty_warned or empty):
                    continue
                if state.phase not in (Phase.TITRATING, Phase.HOLDING, Phase.TAPERING) and not empty:
                    continue
                pump = world.pump(name)
                if empty:
                    pump.clear_alarm()  # acknowledged at the pump before the swap
                first = await daemon.change_syringe(name, DEMO_FILL, None, "demo-nurse", "syringe near empty")
                if first.get("refusals") or pump.status().state.value != "stopped":
                    log.append(f"{fmt_time(clock.now())} {name}: syringe change not started -> {_reply(first)}")
                    continue
                pump.load_syringe(Decimal(DEMO_FILL))
                reply = await daemon.change_syringe(name, DEMO_FILL, None, "demo-nurse", "new syringe loaded")
                log.append(f"{fmt_time(clock.now())} {name}: syringe {state.syringe_changes + 2} "
                           f"({DEMO_FILL} mL) -> {_reply(reply)}")
    finally:
        clock.unregister()


def _reply(reply: dict[str, Any]) -> str:
    if reply.get("ok"):
        return f"ok ({reply.get('phase')})"
    return "refused: " + "; ".join(r["reason"] for r in reply.get("refusals", [])) if reply.get("refusals") \
        else f"error: {reply.get('error')}"
