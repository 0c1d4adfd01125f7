"""Small pure helpers of schedule validation: JSON-pointer paths, printable text, RFC 3339 timestamps,
exact seconds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from driverd.core.canonical import decimal_text
from driverd.core.errors import Problem, ValidationError
from driverd.core.schedule_limits import CONTROL_RE, MAX_YEAR, MIN_YEAR, SECONDS_PER_DAY, TIMESTAMP_RE

# --- paths and small helpers -----------------------------------------------------------------------------


def show_text(key: str) -> str:
    """A key or value as safe printable text (control characters escaped, long text cut)."""
    cut = key if len(key) <= 64 else key[:64] + "..."
    return ascii(cut) if (CONTROL_RE.search(cut) or not cut.isprintable()) else repr(cut)


def json_pointer(base: str, key: str | int) -> str:
    """JSON-pointer child path (RFC 6901 escaping); unprintable keys are shown escaped."""
    if isinstance(key, int):
        return f"{base}/{key}"
    text = key if len(key) <= 64 and key.isprintable() and not CONTROL_RE.search(key) else show_text(key)
    return f"{base}/" + text.replace("~", "~0").replace("/", "~1")


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, Decimal)):
        return "number"
    if isinstance(value, float):
        return "binary float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, Sequence):
        return "array"
    return type(value).__name__


def parse_timestamp(text: str, path: str = "") -> datetime:
    """RFC 3339 with an explicit offset (`Z` or `±hh:mm`) into an aware datetime; raises ValidationError."""
    problems: list[Problem] = []
    value = read_timestamp(text, path, problems, problems)
    if value is None:
        raise ValidationError(problems)
    return value


def read_timestamp(value: str, path: str, structural: list[Problem], late: list[Problem]) -> datetime | None:
    m = TIMESTAMP_RE.fullmatch(value)
    if m is None or CONTROL_RE.search(value):
        structural.append(
            Problem(path, "format", "expected RFC 3339 date-time with an offset, e.g. 2026-12-01T09:00:00+00:00")
        )
        return None
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    micro = int((m.group(7) or ".")[1:].ljust(6, "0"))
    offset_text = m.group(8)
    if offset_text == "Z":
        tz = UTC
    else:
        sign = -1 if offset_text[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(offset_text[1:3]), minutes=int(offset_text[4:6])))
    if not MIN_YEAR <= year <= MAX_YEAR:
        late.append(Problem(path, "range", f"year {year} outside {MIN_YEAR}..{MAX_YEAR}"))
        return None
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError as exc:
        late.append(Problem(path, "format", f"not a calendar date-time: {exc}"))
        return None


def seconds_of(delta: timedelta) -> Decimal:
    return Decimal(delta.days) * SECONDS_PER_DAY + Decimal(delta.seconds) + Decimal(delta.microseconds) / 10**6


def fmt(d: Decimal) -> str:
    return decimal_text(d)
