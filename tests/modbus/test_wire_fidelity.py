"""Issue 16, items 8-9: the Modbus simulator true to the map's own rules, checked with a plain pymodbus client.

References: Modbus Application Protocol Specification V1.1b3 (§6.1 FC01, §6.2 FC02, §6.5 FC05, §6.11 FC15,
§6.21 FC43/14 Read Device Identification, §7 exception codes) and Modbus Messaging on TCP/IP Implementation
Guide V1.0b (§3.1.2: a client may send several requests without waiting; the server answers each).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers.base import DriverOptions, PumpRejected
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.regmap import load_map
from drivers.registry import open_driver
from simulators.clock import ManualClock
from simulators.modbus import SIM_FIRMWARE, SIM_MODEL, serve_modbus
from simulators.world import World

D = Decimal


def _world() -> World:
    return World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 30))


def test_unmapped_coils_and_discrete_inputs_are_exception_02() -> None:
    """The map's rule (config/drivers/modbus-pump.toml header): an unmapped address is exception 02."""

    async def body() -> None:
        world = _world()
        async with serve_modbus(world, {1: "a"}, tcp_port=0) as ep:
            c = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1, retries=0)
            assert await c.connect()
            try:
                for call, address, count in [
                    (c.read_coils, 1, 1),  # coil 0 is the only coil
                    (c.read_coils, 0, 2),  # a span reaching an unmapped coil
                    (c.read_discrete_inputs, 9, 1),  # discrete inputs 0..8 are mapped
                    (c.read_discrete_inputs, 0, 16),
                    (c.read_discrete_inputs, 100, 1),
                ]:
                    r = await call(address, count=count, device_id=1)
                    assert r.isError() and r.exception_code == 0x02, (call.__name__, address, count)
                w = await c.write_coil(3, True, device_id=1)
                assert w.isError() and w.exception_code == 0x02
                ws = await c.write_coils(0, [False, True], device_id=1)
                assert ws.isError() and ws.exception_code == 0x02
                ok = await c.read_discrete_inputs(0, count=9, device_id=1)
                assert not ok.isError() and ok.bits[:9] == [False] * 9
                assert not (await c.read_coils(0, count=1, device_id=1)).isError()
                assert world.pump("a").status().rate_ml_per_h == 0
            finally:
                c.close()

    run(body)


def test_fc43_device_identification_from_the_map() -> None:
    async def body() -> None:
        regmap = load_map()
        async with serve_modbus(_world(), {1: "a"}, tcp_port=0) as ep:
            c = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1, retries=0)
            assert await c.connect()
            try:
                r = await c.read_device_information(read_code=1, object_id=0, device_id=1)
                assert not r.isError()
                assert r.information == {
                    0: regmap.vendor.encode(),
                    1: regmap.product_code.encode(),
                    2: regmap.revision.encode(),
                }
                assert (regmap.product_code, regmap.revision) == (SIM_MODEL, SIM_FIRMWARE)  # same as the registers
            finally:
                c.close()

    run(body)


def test_rate_outside_the_maps_plunger_range_is_exception_03() -> None:
    async def body() -> None:
        world = _world()
        async with serve_modbus(world, {1: "a"}, tcp_port=0) as ep:
            c = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1, retries=0)
            assert await c.connect()
            try:
                low = await c.write_registers(0, [0, 12], device_id=1)  # 0.012 mL/h < 0.01208 with 19.13 mm
                assert low.isError() and low.exception_code == 0x03
                ok = await c.write_registers(0, [0, 13], device_id=1)
                assert not ok.isError()
                assert world.pump("a").status().rate_ml_per_h == D("0.013")
            finally:
                c.close()

    run(body)


def test_driver_reports_the_range_from_the_map() -> None:
    async def body() -> None:
        async with serve_modbus(_world(), {1: "a"}, tcp_port=0) as ep:
            driver = open_driver(ep.url(1), DriverOptions(timeout_s=1, deadman_s=0))
            assert isinstance(driver, ModbusDriver)
            assert driver.rate_range(D("19.13")) == (D("0.013"), D("879.597"))  # scale 0.001, no 4-digit rule
            await driver.connect()
            try:
                with pytest.raises(PumpRejected):
                    await driver.set_rate(D("0.012"))
            finally:
                await driver.close()

    run(body)


@pytest.mark.parametrize("n", [2, 5])
def test_pipelined_requests_in_one_segment_are_all_answered_in_order(n: int) -> None:
    """Modbus/TCP Implementation Guide §3.1.2; pymodbus 3.16 alone answers only the first (see simulators/modbus)."""

    async def body() -> None:
        world = _world()
        world.pump("a").set_rate(D("2.5"))
        async with serve_modbus(world, {1: "a"}, tcp_port=0) as ep:
            reader, writer = await asyncio.open_connection(ep.host, ep.port)
            try:
                # FC04 read input registers 0..1 (rate read-back), transaction ids 1..n, in one write.
                writer.write(b"".join(struct.pack(">HHHBBHH", t, 0, 6, 1, 4, 0, 2) for t in range(1, n + 1)))
                await writer.drain()
                replies = [await reader.readexactly(13) for _ in range(n)]
            finally:
                writer.close()
        for t, reply in enumerate(replies, start=1):
            tid, proto, length, unit, fc, nbytes, hi, lo = struct.unpack(">HHHBBBHH", reply)
            assert (tid, proto, length, unit, fc, nbytes) == (t, 0, 7, 1, 4, 4)
            assert (hi << 16 | lo) == 2500  # 2.5 mL/h at scale 0.001

    run(body)
