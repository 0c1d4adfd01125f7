"""Register-map units, scales and identity (safety review 2026-12-03, item 1): a map that would make the driver
command or read another quantity than it believes is refused, naming the point, the field and the rule; a map
written for another device is refused at connect, before anything is written; the map's sha256 is in the audit
log. The wire tests run the driver against the Modbus/TCP simulator on loopback."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import tomllib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pymodbus.pdu import ModbusPDU

from driverd.core.errors import ConfigError, ValidationError
from drivers.base import DriverOptions, ProtocolError
from drivers.modbus.regmap import DEFAULT_MAP, MAX_DELIVERED_STEP_ML, REQUIRED_UNITS, load_map, parse_map
from drivers.registry import open_driver
from simulators.clock import ManualClock
from simulators.modbus import serve_modbus
from simulators.world import World
from tests.runtime.e2e import events, rig
from tests.runtime.e2e import run as run_rig

SHIPPED_TEXT = DEFAULT_MAP.read_text(encoding="utf-8")
SHIPPED = tomllib.loads(SHIPPED_TEXT)
OPTS = DriverOptions(timeout_s=0.5, retries=1, deadman_s=7)
WRITE_FCS = {5, 6, 15, 16, 23}  # write coil(s), write register(s), read/write multiple


def shipped() -> dict[str, Any]:
    return copy.deepcopy(SHIPPED)


def point(data: dict[str, Any], name: str) -> dict[str, Any]:
    for table in ("holding_registers", "input_registers"):
        if name in data[table]:
            spec: dict[str, Any] = data[table][name]
            return spec
    raise KeyError(name)


def refused(data: dict[str, Any]) -> set[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    return {(p.path, p.rule) for p in info.value.problems}


def path_of(name: str) -> str:
    return ("holding_registers." if name in SHIPPED["holding_registers"] else "input_registers.") + name


# ---- malformed maps: each names point, field and rule --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REQUIRED_UNITS))
@pytest.mark.parametrize("units", ["", "uL/h", "ML/H", "ml", "µL", "cm", "min", "mL/h ", None])
def test_units_must_be_exactly_what_the_driver_assumes(name: str, units: str | None) -> None:
    data = shipped()
    if units is None:
        point(data, name).pop("units", None)
    else:
        point(data, name)["units"] = units
    assert (f"{path_of(name)}.units", "units") in refused(data)


def test_the_review_scenario_uL_per_h_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse_map(tomllib.loads(SHIPPED_TEXT.replace('units = "mL/h"', 'units = "uL/h"')))
    text = str(info.value)
    assert "holding_registers.rate_setpoint.units" in text and "input_registers.rate_readback.units" in text
    assert '"mL/h"' in text and "[units]" in text


@pytest.mark.parametrize(
    ("setpoint", "readback", "key", "value"),
    [
        ("rate_setpoint", "rate_readback", "scale", "0.0001"),  # the 10x of the review
        ("rate_setpoint", "rate_readback", "scale", "0.01"),
        ("rate_setpoint", "rate_readback", "type", "int32"),
        ("rate_setpoint", "rate_readback", "word_order", "little"),
        ("diameter_setpoint", "diameter_readback", "scale", "0.1"),
        ("diameter_setpoint", "diameter_readback", "type", "int16"),
    ],
)
def test_a_read_back_must_be_encoded_like_its_setpoint(setpoint: str, readback: str, key: str, value: str) -> None:
    data = shipped()
    point(data, readback)[key] = value
    assert (f"input_registers.{readback}.{key}", "readback-encoding") in refused(data)
    data = shipped()  # the same difference made on the setpoint side is named on the read-back too
    point(data, setpoint)[key] = value
    assert (f"input_registers.{readback}.{key}", "readback-encoding") in refused(data)


def test_a_read_back_without_the_setpoints_scale_is_refused() -> None:
    data = shipped()
    del point(data, "rate_readback")["scale"]
    assert ("input_registers.rate_readback.scale", "readback-encoding") in refused(data)


@pytest.mark.parametrize("scale", ["0.02", "0.0025", "0.5", "2", "10", "1E-10"])
def test_the_rate_scale_is_a_power_of_ten_the_resolution_can_express(scale: str) -> None:
    data = shipped()
    point(data, "rate_setpoint")["scale"] = scale
    point(data, "rate_readback")["scale"] = scale
    assert ("holding_registers.rate_setpoint.scale", "scale-power-of-ten") in refused(data)


@pytest.mark.parametrize("scale", ["1", "0.1", "0.011", "0.02", None])
def test_the_delivered_volume_step_is_bounded(scale: str | None) -> None:
    data = shipped()
    if scale is None:
        del point(data, "delivered_volume")["scale"]  # raw integer mL: a 1 mL step
    else:
        point(data, "delivered_volume")["scale"] = scale
    assert ("input_registers.delivered_volume.scale", "counter-step") in refused(data)


@pytest.mark.parametrize("scale", ["0.01", "0.001", "0.0001", "0.000001"])
def test_fine_delivered_volume_steps_are_accepted(scale: str) -> None:
    data = shipped()
    point(data, "delivered_volume")["scale"] = scale
    m = parse_map(data)
    assert m.delivered_step() == Decimal(scale) <= MAX_DELIVERED_STEP_ML


def test_open_driver_refuses_a_bad_map_file_before_any_connection(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(SHIPPED_TEXT.replace('units = "mm"', 'units = "cm"'), encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        open_driver(f"modbus+tcp://127.0.0.1:1?unit=1&map={bad}")
    assert ("holding_registers.diameter_setpoint.units", "units") in {(p.path, p.rule) for p in info.value.problems}


def test_map_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_bytes(DEFAULT_MAP.read_bytes())
    m = load_map(path)
    assert m.sha256 == hashlib.sha256(DEFAULT_MAP.read_bytes()).hexdigest()
    driver = open_driver(f"modbus+tcp://127.0.0.1:1?unit=1&map={path}")
    assert driver.definition_files() == {str(path): m.sha256}


# ---- over the wire -----------------------------------------------------------------------------------------


def ten_x_map(tmp: Path, product_code: str) -> Path:
    """The review's map: rate setpoint, rate read-back and delivered volume at 0.0001 where the device counts
    0.001, consistent with each other (so every rule above passes), written for `product_code`."""
    text = SHIPPED_TEXT.replace('product_code = "DRV-MB1"', f'product_code = "{product_code}"')
    scaled = ("holding_registers.rate_setpoint", "input_registers.rate_readback", "input_registers.delivered_volume")
    for name in scaled:
        i = text.index(f"[{name}]")
        j = text.index('scale = "0.001"', i)
        text = text[:j] + 'scale = "0.0001"' + text[j + len('scale = "0.001"'):]
    path = tmp / "ten-x.toml"
    path.write_text(text, encoding="utf-8")
    load_map(path)  # valid as a map
    return path


def test_a_map_for_another_product_is_refused_at_connect_nothing_written(tmp_path: Path) -> None:
    """The review scenario, with the wrong map declaring the device it was written for: refused at connect."""
    path = ten_x_map(tmp_path, "DRV-MB10")
    requests: list[int] = []

    def record(pdu: ModbusPDU) -> None:
        requests.append(pdu.function_code)

    async def main() -> None:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        async with serve_modbus(world, {1: "p"}, tcp_port=0, on_request=record) as ep:
            driver = open_driver(f"{ep.url(1)}&map={path}", OPTS)
            with pytest.raises(ProtocolError) as info:
                await driver.connect()
            assert "DRV-MB1" in str(info.value) and "DRV-MB10" in str(info.value)
            with pytest.raises(ProtocolError):
                await driver.probe()  # probe reads through the same check
            await driver.close()
            status = world.pump("p").status()
            assert status.rate_ml_per_h == 0 and status.state.value != "infusing"

    asyncio.run(asyncio.wait_for(main(), 30))
    assert requests and not WRITE_FCS & set(requests)  # only reads went on the wire: the watchdog was not armed


def test_a_device_whose_model_is_not_the_maps_product_is_refused(tmp_path: Path) -> None:
    """The shipped map (product DRV-MB1) against a device whose model register reads another product."""
    requests: list[int] = []

    def record(pdu: ModbusPDU) -> None:
        requests.append(pdu.function_code)

    async def main() -> None:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        world.pump("p", model="XPUMP-2", firmware="2.0")
        async with serve_modbus(world, {1: "p"}, tcp_port=0, on_request=record) as ep:
            driver = open_driver(ep.url(1), OPTS)
            with pytest.raises(ProtocolError) as info:
                await driver.connect()
            assert "XPUMP-2" in str(info.value)
            await driver.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert requests and not WRITE_FCS & set(requests)


def test_the_right_device_connects_and_reports_the_maps_counter_step() -> None:
    async def main() -> None:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        async with serve_modbus(world, {1: "p"}, tcp_port=0) as ep:
            driver = open_driver(ep.url(1), OPTS)
            await driver.connect()
            try:
                assert (await driver.read_status()).delivered_step_ml == Decimal("0.001")
            finally:
                await driver.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_daemon_start_records_the_register_maps_sha256(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig("modbus-tcp", tmp_path) as r:
            (start,) = events(r.records(), "daemon_start")
            files = start["driver_files"]["bed-1"]
            assert files == {str(DEFAULT_MAP): hashlib.sha256(DEFAULT_MAP.read_bytes()).hexdigest()}
            assert start["config_sha256"] == "e2e"

    run_rig(body())
