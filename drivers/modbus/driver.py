"""Modbus pump driver on pymodbus 3.16's async clients (TCP and RTU), addressed through a register map.

URLs: ``modbus+tcp://host:port?unit=N`` (port 502 by default) and ``modbus+rtu:///dev/ttyX?baud=B&unit=N``;
optional ``map=PATH`` names another register map file (default: the shipped map, config/drivers/modbus-pump.toml
in the repo).

Rules this driver keeps:
- Every write is followed by a read of the matching read-back point, and that read-back is what is returned.
- Values are encoded exactly by the map's codec; a value the map cannot carry exactly is refused before
  anything is sent (PumpRejected, code "modbus:encode"): never rounded.
- Only reads are retried (timeouts and invalid replies, ``options.retries`` times). A write that got no reply
  raises DriverTimeout: the caller must read the pump to learn what it holds.
- Exception responses become PumpRejected(code="modbus:0xNN"); 0x04 while the pump reports an unacknowledged
  alarm becomes PumpAlarm. No reply in time (or only stale/mismatched ones) -> DriverTimeout; a lost
  connection or a port that cannot be opened -> DriverIOError; a reply of the wrong shape -> ProtocolError.
- ``probe()`` only reads (function codes 1-4); it never writes the watchdog or anything else.
- connect() writes the watchdog timeout (``options.deadman_s``) and reads it back; any request re-arms it,
  so ``heartbeat()`` is a status read. The driver never writes anything that could withdraw (the map has no
  direction point at all).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar, Final

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from driverd.core.errors import Problem, ValidationError
from driverd.core.quantities import Resolution
from drivers.base import (
    DriverError,
    DriverIOError,
    DriverOptions,
    DriverTimeout,
    Identity,
    ProbeReport,
    ProtocolError,
    PumpAlarm,
    PumpDriver,
    PumpRejected,
    PumpState,
    PumpStatus,
)
from drivers.modbus import codec
from drivers.modbus.codec import CodecError
from drivers.modbus.regmap import BIT_TABLES, DEFAULT_MAP, Point, RegisterMap, Table, load_map
from drivers.url import DriverURL

# pymodbus logs connection failures itself; without a handler they reach stderr as raw text through logging's
# last resort. The driver reports every failure as a DriverError, so the library's own lines are dropped here.
logging.getLogger("pymodbus").addHandler(logging.NullHandler())

_READ_FC: Final[dict[Table, int]] = {"coils": 1, "discrete_inputs": 2, "holding_registers": 3, "input_registers": 4}
_MAX_REGS: Final = 125  # per read request (Modbus limit)
_MAX_BITS: Final = 2000
_READ_CALL: Final[dict[Table, str]] = {
    "coils": "read_coils",
    "discrete_inputs": "read_discrete_inputs",
    "holding_registers": "read_holding_registers",
    "input_registers": "read_input_registers",
}
_STATUS_POINTS: Final = ("running", "alarm_active", "rate_readback", "delivered_volume", "diameter_readback")


@dataclass(frozen=True, slots=True)
class ReadSpan:
    """One read request: `count` registers (or bits) of `table` from `start`, and the points decoded from it."""

    table: Table
    start: int
    count: int
    points: tuple[Point, ...]


def plan_reads(points: Sequence[Point]) -> tuple[ReadSpan, ...]:
    """The read requests for `points`: contiguous runs per table, within the per-request limits.

    Pure: the driver computes the status poll's plan once per map, not on every poll.
    """
    by_table: dict[Table, list[Point]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    plan: list[ReadSpan] = []
    for table, pts in by_table.items():
        for span in _spans(sorted(pts, key=lambda p: p.address), table):
            start, end = span[0].address, max(p.end for p in span)
            plan.append(ReadSpan(table, start, end - start, tuple(span)))
    return tuple(plan)


class ModbusDriver(PumpDriver):
    scheme: ClassVar[str] = "modbus"
    #: The shipped map carries rates in µL/h (scale 0.001 mL/h): three decimals, exactly. Instances derive
    #: theirs from the map they load (``self.resolution``), which for the shipped map equals this.
    resolution: ClassVar[Resolution] = Resolution(decimals=3)

    def __init__(self, url: DriverURL, options: DriverOptions | None = None, *, regmap: RegisterMap | None = None):
        super().__init__(url, options)
        problems: list[Problem] = []
        if url.transport not in ("tcp", "rtu"):
            problems.append(
                Problem("url.scheme", "transport", "modbus needs modbus+tcp://host:port or modbus+rtu:///dev/x")
            )
        known = {"unit", "map"} | ({"baud"} if url.transport == "rtu" else set())
        problems += [
            Problem(f"url.{k}", "unknown-parameter", f"unknown parameter {k!r}") for k in url.params if k not in known
        ]
        if url.transport == "tcp" and not url.host:
            problems.append(Problem("url.host", "required", "modbus+tcp needs a host"))
        if url.transport == "rtu" and not url.path.strip("/"):
            problems.append(Problem("url.path", "required", "modbus+rtu needs a serial device path"))
        if problems:
            raise ValidationError(problems)
        self.unit = url.int_param("unit", 1, lo=1, hi=247)
        self.baud = url.int_param("baud", 19200, lo=50, hi=4_000_000) if url.transport == "rtu" else 0
        self.map = regmap or load_map(url.params.get("map") or DEFAULT_MAP)
        self.resolution = self.map.rate_resolution()  # type: ignore[misc]  # per-instance: from the map
        # The counter's step: one raw unit of an integer point (at most 0.01 mL by map validation); a float
        # point's step is not known.
        self._delivered_step: Decimal | None = self.map.delivered_step()
        self._alarm_points = tuple(self.map.alarm_points())
        self._status_plan = plan_reads([self.map[n] for n in _STATUS_POINTS] + list(self._alarm_points))
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._lock = asyncio.Lock()
        self._disconnects = 0  # bumped by the client's connection callback: tells a lost link from silence
        self._opens = 0  # clients connected (`transport_opens`); the client never reconnects by itself

    # ---- transport -----------------------------------------------------------------------------------------

    def _on_connection(self, connected: bool) -> None:
        if not connected:
            self._disconnects += 1

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        common: dict[str, Any] = {
            "timeout": self.options.timeout_s,
            "retries": 0,  # our own loop retries reads only; writes are never repeated blindly
            "reconnect_delay": 0,  # reconnect on demand (next request), not behind our back
            "trace_connect": self._on_connection,
        }
        if self.url.transport == "tcp":
            return AsyncModbusTcpClient(self.url.host, port=self.url.port or 502, **common)
        return AsyncModbusSerialClient(self.url.path, framer=FramerType.RTU, baudrate=self.baud, **common)

    async def _open(self) -> None:
        """Connect the client and check the device's map version: reads only."""
        self._client = self._make_client()
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            raise DriverIOError(f"{self.url.raw}: cannot connect: {exc}") from None
        if not ok:
            raise DriverIOError(f"{self.url.raw}: cannot connect")
        self._opens += 1
        version = await self._read_value("map_version")
        if version != self.map.map_version:
            raise ProtocolError(
                f"{self.url.raw}: device implements map version {version}, ours is {self.map.map_version}"
            )
        if self.map.product_code:
            # A map written for another device (other scales at the same addresses) must not drive this one: the
            # device's model register must name the product the map declares.
            model = await self._read_value("model")
            if model != self.map.product_code:
                raise ProtocolError(
                    f"{self.url.raw}: device model {model!r} is not the map's product_code "
                    f"{self.map.product_code!r} ({self.map.source})"
                )

    async def connect(self) -> None:
        async with self._lock:
            await self._open()
            deadman = Decimal(self.options.deadman_s)
            await self._write_value("watchdog_timeout", deadman)
            got = await self._read_value("watchdog_timeout")
            if got != deadman:
                raise DriverError(f"watchdog read back {got} s after writing {deadman} s")

    @property
    def transport_opens(self) -> int:
        return self._opens

    def definition_files(self) -> dict[str, str]:
        """The register map this driver reads the device through: its path and sha256, for the audit log."""
        return {self.map.source: self.map.sha256} if self.map.sha256 else {}

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def probe(self) -> ProbeReport:
        """Register and coil reads only (function codes 1-4): identity, watchdog timeout, the status points."""
        async with self._lock:
            try:
                await self._open()
                identity = await self._identity()
                watchdog = await self._read_decimal("watchdog_timeout")
                status = await self._status()
            finally:
                await self.close()
        if watchdog != watchdog.to_integral_value():
            raise ProtocolError(f"{self.url.raw}: watchdog_timeout reads {watchdog} s, not whole seconds")
        return ProbeReport(identity, status, int(watchdog))

    async def _execute(self, call: str, *args: Any, read: bool, **kwargs: Any) -> ModbusPDU:
        """One request with the retry policy: reads retried on no/invalid reply, writes never."""
        client = self._client
        if client is None:
            raise DriverIOError(f"{self.url.raw}: not connected")
        attempts = 1 + (max(self.options.retries, 0) if read else 0)
        for attempt in range(attempts):
            before = self._disconnects
            try:
                response: ModbusPDU = await getattr(client, call)(*args, device_id=self.unit, **kwargs)
            except ConnectionException as exc:
                raise DriverIOError(f"{self.url.raw}: {exc}") from None
            except ModbusIOException as exc:
                if self._disconnects != before:
                    raise DriverIOError(f"{self.url.raw}: connection lost") from None
                if attempt + 1 < attempts:
                    continue
                raise DriverTimeout(
                    f"{self.url.raw}: no valid reply to {call} within {self.options.timeout_s} s"
                ) from exc
            except (OSError, ModbusException) as exc:
                raise DriverIOError(f"{self.url.raw}: {exc}") from None
            return response  # exception responses are answers too: the caller decides
        raise AssertionError("unreachable")

    # ---- points --------------------------------------------------------------------------------------------

    async def _read_points(self, points: Sequence[Point]) -> dict[str, Decimal | str | bool]:
        """Read points, grouped into contiguous requests per table; decode each exactly."""
        return await self._read_plan(plan_reads(points))

    async def _read_plan(self, plan: Sequence[ReadSpan]) -> dict[str, Decimal | str | bool]:
        out: dict[str, Decimal | str | bool] = {}
        for span in plan:
            table, start = span.table, span.start
            values = await self._read_span(table, start, span.count)
            bits = table in BIT_TABLES
            for p in span.points:
                try:
                    if bits:
                        out[p.name] = codec.decode_bit(p, values[p.address - start])
                    else:
                        out[p.name] = codec.decode(p, values[p.address - start : p.end - start])
                except CodecError as exc:
                    raise ProtocolError(f"{self.url.raw}: {exc}") from None
        return out

    async def _read_span(self, table: Table, address: int, count: int) -> list[Any]:
        call = _READ_CALL[table]
        response = await self._execute(call, address, count=count, read=True)
        self._raise_for_exception(response, f"read {table} {address}..{address + count - 1}")
        if response.function_code != _READ_FC[table]:
            raise ProtocolError(f"{self.url.raw}: reply function {response.function_code} to a {call}")
        values: list[Any] = list(response.bits if table in BIT_TABLES else response.registers)
        # Bits come padded to whole bytes; registers must be exactly what was asked.
        if len(values) < count or (table not in BIT_TABLES and len(values) != count):
            raise ProtocolError(f"{self.url.raw}: {call} returned {len(values)} values for {count}")
        return [bool(v) for v in values[:count]] if table in BIT_TABLES else values

    async def _read_value(self, name: str) -> Decimal | str | bool:
        return (await self._read_points([self.map[name]]))[name]

    async def _read_decimal(self, name: str) -> Decimal:
        value = await self._read_value(name)
        if not isinstance(value, Decimal):
            raise ProtocolError(f"{name} is not numeric in this map")
        return value

    async def _write_value(self, name: str, value: Decimal | bool) -> None:
        point = self.map[name]
        try:
            if point.table == "coils":
                assert isinstance(value, bool)
                response = await self._execute("write_coil", point.address, codec.encode_bit(point, value), read=False)
            else:
                assert isinstance(value, Decimal)
                registers = codec.encode(point, value)
                if len(registers) == 1:
                    response = await self._execute("write_register", point.address, registers[0], read=False)
                else:
                    response = await self._execute("write_registers", point.address, registers, read=False)
        except CodecError as exc:
            raise PumpRejected(f"refused before sending: {exc}", code="modbus:encode") from None
        await self._raise_for_exception_async(response, f"write {point.path}")

    def _raise_for_exception(self, response: ModbusPDU, what: str) -> None:
        if isinstance(response, ExceptionResponse) or response.isError():
            code = int(getattr(response, "exception_code", 0))
            raise PumpRejected(f"{self.url.raw}: {what}: Modbus exception {code:#04x}", code=f"modbus:{code:#04x}")

    async def _raise_for_exception_async(self, response: ModbusPDU, what: str) -> None:
        """Like _raise_for_exception, but a 0x04 refusal during an unacknowledged alarm is a PumpAlarm."""
        if not (isinstance(response, ExceptionResponse) or response.isError()):
            return
        code = int(getattr(response, "exception_code", 0))
        if code == 0x04:
            status = await self._status()
            if status.state is PumpState.ALARM:
                raise PumpAlarm(
                    f"{what}: refused, pump in alarm {sorted(a.value for a in status.alarms)}", alarms=status.alarms
                )
        raise PumpRejected(f"{self.url.raw}: {what}: Modbus exception {code:#04x}", code=f"modbus:{code:#04x}")

    # ---- PumpDriver ----------------------------------------------------------------------------------------

    async def identify(self) -> Identity:
        async with self._lock:
            return await self._identity()

    async def _identity(self) -> Identity:
        values = await self._read_points([self.map["model"], self.map["firmware"]])
        model, firmware = values["model"], values["firmware"]
        assert isinstance(model, str) and isinstance(firmware, str)
        return Identity(model=model, firmware=firmware, address=f"unit {self.unit}")

    def rate_range(self, diameter_mm: Decimal) -> tuple[Decimal, Decimal] | None:
        """(min, max) mL/h the device runs with this syringe bore, from the map's plunger speed range (min
        rounded up, max down, at the map's rate resolution); None if the map states no range."""
        if self.map.plunger is None:
            return None
        return self.map.plunger.range_ml_per_h(diameter_mm, self.resolution)

    async def configure_syringe(self, diameter_mm: Decimal) -> Decimal:
        async with self._lock:
            await self._write_value("diameter_setpoint", diameter_mm)
            return await self._read_decimal("diameter_readback")

    async def set_rate(self, rate_ml_per_h: Decimal) -> Decimal:
        if not isinstance(rate_ml_per_h, Decimal) or not rate_ml_per_h.is_finite() or rate_ml_per_h < 0:
            # Negative would mean withdraw: never. Refused here, before the codec or the wire.
            raise PumpRejected(
                f"rate must be a finite, non-negative Decimal, got {rate_ml_per_h!r}", code="modbus:encode"
            )
        async with self._lock:
            await self._write_value("rate_setpoint", rate_ml_per_h)
            return await self._read_decimal("rate_readback")

    async def run(self) -> None:
        async with self._lock:
            await self._write_value("run", True)
            status = await self._status()
        if not status.running:
            if status.state is PumpState.ALARM:
                raise PumpAlarm("pump did not start: in alarm", alarms=status.alarms)
            raise PumpRejected("pump accepted run but reads back stopped", code="modbus:readback")

    async def stop(self) -> None:
        async with self._lock:
            await self._write_value("run", False)
            status = await self._status()
        if status.running:
            raise DriverError(f"{self.url.raw}: pump still reads running after stop")

    async def clear_alarm(self) -> None:
        async with self._lock:
            await self._write_value("command", Decimal(self.map.command("acknowledge_alarms")))
            status = await self._status()
        if status.state is PumpState.ALARM:
            raise PumpAlarm("alarm still active after acknowledge", alarms=status.alarms)

    async def clear_delivered(self) -> Decimal:
        """The map's command ``clear_delivered`` (guarded by its magic value), then ``delivered_volume`` read
        back. Refused here on a running pump or one in alarm (the reference device answers 04 while infusing)."""
        async with self._lock:
            status = await self._status()
            if status.running:
                raise PumpRejected(f"{self.url.raw}: clear_delivered: the pump is infusing; stop it first", code="NA")
            if status.state is PumpState.ALARM:
                raise PumpAlarm(f"clear_delivered: pump in alarm {sorted(a.value for a in status.alarms)}",
                                alarms=status.alarms)
            await self._write_value("command", Decimal(self.map.command("clear_delivered")))
            return await self._read_decimal("delivered_volume")

    async def read_status(self) -> PumpStatus:
        async with self._lock:
            return await self._status()

    async def _status(self) -> PumpStatus:
        values = await self._read_plan(self._status_plan)
        alarms = frozenset(p.alarm for p in self._alarm_points if p.alarm is not None and values[p.name] is True)
        if values["running"] is True:
            state = PumpState.INFUSING
        elif values["alarm_active"] is True:
            state = PumpState.ALARM
        else:
            state = PumpState.STOPPED
        rate, delivered, diameter = values["rate_readback"], values["delivered_volume"], values["diameter_readback"]
        assert isinstance(rate, Decimal) and isinstance(delivered, Decimal) and isinstance(diameter, Decimal)
        return PumpStatus(state=state, rate_ml_per_h=rate, delivered_ml=delivered, diameter_mm=diameter, alarms=alarms,
                          delivered_step_ml=self._delivered_step)


def _spans(points: Sequence[Point], table: Table) -> list[list[Point]]:
    """Group address-sorted points into runs with no gap, within the per-request limit."""
    limit = _MAX_BITS if table in BIT_TABLES else _MAX_REGS
    spans: list[list[Point]] = []
    span_end = 0  # one past the last address of the current span
    for p in points:
        end = p.end
        if spans and p.address <= span_end and end - spans[-1][0].address <= limit:
            spans[-1].append(p)  # adjacent or overlapping (maps forbid overlaps): one request
            span_end = max(span_end, end)
        else:
            spans.append([p])
            span_end = end
    return spans
