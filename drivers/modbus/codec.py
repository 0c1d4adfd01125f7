"""Pure value <-> register conversion for map points (no I/O).

Exactness rule: a Decimal is encoded only if it is exactly representable by the point (a whole multiple of the
scale, inside the type's range; for FLOAT32, a float32 whose shortest decimal form equals the value).
Anything else raises CodecError naming the point and the rule. Nothing is ever rounded or clamped here: the
safety kernel already quantized, and a silent change of a setpoint is the very fault this module prevents.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from decimal import Context, Decimal, Inexact, InvalidOperation, localcontext

from driverd.core.errors import Problem, ValidationError
from drivers.modbus.regmap import Point

_INT_RANGE: dict[str, tuple[int, int]] = {
    "uint16": (0, 0xFFFF),
    "int16": (-0x8000, 0x7FFF),
    "uint32": (0, 0xFFFF_FFFF),
    "int32": (-0x8000_0000, 0x7FFF_FFFF),
}

Value = Decimal | bool | str

# Division by the scale must be exact or fail: an inexact quotient would silently round a setpoint.
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation])


def _unscale(point: Point, value: Decimal) -> Decimal:
    scale = point.scale or Decimal(1)
    try:
        with localcontext(_EXACT):
            return value / scale
    except (Inexact, InvalidOperation):
        raise CodecError(point, "scale", f"{value} cannot be divided exactly by the scale {scale}") from None


class CodecError(ValidationError):
    """A value that the point cannot carry exactly, or registers that are not a valid encoding."""

    def __init__(self, point: Point, rule: str, detail: str) -> None:
        self.point = point
        self.rule = rule
        super().__init__([Problem(point.path, rule, detail)])


def encode(point: Point, value: Value) -> list[int]:
    """Registers (16-bit ints) for a register point. Bool points: use encode_bit."""
    if point.type == "bool":
        raise CodecError(point, "type", "bool points are bits: use encode_bit")
    if point.type == "ascii":
        if not isinstance(value, str):
            raise CodecError(point, "type", f"expected text, got {type(value).__name__}")
        return _encode_ascii(point, value)
    if isinstance(value, (bool, str)) or not isinstance(value, Decimal):
        raise CodecError(point, "type", f"expected a Decimal, got {type(value).__name__}")
    if not value.is_finite():
        raise CodecError(point, "finite", f"{value} is not a finite number")
    if point.type == "float32":
        return _encode_float32(point, value)
    return _encode_int(point, value)


def decode(point: Point, registers: Sequence[int]) -> Value:
    """The value a register point holds. Numeric types give Decimal (exact), ascii gives str."""
    if point.type == "bool":
        raise CodecError(point, "type", "bool points are bits: use decode_bit")
    if len(registers) != point.width:
        raise CodecError(point, "width", f"expected {point.width} registers, got {len(registers)}")
    for r in registers:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= 0xFFFF:
            raise CodecError(point, "register", f"not a 16-bit register value: {r!r}")
    if point.type == "ascii":
        return _decode_ascii(point, registers)
    if point.type == "float32":
        return _decode_float32(point, registers)
    return _decode_int(point, registers)


def encode_bit(point: Point, value: bool) -> bool:
    if point.type != "bool":
        raise CodecError(point, "type", f"{point.type} point is not a bit")
    if not isinstance(value, bool):
        raise CodecError(point, "type", f"expected a bool, got {type(value).__name__}")
    return value


def decode_bit(point: Point, value: object) -> bool:
    if point.type != "bool":
        raise CodecError(point, "type", f"{point.type} point is not a bit")
    if not isinstance(value, bool):
        raise CodecError(point, "type", f"expected a bit, got {value!r}")
    return value


def raw_int(point: Point, value: Decimal) -> int:
    """The integer a scaled integer point carries for value; raises unless an exact multiple within range."""
    if point.type not in _INT_RANGE:
        raise CodecError(point, "type", f"{point.type} is not an integer type")
    scale = point.scale or Decimal(1)
    raw = _unscale(point, value)
    if raw != raw.to_integral_value():
        raise CodecError(
            point, "scale", f"{value} {point.units} is not a whole multiple of {scale} (not rounded)".strip()
        )
    lo, hi = _INT_RANGE[point.type]
    if not lo <= raw <= hi:
        raise CodecError(
            point,
            "range",
            f"{value} {point.units} is outside {lo * scale}..{hi * scale} for {point.type} x {scale}",
        )
    return int(raw)


def words(point: Point, value32: int) -> list[int]:
    """Split an unsigned 32-bit pattern into two registers in the point's word order."""
    hi, lo = (value32 >> 16) & 0xFFFF, value32 & 0xFFFF
    return [hi, lo] if point.word_order == "big" else [lo, hi]


def join(point: Point, registers: Sequence[int]) -> int:
    first, second = registers
    hi, lo = (first, second) if point.word_order == "big" else (second, first)
    return (hi << 16) | lo


def _encode_int(point: Point, value: Decimal) -> list[int]:
    raw = raw_int(point, value)
    if point.type in {"uint16", "int16"}:
        return [raw & 0xFFFF]
    return words(point, raw & 0xFFFF_FFFF)


def _decode_int(point: Point, registers: Sequence[int]) -> Decimal:
    raw = registers[0] if point.width == 1 else join(point, registers)
    bits = 16 * point.width
    if point.type.startswith("int") and raw >= 1 << (bits - 1):
        raw -= 1 << bits
    scale = point.scale or Decimal(1)
    with localcontext(_EXACT):  # exact: at most 10 digits times the scale
        return Decimal(raw) * scale


def float32_shortest(bits: int) -> Decimal:
    """The shortest decimal that reads back as exactly this float32 pattern (what a device display shows)."""
    (f,) = struct.unpack(">f", bits.to_bytes(4, "big"))
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError("not finite")
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        text = f"{f:.{digits}g}"
        try:
            if struct.pack(">f", float(text)) == bits.to_bytes(4, "big"):
                return Decimal(text)
        except OverflowError:
            continue  # near FLOAT32's maximum a short form rounds past it: try more digits
    raise AssertionError("unreachable: 9 digits round-trip every float32")


def _encode_float32(point: Point, value: Decimal) -> list[int]:
    scale = point.scale or Decimal(1)
    raw = _unscale(point, value)
    try:
        packed = struct.pack(">f", float(raw))
    except OverflowError:
        raise CodecError(point, "range", f"{value} is outside the FLOAT32 range") from None
    bits = int.from_bytes(packed, "big")
    try:
        back = float32_shortest(bits)
    except ValueError:
        raise CodecError(point, "range", f"{value} is outside the FLOAT32 range") from None
    if back != raw:
        raise CodecError(
            point, "float32", f"{value} is not exactly representable as FLOAT32 (would read {back * scale})"
        )
    return words(point, bits)


def _decode_float32(point: Point, registers: Sequence[int]) -> Decimal:
    try:
        value = float32_shortest(join(point, registers))
    except ValueError:
        raise CodecError(point, "finite", "FLOAT32 registers hold NaN or infinity") from None
    scale = point.scale or Decimal(1)
    with localcontext(_EXACT):
        return value * scale


def _encode_ascii(point: Point, text: str) -> list[int]:
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError:
        raise CodecError(point, "ascii", f"{text!r} is not ASCII") from None
    if b"\x00" in data:
        raise CodecError(point, "ascii", "text must not contain NUL")
    if len(data) > 2 * point.length:
        raise CodecError(point, "length", f"{text!r} is longer than {2 * point.length} characters")
    data = data.ljust(2 * point.length, b"\x00")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _decode_ascii(point: Point, registers: Sequence[int]) -> str:
    data = b"".join(r.to_bytes(2, "big") for r in registers).rstrip(b"\x00")
    if b"\x00" in data or any(b > 0x7E or b < 0x20 for b in data):
        raise CodecError(point, "ascii", f"registers are not printable NUL-padded ASCII: {data!r}")
    return data.decode("ascii")
