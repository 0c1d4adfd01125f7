"""Harvard Apparatus Pump 11 Elite front-end: the pump physics model behind the pump-chain ASCII protocol.

Two layers, like simulators/newera.py:
- ``HarvardPumpProtocol`` is sans-IO: one command line in, the reply bytes out (or None), using ``PumpModel`` for
  everything physical. Pump rules from the Pump 11 Elite manual (5420-002 Rev C, pp. 52-58): address prefixes,
  prompts, poll mode (XON after the prompt, no unasked prompts), four-letter abbreviations, two-line command and
  argument errors, ``irate lim``, ``status``.
- ``serve_harvard(...)`` runs it on a real pseudo-terminal or a loopback TCP port, consulting a ``FaultPlan``
  before every reply.

SIMULATOR-ONLY conventions (decided here, documented in docs/simulators.md, tested):
- Infuse-only model ("11 ELITE I Single"): ``wrun``, ``rrun``, ``wrate``, ``wvolume`` are command errors. ``run``
  (the run key) infuses.
- Values are kept to 4 significant digits (rates, syringe volume) or 4 decimals (diameter), rounded half-even:
  the manual shows such values and flowchem sends up to 15 decimals, so the pump must round; how exactly is not
  documented.
- A rate outside what the plunger can run with the loaded bore (``ELITE11_PLUNGER``), including 0, is
  ``Argument error`` / ``Out of range``. A freshly built model has rate 0 and answers ``irate`` with ``0 ml/hr``;
  a real pump always holds a runnable rate.
- Target volume/time are not modelled: ``tvolume``/``ttime`` answer "not set", setting one is a command error
  (``ctvolume`` and ``cttime`` work).
- A stall (the model's occlusion or end of syringe) is shown as the ``*`` prompt and status flag ``S`` until it is
  acknowledged at the pump (``touch_screen()``, or the model's ``clear_alarm()``); meanwhile ``irun`` and the
  settings are command errors (``Motor stalled``) and ``stp`` works. Outside poll mode the stall is also
  announced once with an unasked ``*`` prompt.
- Power cut (the model's power_cycle): the pump comes back idle, with no alarm on the wire, and resets its
  infused volume and time (manual p. 27), as the next request sees.
- Other stopping alarms the Elite has no report for (program error, other): the pump is simply idle.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any, Final

from driverd.core.syringe_limits import (
    ELITE11_DIAMETER_RESOLUTION,
    ELITE11_MAX_DIAMETER_MM,
    ELITE11_MIN_DIAMETER_MM,
    ELITE11_PLUNGER,
)
from drivers.base import AlarmKind, ProtocolError, PumpState
from drivers.harvard.codec import (
    CLOCK_HZ,
    ELITE_RATE_RESOLUTION,
    FL_PER_ML,
    ML_PER_H,
    Command,
    Prompt,
    RateUnit,
    display,
    encode_reply,
    parse_command,
    parse_number,
    parse_volume_unit,
    round_significant,
)
from simulators.clock import Clock
from simulators.faults import FaultPlan
from simulators.pump import ModelError, PumpModel
from simulators.serving import HangUp, Write, announce_unsolicited, send_reply, serve_pty, serve_tcp

STALL_KINDS: Final = frozenset({AlarmKind.OCCLUSION, AlarmKind.END_OF_SYRINGE})
STOP_EVENTS: Final = frozenset({"stop", "power_cycle"} | {k.value for k in AlarmKind} - {"near_end", "low_battery"})
MAX_LINE: Final = 256  # a command line longer than this is noise: discarded
MODEL_NAME: Final = "11 ELITE I Single"
FIRMWARE: Final = "3.0.4"
# `metrics` as the pump prints it (quoted in flowchem's Elite11.PumpInfo docstring), for an infuse-only pump.
METRICS: Final = (
    "Pump type          Pump 11",
    "Pump type string   11 ELITE I Single",
    "Display type       Sharp",
    "Steps per rev      400",
    "Gear ratio         1:1",
    "Pulley ratio       2.4:1",
    "Lead screw         24 threads per inch",
    "Microstepping      16 microsteps per step",
    "Low speed limit    27 seconds",
    "High speed limit   26 microseconds",
    "Motor polarity     Reverse",
    "Min syringe size   0.1 mm",
    "Max syringe size   33 mm",
    "Min raw force %    20%",
    "Max raw force %    80%",
    "Encoder            100 lines",
    "Direction          Infuse",
    "Programmable       Yes",
    "Limit switches     No",
    "Command set        None",
)


class _Refused(Exception):
    """A command the pump answers with an error (two lines)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__(" / ".join(lines))


def _command_error(message: str) -> _Refused:
    return _Refused(["Command error:", f"   {message}"])


def _argument_error(argument: str, message: str) -> _Refused:
    return _Refused([f"Argument error: {argument}", f"   {message}"])


def elite_model_kwargs() -> dict[str, Any]:
    """``PumpModel`` keyword arguments for a Pump 11 Elite: its mechanism, resolutions and identity."""
    return {
        "model": MODEL_NAME, "firmware": FIRMWARE, "plunger": ELITE11_PLUNGER,
        "rate_resolution": ELITE_RATE_RESOLUTION, "diameter_resolution": ELITE11_DIAMETER_RESOLUTION,
        "max_rate_ml_per_h": Decimal(100000),
    }


def elite_model(clock: Clock, **overrides: Any) -> PumpModel:
    return PumpModel(clock, **{**elite_model_kwargs(), **overrides})


@dataclass
class HarvardPumpProtocol:
    """One pump on the chain (sans-IO). ``handle(line)`` takes one command line without its CR."""

    model: PumpModel
    address: int = 0
    poll: bool = False
    echo: bool = False
    rate_unit: RateUnit = ML_PER_H  # the unit the rate was last set in: queries answer in it
    syringe_volume: str = "10 ml"
    force: int = 30
    tap: Callable[[Command], None] | None = None  # every command addressed to this pump (tests record the wire)
    unsolicited: list[bytes] = field(default_factory=list)
    _announced: bool = False
    _counter_reset_at: datetime | None = None
    _power_ups_seen: int = 0

    # ---- state the wire shows -----

    @property
    def stalled(self) -> bool:
        """A stall (occlusion, or the plunger at the end) is shown until acknowledged at the pump."""
        return bool(self.model.status().unacknowledged & STALL_KINDS)

    def _sync(self) -> None:
        """Bring the wire state up to what happened to the mechanism since the last request."""
        power_ups = sum(1 for ev in self.model.events() if ev.kind == "power_cycle")
        if power_ups != self._power_ups_seen:
            # Powered up again: idle, no alarm on the wire, infused volume and timers reset (manual p. 27).
            self._power_ups_seen = power_ups
            self.model.clear_delivered()
            self._counter_reset_at = self.model.clock.now()
            if not self.stalled:
                self.model.clear_alarm()  # nothing to acknowledge on an Elite after a power cut

    def prompt(self) -> Prompt:
        if self.stalled:
            return Prompt.STALLED
        return Prompt.INFUSING if self.model.status().state is PumpState.INFUSING else Prompt.IDLE

    def poll_unsolicited(self) -> bytes | None:
        """Outside poll mode a new stall is announced once with an unasked prompt."""
        self._sync()
        if not self.stalled:
            self._announced = False
            return None
        if self.poll or self._announced:
            return None
        self._announced = True
        packet = encode_reply(self.address, [], Prompt.STALLED, poll=False)
        self.unsolicited.append(packet)
        return packet

    def touch_screen(self) -> None:
        """Someone acknowledges the stall on the pump's screen (the only way: not over the wire)."""
        self._sync()
        self._announced = False
        self.model.clear_alarm()

    # ---- the wire -----

    def handle(self, line: bytes) -> bytes | None:
        try:
            cmd = parse_command(line)
        except ProtocolError:
            return encode_reply(self.address, ["Command error:", "   Unknown command"], self.prompt(), poll=self.poll)
        if cmd.address is not None and cmd.address != self.address:
            return None  # another pump's command: it answers, not this one
        if self.tap is not None:
            self.tap(cmd)
        self._sync()
        name = _resolve(cmd.name)
        try:
            if name is None:
                raise _command_error("Unknown command")
            lines = _HANDLERS[name](self, cmd.argument)
        except _Refused as exc:
            lines = exc.lines
        return encode_reply(self.address, lines, self.prompt(), poll=self.poll)

    # ---- commands -----

    def _empty(self, arg: str) -> list[str]:
        return []

    def _address(self, arg: str) -> list[str]:
        if not arg:
            return [f"Pump address is {self.address}"]
        n = parse_number(arg)
        if n is None or n != n.to_integral_value() or not 0 <= n <= 99:
            raise _argument_error(arg, "Out of range")
        self.address = int(n)
        return []

    def _onoff(self, arg: str, attr: str, label: str) -> list[str]:
        if not arg:
            return [f"{label} is {'ON' if getattr(self, attr) else 'OFF'}"]
        if arg.lower() not in ("on", "off"):
            raise _argument_error(arg, "Invalid argument")
        setattr(self, attr, arg.lower() == "on")
        return []

    def _poll(self, arg: str) -> list[str]:
        return self._onoff(arg, "poll", "Polling mode")

    def _echo(self, arg: str) -> list[str]:
        return self._onoff(arg, "echo", "Echo")

    def _ver(self, arg: str) -> list[str]:
        model, firmware = self.model.identity
        return [f"{model} {firmware}"]

    def _version(self, arg: str) -> list[str]:
        _, firmware = self.model.identity
        return [f"Firmware:     v{firmware}", "RTOS:       FreeRTOS v7.0.1 (http://www.freertos.org)",
                f"Pump address: {self.address}"]

    def _metrics(self, arg: str) -> list[str]:
        return [*METRICS, ""]

    def _status(self, arg: str) -> list[str]:
        st = self.model.status()
        with localcontext() as ctx:
            ctx.prec = 60
            rate_fl_s = (st.rate_ml_per_h * FL_PER_ML / 3600).to_integral_value(ROUND_DOWN)
            vol_fl = (st.delivered_ml * FL_PER_ML).to_integral_value(ROUND_DOWN)
            cycles = (self._infuse_seconds() * 1000).to_integral_value(ROUND_DOWN) * (CLOCK_HZ // 1000)
        running = st.state is PumpState.INFUSING
        flags = ("I" if running else "i") + "." + ("S" if self.stalled else ".") + "." + "I" + "."
        return [f"{rate_fl_s} {cycles} {vol_fl} {flags}"]

    def _infuse_seconds(self) -> Decimal:
        """Time infused since the counters were last reset (running intervals from the model's event log)."""
        total = Decimal(0)
        since = self._counter_reset_at
        started: datetime | None = None
        for ev in self.model.events():
            if ev.kind == "run":
                started = ev.at
            elif ev.kind in STOP_EVENTS and started is not None:
                total += _seconds(started, ev.at, since)
                started = None
        if started is not None:
            total += _seconds(started, self.model.clock.now(), since)
        return total

    def _irate(self, arg: str) -> list[str]:
        lo, hi = self.model.rate_range()
        if not arg:
            return [self._show_rate(self.model.status().rate_ml_per_h)]
        low = arg.lower()
        if low == "lim":
            unit = self.rate_unit
            with localcontext() as ctx:
                ctx.prec = 60
                shown = (_limit(lo / unit.to_ml_per_h, up=True), _limit(hi / unit.to_ml_per_h, up=False))
            return [f"{display(shown[0])} {unit.long} to {display(shown[1])} {unit.long}"]
        if low in ("min", "max"):
            return self._set_rate(_limit(lo, up=True) if low == "min" else _limit(hi, up=False), self.rate_unit, arg)
        value_text, _, unit_text = arg.partition(" ")
        value = parse_number(value_text)
        sent_unit = RateUnit.parse(unit_text.strip())
        if value is None or sent_unit is None:
            raise _argument_error(arg, "Invalid argument")
        kept = round_significant(value)
        with localcontext() as ctx:
            ctx.prec = 60
            ml_per_h = kept * sent_unit.to_ml_per_h
        return self._set_rate(ml_per_h, sent_unit, arg)

    def _set_rate(self, ml_per_h: Decimal, unit: RateUnit, arg: str) -> list[str]:
        if self.stalled:
            raise _command_error("Motor stalled")
        lo, hi = self.model.rate_range()
        if not lo <= ml_per_h <= hi or ml_per_h == 0:
            raise _argument_error(arg, "Out of range")
        try:
            self.model.set_rate(ml_per_h, checked_as_sent=True)
        except ModelError as exc:
            raise _command_error(str(exc)) from None
        self.rate_unit = unit
        return []

    def _show_rate(self, ml_per_h: Decimal) -> str:
        with localcontext() as ctx:
            ctx.prec = 60
            value = ml_per_h / self.rate_unit.to_ml_per_h
        return f"{display(round_significant(value))} {self.rate_unit.long}"

    def _diameter(self, arg: str) -> list[str]:
        if not arg:
            return [f"{self.model.status().diameter_mm:.4f} mm"]
        text = arg[:-2].strip() if arg.lower().endswith("mm") else arg  # flowchem sends "14.5670 mm"
        value = parse_number(text)
        if value is None:
            raise _argument_error(arg, "Invalid argument")
        kept = value.quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN)
        if not ELITE11_MIN_DIAMETER_MM <= kept <= ELITE11_MAX_DIAMETER_MM:
            raise _argument_error(arg, "Out of range")
        self._settings_allowed()
        try:
            self.model.set_diameter(kept)
        except ModelError as exc:
            raise _command_error(str(exc)) from None
        return []

    def _settings_allowed(self) -> None:
        if self.stalled:
            raise _command_error("Motor stalled")
        if self.model.status().state is PumpState.INFUSING:
            raise _command_error("Not allowed while running")

    def _svolume(self, arg: str) -> list[str]:
        if not arg:
            return [self.syringe_volume]
        value_text, _, unit_text = arg.partition(" ")
        value = parse_number(value_text)
        per_ml = parse_volume_unit(unit_text.strip())
        if value is None or per_ml is None or value == 0:
            raise _argument_error(arg, "Invalid argument")
        self._settings_allowed()
        unit = "ul" if per_ml < 1 else "ml"
        self.syringe_volume = f"{display(round_significant(value))} {unit}"
        return []

    def _force(self, arg: str) -> list[str]:
        if not arg:
            return [f"{self.force}%"]
        n = parse_number(arg)
        if n is None or n != n.to_integral_value() or not 1 <= n <= 100:
            raise _argument_error(arg, "Out of range")
        self.force = int(n)
        return []

    def _irun(self, arg: str) -> list[str]:
        if self.stalled:
            raise _command_error("Motor stalled")
        try:
            self.model.run()
        except ModelError as exc:
            raise _command_error(str(exc)) from None
        return []

    def _stp(self, arg: str) -> list[str]:
        self.model.stop()
        return []

    def _infuse_only(self, arg: str) -> list[str]:
        raise _command_error("Infuse only pump")

    def _civolume(self, arg: str) -> list[str]:
        self.model.clear_delivered()
        return []

    def _ctvolume(self, arg: str) -> list[str]:
        return []  # no target is ever set on this simulated pump

    def _tvolume(self, arg: str) -> list[str]:
        if not arg:
            return ["Target volume not set"]
        raise _command_error("Target volume not simulated")

    def _ttime(self, arg: str) -> list[str]:
        if not arg:
            return ["Target time not set"]
        raise _command_error("Target time not simulated")

    def _ivolume(self, arg: str) -> list[str]:
        ml = self.model.status().delivered_ml
        if ml < 1:
            return [f"{display(round_significant(ml * 1000))} ul"]
        return [f"{display(round_significant(ml))} ml"]

    def _itime(self, arg: str) -> list[str]:
        return [f"{self._infuse_seconds().to_integral_value(ROUND_DOWN)} seconds"]

    def _crate(self, arg: str) -> list[str]:
        st = self.model.status()
        if st.state is not PumpState.INFUSING:
            raise _command_error("Pump not running")
        return [f"Infusing at {self._show_rate(st.rate_ml_per_h)}"]


def _seconds(start: datetime, end: datetime, since: datetime | None) -> Decimal:
    if since is not None:
        start = max(start, since)
    if end <= start:
        return Decimal(0)
    delta = end - start
    return Decimal(delta.days * 86400 + delta.seconds) + Decimal(delta.microseconds) / 1_000_000


def _limit(value: Decimal, *, up: bool) -> Decimal:
    """A rate limit as the pump states it (4 significant digits), rounded inward so the pump runs it."""
    if value == 0:
        return value
    with localcontext() as ctx:
        ctx.prec = 60
        q = Decimal(1).scaleb(value.adjusted() - 3)
        return value.quantize(q, rounding=ROUND_CEILING if up else ROUND_DOWN)


_HANDLERS: Final[dict[str, Callable[[HarvardPumpProtocol, str], list[str]]]] = {
    "": HarvardPumpProtocol._empty,
    "address": HarvardPumpProtocol._address,
    "poll": HarvardPumpProtocol._poll,
    "echo": HarvardPumpProtocol._echo,
    "ver": HarvardPumpProtocol._ver,
    "version": HarvardPumpProtocol._version,
    "metrics": HarvardPumpProtocol._metrics,
    "status": HarvardPumpProtocol._status,
    "irate": HarvardPumpProtocol._irate,
    "diameter": HarvardPumpProtocol._diameter,
    "svolume": HarvardPumpProtocol._svolume,
    "force": HarvardPumpProtocol._force,
    "irun": HarvardPumpProtocol._irun,
    "run": HarvardPumpProtocol._irun,  # the run key: this infuse-only pump infuses
    "stp": HarvardPumpProtocol._stp,
    "stop": HarvardPumpProtocol._stp,
    "wrun": HarvardPumpProtocol._infuse_only,
    "rrun": HarvardPumpProtocol._infuse_only,
    "wrate": HarvardPumpProtocol._infuse_only,
    "wvolume": HarvardPumpProtocol._infuse_only,
    "civolume": HarvardPumpProtocol._civolume,
    "cvolume": HarvardPumpProtocol._civolume,
    "ctvolume": HarvardPumpProtocol._ctvolume,
    "cttime": HarvardPumpProtocol._ctvolume,
    "tvolume": HarvardPumpProtocol._tvolume,
    "ttime": HarvardPumpProtocol._ttime,
    "ivolume": HarvardPumpProtocol._ivolume,
    "itime": HarvardPumpProtocol._itime,
    "crate": HarvardPumpProtocol._crate,
}


def _resolve(name: str) -> str | None:
    """Exact name, or a unique abbreviation of at least four letters (manual p. 52)."""
    if name in _HANDLERS:
        return name
    if len(name) >= 4:
        hits = [k for k in _HANDLERS if k.startswith(name)]
        if len(hits) == 1:
            return hits[0]
    return None


# ============================================================================================== transports


@dataclass
class Endpoint:
    url: str
    protocol: HarvardPumpProtocol
    faults: FaultPlan
    device: str | None = None
    port: int | None = None
    _hangup: Callable[[], None] | None = None

    def hang_up(self) -> None:
        if self._hangup is not None:
            self._hangup()


class _Session:
    """Bytes in -> command lines (CR-terminated; LF ignored) -> replies through the fault plan -> bytes out."""

    def __init__(self, protocol: HarvardPumpProtocol, faults: FaultPlan, write: Callable[[bytes], None],
                 disconnect: Callable[[], None]) -> None:
        self.protocol = protocol
        self.faults = faults
        self.write = write
        self.disconnect = disconnect
        self.buf = b""
        self.closed = False

    async def feed(self, data: bytes) -> None:
        if self.faults.is_cut:
            self.faults.reaches_pump()  # counted as lost: the bytes never reach the pump (nor are they echoed)
            return
        if self.protocol.echo:
            self.write(data)
        self.buf += data
        while not self.closed:
            cr = self.buf.find(b"\r")
            if cr < 0:
                if len(self.buf) > MAX_LINE:
                    self.buf = b""
                return
            line, self.buf = self.buf[:cr], self.buf[cr + 1 :]
            reply = self.protocol.handle(line)
            if reply is not None:
                await self._send(reply)

    async def _send(self, reply: bytes) -> None:
        if await send_reply(self.faults, reply, self.write, self.disconnect, self.faults.wire_time_per_byte_s or 0.0):
            self.closed = True


UNSOLICITED_POLL_S: Final = 0.05


async def _announcer(protocol: HarvardPumpProtocol, plan: FaultPlan, write: Callable[[bytes], None]) -> None:
    await announce_unsolicited(protocol, plan, write, UNSOLICITED_POLL_S)


@contextlib.asynccontextmanager
async def serve_harvard(
    model: PumpModel,
    faults: FaultPlan | None = None,
    *,
    pty: bool = False,
    tcp_port: int | None = None,
    host: str = "127.0.0.1",
    address: int = 0,
) -> AsyncIterator[Endpoint]:
    """Serve ``model`` as a Pump 11 Elite on a PTY (``pty=True``) or TCP (``tcp_port``, 0 = ephemeral)."""
    if pty == (tcp_port is not None):
        raise ValueError("serve_harvard: give exactly one of pty=True or tcp_port=N")
    if not 0 <= address <= 99:
        raise ValueError(f"address: must be 0..99, got {address}")
    plan = faults if faults is not None else FaultPlan()
    protocol = HarvardPumpProtocol(model, address=address)
    if pty:
        async with _serve_pty(protocol, plan) as endpoint:
            yield endpoint
    else:
        assert tcp_port is not None
        async with _serve_tcp(protocol, plan, host, tcp_port) as endpoint:
            yield endpoint


@contextlib.asynccontextmanager
async def _serve_pty(protocol: HarvardPumpProtocol, plan: FaultPlan) -> AsyncIterator[Endpoint]:
    def session(write: Write, disconnect: HangUp) -> _Session:
        return _Session(protocol, plan, write, disconnect)

    async with serve_pty(session, functools.partial(_announcer, protocol, plan)) as (device, hang_up):
        yield Endpoint(f"harvard+serial://{device}?address={protocol.address}", protocol, plan, device=device,
                       _hangup=hang_up)


@contextlib.asynccontextmanager
async def _serve_tcp(protocol: HarvardPumpProtocol, plan: FaultPlan, host: str, port: int) -> AsyncIterator[Endpoint]:
    def session(write: Write, disconnect: HangUp) -> _Session:
        return _Session(protocol, plan, write, disconnect)

    async with serve_tcp(session, functools.partial(_announcer, protocol, plan), host, port) as (chosen, hang_up):
        yield Endpoint(f"harvard+socket://{host}:{chosen}?address={protocol.address}", protocol, plan, port=chosen,
                       _hangup=hang_up)
