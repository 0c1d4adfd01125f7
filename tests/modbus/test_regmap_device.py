"""The map's [device] identification (FC43/14) and plunger range keys (issue 16.8): valid and malformed."""

from __future__ import annotations

from decimal import Decimal

import pytest

from driverd.core.errors import ConfigError
from drivers.modbus.regmap import parse_map
from tests.modbus.test_regmap import shipped


def test_shipped_map_states_identity_and_range() -> None:
    m = parse_map(shipped())
    assert (m.vendor, m.product_code, m.revision) == ("driverd", "DRV-MB1", "1.0.0-sim")
    assert m.plunger is not None
    assert (m.plunger.min_mm_per_h, m.plunger.max_mm_per_h) == (Decimal("0.04205"), Decimal("3060.3"))


def test_identity_and_range_are_optional() -> None:
    data = shipped()
    for key in ("vendor", "product_code", "revision", "plunger_min_mm_per_h", "plunger_max_mm_per_h"):
        del data["device"][key]
    m = parse_map(data)
    assert (m.vendor, m.plunger) == ("", None)


@pytest.mark.parametrize(
    ("key", "value", "path", "rule"),
    [
        ("vendor", "Ünïcode", "device.vendor", "format"),
        ("product_code", 7, "device.product_code", "format"),
        ("revision", "x" * 65, "device.revision", "format"),
        ("plunger_min_mm_per_h", "fast", "device.plunger_min_mm_per_h", None),
        ("plunger_min_mm_per_h", "5000", "device.plunger_min_mm_per_h", "range"),
        ("plunger_max_mm_per_h", "-1", "device.plunger_max_mm_per_h", None),
    ],
)
def test_malformed_device_keys_name_the_field(key: str, value: object, path: str, rule: str | None) -> None:
    data = shipped()
    data["device"][key] = value
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    hits = [p for p in info.value.problems if p.path == path]
    assert hits, info.value.problems
    assert rule is None or hits[0].rule == rule


def test_half_a_plunger_range_is_refused() -> None:
    data = shipped()
    del data["device"]["plunger_max_mm_per_h"]
    with pytest.raises(ConfigError) as info:
        parse_map(data)
    assert any(p.path == "device.plunger_max_mm_per_h" for p in info.value.problems)
