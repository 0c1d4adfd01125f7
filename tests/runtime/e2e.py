"""Shared helpers for the end-to-end and fault tests: simulators on real transports + a Daemon on a VirtualClock.

`rig(...)` starts the simulated pumps (New Era on a PTY or loopback TCP, or Modbus/TCP on loopback), a Daemon on
the real driver path, and optionally its control socket. The test itself is a participant of the virtual clock
from the start, so virtual time moves only while the test waits in `Rig.advance_to`: between two waits the test
sees (and commands) a frozen instant. Instants passed to `advance_to` must lie between the channels' polls
(the poll grid is START + k * poll period), so no poll runs concurrently with the test's checks.

What reached the pump is read from the simulated pump model (`PumpModel.rate_history()`), whatever the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from driverd.audit.reader import iter_records
from driverd.audit.replay import ReplayResult, replay_records
from driverd.audit.segments import list_segments
from driverd.audit.verify import VerifyReport, verify_log
from driverd.core.quantities import NEW_ERA_RESOLUTION, Resolution, dose_to_rate, quantize_down
from driverd.runtime.channel import Channel
from driverd.runtime.clock import VirtualClock
from driverd.runtime.config import AuditSettings, DaemonConfig, PumpConfig
from driverd.runtime.control import ControlServer, request
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import CONCENTRATION, CONFIG_DIR, DEMO_TRUST, START, SYRINGE, demo_schedule
from driverd.signing import generate_keypair, load_public_key
from simulators.faults import FaultPlan
from simulators.pump import PumpModel
from simulators.world import World

TRANSPORTS = ("newera-pty", "newera-tcp", "modbus-tcp")
BOUND_S = 60.0  # real seconds any single wait may take before the test fails (never a timing assertion)
FIRST_STEP = START + timedelta(minutes=5)  # demo_schedule: steps at START + 5 min + 24 h * i
DOSES = (Decimal(100), Decimal(300), Decimal(500))
HOLD = timedelta(days=3)


@dataclass(frozen=True, slots=True)
class Timing:
    """Daemon timing for a rig. Poll, link timeout and dead-man are virtual seconds; the driver timeout is real."""

    poll_s: int = 60
    deadman_s: int = 180  # the pump's own dead-man (New Era safe mode, Modbus watchdog); 0 = off
    link_timeout_s: float | None = None  # default: two polls
    driver_timeout_s: float = 0.4


def resolution_for(transport: str) -> Resolution:
    if transport.startswith("modbus"):
        from drivers.modbus.regmap import load_map

        return load_map().rate_resolution()
    return NEW_ERA_RESOLUTION


def kernel_rate(dose: Decimal, transport: str) -> Decimal:
    """The rate the safety kernel sends for `dose` at the demo concentration (quantized toward less drug)."""
    return quantize_down(dose_to_rate(dose, Decimal(CONCENTRATION)), resolution_for(transport))


def closed_port() -> int:
    """A loopback port nobody listens on (bound then released): connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Rig:
    clock: VirtualClock
    world: World
    daemon: Daemon
    transport: str
    names: list[str]
    poll: timedelta
    audit_dir: Path
    audit_pub: Path
    socket: Path | None
    endpoints: dict[str, Any] = field(default_factory=dict)  # pump -> newera Endpoint | ModbusEndpoint
    stopped: bool = False  # the daemon has stopped (its audit log is closed)
    config: DaemonConfig | None = None
    links: dict[str, Path] = field(default_factory=dict)  # pump -> the symlink its URL names (serial_links)
    stack: contextlib.AsyncExitStack | None = None  # what serves the simulators (replug adds to it)

    # ---- the pumps -----

    def model(self, name: str) -> PumpModel:
        return self.world.pump(name)

    def faults(self, name: str) -> FaultPlan:
        return self.world.faults(name)

    def channel(self, name: str) -> Channel:
        return self.daemon.channels[name]

    async def replug(self, name: str) -> None:
        """New Era over a PTY with `serial_links`: the line of `name` is pulled (its PTY hangs up) and plugged into a
        new PTY serving the same simulated pump, which the pump's link (the path its URL names, as a udev
        /dev/serial/by-id link does) now points to. The driver's open port fails at its next request; reopened, it
        is the new PTY."""
        from simulators.newera import serve_newera

        assert self.stack is not None and name in self.links, "rig(..., serial_links=True) on newera-pty"
        self.endpoints[name].hang_up()
        ep = await self.stack.enter_async_context(serve_newera(self.model(name), self.faults(name), pty=True))
        link = self.links[name]
        fresh = link.with_name(link.name + ".new")
        assert ep.device is not None
        fresh.symlink_to(ep.device)
        os.replace(fresh, link)  # atomically: the driver never finds no link
        self.endpoints[name] = ep

    def wire_rates(self, name: str) -> list[Decimal]:
        """Every rate the simulated pump accepted, in order."""
        return [rate for _, rate in self.model(name).rate_history()]

    def rate(self, dose: int | Decimal) -> Decimal:
        return kernel_rate(Decimal(dose), self.transport)

    # ---- time -----

    def on_grid(self, when: datetime) -> bool:
        return (when - START) % self.poll == timedelta(0)

    async def advance_to(self, when: datetime) -> None:
        """Let virtual time run to `when` (between two polls), then freeze it again for the test's checks."""
        if self.on_grid(when):
            raise ValueError(f"{when} is a poll instant: pick a time between polls")
        if when < self.clock.now():
            raise ValueError(f"{when} is in the past (now {self.clock.now()})")
        await asyncio.wait_for(self.clock.sleep_until(when), timeout=BOUND_S)

    async def wait_until(self, predicate: Any, *, step: timedelta, limit: datetime) -> datetime:
        """Advance by `step` (off grid) until `predicate()` holds; fail at `limit`. Returns the time it held."""
        while not predicate():
            if self.clock.now() >= limit:
                raise AssertionError(f"condition not reached by {limit} (now {self.clock.now()})")
            nxt = self.clock.now() + step
            await self.advance_to(nxt + step / 2 if self.on_grid(nxt) else nxt)
        return self.clock.now()

    async def restart(self, silent_for: timedelta) -> None:
        """The daemon goes away (stopped: no packet reaches any pump) for `silent_for` of virtual time, then a
        new one starts on the same audit log and recovers every course from it."""
        assert self.config is not None
        await asyncio.wait_for(self.daemon.stop(), timeout=BOUND_S)
        self.stopped = True
        await self.advance_to(self.clock.now() + silent_for)
        self.daemon = Daemon(self.config, self.clock, world=self.world)
        await asyncio.wait_for(self.daemon.start(), timeout=BOUND_S)
        self.stopped = False

    # ---- the daemon's API -----

    async def push(self, name: str, doc: dict[str, Any] | None = None) -> dict[str, Any]:
        """Push the signed demo schedule for `name` through the control socket (or the daemon if none)."""
        index = self.names.index(name) + 1
        doc = doc if doc is not None else demo_schedule(name, index, START)
        if self.socket is None:
            return await asyncio.wait_for(self.daemon.push_schedule(doc), timeout=BOUND_S)
        return await request(self.socket, {"op": "push", "schedule": doc}, timeout_s=BOUND_S)

    async def status(self) -> dict[str, dict[str, Any]]:
        reply = (await request(self.socket, {"op": "status"}, timeout_s=BOUND_S) if self.socket is not None
                 else self.daemon.status())
        assert reply["ok"] is True, reply
        return {p["pump_id"]: p for p in reply["pumps"]}

    async def command(self, name: str, action: str, *, by: str = "nurse-1", reason: str = "test",
                      dose: Any = None) -> dict[str, Any]:
        return await asyncio.wait_for(self.daemon.command(name, action, by, reason, dose), timeout=BOUND_S)

    # ---- the audit log -----

    def records(self) -> list[dict[str, Any]]:
        if not self.stopped:
            self.daemon.tick_audit()  # group-committed telemetry onto disk first
        return [r for _, p in list_segments(self.audit_dir) for r in iter_records(p)]

    def verify(self) -> VerifyReport:
        return verify_log(self.audit_dir, public_key=load_public_key(self.audit_pub))

    def replay(self) -> ReplayResult:
        return replay_records(self.records())


def events(records: Iterable[dict[str, Any]], name: str, pump: str | None = None) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == name and (pump is None or r.get("pump_id") == pump)]


def setpoints(records: Iterable[dict[str, Any]], pump: str) -> list[dict[str, Any]]:
    return events(records, "setpoint", pump)


def verified_setpoints(records: list[dict[str, Any]], pump: str) -> list[tuple[datetime, Decimal]]:
    """(time, rate) of every setpoint whose read-back equalled what was sent."""
    sent = {r["setpoint_id"]: Decimal(r["rate_ml_per_h"]) for r in setpoints(records, pump)}
    out = []
    for r in events(records, "setpoint_result", pump):
        rb = r.get("readback_ml_per_h")
        if rb is not None and sent.get(r["setpoint_id"]) == Decimal(rb):
            out.append((datetime.fromisoformat(r["ts"]), Decimal(rb)))
    return out


def transitions(records: Iterable[dict[str, Any]], pump: str) -> list[tuple[datetime, str]]:
    return [(datetime.fromisoformat(r["ts"]), r["to"]) for r in events(records, "transition", pump)]


def build_world(clock: VirtualClock, transport: str, names: Iterable[str], fill_ml: Decimal | None = None) -> World:
    world = World(clock)
    kw: dict[str, Any] = {}
    if transport.startswith("modbus"):
        kw["rate_resolution"] = resolution_for(transport)
        from simulators.modbus import SIM_FIRMWARE, SIM_MODEL

        kw.update(model=SIM_MODEL, firmware=SIM_FIRMWARE)
    for n in names:
        world.pump(n, diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]),
                   fill_volume_ml=fill_ml if fill_ml is not None else Decimal(SYRINGE["fill_volume_ml"]), **kw)
    return world


async def _serve(stack: contextlib.AsyncExitStack, transport: str, world: World, names: list[str],
                 dead: set[str], links: dict[str, Path] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """`links` (newera-pty only; pump -> a path): each pump's URL names that path, a symlink to its PTY."""
    urls: dict[str, str] = {}
    endpoints: dict[str, Any] = {}
    if links and transport != "newera-pty":
        raise ValueError("serial links are for newera-pty")
    live = [n for n in names if n not in dead]
    if transport.startswith("newera"):
        from simulators.newera import serve_newera

        for n in live:
            if transport == "newera-pty":
                ep = await stack.enter_async_context(serve_newera(world.pump(n), world.faults(n), pty=True))
            else:
                ep = await stack.enter_async_context(serve_newera(world.pump(n), world.faults(n), tcp_port=0))
            urls[n], endpoints[n] = ep.url, ep
            if links is not None and n in links:
                assert ep.device is not None
                links[n].symlink_to(ep.device)
                urls[n] = ep.url.replace(ep.device, str(links[n]), 1)
        for n in dead:
            urls[n] = f"newera+socket://127.0.0.1:{closed_port()}?address=0"
    elif transport == "modbus-tcp":
        from simulators.modbus import serve_modbus

        if live:
            units = {i + 1: n for i, n in enumerate(live)}
            gw = await stack.enter_async_context(serve_modbus(world, units, tcp_port=0))
            for u, n in units.items():
                urls[n], endpoints[n] = gw.url(u), gw
        for n in dead:
            urls[n] = f"modbus+tcp://127.0.0.1:{closed_port()}?unit=1"
    else:
        raise ValueError(f"unknown transport {transport!r}")
    return urls, endpoints


@contextlib.asynccontextmanager
async def rig(
    transport: str,
    work: Path,
    names: Iterable[str] = ("bed-1",),
    *,
    timing: Timing = Timing(),
    dead: Iterable[str] = (),
    control: bool = False,
    start: datetime = START,
    fill_ml: Decimal | None = None,
    audit: AuditSettings | None = None,
    hl7: Any = None,
    protocol: Path | None = None,
    url_params: str = "",
    serial_links: bool = False,
) -> AsyncIterator[Rig]:
    """`protocol`: a drug library other than the shipped one; `url_params`: appended to every pump URL (`&k=v`);
    `serial_links` (newera-pty): each pump's URL names a symlink to its PTY, for `Rig.replug`."""
    names = list(names)
    dead_set = set(dead)
    sock_dir = Path(tempfile.mkdtemp(prefix="dde2e", dir="/tmp"))  # short: Unix socket paths are <= 107 bytes
    clock = VirtualClock(start)
    # The test is a participant from the start: time never runs ahead of it (see the module docstring).
    clock.register()
    world = build_world(clock, transport, names, fill_ml)
    key, pub = generate_keypair(work / "keys", "audit")
    try:
        async with contextlib.AsyncExitStack() as stack:
            links = {n: work / f"tty-{n}" for n in names} if serial_links else None
            urls, endpoints = await _serve(stack, transport, world, names, dead_set, links)
            config = DaemonConfig(
                path=work / "driverd.toml", sha256="e2e",
                protocol=protocol or CONFIG_DIR / "protocols" / "ketamine-burst.toml",
                audit_dir=work / "audit", audit_key=key, trust_dir=DEMO_TRUST, control_socket=sock_dir / "ctl.sock",
                socket_mode=0o600, poll_period_s=float(timing.poll_s),
                link_timeout_s=float(timing.link_timeout_s or 2 * timing.poll_s),
                deadman_s=timing.deadman_s, driver_timeout_s=timing.driver_timeout_s,
                pumps=tuple(PumpConfig(n, urls[n] + url_params) for n in names),
                audit=audit or AuditSettings(checkpoint_every_records=500, checkpoint_every_s=3600,
                                             group_commit_ms=200, group_commit_records=512),
                hl7=hl7,
            )
            daemon = Daemon(config, clock, world=world)
            await asyncio.wait_for(daemon.start(), timeout=BOUND_S)
            server: ControlServer | None = None
            try:
                if control:
                    server = ControlServer(daemon, config.control_socket, 0o600)
                    await server.start()
                the_rig = Rig(clock, world, daemon, transport, names, timedelta(seconds=timing.poll_s),
                              config.audit_dir, pub, config.control_socket if control else None, endpoints,
                              config=config, links=links or {}, stack=stack)
                yield the_rig
            finally:
                clock.unregister()
                if server is not None:
                    await server.close()
                stopped = False
                with contextlib.suppress(NameError):
                    daemon, stopped = the_rig.daemon, the_rig.stopped  # restart() may have replaced or stopped it
                if not stopped:
                    await asyncio.wait_for(daemon.stop(), timeout=BOUND_S)
                with contextlib.suppress(NameError):
                    the_rig.stopped = True
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def run(coro: Any, timeout: float = 120.0) -> Any:
    """Run an async test body with a hard bound (a test must never hang)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- shared checks of the fault, supervision and clock tests (one pump, "bed-1", polled every minute) -----

PUMP = "bed-1"
HALF_POLL = timedelta(seconds=30)  # polls every 60 s on whole minutes: +30 s is between two polls
RUNNING_AT = FIRST_STEP + timedelta(hours=1) + HALF_POLL  # titrating at 100 mg/24h, rate verified


async def start_running(r: Rig, name: str = PUMP) -> Decimal:
    """Push the schedule and run until the first step is verified; returns that (last verified) rate."""
    from drivers.base import PumpState

    assert (await r.push(name))["ok"] is True
    await r.advance_to(RUNNING_AT)
    ch = r.channel(name)
    assert ch.state.phase.value == "titrating" and ch.state.verified_rate == r.rate(100), ch.state
    assert r.model(name).status().state is PumpState.INFUSING
    return ch.state.verified_rate


async def until_phase(r: Rig, phase: str, limit: timedelta = timedelta(hours=2), name: str = PUMP) -> datetime:
    return await r.wait_until(lambda: r.channel(name).state.phase.value == phase, step=timedelta(minutes=1),
                              limit=r.clock.now() + limit)


def never_above(r: Rig, since: datetime, limit: Decimal, name: str = PUMP) -> None:
    """No setpoint after `since` above `limit`, neither approved by the kernel nor received by the pump."""
    for at, rate in r.model(name).rate_history():
        if at >= since:
            assert rate <= limit, f"pump received {rate} mL/h at {at}, above {limit}"
    for s in setpoints(r.records(), name):
        if datetime.fromisoformat(s["ts"]) >= since:
            assert Decimal(s["rate_ml_per_h"]) <= limit, s


def audit_ok(r: Rig) -> None:
    """The log verifies (chain, signatures) and replays with no divergence."""
    report = r.verify()
    assert report.ok, report.failure
    result = r.replay()
    assert result.ok, [d.as_dict() for d in result.divergences][:3]
