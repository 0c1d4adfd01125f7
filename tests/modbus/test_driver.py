"""ModbusDriver specifics beyond the shared contract: URLs, refusals before the wire, error mapping."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from driverd.core.errors import ValidationError
from drivers.base import DriverIOError, DriverOptions, ProtocolError, PumpRejected, PumpState
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.regmap import DEFAULT_MAP
from drivers.registry import open_driver
from simulators.clock import ManualClock
from simulators.modbus import ModbusEndpoint, serve_modbus
from simulators.world import World

OPTS = DriverOptions(timeout_s=0.5, retries=1, deadman_s=7)


def run(body: Callable[[ModbusDriver, ModbusEndpoint, World], Awaitable[None]], url_extra: str = "") -> None:
    async def main() -> None:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        async with serve_modbus(world, {5: "p"}, tcp_port=0) as ep:
            driver = open_driver(ep.url(5) + url_extra, OPTS)
            assert isinstance(driver, ModbusDriver)
            await driver.connect()
            try:
                await body(driver, ep, world)
            finally:
                await driver.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_registry_selects_the_modbus_driver_and_resolution_matches_the_map() -> None:
    driver = open_driver("modbus+tcp://127.0.0.1:5020?unit=3")
    assert isinstance(driver, ModbusDriver) and driver.unit == 3
    assert driver.resolution == ModbusDriver.resolution
    rtu = open_driver("modbus+rtu:///dev/ttyUSB1?baud=9600&unit=2")
    assert isinstance(rtu, ModbusDriver) and (rtu.baud, rtu.unit) == (9600, 2)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("modbus://127.0.0.1:5020", "url.scheme"),
        ("modbus+udp://127.0.0.1:5020", "url.scheme"),
        ("modbus+tcp://127.0.0.1:5020?unit=0", "url.unit"),
        ("modbus+tcp://127.0.0.1:5020?unit=248", "url.unit"),
        ("modbus+tcp://127.0.0.1:5020?unit=x", "url.unit"),
        ("modbus+tcp://127.0.0.1:5020?slave=1", "url.slave"),
        ("modbus+tcp://127.0.0.1:5020?baud=9600", "url.baud"),
        ("modbus+rtu:///dev/ttyUSB0?baud=fast", "url.baud"),
        ("modbus+rtu://?unit=1", "url.path"),
        ("modbus+tcp://:5020?unit=1", "url.host"),
    ],
)
def test_malformed_urls_name_the_part(url: str, path: str) -> None:
    with pytest.raises(ValidationError) as info:
        open_driver(url)
    assert path in {p.path for p in info.value.problems}


def test_map_parameter_loads_another_map(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[device]\nname = 'x'\n", encoding="utf-8")
    with pytest.raises(ValidationError):
        open_driver(f"modbus+tcp://127.0.0.1:5020?unit=1&map={bad}")
    assert isinstance(open_driver(f"modbus+tcp://127.0.0.1:5020?unit=1&map={DEFAULT_MAP}"), ModbusDriver)


def test_connect_to_nothing_is_an_io_error() -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        driver = open_driver(f"modbus+tcp://127.0.0.1:{port}?unit=1", OPTS)
        with pytest.raises(DriverIOError):
            await driver.connect()
        await driver.close()
        rtu = open_driver("modbus+rtu:///dev/driverd-no-such-tty?unit=1", OPTS)
        with pytest.raises(DriverIOError):
            await rtu.connect()
        await rtu.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_connect_writes_the_watchdog_from_the_options() -> None:
    async def body(d: ModbusDriver, ep: ModbusEndpoint, world: World) -> None:
        assert world.pump("p").status().deadman_s == 7
        assert world.pump("p").status().deadman_armed  # the read-back after the write armed it

    run(body)


@pytest.mark.parametrize("rate", ["1.0005", "0.0001", "-1", "4294967.296", "NaN"])
def test_rates_the_map_cannot_carry_are_refused_before_the_wire(rate: str) -> None:
    async def body(d: ModbusDriver, ep: ModbusEndpoint, world: World) -> None:
        await d.set_rate(Decimal(3))
        seen = world.faults("p").replies_seen
        with pytest.raises(PumpRejected) as info:
            await d.set_rate(Decimal(rate))
        assert info.value.code == "modbus:encode"
        assert world.faults("p").replies_seen == seen  # nothing was sent
        assert world.pump("p").status().rate_ml_per_h == 3

    run(body)


def test_float_rate_is_refused() -> None:
    async def body(d: ModbusDriver, ep: ModbusEndpoint, world: World) -> None:
        with pytest.raises(PumpRejected):
            await d.set_rate(2.5)  # type: ignore[arg-type]

    run(body)


@pytest.mark.parametrize("code", [0x01, 0x02, 0x03, 0x04, 0x06])
def test_exception_responses_map_to_pump_rejected_with_the_code(code: int) -> None:
    async def body(d: ModbusDriver, ep: ModbusEndpoint, world: World) -> None:
        ep.exception_next(5, code)
        with pytest.raises(PumpRejected) as info:
            await d.set_rate(Decimal(2))
        assert info.value.code == f"modbus:{code:#04x}"
        assert world.pump("p").status().rate_ml_per_h == 0
        ep.exception_next(5, code)
        with pytest.raises(PumpRejected):
            await d.read_status()  # a definite answer: not retried
        assert (await d.read_status()).state is PumpState.STOPPED

    run(body)


def test_map_version_mismatch_refuses_to_connect(tmp_path: Path) -> None:
    other = tmp_path / "v2.toml"
    other.write_text(
        DEFAULT_MAP.read_text(encoding="utf-8").replace("map_version = 1", "map_version = 2"), encoding="utf-8"
    )

    async def main() -> None:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        async with serve_modbus(world, {1: "p"}, tcp_port=0) as ep:
            driver = open_driver(f"{ep.url(1)}&map={other}", OPTS)
            with pytest.raises(ProtocolError):
                await driver.connect()
            await driver.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_identify_names_the_unit() -> None:
    async def body(d: ModbusDriver, ep: ModbusEndpoint, world: World) -> None:
        ident = await d.identify()
        assert (ident.model, ident.firmware, ident.address) == ("DRV-MB1", "1.0.0-sim", "unit 5")

    run(body)


def test_unit_the_gateway_does_not_serve_is_rejected_0x0b() -> None:
    async def main() -> None:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        async with serve_modbus(world, {1: "p"}, tcp_port=0) as ep:
            driver = open_driver(f"modbus+tcp://127.0.0.1:{ep.port}?unit=2", OPTS)
            with pytest.raises(PumpRejected) as info:
                await driver.connect()
            assert info.value.code == "modbus:0x0b"
            await driver.close()

    asyncio.run(asyncio.wait_for(main(), 30))
