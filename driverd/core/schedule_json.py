"""Strict JSON loading of a schedule document: UTF-8, size-limited, Decimal numbers, no NaN, no duplicate
keys. Pure."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Final

from driverd.core.errors import Problem, ValidationError
from driverd.core.schedule_limits import MAX_DOCUMENT_BYTES
from driverd.core.schedule_values import show_text

# --- JSON loading ------------------------------------------------------------------------------------------


class _Refused(ValueError):
    """Raised from json hooks; turned into a Problem by load_json."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule
        self.detail = detail


def _no_constants(name: str) -> object:
    raise _Refused("json", f"{name} is not a JSON number")


_MAX_NUMBER_CHARS: Final = 100


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_NUMBER_CHARS:
        raise _Refused("range", f"integer literal with {len(text)} digits")
    return int(text)


def _bounded_decimal(text: str) -> Decimal:
    # A literal like 1e999999999999999999999 is beyond Decimal's exponent range (InvalidOperation), and a
    # 100 kB literal is no quantity: both are refused here, before any arithmetic sees them.
    if len(text) > _MAX_NUMBER_CHARS:
        raise _Refused("range", f"number literal of {len(text)} characters")
    try:
        return Decimal(text)
    except ArithmeticError:
        raise _Refused("range", f"number {text[:40]} is out of range") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            # Duplicate keys are read differently by different parsers: a signature-confusion risk.
            raise _Refused("duplicate-key", f"key {show_text(key)} appears more than once in one object")
        out[key] = value
    return out


def load_json(data: bytes | str) -> object:
    """Parse a schedule document strictly: UTF-8, size-limited, numbers as Decimal/int, no NaN/Infinity,
    no duplicate keys. Raises ValidationError (rule `size`, `encoding`, `json`, `duplicate-key`, `range`)."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ValidationError([Problem("", "size", f"document larger than {MAX_DOCUMENT_BYTES} bytes")])
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError([Problem("", "encoding", f"not UTF-8 (byte offset {exc.start})")]) from None
    else:
        text = data
    try:
        return json.loads(
            text,
            parse_float=_bounded_decimal,
            parse_int=_bounded_int,
            parse_constant=_no_constants,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        detail = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise ValidationError([Problem("", "json", detail)]) from None
    except _Refused as exc:
        raise ValidationError([Problem("", exc.rule, exc.detail)]) from None
    except RecursionError:
        raise ValidationError([Problem("", "json", "JSON nested too deeply")]) from None
    except ValueError as exc:  # e.g. Python's own integer-digit limit
        raise ValidationError([Problem("", "json", f"invalid JSON: {exc}")]) from None
