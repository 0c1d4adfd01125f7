"""Codec: exact Decimal <-> register round trips; refusal (never rounding) of values a point cannot carry."""

from __future__ import annotations

import struct
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client.mixin import ModbusClientMixin

from drivers.modbus import codec
from drivers.modbus.codec import CodecError
from drivers.modbus.regmap import Point, load_map

MAP = load_map()
RATE = MAP["rate_setpoint"]
DIAMETER = MAP["diameter_setpoint"]
MODEL = MAP["model"]


def point(ptype: str, *, scale: str | None = None, word_order: str = "big", length: int = 0) -> Point:
    return Point(
        table="holding_registers",
        name="p",
        address=0,
        type=ptype,
        access="rw",
        meaning="test point",
        scale=None if scale is None else Decimal(scale),
        word_order=word_order,
        length=length,
    )


def test_rate_vector_big_endian_words() -> None:
    # 70000.123 mL/h -> 70000123 uL/h = 0x042C1DFB: high word first
    assert codec.encode(RATE, Decimal("70000.123")) == [0x042C, 0x1DFB]
    assert codec.decode(RATE, [0x042C, 0x1DFB]) == Decimal("70000.123")
    assert codec.encode(RATE, Decimal("2.083")) == [0, 2083]
    assert codec.encode(DIAMETER, Decimal("19.13")) == [1913]


@given(st.integers(min_value=0, max_value=0xFFFF_FFFF))
def test_uint32_rate_round_trip(raw: int) -> None:
    value = Decimal(raw).scaleb(-3)
    regs = codec.encode(RATE, value)
    assert all(0 <= r <= 0xFFFF for r in regs)
    assert codec.decode(RATE, regs) == value


@given(
    st.sampled_from(["uint16", "int16", "uint32", "int32"]),
    st.sampled_from(["1", "0.01", "0.001", "10", "0.5"]),
    st.sampled_from(["big", "little"]),
    st.integers(min_value=-(2**31), max_value=2**32 - 1),
)
def test_integer_types_round_trip_or_refuse(ptype: str, scale: str, order: str, raw: int) -> None:
    p = point(ptype, scale=scale, word_order=order)
    value = Decimal(raw) * Decimal(scale)
    lo, hi = {
        "uint16": (0, 0xFFFF),
        "int16": (-0x8000, 0x7FFF),
        "uint32": (0, 2**32 - 1),
        "int32": (-(2**31), 2**31 - 1),
    }[ptype]
    if lo <= raw <= hi:
        assert codec.decode(p, codec.encode(p, value)) == value
    else:
        with pytest.raises(CodecError) as info:
            codec.encode(p, value)
        assert info.value.rule == "range"


@given(st.integers(min_value=0, max_value=10**7), st.integers(min_value=1, max_value=9))
def test_values_finer_than_the_scale_are_refused_not_rounded(raw: int, extra: int) -> None:
    value = Decimal(raw).scaleb(-3) + Decimal(extra).scaleb(-4)  # one digit finer than 0.001
    with pytest.raises(CodecError) as info:
        codec.encode(RATE, value)
    assert info.value.rule == "scale"
    assert "holding_registers.rate_setpoint" in str(info.value)


def test_value_with_more_digits_than_any_context_is_refused() -> None:
    value = Decimal("1." + "0" * 80 + "1")
    with pytest.raises(CodecError):
        codec.encode(RATE, value)


@pytest.mark.parametrize("bad", [Decimal("-0.001"), Decimal("4294967.296"), Decimal("NaN"), Decimal("Infinity")])
def test_out_of_range_and_non_finite_are_refused(bad: Decimal) -> None:
    with pytest.raises(CodecError):
        codec.encode(RATE, bad)


@pytest.mark.parametrize("bad", [1.5, 2, True, "2.083", None])
def test_wrong_python_types_are_refused(bad: object) -> None:
    with pytest.raises(CodecError) as info:
        codec.encode(RATE, bad)  # type: ignore[arg-type]
    assert info.value.rule == "type"


@pytest.mark.parametrize("regs", [[1], [1, 2, 3], [0x10000, 0], [-1, 0], [True, 0], ["a", 0]])
def test_malformed_registers_are_refused(regs: list[object]) -> None:
    with pytest.raises(CodecError):
        codec.decode(RATE, regs)  # type: ignore[arg-type]


def test_signed_decoding() -> None:
    assert codec.decode(point("int16"), [0xFFFF]) == -1
    assert codec.decode(point("int32"), [0xFFFF, 0xFFFE]) == -2
    assert codec.decode(point("int32", word_order="little"), [0xFFFE, 0xFFFF]) == -2


# -- FLOAT32 (map option for other devices) -----------------------------------------------------------------


@given(st.floats(width=32, allow_nan=False, allow_infinity=False), st.sampled_from(["big", "little"]))
def test_float32_round_trip_of_every_finite_float32(f: float, order: str) -> None:
    p = point("float32", word_order=order)
    bits = int.from_bytes(struct.pack(">f", f), "big")
    regs = [bits >> 16, bits & 0xFFFF] if order == "big" else [bits & 0xFFFF, bits >> 16]
    value = codec.decode(p, regs)
    assert isinstance(value, Decimal)
    assert struct.pack(">f", float(value)) == struct.pack(">f", f) or (f == 0 and value == 0)
    assert codec.encode(p, value) == regs or f == 0


@given(st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6))
def test_float32_big_endian_matches_pymodbus(f: float) -> None:
    """An independent oracle: pymodbus's own FLOAT32 conversion (big word order)."""
    p = point("float32")
    value = codec.decode(p, ModbusClientMixin.convert_to_registers(f, ModbusClientMixin.DATATYPE.FLOAT32))
    assert isinstance(value, Decimal)
    regs = codec.encode(p, value)
    assert ModbusClientMixin.convert_from_registers(regs, ModbusClientMixin.DATATYPE.FLOAT32) == f


def test_float32_largest_finite_value_round_trips() -> None:
    p = point("float32")
    biggest = 0x7F7FFFFF  # 3.4028235e38
    value = codec.decode(p, [biggest >> 16, biggest & 0xFFFF])
    assert isinstance(value, Decimal) and codec.encode(p, value) == [0x7F7F, 0xFFFF]
    # found by hypothesis: its 4-digit form (3.403e38) is past FLOAT32's maximum
    near = int.from_bytes(struct.pack(">f", 3.4025001647762064e38), "big")
    value = codec.decode(p, [near >> 16, near & 0xFFFF])
    assert isinstance(value, Decimal) and codec.encode(p, value) == [near >> 16, near & 0xFFFF]


def test_float32_vectors() -> None:
    p = point("float32")
    assert codec.encode(p, Decimal("12.5")) == [0x4148, 0x0000]
    assert codec.encode(point("float32", word_order="little"), Decimal("12.5")) == [0x0000, 0x4148]
    assert codec.decode(p, [0x3DCC, 0xCCCD]) == Decimal("0.1")  # shortest form that reads back as this float32


@pytest.mark.parametrize("value", ["0.123456789", "16777217", "3.4e39", "1e-50"])
def test_float32_refuses_values_it_cannot_carry_exactly(value: str) -> None:
    with pytest.raises(CodecError) as info:
        codec.encode(point("float32"), Decimal(value))
    assert info.value.rule in {"float32", "range"}


def test_float32_nan_registers_are_refused() -> None:
    with pytest.raises(CodecError) as info:
        codec.decode(point("float32"), [0x7FC0, 0x0000])
    assert info.value.rule == "finite"


# -- ASCII and bits -------------------------------------------------------------------------------------------


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16))
def test_ascii_round_trip(text: str) -> None:
    assert codec.decode(MODEL, codec.encode(MODEL, text.rstrip("\x00"))) == text


def test_ascii_vector_high_byte_first() -> None:
    assert codec.encode(MODEL, "AB")[:2] == [0x4142, 0]


@pytest.mark.parametrize("text", ["é", "x" * 17, "a\x00b"])
def test_ascii_refuses(text: str) -> None:
    with pytest.raises(CodecError):
        codec.encode(MODEL, text)


@pytest.mark.parametrize("regs", [[0x4100, 0x4200] + [0] * 6, [0x0141] + [0] * 7, [0xFF41] + [0] * 7])
def test_ascii_decoding_refuses_garbage(regs: list[int]) -> None:
    with pytest.raises(CodecError):
        codec.decode(MODEL, regs)


def test_bits() -> None:
    run = MAP["run"]
    assert codec.encode_bit(run, True) is True
    assert codec.decode_bit(run, False) is False
    with pytest.raises(CodecError):
        codec.encode_bit(run, 1)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        codec.decode_bit(RATE, True)
    with pytest.raises(CodecError):
        codec.encode(run, Decimal(1))
