"""Modbus codec and register map on hostile input (issue #11 item 5): register values of any shape decode to a
value or a CodecError; any map file is a RegisterMap or a ConfigError; never another exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core.errors import ConfigError
from drivers.modbus import codec
from drivers.modbus.codec import CodecError
from drivers.modbus.regmap import DEFAULT_MAP, load_map, parse_map_text

MAP = load_map()
POINTS = sorted(MAP.points.values(), key=lambda p: p.name)
REGISTER_POINTS = [p for p in POINTS if p.type != "bool"]

registers = st.lists(st.one_of(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(),
                               st.none(), st.booleans(), st.floats(), st.text(max_size=3)), max_size=12)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(REGISTER_POINTS), registers)
def test_any_registers_decode_or_raise_codec_error(point: Any, regs: list[Any]) -> None:
    try:
        value = codec.decode(point, regs)
    except CodecError as exc:
        assert exc.problems and exc.point is point
    else:
        assert value is not None


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(REGISTER_POINTS), st.data())
def test_any_well_formed_registers_decode_or_raise_codec_error(point: Any, data: st.DataObject) -> None:
    regs = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=point.width, max_size=point.width))
    try:
        codec.decode(point, regs)
    except CodecError as exc:
        assert exc.problems


@given(st.sampled_from(POINTS), st.one_of(st.booleans(), st.integers(), st.none(), st.text(max_size=3)))
def test_any_bit_decodes_or_raises_codec_error(point: Any, value: Any) -> None:
    try:
        codec.decode_bit(point, value)
    except CodecError as exc:
        assert exc.problems


HOSTILE_MAPS = {
    "deep": "a = " + "[" * 100_000 + "]" * 100_000,
    "huge-int": "a = " + "9" * 5000,
    "huge-exponent-scale": DEFAULT_MAP.read_text(encoding="utf-8").replace('scale = "', 'scale = "1e999999999', 1),
    "nul": "\x00" * 10,
    "huge": "# " + "x" * (2 << 20),
}


@pytest.mark.parametrize("name", list(HOSTILE_MAPS))
def test_hostile_map_text_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_map_text(HOSTILE_MAPS[name])
    assert info.value.problems


def test_hostile_map_files_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "map.toml"
    bad.write_bytes(b'[device]\nname = "\xff\xfe"\n')
    for path in (bad, Path("map\x00.toml"), tmp_path / "missing.toml", tmp_path):
        with pytest.raises(ConfigError):
            load_map(path)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=500))
def test_arbitrary_map_text_is_a_map_or_a_config_error(text: str) -> None:
    try:
        parse_map_text(text)
    except ConfigError as exc:
        assert exc.problems


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5000), st.text(max_size=40))
def test_shipped_map_with_a_hostile_splice_is_a_map_or_a_config_error(at: int, splice: str) -> None:
    text = DEFAULT_MAP.read_text(encoding="utf-8")
    at = min(at, len(text))
    try:
        parse_map_text(text[:at] + splice + text[at:])
    except ConfigError as exc:
        assert exc.problems
