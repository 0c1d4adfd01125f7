"""Canonical JSON: the exact bytes a schedule signature and digest are computed over.

Specification (also in docs/schedules.md, precise enough to reimplement):

- UTF-8, no whitespace outside strings, no BOM, no trailing newline.
- Objects: members sorted by key, comparing keys as sequences of Unicode code points; `{"k":v,...}`.
  Keys must be strings.
- Arrays: `[v,...]` in their order.
- Strings: `"` + text + `"`; `"` and `\\` are escaped as `\\"` and `\\\\`; U+0008, U+0009, U+000A, U+000C,
  U+000D as `\\b \\t \\n \\f \\r`; every other code point below U+0020 as `\\u00xx` (lowercase hex);
  everything else literally (no `\\u` escapes for non-ASCII). Lone surrogates are refused.
- `true`, `false`, `null`.
- Integers: optional `-` then decimal digits, no leading zeros (`0` for zero).
- Decimal numbers: the exact value written in plain notation, shortest form: no exponent, no trailing
  fractional zeros, no trailing `.`, no `+`, `-` only for non-zero negatives, `0.` prefix for |x| < 1
  (`2.50` -> `2.5`, `1E+2` -> `100`, `-0.0` -> `0`). An integral Decimal is therefore written like an integer.
- A number whose plain form would need more than MAX_DIGITS digits is refused (this bounds the work a
  hostile document can cause, e.g. `1E+999999999`).
- Binary floats are refused (TypeError): their value is not the literal a document said.

The signed content of a schedule is the document object without its top-level `signature` member.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Final

MAX_DIGITS: Final = 100
SIGNATURE_KEY: Final = "signature"


def canonical_bytes(obj: object) -> bytes:
    """The canonical UTF-8 JSON encoding of obj (see module doc). Raises TypeError/ValueError if impossible."""
    parts: list[str] = []
    _encode(obj, parts, depth=0)
    text = "".join(parts)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("strings must not contain lone surrogates") from None


def signed_content(doc: Mapping[str, object]) -> dict[str, object]:
    """The part of a document a signature covers: every top-level member except `signature`."""
    return {k: v for k, v in doc.items() if k != SIGNATURE_KEY}


def content_digest(doc: Mapping[str, object]) -> str:
    """Hex SHA-256 of the canonical bytes of the signed content: names this exact schedule."""
    return hashlib.sha256(canonical_bytes(signed_content(doc))).hexdigest()


def decimal_text(value: Decimal) -> str:
    """Shortest plain-notation text of a finite Decimal's exact value (no context rounding)."""
    if not value.is_finite():
        raise ValueError(f"not a finite number: {value}")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    coeff = "".join(map(str, digits)).lstrip("0")
    if not coeff:
        return "0"
    # Drop trailing zeros of the coefficient into the exponent: the exact value is unchanged.
    stripped = coeff.rstrip("0")
    exponent += len(coeff) - len(stripped)
    coeff = stripped
    if exponent >= 0:
        if len(coeff) + exponent > MAX_DIGITS:
            raise ValueError(f"number needs more than {MAX_DIGITS} digits in plain notation")
        text = coeff + "0" * exponent
    else:
        frac = -exponent
        ndigits = len(coeff) if len(coeff) > frac else frac + 1  # "0.00c" counts its leading zeros
        if ndigits > MAX_DIGITS:
            raise ValueError(f"number needs more than {MAX_DIGITS} digits in plain notation")
        whole, point = (coeff[:-frac], coeff[-frac:]) if len(coeff) > frac else ("0", coeff.rjust(frac, "0"))
        text = whole + "." + point
    return ("-" if sign else "") + text


_MAX_DEPTH: Final = 64


def _encode(obj: object, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"nesting deeper than {_MAX_DEPTH}")
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, float):
        raise TypeError("binary floats are not allowed in canonical JSON; use Decimal (parse_float=Decimal)")
    elif isinstance(obj, int):
        text = str(abs(obj))
        if len(text) > MAX_DIGITS:
            raise ValueError(f"integer has more than {MAX_DIGITS} digits")
        out.append(("-" if obj < 0 else "") + text)
    elif isinstance(obj, Decimal):
        out.append(decimal_text(obj))
    elif isinstance(obj, str):
        # json.dumps with ensure_ascii=False escapes exactly the set in the module doc.
        out.append(json.dumps(obj, ensure_ascii=False))
    elif isinstance(obj, Mapping):
        keys = list(obj.keys())
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"object keys must be strings, got {type(key).__name__}")
        out.append("{")
        for i, key in enumerate(sorted(keys)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _encode(obj[key], out, depth + 1)
        out.append("}")
    elif isinstance(obj, Sequence) and not isinstance(obj, (bytes, bytearray)):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _encode(item, out, depth + 1)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as canonical JSON")


def to_json_text(obj: object, indent: int = 2) -> str:
    """Readable JSON with the canonical number and string rules (keys keep their order).

    Used to write signed documents: reading the text back with parse_float=Decimal gives a document
    with the same canonical bytes, so the signature still verifies.
    """
    out: list[str] = []
    _pretty(obj, out, indent, 0)
    return "".join(out) + "\n"


def _pretty(obj: object, out: list[str], indent: int, level: int) -> None:
    pad = " " * (indent * (level + 1))
    end = " " * (indent * level)
    if isinstance(obj, Mapping) and obj:
        out.append("{\n")
        for i, (key, value) in enumerate(obj.items()):
            if not isinstance(key, str):
                raise TypeError(f"object keys must be strings, got {type(key).__name__}")
            out.append((",\n" if i else "") + pad + json.dumps(key, ensure_ascii=False) + ": ")
            _pretty(value, out, indent, level + 1)
        out.append("\n" + end + "}")
    elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes, bytearray)) and obj:
        out.append("[\n")
        for i, item in enumerate(obj):
            out.append((",\n" if i else "") + pad)
            _pretty(item, out, indent, level + 1)
        out.append("\n" + end + "]")
    else:
        out.append(canonical_bytes(obj).decode("utf-8"))
