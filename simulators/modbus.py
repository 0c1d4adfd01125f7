"""Modbus pump simulator: pymodbus's server in front of the shared pump physics model.

One server (a "gateway") answers several unit ids, each backed by its own ``PumpModel`` from a ``World``.
The register map (``config/drivers/modbus-pump.toml`` or another map file) decides where every value lives;
this module computes each point from the model by name, so a new device map needs no new code here.

Transports: Modbus TCP on 127.0.0.1 (port 0 = ephemeral), or Modbus RTU over a PTY. For RTU the pymodbus
serial server opens the slave end of one PTY pair, the host (driver) opens the slave end of a second pair, and
a small byte bridge joins the two masters (the classic ``socat pty,pty`` arrangement): both sides then run
their real serial code paths, and each side's slave fd is also held open here so a host reopening its port
never sees a hang-up.

pymodbus 3.16 datastore choice (documented because the API is in flux): in 3.16 the server runs *every*
datastore through ``pymodbus.simulator.SimDevice``/``SimCore`` (``ModbusDeviceContext`` and
``ModbusSequentialDataBlock`` are converted into a ``SimDevice`` internally and warn "removed in v4"). Only
``SimDevice(action=...)`` offers a per-request hook that sees writes before they land and may answer with an
exception code, which is exactly what "values computed from the model on every read" and "writes go to the
model, which may refuse them" need. The alternative -- a deprecated context plus ``server.async_setValues``
refreshes -- has no write notification and would serve stale values between refreshes. So we use
``SimDevice``/``SimData`` with an ``action`` (labelled experimental upstream; pymodbus is pinned to 3.16.* and
tests/modbus pins the behaviour with a plain pymodbus client), with separate blocks per table (``simdata`` as a
4-tuple) so coils and discrete inputs are bit-addressed as in the standard.

Faults: each unit's ``FaultPlan`` (from the world, or given) is consulted for every reply of that unit
(drop / garble / delay / disconnect, plus the plan's per-byte wire time). RTU: a garbled reply is the plan's
byte-flipped frame (the CRC catches it); a disconnect hangs up the host's PTY for good (a pulled cable).
TCP: a disconnect closes that client's connection; a garble corrupts the MBAP transaction id, because Modbus/TCP
has no checksum of its own (payload corruption is undetectable by design and prevented by TCP). An
A cut (``FaultPlan.cut``) makes the unit unreachable: its requests never reach its registers (no watchdog
contact, no write) and get no answer, on TCP and RTU alike. An
``ExceptionPlan`` per unit injects Modbus exception responses (``endpoint.exception_next(unit, code)``).
A request for a unit id that the gateway does not serve gets exception 0x0B (gateway target failed to
respond) on TCP and silence on RTU.

Every request to a unit, valid or not, counts as host contact for that pump's dead-man (the map's watchdog).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import threading
import tty
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Final

from pymodbus import ModbusDeviceIdentification
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simutils import SimUtils
from pymodbus.transaction import TransactionManager

from driverd.core.errors import Problem, ValidationError
from driverd.core.quantities import Resolution
from drivers.base import AlarmKind, PumpState
from drivers.modbus import codec
from drivers.modbus.codec import CodecError
from drivers.modbus.regmap import TABLES, Point, RegisterMap, Table, load_map
from simulators.faults import FaultPlan
from simulators.pump import ModelError, PumpModel
from simulators.world import World

__all__ = ["SIM_FIRMWARE", "SIM_MODEL", "ExceptionPlan", "ModbusEndpoint", "serve_modbus"]

SIM_MODEL: Final = "DRV-MB1"
SIM_FIRMWARE: Final = "1.0.0-sim"
TCP_BACKLOG: Final = 1024  # listen backlog of a TCP gateway: see _TcpServer
_TABLE_OF_FC: Final[dict[int, Table]] = {
    1: "coils",
    5: "coils",
    15: "coils",
    2: "discrete_inputs",
    3: "holding_registers",
    6: "holding_registers",
    16: "holding_registers",
    22: "holding_registers",
    23: "holding_registers",
    4: "input_registers",
}
_WRITE_FCS: Final = frozenset({5, 6, 15, 16})  # their read-back is the echo of what was written
_MODEL_ERROR_CODES: Final[dict[str, ExcCodes]] = {
    "OOR": ExcCodes.ILLEGAL_VALUE,  # 03: out of range / not representable
    "NA": ExcCodes.DEVICE_FAILURE,  # 04: cannot do it now
    "ALARM": ExcCodes.DEVICE_FAILURE,  # 04: an unacknowledged alarm blocks it
}


class ExceptionPlan:
    """Modbus exception responses to inject for one unit: the next n requests that reach the datastore."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[ExcCodes] = deque()
        self.history: list[int] = []

    def exception_next(self, code: int, n: int = 1) -> None:
        try:
            exc = ExcCodes(code)
        except ValueError:
            raise ValidationError(
                [Problem("code", "modbus-exception", f"not a Modbus exception code: {code!r}")]
            ) from None
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:
            raise ValidationError([Problem("n", "range", f"must be an int 1..1000000, got {n!r}")])
        with self._lock:
            self._queue.extend([exc] * n)

    def take(self) -> ExcCodes | None:
        with self._lock:
            if not self._queue:
                return None
            exc = self._queue.popleft()
            self.history.append(int(exc))
            return exc


class _Refused(Exception):
    """Internal: a write the device refuses with this exception code."""

    def __init__(self, code: ExcCodes) -> None:
        self.code = code


def _floor_to_scale(point: Point, value: Decimal) -> Decimal:
    """Truncate a measured quantity to what the point can show (never over-report), saturating at the top."""
    scale = point.scale or Decimal(1)
    raw = (value / scale).to_integral_value(rounding=ROUND_FLOOR)
    top = Decimal(0xFFFF if point.width == 1 else 0xFFFF_FFFF)
    return min(max(raw, Decimal(0)), top) * scale


class _Unit:
    """One simulated pump behind the gateway: computes points from the model, applies writes to it."""

    def __init__(self, unit_id: int, model: PumpModel, regmap: RegisterMap, exceptions: ExceptionPlan) -> None:
        self.unit_id = unit_id
        self.model = model
        self.map = regmap
        self.exceptions = exceptions
        self.target_volume = Decimal(0)
        self.extra: dict[str, Decimal | bool] = {}  # writable points of other maps that the model lacks
        self.bit_addresses: dict[str, frozenset[int]] = {
            t: frozenset(p.address for p in regmap.table(t)) for t in ("coils", "discrete_inputs")
        }

    # -- pymodbus SimDevice blocks -------------------------------------------------------------------------

    def device(self) -> SimDevice:
        blocks: list[list[SimData]] = []
        for table in TABLES:
            points = self.map.table(table)
            if table in ("coils", "discrete_inputs"):
                blocks.append(
                    [
                        SimData(p.address, values=[False], datatype=DataType.BITS, readonly=not p.writable)
                        for p in points
                    ]
                )
            else:
                blocks.append(
                    [
                        SimData(
                            p.address, count=p.width, values=0, datatype=DataType.REGISTERS, readonly=not p.writable
                        )
                        for p in points
                    ]
                )
        # Every table is non-empty: the map's required points put at least one point in each.
        coils, dis, hrs, irs = blocks
        return SimDevice(self.unit_id, simdata=(coils, dis, hrs, irs), action=self.action)

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        injected = self.exceptions.take()
        if injected is not None:
            return injected
        table = _TABLE_OF_FC.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        try:
            if set_values is not None and function_code not in (3, 4):
                if table == "coils":
                    self._write_bits(address, [bool(v) for v in set_values])
                else:
                    self._write_registers(address, [int(v) for v in set_values])
            elif function_code not in _WRITE_FCS:
                self._refresh(table, start_address, address, count, registers)
        except _Refused as refused:
            return refused.code
        return None

    # -- reads: every point from the model, by name ----------------------------------------------------------

    def _refresh(self, table: Table, start_address: int, address: int, count: int, registers: list[int]) -> None:
        points = self.map.table(table)
        if table in ("coils", "discrete_inputs"):
            status = self.model.status()
            nbits = 16 * (len(registers) - 1)  # the last register is pymodbus's end marker
            bits = [False] * nbits
            base = 16 * start_address
            for p in points:
                if 0 <= p.address - base < nbits:
                    bits[p.address - base] = self._bit(p, status.state, status.alarms)
            registers[: len(registers) - 1] = SimUtils.bitsToRegisters(bits)
            return
        # Only the points the request touches: a status poll need not encode the model and firmware text
        # (measured: 32 -> 19 µs of the ~130 µs a loopback request costs the simulator; bench/scale.py).
        end = address + count
        points = [p for p in points if p.address < end and address < p.end]
        values = self._register_values(points)
        for p in points:
            offset = p.address - start_address
            registers[offset : offset + p.width] = values[p.name]

    def _bit(self, p: Point, state: PumpState, alarms: frozenset[AlarmKind]) -> bool:
        if p.name in ("run", "running"):
            return state is PumpState.INFUSING
        if p.name == "alarm_active":
            return state is PumpState.ALARM
        if p.alarm is not None:
            if p.alarm in alarms:
                return True
            if p.alarm is AlarmKind.OTHER:  # catch-all for kinds this map has no own bit for
                own = {q.alarm for q in self.map.alarm_points()}
                return any(a not in own for a in alarms)
            return False
        value = self.extra.get(p.name, False)
        return bool(value)

    def _register_values(self, points: Sequence[Point]) -> dict[str, list[int]]:
        st = self.model.status()
        name, firmware = self.model.identity
        known: dict[str, Decimal | str] = {
            "rate_setpoint": st.rate_ml_per_h,
            "rate_readback": st.rate_ml_per_h,
            "diameter_setpoint": st.diameter_mm,
            "diameter_readback": st.diameter_mm,
            "target_volume": self.target_volume,
            "watchdog_timeout": Decimal(st.deadman_s),
            "command": Decimal(0),
            "delivered_volume": st.delivered_ml,
            "remaining_volume": st.remaining_ml,
            "battery": Decimal(st.battery_pct),
            "map_version": Decimal(self.map.map_version),
            "model": name,
            "firmware": firmware,
        }
        out: dict[str, list[int]] = {}
        for p in points:
            value = known.get(p.name, self.extra.get(p.name, Decimal(0)))
            if isinstance(value, str):
                out[p.name] = codec.encode(p, value[: 2 * p.length])
            elif isinstance(value, bool):
                out[p.name] = codec.encode(p, Decimal(int(value)))
            else:
                out[p.name] = codec.encode(p, value if p.type == "float32" else _floor_to_scale(p, value))
        return out

    # -- writes: decoded exactly, applied to the model, refused with the standard exception codes ------------

    def _write_bits(self, address: int, values: list[bool]) -> None:
        by_address = {p.address: p for p in self.map.table("coils")}
        for i in range(len(values)):
            p = by_address.get(address + i)
            if p is None or not p.writable:
                raise _Refused(ExcCodes.ILLEGAL_ADDRESS)
        for i, value in enumerate(values):
            p = by_address[address + i]
            if p.name == "run":
                self._call(self.model.run if value else self.model.stop)
            else:
                self.extra[p.name] = value

    def _write_registers(self, address: int, values: list[int]) -> None:
        end = address + len(values)
        touched = [p for p in self.map.table("holding_registers") if p.address < end and address < p.end]
        decoded: list[tuple[Point, Decimal]] = []
        for p in touched:
            if p.address < address or p.end > end or not p.writable:
                raise _Refused(ExcCodes.ILLEGAL_ADDRESS)  # a half of a 32-bit value, or a read-only point
            try:
                value = codec.decode(p, values[p.address - address : p.end - address])
            except CodecError:
                raise _Refused(ExcCodes.ILLEGAL_VALUE) from None
            if not isinstance(value, Decimal):
                raise _Refused(ExcCodes.ILLEGAL_ADDRESS)  # text points are not writable here
            decoded.append((p, value))
        if sum(p.width for p in touched) != len(values):
            raise _Refused(ExcCodes.ILLEGAL_ADDRESS)  # the write covers unmapped addresses
        for p, value in decoded:
            self._apply(p, value)

    def _apply(self, p: Point, value: Decimal) -> None:
        if p.name == "rate_setpoint":
            self._call(lambda: self.model.set_rate(value))
        elif p.name == "diameter_setpoint":
            self._call(lambda: self.model.set_diameter(value))
        elif p.name == "target_volume":
            if value != 0:
                raise _Refused(ExcCodes.ILLEGAL_VALUE)  # the reference device runs continuous only
            self.target_volume = value
        elif p.name == "watchdog_timeout":
            if value != value.to_integral_value():
                raise _Refused(ExcCodes.ILLEGAL_VALUE)
            self._call(lambda: self.model.set_deadman(int(value)))
        elif p.name == "command":
            self._command(int(value))
        else:
            self.extra[p.name] = value

    def _command(self, magic: int) -> None:
        commands = {v: k for k, v in self.map["command"].commands.items()}
        name = commands.get(magic)
        if name == "acknowledge_alarms":
            self._call(self.model.clear_alarm)
        elif name == "clear_delivered":
            if self.model.status().state is PumpState.INFUSING:
                raise _Refused(ExcCodes.DEVICE_FAILURE)
            self._call(self.model.clear_delivered)
        else:
            raise _Refused(ExcCodes.ILLEGAL_VALUE)  # a wrong magic value does nothing

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except ModelError as exc:
            raise _Refused(_MODEL_ERROR_CODES.get(exc.code, ExcCodes.DEVICE_FAILURE)) from None


# ---- servers with per-unit reply faults --------------------------------------------------------------------


class _Gateway:
    """What the server's connections share: units, their fault plans, and the contact hook."""

    def __init__(
        self,
        units: Mapping[int, _Unit],
        plans: Mapping[int, FaultPlan],
        *,
        serial: bool,
        on_request: Callable[[ModbusPDU], None] | None = None,
    ) -> None:
        self.units = units
        self.plans = plans
        self.serial = serial
        self.on_request = on_request
        self.hang_up: Callable[[], None] = lambda: None

    def bits_mapped(self, request: ModbusPDU) -> bool:
        """Whether every coil / discrete input a bit request touches is a point of the unit's map."""
        table = {1: "coils", 5: "coils", 15: "coils", 2: "discrete_inputs"}.get(request.function_code)
        unit = self.units.get(request.dev_id)
        if table is None or unit is None:
            return True
        count = len(request.bits) if request.function_code == 15 else 1 if request.function_code == 5 else request.count
        mapped = unit.bit_addresses[table]
        return all(a in mapped for a in range(request.address, request.address + max(count, 1)))

    def trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            if self.on_request is not None:
                self.on_request(pdu)
            unit = self.units.get(pdu.dev_id)
            plan = self.plans.get(pdu.dev_id)
            if unit is not None and not (plan is not None and plan.is_cut):
                unit.model.host_contact()  # any request re-arms the watchdog, even one that fails
        return pdu


class _FaultyHandler(ServerRequestHandler):
    """A connection handler that passes each reply through its unit's FaultPlan before it hits the wire.

    Pipelining (issue 16.9): pymodbus 3.16's handler decodes one frame per read and keeps the rest of the
    buffer until more bytes arrive, so a client that sends several requests in one TCP segment gets only the
    first answered. Here every whole frame in the buffer is decoded and answered, in order (one at a time:
    handle_request works on the single ``last_pdu`` slot).
    """

    gateway: _Gateway
    _pending: deque[tuple[ModbusPDU, tuple[Any, ...] | None]]
    _draining: bool

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        if not hasattr(self, "_pending"):
            self._pending, self._draining = deque(), False
        used = 0
        while used < len(data):
            try:
                n = TransactionManager.callback_data(self, data[used:], addr)
            except ModbusIOException:
                # Undecodable: let pymodbus answer it as it does (illegal function) and drop the buffer.
                return used + ServerRequestHandler.callback_data(self, data[used:], addr)
            used += n
            if self.last_pdu is None or n == 0:
                break
            self._pending.append((self.last_pdu, addr))
        if self._pending and not self._draining:
            self._draining = True
            self.loop.create_task(self._drain_pending())
        return used

    async def _drain_pending(self) -> None:
        try:
            while self._pending:
                self.last_pdu, self.last_addr = self._pending.popleft()
                await self.handle_request()
        finally:
            self._draining = False

    async def handle_request(self) -> None:
        request = self.last_pdu
        plan = self.gateway.plans.get(request.dev_id) if request is not None else None
        if plan is not None and not plan.reaches_pump():
            return  # the unit's cable is cut: the request never reaches it, and it does not answer
        if request is not None and request.dev_id not in self.gateway.units:
            if self.gateway.serial:
                return  # nobody on the bus answers for this address
            # A gateway answers for a unit it cannot reach with exception 0x0B.
            reply = ExceptionResponse(request.function_code, ExcCodes.GATEWAY_NO_RESPONSE, device_id=request.dev_id)
            reply.transaction_id = request.transaction_id
            super().pdu_send(reply, self.last_addr)
            return
        if request is not None and not self.gateway.bits_mapped(request):
            # pymodbus keeps bits 16 to a register, so an unmapped bit next to a mapped one would read as 0.
            # The map's own rule: every address a request touches must be a point, else exception 02.
            reply = ExceptionResponse(request.function_code, ExcCodes.ILLEGAL_ADDRESS, device_id=request.dev_id)
            reply.transaction_id = request.transaction_id
            self.pdu_send(reply, self.last_addr)
            return
        await super().handle_request()  # type: ignore[no-untyped-call]

    def pdu_send(self, pdu: ModbusPDU, addr: tuple[Any, ...] | None = None) -> None:
        plan = self.gateway.plans.get(pdu.dev_id)
        if plan is None:
            super().pdu_send(pdu, addr)
            return
        packet = self.framer.buildFrame(self.trace_pdu(True, pdu))
        action = plan.on_reply(packet)
        if action.kind == "drop":
            return
        if action.kind == "disconnect":
            if self.gateway.serial:
                self.gateway.hang_up()  # the line is gone, as with a pulled cable
            else:
                self.close()
            return
        payload = action.payload
        if action.kind == "garble" and not self.gateway.serial:
            # Modbus/TCP carries no checksum: a flipped payload bit is undetectable by design, and TCP's own
            # checksum keeps it from happening on a real link. What a master does meet is a corrupted header
            # (a gateway mixing up transactions): flip the transaction id instead of the plan's middle byte.
            payload = bytes([packet[0] ^ 0xFF]) + packet[1:]
        delay = action.delay_s + plan.wire_delay_s(len(payload))
        if delay > 0:
            self.loop.call_later(delay, self._send_late, payload, addr)
        else:
            self.send(payload, addr=addr)

    def _send_late(self, payload: bytes, addr: tuple[Any, ...] | None) -> None:
        if self.transport is not None:
            self.send(payload, addr=addr)


def _make_handler(server: Any, gateway: _Gateway) -> _FaultyHandler:
    handler = _FaultyHandler(server, server.trace_packet, server.trace_pdu, server.trace_connect)  # type: ignore[no-untyped-call]
    handler.gateway = gateway
    return handler


class _TcpServer(ModbusTcpServer):
    gateway: _Gateway

    def __init__(self, *args: Any, backlog: int = TCP_BACKLOG, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # pymodbus 3.16 listens with asyncio's default backlog (100). A daemon that starts with more pumps than
        # that behind one gateway connects all at once; the kernel drops the excess SYNs and those masters'
        # connects time out (the first SYN retransmit is 1 s later). A gateway's limit is its connection table.
        create: Any = self.call_create  # a partial of loop.create_server (pymodbus 3.16 transport)
        self.call_create = functools.partial(create, backlog=backlog)

    def callback_new_connection(self) -> _FaultyHandler:
        return _make_handler(self, self.gateway)


class _SerialServer(ModbusSerialServer):
    gateway: _Gateway

    def callback_new_connection(self) -> _FaultyHandler:
        return _make_handler(self, self.gateway)


# ---- PTY plumbing -------------------------------------------------------------------------------------------


class _PtyBridge:
    """Two PTY pairs with their masters joined: the server opens one slave, the host the other."""

    def __init__(self) -> None:
        self.server_master, self._server_slave = os.openpty()
        self.host_master, self._host_slave = os.openpty()
        for fd in (self._server_slave, self._host_slave):
            tty.setraw(fd)  # no echo, no line editing, before either side opens its end
        for fd in (self.server_master, self.host_master):
            os.set_blocking(fd, False)
        self.server_path = os.ttyname(self._server_slave)
        self.host_path = os.ttyname(self._host_slave)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hung_up = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.server_master, self._pump, self.server_master, self.host_master)
        self._loop.add_reader(self.host_master, self._pump, self.host_master, self.server_master)

    @staticmethod
    def _pump(src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO while no slave is open: nothing to forward
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(dst, data)

    def hang_up(self) -> None:
        """Drop the host's side for good: its open port then reads EOF/EIO, like a pulled cable."""
        if self._hung_up:
            return
        self._hung_up = True
        if self._loop is not None:
            self._loop.remove_reader(self.host_master)
        for fd in (self.host_master, self._host_slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self.hang_up()
        if self._loop is not None:
            self._loop.remove_reader(self.server_master)
        for fd in (self.server_master, self._server_slave):
            with contextlib.suppress(OSError):
                os.close(fd)


# ---- the public entry point ---------------------------------------------------------------------------------


@dataclass
class ModbusEndpoint:
    """Where a running simulator listens, and its per-unit injection handles."""

    transport: str  # "tcp" | "rtu"
    host: str
    port: int
    path: str
    units: Mapping[int, str]  # unit id -> pump name in the world
    plans: Mapping[int, FaultPlan]
    exceptions: Mapping[int, ExceptionPlan] = field(default_factory=dict)

    def url(self, unit: int) -> str:
        if unit not in self.units:
            raise ValidationError([Problem("unit", "served", f"unit {unit} is not served here: {sorted(self.units)}")])
        if self.transport == "tcp":
            return f"modbus+tcp://{self.host}:{self.port}?unit={unit}"
        return f"modbus+rtu://{self.path}?unit={unit}"

    def exception_next(self, unit: int, code: int, n: int = 1) -> None:
        """The next n requests to `unit` that reach its registers get Modbus exception `code`."""
        self.exceptions[unit].exception_next(code, n)


def _check_units(unit_ids: Mapping[int, str]) -> None:
    problems = []
    if not unit_ids:
        problems.append(Problem("units", "required", "serve at least one unit id"))
    for unit, name in unit_ids.items():
        if isinstance(unit, bool) or not isinstance(unit, int) or not 1 <= unit <= 247:
            problems.append(Problem(f"units.{unit}", "range", f"unit ids are 1..247, got {unit!r}"))
        if not isinstance(name, str) or not name:
            problems.append(Problem(f"units.{unit}", "name", "each unit needs a pump name"))
    if problems:
        raise ValidationError(problems)


def _check_port(host: str, port: int) -> None:
    """Bind the port the way asyncio's server will (SO_REUSEADDR), and let go: an OSError names why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


@contextlib.asynccontextmanager
async def serve_modbus(
    world: World,
    unit_ids: Mapping[int, str],
    faults: Mapping[int, FaultPlan] | None = None,
    *,
    tcp_port: int | None = None,
    pty: bool = False,
    host: str = "127.0.0.1",
    regmap: RegisterMap | None = None,
    on_request: Callable[[ModbusPDU], None] | None = None,
) -> AsyncIterator[ModbusEndpoint]:
    """Serve `unit_ids` (unit -> pump name in `world`) over TCP (`tcp_port`, 0 = ephemeral) or RTU on a PTY.

    Pumps that do not exist yet are created with this device's identity and the map's rate resolution.
    Each unit's wire faults come from `faults[unit]`, else from ``world.faults(name)``.
    ``on_request`` is called with every request PDU the server decodes, for any unit, before it is handled
    (tests record what a master sent).
    """
    if (tcp_port is None) == (not pty):
        raise ValidationError([Problem("transport", "exactly-one", "give exactly one of tcp_port or pty=True")])
    _check_units(unit_ids)
    regmap = regmap or load_map()
    resolution: Resolution = regmap.rate_resolution()
    units: dict[int, _Unit] = {}
    plans: dict[int, FaultPlan] = {}
    exceptions: dict[int, ExceptionPlan] = {}
    for unit, name in sorted(unit_ids.items()):
        model = world.pump(
            name, model=SIM_MODEL, firmware=SIM_FIRMWARE, rate_resolution=resolution, plunger=regmap.plunger
        )
        exceptions[unit] = ExceptionPlan()
        units[unit] = _Unit(unit, model, regmap, exceptions[unit])
        plans[unit] = (faults or {}).get(unit) or world.faults(name)
    devices = [u.device() for u in units.values()]
    # FC43/14 basic device identification from the map (pymodbus answers it from this block).
    identity = ModbusDeviceIdentification(  # type: ignore[no-untyped-call]
        info_name={
            "VendorName": regmap.vendor,
            "ProductCode": regmap.product_code,
            "MajorMinorRevision": regmap.revision,
        }
    )
    gateway = _Gateway(units, plans, serial=pty, on_request=on_request)

    bridge: _PtyBridge | None = None
    server: _TcpServer | _SerialServer
    if pty:
        bridge = _PtyBridge()
        server = _SerialServer(
            devices, framer=FramerType.RTU, port=bridge.server_path, trace_pdu=gateway.trace_pdu, identity=identity
        )
    else:
        server = _TcpServer(devices, address=(host, tcp_port or 0), trace_pdu=gateway.trace_pdu, identity=identity)
    server.gateway = gateway
    if bridge is not None:
        gateway.hang_up = bridge.hang_up
    if bridge is None and tcp_port:
        _check_port(host, tcp_port)  # pymodbus only logs the reason and raises a bare RuntimeError
    try:
        if bridge is not None:
            bridge.start()
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:  # pymodbus: "Could not start listen" (the port was taken meanwhile)
            raise OSError(f"cannot listen on {host}:{tcp_port}: {exc}") from None
        if bridge is not None:
            endpoint = ModbusEndpoint("rtu", "", 0, bridge.host_path, dict(unit_ids), plans, exceptions)
        else:
            sockets = server.transport.sockets  # type: ignore[attr-defined]  # an asyncio.Server
            port = int(sockets[0].getsockname()[1])
            endpoint = ModbusEndpoint("tcp", host, port, "", dict(unit_ids), plans, exceptions)
        yield endpoint
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]
        if bridge is not None:
            bridge.close()
