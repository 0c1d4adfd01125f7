"""Canonical record bytes: the one place values become audit JSON, and the hashes over those bytes.

A record is one line: `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` encoded
UTF-8. Decimals become plain-notation strings, datetimes RFC 3339 UTC strings with "Z". Floats are refused:
a binary float never enters the audit log (its decimal expansion is not what anyone meant).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
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
    if utc.year >= 1000:
        # Same text as the strftime form below (isoformat omits zero microseconds too), 2.5x faster.
        return utc.replace(tzinfo=None).isoformat() + "Z"
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")  # years < 1000: strftime does not pad; keep its bytes
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
        if value.isascii():
            return str(value)
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
        # Lists of ASCII strings (a snapshot's history rows: tens of thousands at start-up) are already in their
        # JSON form: what the element-wise path returns for each (str(v) of an exact str is v), without a path
        # built per element.
        if all(type(v) is str and v.isascii() for v in value):
            return list(value)
        return [canonicalize(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, JsonValue] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise AuditFieldError(f"{path}.{k!r}", "key-type", "mapping keys must be strings")
            out[k] = canonicalize(v, f"{path}.{k}" if path else k)
        return out
    raise AuditFieldError(path, "type", f"unsupported type {type(value).__name__} for the audit log")


_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _reference_dumps(obj: Mapping[str, Any]) -> bytes:
    """The definition of the canonical bytes. `dumps` must give exactly these (tests compare the two)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _make_fast_encoder() -> Callable[[Any, int], Any] | None:
    """The C encoder json.dumps builds on every call, built once (json.dumps with options re-creates a
    JSONEncoder and its C encoder per call: about half the cost of encoding a record). Used only if it gives
    the same bytes as json.dumps on a probe; otherwise None and `dumps` falls back to json.dumps."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        enc = make(None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", True, False, False)
        probe = {"b": [1, None, True, False, {"y": "\u00fc\"\\\n", "x": -3}], "a": "\u2192", "c": {}}
        if "".join(enc(probe, 0)).encode("utf-8") != _reference_dumps(probe):
            return None
    except Exception:  # a different C signature in another Python: use the slow path, never wrong bytes
        return None
    return enc  # type: ignore[no-any-return]


_FAST_ENCODE: Final = _make_fast_encoder()


def dumps(obj: Mapping[str, Any]) -> bytes:
    """Canonical bytes of an already-canonical JSON object (no trailing newline)."""
    if _FAST_ENCODE is not None and isinstance(obj, dict):
        return "".join(_FAST_ENCODE(obj, 0)).encode("utf-8")
    return _reference_dumps(obj)


def _join(left: bytes, right: bytes) -> bytes:
    """Merge two encoded objects whose keys do not interleave (all of left's sort before right's)."""
    if left == b"{}":
        return right
    if right == b"{}":
        return left
    return left[:-1] + b"," + right[1:]


def hashed_line(record: Mapping[str, Any]) -> tuple[bytes, str]:
    """(line, hash) for a canonical record WITHOUT `hash`: hash = SHA-256 of its canonical bytes, line = the
    canonical bytes of the record WITH that hash. Same bytes as `dumps(record | {"hash": record_hash(record)})`
    with one encoding pass instead of two: keys sort, so the record splits into the members before "hash" and
    those after, and both bytes strings are joins of the two halves."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for k, v in record.items():
        if k == "hash":
            raise ValueError("hashed_line: the record already has a hash")
        (before if k < "hash" else after)[k] = v
    b, a = dumps(before), dumps(after)
    digest = sha256_hex(_join(b, a))
    return _join(_join(b, b'{"hash":"' + digest.encode("ascii") + b'"}'), a), digest


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """The `hash` field: SHA-256 of the canonical bytes of the record without `hash`."""
    return sha256_hex(dumps({k: v for k, v in record.items() if k != "hash"}))


def _bad_float(s: str) -> Any:
    raise ValueError(f"float literal {s!r} in an audit record")


def _bad_const(s: str) -> Any:
    raise ValueError(f"constant {s!r} in an audit record")


# Built once: json.loads with options builds a new decoder per call.
_DECODER: Final = json.JSONDecoder(parse_float=_bad_float, parse_constant=_bad_const)


def _parse(line: bytes) -> dict[str, Any]:
    text = line.decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        obj = _DECODER.decode(text)
    except RecursionError:  # hostile nesting; no record the writer makes is nested more than a few levels
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("record is not a JSON object")
    return obj


def _make_fast_codec() -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]] | None:
    """msgspec's C JSON decoder (floats refused by its float_hook) and sorted-key encoder, or None without msgspec.

    They are only a shortcut: `loads_line` accepts a line on the fast path only when msgspec's re-encoding of what
    it decoded is byte for byte the line itself. Its encoder gives exactly `_reference_dumps` on every value a
    decoded record can hold (str, int of any size, bool, None, list, dict with str keys): tests/audit/
    test_fast_codec.py proves it with hypothesis. So such a line is `_reference_dumps` of that value, and the
    standard library decodes it to the same value: the fast path accepts nothing the reference rejects and returns
    the same record. Any other line (an error, a different re-encoding) goes the reference way, which decides and
    words the error exactly as before.
    """
    try:
        import msgspec
    except ImportError:  # a declared dependency; without it everything still works through the reference path
        return None

    def refuse_float(text: str) -> Any:
        raise ValueError(f"float literal {text!r} in an audit record")

    decoder = msgspec.json.Decoder(float_hook=refuse_float)
    encoder = msgspec.json.Encoder(order="sorted")
    return decoder.decode, encoder.encode


_FAST_CODEC: Final = _make_fast_codec()


def loads_line(line: bytes) -> dict[str, Any]:
    """Parse one line (without newline) into a record dict. Raises ValueError on anything non-canonical.

    Numbers in a canonical record are integers only (Decimals are strings), so a float literal is an error.
    """
    fast = loads_line_fast(line)
    if fast is not None:
        return fast
    obj = _parse(line)  # any doubt: the reference decides, with its own message
    if dumps(obj) != line:
        raise ValueError("line is not in canonical form")
    return obj


def loads_line_fast(line: bytes) -> dict[str, Any] | None:
    """The record if the fast path alone proves `line` canonical (see `_make_fast_codec`), else None: then
    `loads_line` decides. Never returns a record that loads_line would refuse or parse differently."""
    if _FAST_CODEC is None:
        return None
    decode, encode = _FAST_CODEC
    try:
        obj = decode(line)
        if type(obj) is dict and encode(obj) == line:
            return obj
    except Exception:
        pass
    return None


_HEX64: Final = re.compile(r"[0-9a-f]{64}")


HASH_KEY: Final = b'"hash":"'


def hash_cut_from_line(line: bytes, digest: str) -> str | None:
    """SHA-256 of `line` without its member `"hash":"<digest>"` and one comma next to it, or None unless the line
    holds exactly one "hash" member with a string value and that value is written as `digest` itself.
    `line_content_hash` says when this is the content hash."""
    i = line.find(HASH_KEY)
    if i <= 0 or line.find(HASH_KEY, i + 8) >= 0:
        return None
    raw = digest.encode("utf-8", "replace")
    j = i + 8 + len(raw)
    if line[i + 8 : j] != raw or line[j : j + 1] != b'"':
        return None
    j += 1
    if line[j] == 44:  # ","
        return hashlib.sha256(line[:i] + line[j + 1 :]).hexdigest()
    if line[i - 1] == 44:
        return hashlib.sha256(line[: i - 1] + line[j:]).hexdigest()
    return hashlib.sha256(line[:i] + line[j:]).hexdigest()


def line_content_hash(line: bytes, record: Mapping[str, Any]) -> str:
    """record_hash(record) for a record parsed from `line` by loads_line (so line == dumps(record)), without
    encoding the record again.

    The canonical bytes of the record without `hash` are the line with its top-level member `"hash":"<hex>"` and
    one comma next to it cut out: keys are sorted, members are joined by commas, and a 64-hex-digit string is
    written as is. That member is found by its bytes `"hash":"`: the top-level one is certainly there, so if these
    bytes occur only once, they are it. When they occur more than once (a nested "hash" string member, or a key
    ending in an escaped quote and "hash") the record is encoded again instead."""
    digest = record.get("hash")
    if type(digest) is str and _HEX64.fullmatch(digest):
        found = hash_cut_from_line(line, digest)
        if found is not None:
            return found
    return record_hash(record)
