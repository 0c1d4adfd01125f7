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
import os
import socket
import termios
import tty
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
    # The most recent valid commands (for tests and benches); bounded, since a bench simulator runs for days.
    requests: deque[Command] = field(default_factory=lambda: deque(maxlen=4096))
    # Called with every whole frame from the host, before it is parsed or addressed (tests record the wire).
    tap: Callable[[Frame], None] | None = None
    _reported: frozenset[AlarmKind] = frozenset()  # alarms already announced with A?x (acknowledged)

    @property
    def safe(self) -> bool:
        # SAF is stored in the model (like NVRAM): it survives a power cycle, and so does the framing.
        return self.model.status().deadman_s > 0

    def power_up(self) -> bytes:
        """Power applied: the model latches POWER_INTERRUPTED; the pump announces A?R unprompted."""
        self.model.power_cycle()
        return self._reply(Status.ALARM, alarm=AlarmCode.RESET)

    def bad_packet(self, error: ProtocolError) -> bytes | None:
        """A corrupt packet: a safe-mode pump answers ?COM; a basic-mode one stays silent (noise)."""
        del error  # the reason is for logs; the pump's answer does not depend on it
        if not self.safe:
            return None
        return self._reply(self._status_char(), error=ErrorCode.COMMUNICATION)

    def handle(self, frame: Frame) -> bytes | None:
        if self.tap is not None:
            self.tap(frame)
        try:
            cmd = parse_command(frame.payload)
        except ProtocolError as exc:
            return self.bad_packet(exc)
        if cmd.address is not None and cmd.address != self.address:
            return None  # another pump's packet
        self.requests.append(cmd)
        self.model.host_contact()
        blocking = self.model.status().unacknowledged - WARNING_ALARMS
        if not blocking:
            self._reported = frozenset()
        fresh = blocking - self._reported
        if fresh:
            # The A?x reply acknowledges the alarm on the wire; the command itself is not executed.
            code = next(c for kind, c in ALARM_WIRE if kind in fresh)
            self._reported = blocking
            return None if cmd.address is None else self._reply(Status.ALARM, alarm=code)
        if blocking and not _is_query(cmd):
            # Reported already: the pump accepts data again. The model's own acknowledgement is taken only
            # now, so until the host changes something the model still shows the alarm (tests observe it).
            self.model.clear_alarm()
            self._reported = frozenset()
        try:
            data = self._execute(cmd)
        except ModelError as exc:
            err = {"NA": ErrorCode.NOT_APPLICABLE, "OOR": ErrorCode.OUT_OF_RANGE}.get(
                exc.code, ErrorCode.NOT_APPLICABLE
            )
            return None if cmd.address is None else self._reply(self._status_char(), error=err)
        except _WireError as exc:
            return None if cmd.address is None else self._reply(self._status_char(), error=exc.code)
        except QuantityError:
            # A value the 4-digit display cannot show (e.g. 1000 mL/h read in uL/h): out of range.
            return None if cmd.address is None else self._reply(self._status_char(), error=ErrorCode.OUT_OF_RANGE)
        return None if cmd.address is None else self._reply(self._status_char(), data=data)

    # ---- internals -----

    def _status_char(self) -> Status:
        return Status.INFUSING if self.model.status().state is PumpState.INFUSING else Status.STOPPED

    def _reply(
        self, status: Status, *, alarm: AlarmCode | None = None, error: ErrorCode | None = None, data: str = ""
    ) -> bytes:
        return encode_reply(self.address, status, alarm=alarm, error=error, data=data, safe=self.safe)

    def _execute(self, cmd: Command) -> str:
        handler = _HANDLERS.get(cmd.name)
        if handler is None:
            raise _WireError(ErrorCode.UNKNOWN_COMMAND)
        return handler(self, cmd.data)

    def _number(self, text: str) -> Decimal:
        n = _plain_number(text)
        if n is None:
            raise _WireError(ErrorCode.OUT_OF_RANGE)
        return n

    def _cmd_status(self, data: str) -> str:
        if data:
            raise _WireError(ErrorCode.UNKNOWN_COMMAND)
        return ""

    def _cmd_ver(self, data: str) -> str:
        return self.model.model.replace("-", "") + self.model.firmware

    def _cmd_dia(self, data: str) -> str:
        if not data:
            return format_display(self.model.status().diameter_mm)
        self.model.set_diameter(self._number(data))
        return ""

    def _cmd_rat(self, data: str) -> str:
        running = self.model.status().state is PumpState.INFUSING
        if not data:
            shown = self.model.status().rate_ml_per_h / RATE_TO_ML_PER_H[self.rate_unit]
            return format_display(shown) + self.rate_unit.value
        number, unit = data, self.rate_unit
        for u in RateUnit:
            if data.endswith(u.value):
                number, unit = data[: -len(u.value)], u
                break
        if unit is not self.rate_unit and running:
            raise ModelError("NA", "rate units may not change while infusing")
        if number:
            value = self._number(number)
            try:
                ml_per_h = value * RATE_TO_ML_PER_H[unit]
            except (InvalidOperation, QuantityError):  # pragma: no cover - exact decimals
                raise _WireError(ErrorCode.OUT_OF_RANGE) from None
            self.model.set_rate(ml_per_h)
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
            return "INF"
        if data == "INF":
            return ""
        if data in ("WDR", "REV"):
            raise ModelError("NA", "simulator: infuse-only pump")
        raise _WireError(ErrorCode.OUT_OF_RANGE)

    def _cmd_run(self, data: str) -> str:
        if data:
            raise _WireError(ErrorCode.OUT_OF_RANGE)  # program phases are not modelled
        self.model.run()
        return ""

    def _cmd_stp(self, data: str) -> str:
        self.model.stop()
        return ""

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
        if not data:
            return str(self.model.status().deadman_s)
        if not data.isdigit() or len(data) > 3 or int(data) > 255:
            raise _WireError(ErrorCode.OUT_OF_RANGE)
        self.model.set_deadman(int(data))
        self.model.host_contact()  # the SAF packet itself arms the timer (see module docstring)
        return ""


def _is_query(cmd: Command) -> bool:
    """Queries only read; anything else (a set, RUN, STP, CLD) is the host acting on the pump."""
    return cmd.name in ("", "VER", "DIS") or (cmd.name in ("DIA", "RAT", "VOL", "DIR", "SAF") and not cmd.data)


class _WireError(Exception):
    def __init__(self, code: ErrorCode) -> None:
        self.code = code
        super().__init__(code.value)


_HANDLERS: Final[dict[str, Callable[[NewEraPumpProtocol, str], str]]] = {
    "": NewEraPumpProtocol._cmd_status,
    "VER": NewEraPumpProtocol._cmd_ver,
    "DIA": NewEraPumpProtocol._cmd_dia,
    "RAT": NewEraPumpProtocol._cmd_rat,
    "VOL": NewEraPumpProtocol._cmd_vol,
    "DIR": NewEraPumpProtocol._cmd_dir,
    "RUN": NewEraPumpProtocol._cmd_run,
    "STP": NewEraPumpProtocol._cmd_stp,
    "DIS": NewEraPumpProtocol._cmd_dis,
    "CLD": NewEraPumpProtocol._cmd_cld,
    "SAF": NewEraPumpProtocol._cmd_saf,
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
        action = self.faults.on_reply(reply)
        per_byte = self._per_byte()
        if per_byte:
            await asyncio.sleep(per_byte * (request_len + len(action.payload or reply)))
        if action.kind == "drop":
            return
        if action.kind == "disconnect":
            self.closed = True
            self.disconnect()
            return
        if action.kind == "delay":
            await asyncio.sleep(action.delay_s)
        self.write(action.payload)


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
) -> AsyncIterator[Endpoint]:
    """Serve ``model`` as a New Era pump on a PTY (``pty=True``) or TCP (``tcp_port``, 0 = ephemeral).

    ``power_up=True`` starts like a pump just switched on: POWER_INTERRUPTED latched and ``A?R`` sent
    unprompted (on the PTY; on TCP to each new connection, since nobody listens before that).
    """
    if pty == (tcp_port is not None):
        raise ValueError("serve_newera: give exactly one of pty=True or tcp_port=N")
    if not 0 <= address <= 99:
        raise ValueError(f"address: must be 0..99, got {address}")
    plan = faults if faults is not None else FaultPlan()
    protocol = NewEraPumpProtocol(model, address=address)
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
    loop = asyncio.get_running_loop()
    master, slave = os.openpty()
    # Raw at once: with the default line discipline the slave would echo our replies back to us.
    tty.setraw(slave, termios.TCSANOW)
    os.set_blocking(master, False)
    device = os.ttyname(slave)
    state = {"master": master}
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def write(data: bytes) -> None:
        fd = state["master"]
        if fd < 0:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(fd, data)  # a full buffer means nobody reads: the bytes are lost, as on a wire

    def hang_up() -> None:
        fd = state["master"]
        if fd >= 0:
            loop.remove_reader(fd)
            os.close(fd)
            state["master"] = -1

    def readable() -> None:
        try:
            data = os.read(state["master"], 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # EIO: no slave open right now; we hold our own slave fd, so this is rare
        if data:
            queue.put_nowait(data)

    session = _Session(protocol, plan, wire_time, write, hang_up)

    async def worker() -> None:
        while True:
            data = await queue.get()
            await session.feed(data)
            if session.closed:
                return

    loop.add_reader(master, readable)
    if announce is not None:
        write(announce)
    task = asyncio.create_task(worker())
    try:
        yield Endpoint(
            f"newera+serial://{device}?address={protocol.address}", protocol, plan, device=device, _hangup=hang_up
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        hang_up()
        os.close(slave)


@contextlib.asynccontextmanager
async def _serve_tcp(
    protocol: NewEraPumpProtocol,
    plan: FaultPlan,
    wire_time: float | None,
    announce: bytes | None,
    host: str,
    port: int,
) -> AsyncIterator[Endpoint]:
    writers: set[asyncio.StreamWriter] = set()
    pending_announce = [announce]

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def write(data: bytes) -> None:
            if not writer.is_closing():
                writer.write(data)

        session = _Session(protocol, plan, wire_time, write, writer.close)
        if pending_announce[0] is not None:
            write(pending_announce[0])
            pending_announce[0] = None
        try:
            while not session.closed:
                data = await reader.read(4096)
                if not data:
                    break
                await session.feed(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writers.discard(writer)
            writer.close()

    def hang_up() -> None:
        for w in list(writers):
            w.close()

    server = await asyncio.start_server(client, host, port)
    chosen = server.sockets[0].getsockname()[1]
    try:
        yield Endpoint(
            f"newera+socket://{host}:{chosen}?address={protocol.address}", protocol, plan, port=chosen, _hangup=hang_up
        )
    finally:
        server.close()
        hang_up()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
