"""New Era protocol front-end: the pump physics model behind the NE-1000 RS-232 protocol, on a PTY or TCP.

Two layers, like the codec/driver split:
- ``NewEraPumpProtocol`` is sans-IO: request frame in, reply bytes out, using ``PumpModel`` for everything
  physical. It enforces the pump's own rules: number format (at most 4 digits, 3 decimals: ``?OOR``, never
  rounded), units (rate units may not change while infusing: ``?NA``), alarms must be acknowledged (the
  first valid packet after an alarm gets the ``A?x`` reply and is not executed), ``SAF`` safe mode with its
  timeout enforced by the model's dead-man, and ``?COM`` for a corrupt safe-mode packet.
- ``serve_newera(...)`` runs it on a real pseudo-terminal (the host opens the slave path with pyserial) or a
  loopback TCP port, consulting a ``FaultPlan`` before every reply and imitating wire time if asked.

SIMULATOR-ONLY conventions (decided here, documented, and tested; a driver must not depend on anything else):
- The New Era protocol has no near-end, end-of-syringe or low-battery report. End of syringe shows as a
  motor-stall alarm ``A?S``, as on a real pump whose plunger reaches the end; occlusion is also ``A?S``.
  Near-end and low battery are not visible on the wire at all (the daemon tracks volume itself). There is no
  extra query only the simulator answers.
- Target-volume mode is not modelled: ``VOL 0`` (continuous) and ``VOL ML|UL`` work; ``VOL <n>0`` is ``?NA``.
- The simulated pump is infuse-only: ``DIR WDR``/``DIR REV`` are ``?NA`` (the driver never sends them).
- Rates in UM/MM/UH are converted exactly to mL/h for the model; one that is not representable in mL/h at
  New Era resolution is ``?OOR``.
- ``SAF n`` arms the dead-man at once (the SAF packet itself counts as the first valid packet).
- Alarm acknowledgement: on the wire the first valid packet after an alarm gets ``A?x`` and acknowledges it
  (later packets are executed normally). Inside, the model's ``clear_alarm()`` is called when the host next
  acts (anything but a query), so the model keeps showing ALARM while the host only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Final

from driverd.core.errors import QuantityError
from drivers.base import WARNING_ALARMS, AlarmKind, ProtocolError, PumpState
from drivers.newera.codec import (
    MAX_DECIMALS,
    MAX_DIGITS,
    RATE_TO_ML_PER_H,
    VOLUME_TO_ML,
    AlarmCode,
    Command,
    Direction,
    ErrorCode,
    Frame,
    FrameDecoder,
    RateUnit,
    Status,
    VolumeUnit,
    encode_reply,
    format_display,
    parse_command,
)
from simulators.faults import FaultPlan
from simulators.pump import ModelError, PumpModel
from simulators.serving import HangUp, Write, announce_unsolicited, send_reply, serve_pty, serve_tcp

INTER_BYTE_TIMEOUT_S: Final = 0.5  # a partial packet older than this is discarded (manual)

# Which alarm the single A?x reply shows when several are latched (all are acknowledged by it).
ALARM_WIRE: Final[tuple[tuple[AlarmKind, AlarmCode], ...]] = (
    (AlarmKind.POWER_INTERRUPTED, AlarmCode.RESET),
    (AlarmKind.SAFE_MODE_TIMEOUT, AlarmCode.SAFE_TIMEOUT),
    (AlarmKind.OCCLUSION, AlarmCode.STALLED),
    (AlarmKind.END_OF_SYRINGE, AlarmCode.STALLED),  # simulator-only convention: see module docstring
    (AlarmKind.PROGRAM_ERROR, AlarmCode.PROGRAM_ERROR),
    (AlarmKind.OTHER, AlarmCode.OUT_OF_RANGE),
)


def _plain_number(text: str) -> Decimal | None:
    """The pump's number rule on the literal text: digits and one point, <= 4 digits, <= 3 decimals."""
    if not text or text.count(".") > 1 or not all(c.isdigit() or c == "." for c in text) or text == ".":
        return None
    _, _, frac = text.partition(".")
    if sum(c.isdigit() for c in text) > MAX_DIGITS or len(frac) > MAX_DECIMALS:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - filtered above
        return None


@dataclass
class NewEraPumpProtocol:
    """One pump on the line (sans-IO). ``handle(frame)`` returns the reply bytes, or None for no reply."""

    model: PumpModel
    address: int = 0
    rate_unit: RateUnit = RateUnit.ML_PER_H
    volume_unit: VolumeUnit = VolumeUnit.ML
    # Firmware without safe mode (older NE-500/NE-1000): ``SAF`` is an unknown command, safe frames are noise.
    safe_mode_supported: bool = True
    # The most recent valid commands (for tests and benches); bounded, since a bench simulator runs for days.
    requests: deque[Command] = field(default_factory=lambda: deque(maxlen=4096))
    # Called with every whole frame from the host, before it is parsed or addressed (tests record the wire).
    tap: Callable[[Frame], None] | None = None
    # Every unsolicited packet sent (safe-mode Auto-Alarm), for tests.
    unsolicited: list[bytes] = field(default_factory=list)
    paused: bool = False  # STP while infusing pauses (status P); a second STP stops
    direction: str = "INF"  # INF or STK (sticky: the direction input pin, low = infuse, is not connected)
    baud: int = 19200  # stored by ADR ... B <baud>; the simulated line does not change speed
    # Stored settings the simulator keeps but that have no effect on the model (see SETTINGS).
    settings: dict[str, str] = field(default_factory=lambda: {k: v[0] for k, v in SETTINGS.items()})
    _reported: frozenset[AlarmKind] = frozenset()  # alarms already announced with A?x (acknowledged)
    _announced: frozenset[AlarmKind] = frozenset()  # alarms already sent unsolicited (safe mode Auto-Alarm)

    @property
    def safe(self) -> bool:
        # SAF is stored in the model (like NVRAM): it survives a power cycle, and so does the framing.
        return self.model.status().deadman_s > 0

    def power_up(self) -> bytes | None:
        """Power applied: the model latches POWER_INTERRUPTED.

        Basic mode: the pump never transmits unprompted; the first packet gets ``A?R``. Safe mode: Auto-Alarm
        sends the ``A?R`` status packet unprompted (NE-1000 manual §10.4 Safe Mode).
        """
        self.model.power_cycle()
        self.paused = False
        return self.poll_unsolicited()

    def poll_unsolicited(self) -> bytes | None:
        """Safe-mode Auto-Alarm: a new stopping alarm is announced once with an unsolicited status packet.

        It does not acknowledge the alarm: the next valid packet is still answered ``A?x``, as on the pump.
        """
        if self.model.deadman_setting_s == 0:
            return None  # basic mode: never unprompted (and no need to advance the model to find out)
        blocking = self.model.status().unacknowledged - WARNING_ALARMS
        if not blocking:
            self._announced = frozenset()
            return None
        fresh = blocking - self._announced - self._reported
        if not fresh:
            return None
        self._announced = blocking
        code = next(c for kind, c in ALARM_WIRE if kind in fresh)
        packet = self._reply(Status.ALARM, alarm=code)
        self.unsolicited.append(packet)
        return packet

    def bad_packet(self, error: ProtocolError) -> bytes | None:
        """A corrupt packet: a safe-mode pump answers ?COM; a basic-mode one stays silent (noise)."""
        del error  # the reason is for logs; the pump's answer does not depend on it
        if not self.safe:
            return None
        return self._reply(self._status_char(), error=ErrorCode.COMMUNICATION)

    def handle(self, frame: Frame) -> bytes | None:
        if self.tap is not None:
            self.tap(frame)
        if frame.safe and not self.safe_mode_supported:
            return None  # firmware without safe mode: STX...ETX is noise without a CR, never answered
        text = frame.payload.replace(b" ", b"")
        if b"*" in text and not text.startswith(b"*"):
            return self._burst(text)
        try:
            cmd = parse_command(frame.payload)
        except ProtocolError as exc:
            return self.bad_packet(exc)
        return self._handle_command(cmd)

    def _burst(self, text: bytes) -> bytes | None:
        """Network Command Burst (NE-1000 manual §10.3): ``0RAT100*1RAT250*``, one segment per pump.

        Each pump executes the segments addressed to it, in order, and answers once, after its last one (the
        reply to that segment); a pump with no segment stays silent. A segment that fails to parse makes the
        whole burst a bad packet.
        """
        mine: list[Command] = []
        for part in text.split(b"*"):
            if not part:
                continue
            try:
                cmd = parse_command(part)
            except ProtocolError as exc:
                return self.bad_packet(exc)
            if cmd.address == self.address:
                mine.append(cmd)
        reply: bytes | None = None
        for cmd in mine:
            reply = self._handle_command(cmd)
        return reply

    def _handle_command(self, cmd: Command) -> bytes | None:
        system = cmd.address is None
        if not system and cmd.address != self.address:
            return None  # another pump's packet
        # *RUN/*STP/*PUR (and *<any>): every pump acts at once and none answers: replies would collide.
        silent = system and cmd.name not in SYSTEM_REPLIES
        self.requests.append(cmd)
        self.model.host_contact()
        blocking = self.model.status().unacknowledged - WARNING_ALARMS
        if not blocking:
            self._reported = frozenset()
        fresh = blocking - self._reported
        if fresh and cmd.name != "RESET":
            # The A?x reply acknowledges the alarm on the wire; the command itself is not executed.
            code = next(c for kind, c in ALARM_WIRE if kind in fresh)
            self._reported = blocking
            return None if silent else self._reply(Status.ALARM, alarm=code)
        if blocking and not _is_query(cmd):
            # Reported already: the pump accepts data again. The model's own acknowledgement is taken only
            # now, so until the host changes something the model still shows the alarm (tests observe it).
            self.model.clear_alarm()
            self._reported = frozenset()
            self._announced = frozenset()
        try:
            data = self._execute(cmd)
        except ModelError as exc:
            err = {"NA": ErrorCode.NOT_APPLICABLE, "OOR": ErrorCode.OUT_OF_RANGE}.get(
                exc.code, ErrorCode.NOT_APPLICABLE
            )
            return None if silent else self._reply(self._status_char(), error=err)
        except _WireError as exc:
            return None if silent else self._reply(self._status_char(), error=exc.code)
        except QuantityError:
            # A value the 4-digit display cannot show (e.g. 1000 mL/h read in uL/h): out of range.
            return None if silent else self._reply(self._status_char(), error=ErrorCode.OUT_OF_RANGE)
        except _Restarted:
            return None  # *RESET: the pump restarts; it announces nothing in basic mode (see power_up)
        return None if silent else self._reply(self._status_char(), data=data)

    # ---- internals -----

    def _status_char(self) -> Status:
        if self.model.status().state is PumpState.INFUSING:
            return Status.INFUSING
        return Status.PAUSED if self.paused else Status.STOPPED

    def _reply(
        self, status: Status, *, alarm: AlarmCode | None = None, error: ErrorCode | None = None, data: str = ""
    ) -> bytes:
        return encode_reply(self.address, status, alarm=alarm, error=error, data=data, safe=self.safe)

    def _execute(self, cmd: Command) -> str:
        handler = _HANDLERS.get(cmd.name)
        if handler is None:
            if cmd.name in SETTINGS:
                return self._setting(cmd.name, cmd.data)
            raise _WireError(ErrorCode.UNKNOWN_COMMAND)
        return handler(self, cmd.data)

    def _number(self, text: str) -> Decimal:
        n = _plain_number(text)
        if n is None:
            raise _WireError(ErrorCode.OUT_OF_RANGE)
        return n

    def _setting(self, name: str, data: str) -> str:
        """A stored setting with no effect on the simulated mechanism: query, or set to an allowed value."""
        if not data:
            return self.settings[name]
        allowed = SETTINGS[name]
        if data not in allowed:
            raise _WireError(ErrorCode.OUT_OF_RANGE)
        if self.model.status().state is PumpState.INFUSING and name in STOPPED_ONLY:
            raise ModelError("NA", f"{name}: only while stopped")
        self.settings[name] = data
        return ""

    def _cmd_status(self, data: str) -> str:
        if data:
            raise _WireError(ErrorCode.UNKNOWN_COMMAND)
        return ""

    def _cmd_ver(self, data: str) -> str:
        return self.model.model.replace("-", "") + self.model.firmware

    def _cmd_dia(self, data: str) -> str:
        if not data:
            return format_display(self.model.status().diameter_mm)
        diameter = self._number(data)
        self.model.set_diameter(diameter)
        # Manual §"Syringe diameter": volume units follow the bore, uL at or below 14.0 mm, mL above.
        self.volume_unit = VolumeUnit.UL if diameter <= SMALL_SYRINGE_MM else VolumeUnit.ML
        return ""

    def _cmd_rat(self, data: str) -> str:
        running = self.model.status().state is PumpState.INFUSING
        if not data:
            shown = self.model.status().rate_ml_per_h / RATE_TO_ML_PER_H[self.rate_unit]
            return format_display(shown) + self.rate_unit.value
        if data[0] in "CI" and len(data) > 1 and (data[1].isdigit() or data[1] == "."):
            # RAT C <n> / RAT I <n>: change the rate of the running phase at once, not stored. Without program
            # phases in the simulator both act like a plain RAT (the rate is not kept over a power cycle anyway).
            data = data[1:]
        number, unit = data, self.rate_unit
        for u in RateUnit:
            if data.endswith(u.value):
                number, unit = data[: -len(u.value)], u
                break
        if unit is not self.rate_unit and running:
            raise ModelError("NA", "rate units may not change while infusing")
        if number:
            # The number rule applies to the text as sent, in the units sent: RAT 416.6 UH is valid.
            value = self._number(number)
            self.model.set_rate(value * RATE_TO_ML_PER_H[unit], checked_as_sent=True)
        self.rate_unit = unit
        return ""

    def _cmd_vol(self, data: str) -> str:
        if not data:
            return "0.000" + self.volume_unit.value
        if data in ("ML", "UL"):
            self.volume_unit = VolumeUnit(data)
            return ""
        if self._number(data) != 0:
            raise ModelError("NA", "simulator: target-volume mode is not modelled (VOL 0 only)")
        return ""

    def _cmd_dir(self, data: str) -> str:
        if not data:
            return self.direction
        if data == "INF":
            self.direction = "INF"
            return ""
        if data == "STK":
            if self.model.status().state is PumpState.INFUSING:
                raise ModelError("NA", "DIR STK only while stopped")
            self.direction = "STK"
            return ""
        if data in ("WDR", "REV"):
            raise ModelError("NA", "simulator: infuse-only pump")
        raise _WireError(ErrorCode.OUT_OF_RANGE)

    def _cmd_run(self, data: str) -> str:
        if data:
            raise _WireError(ErrorCode.OUT_OF_RANGE)  # program phases are not modelled
        self.model.run()
        self.paused = False
        return ""

    def _cmd_stp(self, data: str) -> str:
        # Manual §"STP": stopping a running program pauses it (status P, RUN resumes); STP while paused
        # stops it (status S, the program resets to phase 1).
        if self.model.status().state is PumpState.INFUSING:
            self.model.stop()
            self.paused = True
        else:
            self.paused = False
        return ""

    def _cmd_pur(self, data: str) -> str:
        raise ModelError("NA", "simulator: purge (infusing at the maximum rate) is not modelled")

    def _cmd_dis(self, data: str) -> str:
        delivered = self.model.status().delivered_ml / VOLUME_TO_ML[self.volume_unit]
        return f"I{format_display(delivered)}W{format_display(Decimal(0))}{self.volume_unit.value}"

    def _cmd_cld(self, data: str) -> str:
        if data == "INF":
            self.model.clear_delivered()
        elif data != "WDR":
            raise _WireError(ErrorCode.OUT_OF_RANGE)
        return ""

    def _cmd_saf(self, data: str) -> str:
        if not self.safe_mode_supported:
            raise _WireError(ErrorCode.UNKNOWN_COMMAND)
        if not data:
            return str(self.model.status().deadman_s)
        if not data.isdigit() or len(data) > 3 or int(data) > 255:
            raise _WireError(ErrorCode.OUT_OF_RANGE)
        self.model.set_deadman(int(data))
        self.model.host_contact()  # the SAF packet itself arms the timer (see module docstring)
        return ""

    def _cmd_adr(self, data: str) -> str:
        """``ADR`` query; ``ADR <n> [B <baud>]`` sets the network address (and stored baud rate)."""
        if not data:
            return f"{self.address:02d}"
        number, _, baud = data.partition("B")
        if not number.isdigit() or int(number) > 99 or (baud and (not baud.isdigit() or int(baud) not in BAUDS)):
            raise _WireError(ErrorCode.OUT_OF_RANGE)
        self.address = int(number)
        if baud:
            self.baud = int(baud)
        return ""

    def _cmd_phn(self, data: str) -> str:
        # A single-phase program (phase 1, function RAT) is all the simulator has.
        if not data:
            return "01"
        if data.isdigit() and int(data) == 1:
            return ""
        raise ModelError("NA", "simulator: only program phase 1 exists")

    def _cmd_fun(self, data: str) -> str:
        if not data:
            return "RAT"
        if data == "RAT":
            return ""
        raise ModelError("NA", "simulator: program functions other than RAT are not modelled")

    def _cmd_reset(self, data: str) -> str:
        # *RESET: the pump restarts as after power-up (settings kept, POWER_INTERRUPTED latched).
        self.model.stop()
        self.paused = False
        self.model.power_cycle()
        raise _Restarted


def _is_query(cmd: Command) -> bool:
    """Queries only read; anything else (a set, RUN, STP, CLD) is the host acting on the pump."""
    return cmd.name in ("", "VER", "DIS") or (
        (cmd.name in ("DIA", "RAT", "VOL", "DIR", "SAF", "ADR", "PHN", "FUN") or cmd.name in SETTINGS)
        and not cmd.data
    )


class _WireError(Exception):
    def __init__(self, code: ErrorCode) -> None:
        self.code = code
        super().__init__(code.value)


class _Restarted(Exception):
    """The pump restarted (``*RESET``): no reply."""


SMALL_SYRINGE_MM: Final = Decimal("14.0")
BAUDS: Final = (300, 1200, 2400, 9600, 19200)
# System commands (``*`` prefix, any address) that the pump answers: they are for finding or resetting the one
# pump on a line whose address is unknown. *RESET restarts without a reply. Every other * command is executed
# by every pump and answered by none.
SYSTEM_REPLIES: Final = frozenset({"ADR", "VER", "", "SAF", "RESET"})

# Stored settings (NE-1000 manual Appendix B) the simulator keeps and answers but that change nothing in the
# model: allowed values, first is the default. The manual lists more detail per setting (trigger modes, buzzer
# counts); the simulator accepts exactly these forms.
SETTINGS: Final[dict[str, tuple[str, ...]]] = {
    "AL": ("0", "1"),  # alarm buzzer on/off
    "PF": ("0", "1"),  # power-failure mode: 1 = resume after power returns (never on a drug pump)
    "BP": ("0", "1"),  # key beep
    "BUZ": ("0", "1"),  # buzzer now
    "LOC": ("0", "1", "P0", "P1"),  # keypad lockout
    "TRG": ("FT", "FH", "FL", "F2", "LE", "ST", "T2"),  # TTL trigger input mode
    "DIN": ("0", "1"),  # TTL direction input enable
    "ROM": ("0", "1"),  # rate output mode
    "OUT": ("0", "1"),  # TTL output level
    "IN": ("0",),  # TTL input level (read-only in effect: nothing is wired to it)
}
STOPPED_ONLY: Final = frozenset({"TRG", "DIN", "PF"})

_HANDLERS: Final[dict[str, Callable[[NewEraPumpProtocol, str], str]]] = {
    "": NewEraPumpProtocol._cmd_status,
    "VER": NewEraPumpProtocol._cmd_ver,
    "DIA": NewEraPumpProtocol._cmd_dia,
    "RAT": NewEraPumpProtocol._cmd_rat,
    "VOL": NewEraPumpProtocol._cmd_vol,
    "DIR": NewEraPumpProtocol._cmd_dir,
    "RUN": NewEraPumpProtocol._cmd_run,
    "STP": NewEraPumpProtocol._cmd_stp,
    "PUR": NewEraPumpProtocol._cmd_pur,
    "DIS": NewEraPumpProtocol._cmd_dis,
    "CLD": NewEraPumpProtocol._cmd_cld,
    "SAF": NewEraPumpProtocol._cmd_saf,
    "ADR": NewEraPumpProtocol._cmd_adr,
    "PHN": NewEraPumpProtocol._cmd_phn,
    "FUN": NewEraPumpProtocol._cmd_fun,
    "RESET": NewEraPumpProtocol._cmd_reset,
}


# ============================================================================================== transports


@dataclass
class Endpoint:
    """A running simulator. ``url`` is what a driver opens."""

    url: str
    protocol: NewEraPumpProtocol
    faults: FaultPlan
    device: str | None = None  # PTY slave path
    port: int | None = None  # TCP port
    _hangup: Callable[[], None] | None = None

    def hang_up(self) -> None:
        """Pull the cable (PTY: close the master; TCP: drop open connections)."""
        if self._hangup is not None:
            self._hangup()


class _Session:
    """Bytes in -> frames -> replies through the fault plan -> bytes out, one request at a time."""

    def __init__(
        self,
        protocol: NewEraPumpProtocol,
        faults: FaultPlan,
        wire_time: float | None,
        write: Callable[[bytes], None],
        disconnect: Callable[[], None],
    ) -> None:
        self.protocol = protocol
        self.faults = faults
        self.wire_time = wire_time
        self.write = write
        self.disconnect = disconnect
        self.decoder = FrameDecoder(Direction.TO_PUMP)
        self.last_byte = 0.0
        self.closed = False

    def _per_byte(self) -> float:
        if self.wire_time is not None:
            return self.wire_time
        return self.faults.wire_time_per_byte_s or 0.0

    async def feed(self, data: bytes) -> None:
        if self.faults.is_cut:
            self.faults.reaches_pump()  # counted as lost: the bytes never reach the pump
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.decoder.pending and now - self.last_byte > INTER_BYTE_TIMEOUT_S:
            self.decoder.discard_partial()
        self.last_byte = now
        self.decoder.feed(data)
        while not self.closed:
            try:
                frame = self.decoder.next_frame()
            except ProtocolError as exc:
                reply = self.protocol.bad_packet(exc)
                if reply is not None:
                    await self._send(reply, 0)
                continue
            if frame is None:
                return
            reply = self.protocol.handle(frame)
            if reply is not None:
                await self._send(reply, len(frame.payload) + (5 if frame.safe else 1))

    async def _send(self, reply: bytes, request_len: int) -> None:
        if await send_reply(self.faults, reply, self.write, self.disconnect, self._per_byte(), request_len):
            self.closed = True


AUTO_ALARM_POLL_S: Final = 0.05  # how often the simulator looks for an alarm to announce (safe mode)


async def _auto_alarm(protocol: NewEraPumpProtocol, plan: FaultPlan, write: Callable[[bytes], None]) -> None:
    """Safe-mode Auto-Alarm: the model is lazy, so look for a new alarm now and then and announce it."""
    await announce_unsolicited(protocol, plan, write, AUTO_ALARM_POLL_S)


@contextlib.asynccontextmanager
async def serve_newera(
    model: PumpModel,
    faults: FaultPlan | None = None,
    *,
    pty: bool = False,
    tcp_port: int | None = None,
    host: str = "127.0.0.1",
    address: int = 0,
    wire_time: float | None = None,
    power_up: bool = False,
    safe_mode: bool = True,
) -> AsyncIterator[Endpoint]:
    """Serve ``model`` as a New Era pump on a PTY (``pty=True``) or TCP (``tcp_port``, 0 = ephemeral).

    ``power_up=True`` starts like a pump just switched on: POWER_INTERRUPTED latched; in safe mode ``A?R`` is
    sent unprompted (on the PTY; on TCP to each new connection, since nobody listens before that); in basic
    mode nothing is sent until the host asks. ``safe_mode=False`` imitates firmware without safe mode.
    """
    if pty == (tcp_port is not None):
        raise ValueError("serve_newera: give exactly one of pty=True or tcp_port=N")
    if not 0 <= address <= 99:
        raise ValueError(f"address: must be 0..99, got {address}")
    plan = faults if faults is not None else FaultPlan()
    protocol = NewEraPumpProtocol(model, address=address, safe_mode_supported=safe_mode)
    announce = protocol.power_up() if power_up else None
    if pty:
        async with _serve_pty(protocol, plan, wire_time, announce) as endpoint:
            yield endpoint
    else:
        assert tcp_port is not None
        async with _serve_tcp(protocol, plan, wire_time, announce, host, tcp_port) as endpoint:
            yield endpoint


@contextlib.asynccontextmanager
async def _serve_pty(
    protocol: NewEraPumpProtocol, plan: FaultPlan, wire_time: float | None, announce: bytes | None
) -> AsyncIterator[Endpoint]:
    def session(write: Write, disconnect: HangUp) -> _Session:
        return _Session(protocol, plan, wire_time, write, disconnect)

    async with serve_pty(session, functools.partial(_auto_alarm, protocol, plan), announce) as (device, hang_up):
        yield Endpoint(
            f"newera+serial://{device}?address={protocol.address}", protocol, plan, device=device, _hangup=hang_up
        )


@contextlib.asynccontextmanager
async def _serve_tcp(
    protocol: NewEraPumpProtocol,
    plan: FaultPlan,
    wire_time: float | None,
    announce: bytes | None,
    host: str,
    port: int,
) -> AsyncIterator[Endpoint]:
    def session(write: Write, disconnect: HangUp) -> _Session:
        return _Session(protocol, plan, wire_time, write, disconnect)

    background = functools.partial(_auto_alarm, protocol, plan)
    async with serve_tcp(session, background, host, port, announce) as (chosen, hang_up):
        yield Endpoint(
            f"newera+socket://{host}:{chosen}?address={protocol.address}", protocol, plan, port=chosen, _hangup=hang_up
        )
