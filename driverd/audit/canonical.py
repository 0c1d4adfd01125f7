"""Canonical record bytes: the one place values become audit JSON, and the hashes over those bytes.

A record is one line: `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` encoded
UTF-8. Decimals become plain-notation strings, datetimes RFC 3339 UTC strings with "Z". Floats are refused:
a binary float never enters the audit log (its decimal expansion is not what anyone meant).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from driverd.core.errors import AuditError, Problem, ValidationError

ZERO_HASH: Final = "0" * 64

# Names the writer owns; event fields may not use them (they would silently overwrite the envelope).
ENVELOPE_FIELDS: Final = frozenset({"seq", "ts", "event", "pump_id", "course_id", "prev", "hash"})


class AuditFieldError(ValidationError, AuditError):
    """A value that cannot go into the audit log (wrong type, float, naive datetime, reserved name).

    Raised before anything is written: the log and the writer are unchanged.
    """

    def __init__(self, path: str, rule: str, detail: str) -> None:
        super().__init__([Problem(path, rule, detail)])


JsonValue = str | int | bool | None | list["JsonValue"] | dict[str, "JsonValue"]


def format_ts(value: datetime) -> str:
    """RFC 3339 UTC with "Z"; microseconds only when non-zero. Naive datetimes are refused."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise AuditFieldError("ts", "timezone", "datetime must be timezone-aware")
    utc = value.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}"
    return text + "Z"


def parse_ts(text: str) -> datetime:
    """Inverse of format_ts (accepts only the "Z" form the writer produces)."""
    if not isinstance(text, str) or not text.endswith("Z"):
        raise AuditFieldError("ts", "rfc3339-utc", f"expected an RFC 3339 UTC time ending in Z, got {text!r}")
    try:
        return datetime.fromisoformat(text[:-1] + "+00:00")
    except ValueError:
        raise AuditFieldError("ts", "rfc3339-utc", f"not an RFC 3339 time: {text!r}") from None


def canonicalize(value: object, path: str = "") -> JsonValue:
    """Convert an event field value to its JSON form, or raise AuditFieldError naming the field and rule."""
    # bool before int: bool is a subclass of int and must stay true/false.
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)  # IntEnum etc. become plain ints
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AuditFieldError(path, "utf-8", "string is not encodable as UTF-8 (lone surrogate)") from None
        return str(value)
    if isinstance(value, float):
        raise AuditFieldError(path, "no-float", "floats never enter the audit log; pass a Decimal")
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise AuditFieldError(path, "finite", f"decimal must be finite, got {value}")
        return format(value, "f")
    if isinstance(value, datetime):
        try:
            return format_ts(value)
        except AuditFieldError:
            raise AuditFieldError(path, "timezone", "datetime must be timezone-aware") from None
    if isinstance(value, list | tuple):
        return [canonicalize(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, JsonValue] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise AuditFieldError(f"{path}.{k!r}", "key-type", "mapping keys must be strings")
            out[k] = canonicalize(v, f"{path}.{k}" if path else k)
        return out
    raise AuditFieldError(path, "type", f"unsupported type {type(value).__name__} for the audit log")


def dumps(obj: Mapping[str, Any]) -> bytes:
    """Canonical bytes of an already-canonical JSON object (no trailing newline)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """The `hash` field: SHA-256 of the canonical bytes of the record without `hash`."""
    return sha256_hex(dumps({k: v for k, v in record.items() if k != "hash"}))


def loads_line(line: bytes) -> dict[str, Any]:
    """Parse one line (without newline) into a record dict. Raises ValueError on anything non-canonical.

    Numbers in a canonical record are integers only (Decimals are strings), so a float literal is an error.
    """
    text = line.decode("utf-8")  # UnicodeDecodeError is a ValueError

    def bad_float(s: str) -> Any:
        raise ValueError(f"float literal {s!r} in an audit record")

    def bad_const(s: str) -> Any:
        raise ValueError(f"constant {s!r} in an audit record")

    obj = json.loads(text, parse_float=bad_float, parse_constant=bad_const)
    if not isinstance(obj, dict):
        raise ValueError("record is not a JSON object")
    if dumps(obj) != line:
        raise ValueError("line is not in canonical form")
    return obj
