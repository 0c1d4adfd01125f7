"""The Modbus simulator read by a plain pymodbus client, exactly as the map file documents the registers.

Addresses, word order and scaling here are written out from config/drivers/modbus-pump.toml by hand (an
independent reading of the map), not taken from our regmap/codec modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from driverd.core.errors import ValidationError
from drivers.base import AlarmKind, PumpState
from simulators.clock import ManualClock
from simulators.modbus import SIM_FIRMWARE, SIM_MODEL, ModbusEndpoint, serve_modbus
from simulators.world import World

Client = AsyncModbusTcpClient | AsyncModbusSerialClient
Body = Callable[[Client, ModbusEndpoint, World], Awaitable[None]]


def u32(hi: int, lo: int) -> int:
    return (hi << 16) | lo  # the map: big-endian word order, high word at the lower address


def ascii_of(regs: Sequence[int]) -> str:
    return b"".join(r.to_bytes(2, "big") for r in regs).rstrip(b"\x00").decode("ascii")


def run(body: Body, *, pty: bool = False, units: dict[int, str] | None = None) -> None:
    async def main() -> None:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        where = {"pty": True} if pty else {"tcp_port": 0}
        async with serve_modbus(world, units or {1: "a", 2: "b"}, **where) as ep:
            client: Client
            if pty:
                client = AsyncModbusSerialClient(ep.path, framer=FramerType.RTU, timeout=0.5, retries=0)
            else:
                client = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=0.5, retries=0)
            assert await client.connect()
            try:
                await body(client, ep, world)
            finally:
                client.close()

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("pty", [False, True], ids=["tcp", "rtu-pty"])
def test_identification_registers(pty: bool) -> None:
    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        version = await c.read_input_registers(100, count=1, device_id=1)
        assert version.registers == [1]
        ident = await c.read_input_registers(101, count=16, device_id=1)
        assert ascii_of(ident.registers[:8]) == SIM_MODEL
        assert ascii_of(ident.registers[8:]) == SIM_FIRMWARE

    run(body, pty=pty)


@pytest.mark.parametrize("pty", [False, True], ids=["tcp", "rtu-pty"])
def test_rate_diameter_delivered_as_documented(pty: bool) -> None:
    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        # rate setpoint: holding 0-1, uint32 µL/h; diameter: holding 2, uint16 0.01 mm
        assert not (await c.write_registers(0, [0x0001, 0x0004], device_id=1)).isError()  # 65540 µL/h
        assert not (await c.write_register(2, 1457, device_id=1)).isError()  # 14.57 mm
        model = world.pump("a")
        assert model.status().rate_ml_per_h == Decimal("65.540")
        assert model.status().diameter_mm == Decimal("14.57")
        ir = await c.read_input_registers(0, count=8, device_id=1)
        assert u32(ir.registers[0], ir.registers[1]) == 65540  # rate read-back
        assert ir.registers[2] == 1457  # diameter read-back
        assert u32(ir.registers[5], ir.registers[6]) == 17000  # remaining: full 17 mL syringe, in µL
        assert ir.registers[7] == 100  # battery %
        hr = await c.read_holding_registers(0, count=7, device_id=1)
        assert hr.registers == [1, 4, 1457, 0, 0, 0, 0]  # setpoints, target 0, watchdog 0, command reads 0
        # run coil 0; running discrete input 0
        assert not (await c.write_coil(0, True, device_id=1)).isError()
        assert (await c.read_discrete_inputs(0, count=1, device_id=1)).bits[0] is True
        assert (await c.read_coils(0, count=1, device_id=1)).bits[0] is True
        world.clock.advance(36)  # type: ignore[attr-defined]
        ir = await c.read_input_registers(3, count=2, device_id=1)
        assert u32(*ir.registers) == 655  # 655.4 µL in 36 s at 65.540 mL/h: truncated, never over-reported
        # unit 2 is a different pump: untouched
        assert (await c.read_input_registers(0, count=2, device_id=2)).registers == [0, 0]
        assert world.pump("b").status().state is PumpState.STOPPED

    run(body, pty=pty)


def test_alarm_bits_and_acknowledge_with_the_magic_value() -> None:
    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        model = world.pump("a")
        await c.write_registers(0, [0, 1000], device_id=1)
        await c.write_coil(0, True, device_id=1)
        model.inject_alarm(AlarmKind.OCCLUSION)
        model.set_battery(10)
        bits = (await c.read_discrete_inputs(0, count=9, device_id=1)).bits[:9]
        # running, occlusion, end, near-end, low battery, watchdog, power, other, alarm_active
        assert bits == [False, True, False, False, True, False, False, False, True]
        wrong = await c.write_register(6, 0x1234, device_id=1)
        assert wrong.isError() and wrong.exception_code == 0x03
        assert model.status().state is PumpState.ALARM
        blocked = await c.write_coil(0, True, device_id=1)
        assert blocked.isError() and blocked.exception_code == 0x04
        ack = await c.write_register(6, 0x5555, device_id=1)
        assert not ack.isError() and ack.registers == [0x5555]  # FC6 reply echoes the request
        bits = (await c.read_discrete_inputs(0, count=9, device_id=1)).bits[:9]
        assert bits == [False, False, False, False, True, False, False, False, False]  # battery still low

    run(body)


def test_standard_exception_codes() -> None:
    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        model = world.pump("a")
        half = await c.write_register(1, 5, device_id=1)  # one word of the 32-bit rate
        assert half.isError() and half.exception_code == 0x02
        unmapped = await c.read_holding_registers(7, count=1, device_id=1)
        assert unmapped.isError() and unmapped.exception_code == 0x02
        gap = await c.read_input_registers(6, count=3, device_id=1)  # 8..99 are unmapped
        assert gap.isError() and gap.exception_code == 0x02
        too_fast = await c.write_registers(0, [0x000F, 0x4241], device_id=1)  # 1000.001 mL/h > max 1000
        assert too_fast.isError() and too_fast.exception_code == 0x03
        too_wide = await c.write_register(2, 5001, device_id=1)  # 50.01 mm
        assert too_wide.isError() and too_wide.exception_code == 0x03
        target = await c.write_registers(3, [0, 1], device_id=1)
        assert target.isError() and target.exception_code == 0x03  # continuous only
        no_rate = await c.write_coil(0, True, device_id=1)
        assert no_rate.isError() and no_rate.exception_code == 0x04
        await c.write_registers(0, [0, 500], device_id=1)
        await c.write_coil(0, True, device_id=1)
        busy = await c.write_register(2, 1000, device_id=1)  # diameter while infusing
        assert busy.isError() and busy.exception_code == 0x04
        assert model.status().diameter_mm == Decimal("19.13") and model.status().rate_ml_per_h == Decimal("0.5")

    run(body)


def test_injected_exception_then_normal_service() -> None:
    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        ep.exception_next(1, 0x04, n=2)
        for _ in range(2):
            r = await c.read_input_registers(0, count=2, device_id=1)
            assert r.isError() and r.exception_code == 0x04
        assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()
        assert ep.exceptions[1].history == [4, 4]
        with pytest.raises(ValidationError):
            ep.exception_next(1, 0x42)

    run(body)


def test_unknown_unit_behind_the_tcp_gateway_is_exception_0x0b() -> None:
    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        r = await c.read_input_registers(0, count=1, device_id=9)
        assert r.isError() and r.exception_code == 0x0B

    run(body)


def test_unknown_unit_on_the_rtu_bus_is_silence() -> None:
    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        with pytest.raises(ModbusIOException):
            await c.read_input_registers(0, count=1, device_id=9)
        assert not (await c.read_input_registers(0, count=1, device_id=1)).isError()

    run(body, pty=True)


def test_watchdog_stops_the_pump_when_requests_stop() -> None:
    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        model = world.pump("a")
        await c.write_register(5, 3, device_id=1)  # watchdog 3 s; armed by the next request
        await c.write_registers(0, [0, 3600], device_id=1)
        await c.write_coil(0, True, device_id=1)
        world.clock.advance(2)  # type: ignore[attr-defined]
        assert (await c.read_discrete_inputs(0, count=1, device_id=1)).bits[0] is True
        world.clock.advance(4)  # type: ignore[attr-defined]  # silent for longer than 3 s
        bits = (await c.read_discrete_inputs(0, count=9, device_id=1)).bits
        assert bits[0] is False and bits[5] is True and bits[8] is True  # stopped, watchdog alarm, alarm active
        delivered = await c.read_input_registers(3, count=2, device_id=1)
        assert u32(*delivered.registers) == 5  # exactly 5 s at 3.6 mL/h = 5 µL: stopped at the expiry
        assert model.status().state is PumpState.ALARM

    run(body)


def test_wire_faults_per_unit() -> None:
    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        world.faults("a").drop_next(1)
        assert not (await c.read_input_registers(0, count=1, device_id=2)).isError()  # unit 2 unaffected
        with pytest.raises(ModbusIOException):
            await c.read_input_registers(0, count=1, device_id=1)
        assert not (await c.read_input_registers(0, count=1, device_id=1)).isError()

    run(body)


def test_endpoint_rejects_bad_arguments() -> None:
    async def main() -> None:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        with pytest.raises(ValidationError):
            async with serve_modbus(world, {1: "a"}):
                pass
        with pytest.raises(ValidationError):
            async with serve_modbus(world, {0: "a"}, tcp_port=0):
                pass
        with pytest.raises(ValidationError):
            async with serve_modbus(world, {}, tcp_port=0):
                pass
        async with serve_modbus(world, {1: "a"}, tcp_port=0) as ep:
            with pytest.raises(ValidationError):
                ep.url(2)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_gateway_accepts_a_burst_of_simultaneous_connections() -> None:
    """A daemon starting with many pumps connects to the gateway all at once: every connect must succeed.

    (asyncio's default listen backlog is 100; beyond it the kernel drops SYNs and a 1 s connect times out.)
    """
    n = 300

    async def main() -> None:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        async with serve_modbus(world, {1: "a"}, tcp_port=0) as ep:
            clients = [AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1.0, retries=0) for _ in range(n)]
            try:
                connected = await asyncio.gather(*(c.connect() for c in clients))
                assert all(connected), f"{connected.count(False)} of {n} connects failed"
                replies = await asyncio.gather(*(c.read_input_registers(100, count=1, device_id=1) for c in clients))
                assert all(r.registers == [1] for r in replies)
            finally:
                for c in clients:
                    c.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_read_refreshes_exactly_the_points_it_touches() -> None:
    """A read of part of the table (even one half of a 32-bit point) sees the model's current values."""

    async def body(c: Client, ep: ModbusEndpoint, world: World) -> None:
        assert not (await c.write_registers(0, [0x0001, 0x0004], device_id=1)).isError()  # 65.540 mL/h
        low = await c.read_input_registers(1, count=1, device_id=1)
        assert low.registers == [0x0004]  # the low word of rate_readback, fresh
        high = await c.read_input_registers(0, count=1, device_id=1)
        assert high.registers == [0x0001]
        assert not (await c.write_register(2, 1457, device_id=1)).isError()
        assert (await c.read_input_registers(2, count=1, device_id=1)).registers == [1457]
        ident = await c.read_input_registers(100, count=17, device_id=1)
        assert ident.registers[0] == 1 and ascii_of(ident.registers[1:9]) == SIM_MODEL

    run(body)
