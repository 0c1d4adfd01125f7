"""Register map loading and validation: the shipped map is valid; every broken map names path and rule."""

from __future__ import annotations

import copy
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.core.errors import ConfigError, ValidationError
from driverd.core.quantities import Resolution
from drivers.modbus.regmap import DEFAULT_MAP, REQUIRED, REQUIRED_ALARMS, load_map, parse_map, parse_map_text

SHIPPED = tomllib.loads(DEFAULT_MAP.read_text(encoding="utf-8"))


def shipped() -> dict[str, Any]:
    return copy.deepcopy(SHIPPED)


def rules(exc: ValidationError) -> set[tuple[str, str]]:
    return {(p.path, p.rule) for p in exc.problems}


def test_shipped_map_loads_with_every_required_point() -> None:
    m = load_map()
    assert m.map_version == 1
    for name, req in REQUIRED.items():
        assert m[name].table == req.table
    assert {p.alarm for p in m.alarm_points()} >= REQUIRED_ALARMS
    assert m.command("acknowledge_alarms") == 0x5555


def test_shipped_map_uses_exact_scaled_integers_as_decided() -> None:
    m = load_map()
    for name in ("rate_setpoint", "rate_readback"):
        assert (m[name].type, m[name].scale, m[name].units) == ("uint32", Decimal("0.001"), "mL/h")
        assert m[name].word_order == "big"
    for name in ("target_volume", "delivered_volume"):
        assert (m[name].type, m[name].scale, m[name].units) == ("uint32", Decimal("0.001"), "mL")
    assert (m["diameter_setpoint"].type, m["diameter_setpoint"].scale) == ("uint16", Decimal("0.01"))
    assert m.rate_resolution() == Resolution(decimals=3)


def test_every_point_documents_its_meaning() -> None:
    m = load_map()
    assert all(p.meaning.strip() for p in m.points.values())


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_map(tmp_path / "nope.toml")
    assert info.value.problems[0].rule == "readable"


@pytest.mark.parametrize("text", ["[device\nname=", "x = = 1", "\x00"])
def test_malformed_toml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_map_text(text)
    assert info.value.problems[0].rule == "toml"


def test_overlapping_registers_name_both_points() -> None:
    data = shipped()
    data["holding_registers"]["diameter_setpoint"]["address"] = 1  # inside rate_setpoint (0..1)
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("holding_registers.diameter_setpoint.address", "overlap") in rules(info.value)
    assert "rate_setpoint" in str(info.value)


def test_overlap_with_a_wide_point_that_is_not_the_neighbour() -> None:
    data = shipped()
    # model spans 101..108; firmware moved into it after battery/map_version stay put
    data["input_registers"]["firmware"]["address"] = 105
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("input_registers.firmware.address", "overlap") in rules(info.value)


def test_same_address_in_different_tables_is_fine() -> None:
    m = parse_map(shipped())
    assert m["run"].address == m["running"].address == m["rate_setpoint"].address == 0


def test_unknown_type_and_unknown_keys() -> None:
    data = shipped()
    data["holding_registers"]["rate_setpoint"]["type"] = "uint24"
    data["holding_registers"]["rate_setpoint"]["colour"] = "red"
    data["device"]["colour"] = "x"
    data["registers"] = {}
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert {
        ("holding_registers.rate_setpoint.type", "known-type"),
        ("holding_registers.rate_setpoint.colour", "unknown-key"),
        ("device.colour", "unknown-key"),
        ("registers", "unknown-key"),
    } <= rules(info.value)


def test_missing_required_points_are_each_listed() -> None:
    data = shipped()
    del data["holding_registers"]["watchdog_timeout"]
    del data["coils"]["run"]
    del data["discrete_inputs"]["alarm_occlusion"]
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    found = rules(info.value)
    assert ("holding_registers.watchdog_timeout", "missing-point") in found
    assert ("coils.run", "missing-point") in found
    assert ("discrete_inputs", "missing-alarm") in found
    assert "occlusion" in str(info.value)


def test_writable_point_in_a_read_only_table() -> None:
    data = shipped()
    data["input_registers"]["delivered_volume"]["access"] = "rw"
    data["discrete_inputs"]["running"]["access"] = "w"
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("input_registers.delivered_volume.access", "read-only-table") in rules(info.value)
    assert ("discrete_inputs.running.access", "read-only-table") in rules(info.value)


def test_required_setpoint_must_be_writable() -> None:
    data = shipped()
    data["holding_registers"]["rate_setpoint"]["access"] = "r"
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("holding_registers.rate_setpoint.access", "required-writable") in rules(info.value)


@pytest.mark.parametrize("scale", ["0", "-0.001", "abc", "NaN", "Infinity", 0.001, True, [1]])
def test_bad_scale(scale: object) -> None:
    data = shipped()
    data["holding_registers"]["rate_setpoint"]["scale"] = scale
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("holding_registers.rate_setpoint.scale", "scale") in rules(info.value)


def test_scale_on_non_numeric_point() -> None:
    data = shipped()
    data["input_registers"]["model"]["scale"] = "1"
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("input_registers.model.scale", "not-applicable") in rules(info.value)


@pytest.mark.parametrize("address", [-1, 65536, "0", 1.0, True])
def test_bad_address(address: object) -> None:
    data = shipped()
    data["coils"]["run"]["address"] = address
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("coils.run.address", "range") in rules(info.value)


def test_point_running_past_the_address_space() -> None:
    data = shipped()
    data["holding_registers"]["rate_setpoint"]["address"] = 65535
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("holding_registers.rate_setpoint.address", "range") in rules(info.value)


def test_type_in_wrong_table() -> None:
    data = shipped()
    data["coils"]["run"]["type"] = "uint16"
    data["input_registers"]["battery"]["type"] = "bool"
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("coils.run.type", "table-type") in rules(info.value)
    assert ("input_registers.battery.type", "table-type") in rules(info.value)


def test_ascii_needs_a_length_and_others_must_not_have_one() -> None:
    data = shipped()
    del data["input_registers"]["model"]["length"]
    data["input_registers"]["battery"]["length"] = 2
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("input_registers.model.length", "range") in rules(info.value)
    assert ("input_registers.battery.length", "not-applicable") in rules(info.value)


def test_word_order_rules() -> None:
    data = shipped()
    data["holding_registers"]["rate_setpoint"]["word_order"] = "middle"
    data["holding_registers"]["diameter_setpoint"]["word_order"] = "little"
    data["device"]["word_order"] = "sideways"
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    found = rules(info.value)
    assert ("holding_registers.rate_setpoint.word_order", "word-order") in found
    assert ("holding_registers.diameter_setpoint.word_order", "not-applicable") in found
    assert ("device.word_order", "word-order") in found


def test_device_section_rules() -> None:
    data = shipped()
    data["device"]["address_base"] = 1
    data["device"]["map_version"] = 0
    data["device"]["name"] = " "
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert {
        ("device.address_base", "zero-based"),
        ("device.map_version", "range"),
        ("device.name", "required"),
    } <= (rules(info.value))
    data = shipped()
    del data["device"]
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("device", "required") in rules(info.value)


def test_alarm_and_command_rules() -> None:
    data = shipped()
    data["discrete_inputs"]["alarm_other"]["alarm"] = "gremlins"
    data["discrete_inputs"]["alarm_near_end"]["alarm"] = "occlusion"  # duplicate, and near_end now missing
    data["holding_registers"]["command"]["commands"] = {"self_destruct": 1, "clear_delivered": 0x10000}
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    found = rules(info.value)
    assert ("discrete_inputs.alarm_other.alarm", "known-alarm") in found
    assert ("discrete_inputs", "missing-alarm") in found
    assert any(rule == "unique-alarm" for _, rule in found)
    assert ("holding_registers.command.commands.self_destruct", "known-command") in found
    assert ("holding_registers.command.commands.clear_delivered", "range") in found
    assert ("holding_registers.command", "missing-point") not in found  # invalid, not missing


def test_command_register_needs_the_acknowledge_command() -> None:
    data = shipped()
    data["holding_registers"]["command"]["commands"] = {"clear_delivered": 0xA5A5}
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert rules(info.value) == {("holding_registers.command.commands", "missing-command")}


def test_the_command_register_needs_clear_delivered() -> None:
    """The daemon clears the delivered counter before every course: a map that cannot is refused at load."""
    data = shipped()
    data["holding_registers"]["command"]["commands"] = {"acknowledge_alarms": 0x5555}
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert rules(info.value) == {("holding_registers.command.commands", "missing-command")}
    assert "clear_delivered" in str(info.value)


def test_duplicate_magic_values() -> None:
    data = shipped()
    data["holding_registers"]["command"]["commands"] = {
        "acknowledge_alarms": 0x5555,
        "clear_delivered": 0x5555,
    }
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("holding_registers.command.commands.clear_delivered", "unique-magic") in rules(info.value)


def test_point_name_used_in_two_tables() -> None:
    data = shipped()
    data["input_registers"]["run"] = {"address": 300, "type": "uint16", "access": "r", "meaning": "dup"}
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("input_registers.run", "unique-name") in rules(info.value)


def test_point_without_meaning_and_non_table_point() -> None:
    data = shipped()
    data["input_registers"]["battery"]["meaning"] = ""
    data["input_registers"]["junk"] = 5
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert ("input_registers.battery.meaning", "required") in rules(info.value)
    assert ("input_registers.junk", "type") in rules(info.value)


def test_a_second_device_is_a_new_file_not_new_code(tmp_path: Path) -> None:
    """Another device: different addresses, FLOAT32 rate in little word order, 0.1 mm diameter scale."""
    data = shipped()
    hr, ir = data["holding_registers"], data["input_registers"]
    hr["rate_setpoint"] = {
        "address": 12,
        "type": "float32",
        "word_order": "little",
        "units": "mL/h",
        "access": "rw",
        "meaning": "flow setpoint",
    }
    hr["diameter_setpoint"]["scale"] = "0.1"
    ir["diameter_readback"]["scale"] = "0.1"  # a read-back is encoded like its setpoint
    ir["rate_readback"] = {
        "address": 72,
        "type": "float32",
        "word_order": "little",
        "access": "r",
        "units": "mL/h",
        "meaning": "flow",
    }
    text = "\n".join(
        ['[device]\nname = "other"\nmap_version = 7\naddress_base = 0\n']
        + [
            _point_toml(t, n, spec)
            for t in ("coils", "discrete_inputs", "holding_registers", "input_registers")
            for n, spec in data[t].items()
        ]
    )
    path = tmp_path / "other.toml"
    path.write_text(text, encoding="utf-8")
    m = load_map(path)
    assert (m["rate_setpoint"].address, m["rate_setpoint"].type, m["rate_setpoint"].word_order) == (
        12,
        "float32",
        "little",
    )
    assert m.map_version == 7


def _point_toml(table: str, name: str, spec: dict[str, Any]) -> str:
    def value(v: object) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return str(v).lower() if isinstance(v, bool) else str(v)

    return f"[{table}.{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in spec.items())
