"""The parse of input records and the format of times are exact however fast (issue 12, item 3: replay speed).

`event_from_record` takes a decimal or a time string it has parsed recently from a small cache (the pumps of a
ward report at the same instant, mostly the same rate): a cached value is the very value a fresh parse gives
(same digits and exponent, same instant and offset), and a malformed one is refused naming the field and the rule,
whatever was parsed before it. `fmt_time` of a UTC time takes a short cut: equal to the general form for every
time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from driverd.core.errors import Problem, ValidationError
from driverd.core.events import PumpReport
from driverd.core.records import event_from_record, fmt_time

REPORT = {"event": "pump_report", "at": "2026-12-01T10:55:00Z", "state": "infusing", "rate_ml_per_h": "0.041",
          "delivered_ml": "0.078", "alarms": []}


def reference_reported(fields: dict[str, Any], key: str) -> Decimal:
    """A pump report's value: records._dec before its cache, less the finite rule (a NaN or an infinite reading
    is the core's to judge, and the replay's to fold: review, 2026-12-03)."""
    raw = fields.get(key)
    if not isinstance(raw, str):
        raise ValidationError([Problem(key, "type", f"expected a decimal string, got {raw!r}")])
    try:
        return Decimal(raw)
    except InvalidOperation:
        raise ValidationError([Problem(key, "number", f"not a decimal: {raw!r}")]) from None


def reference_time(fields: dict[str, Any], key: str) -> datetime:
    """records._time before its cache (verbatim)."""
    raw = fields.get(key)
    try:
        t = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        t = None
    if t is None or t.tzinfo is None:
        raise ValidationError([Problem(key, "format", f"expected an RFC 3339 time with offset, got {raw!r}")])
    return t


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        value = fn(*args)
    except ValidationError as exc:
        return "refused", [(p.path, p.rule, p.detail) for p in exc.problems]
    return "value", value


def same(a: Any, b: Any) -> bool:
    """Equal and written alike: a Decimal's exponent, a time's offset and microseconds. (Decimals by their tuple:
    sign, digits, exponent, or a NaN's kind and payload; a NaN equals nothing, an sNaN raises on ==.)"""
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return a.as_tuple() == b.as_tuple()
    return bool(a == b) and repr(a) == repr(b) and type(a) is type(b)


DECIMALS = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.from_regex(r"-?[0-9]{0,6}(\.[0-9]{0,6})?(E[+-]?[0-9]{1,3})?", fullmatch=True),
    st.sampled_from(["0.041", "0.0410", "4.1E-2", "NaN", "sNaN", "-Infinity", "", " 1", "1_000", "0x10", "١٢"]),
    st.text(max_size=8),
)
TIMES = st.one_of(
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))])).map(
        lambda t: t.isoformat()),
    st.datetimes().map(lambda t: t.isoformat()),  # no offset: refused
    st.sampled_from(["2026-12-01T10:55:00Z", "2026-12-01T10:55:00+00:00", "2026-12-01T10:55:00.5Z",
                     "2026-12-01 10:55Z", "2026-12-01", "yesterday", "", "2026-13-01T00:00:00Z"]),
    st.text(max_size=12),
)


@given(DECIMALS, DECIMALS, TIMES)
@example("0.041", "NaN", "2026-12-01T10:55:00")
def test_a_report_parses_as_before_however_often_its_strings_were_seen(rate: str, delivered: str, at: str) -> None:
    rec = {**REPORT, "rate_ml_per_h": rate, "delivered_ml": delivered, "at": at}

    def reference(r: dict[str, Any]) -> PumpReport:
        return PumpReport(reference_time(r, "at"), "infusing", reference_reported(r, "rate_ml_per_h"),
                          reference_reported(r, "delivered_ml"), ())

    want = outcome(reference, rec)
    for _ in range(2):  # the second time from the cache, where it holds the strings
        got = outcome(event_from_record, rec)
        assert got[0] == want[0]
        if want[0] == "refused":
            assert got[1] == want[1]
        else:
            for name in ("at", "rate_ml_per_h", "delivered_ml"):
                assert same(getattr(got[1], name), getattr(want[1], name))


@pytest.mark.parametrize(("key", "value", "rule"), [
    ("at", "2026-12-01T10:55:00", "format"), ("at", "yesterday", "format"), ("at", None, "format"),
    ("rate_ml_per_h", "fast", "number"), ("rate_ml_per_h", 1, "type"), ("rate_ml_per_h", None, "type"),
    ("delivered_ml", "0x10", "number"), ("delivered_ml", "", "number"), ("delivered_ml", [], "type"),
])
def test_a_malformed_report_is_refused_after_good_ones(key: str, value: Any, rule: str) -> None:
    for _ in range(3):
        event_from_record(REPORT)
    with pytest.raises(ValidationError) as info:
        event_from_record({**REPORT, key: value})
    assert [(p.path, p.rule) for p in info.value.problems] == [(key, rule)]
    assert event_from_record(REPORT).at == datetime(2026, 12, 1, 10, 55, tzinfo=UTC)


def general_fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(0), "UTC"), timezone(timedelta(hours=2)),
                                               timezone(timedelta(hours=-9, minutes=-30)),
                                               ZoneInfo("Europe/London"), ZoneInfo("Australia/Lord_Howe")]),
                    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
@example(datetime(2026, 12, 1, 10, 55, tzinfo=UTC))
@example(datetime(2026, 12, 1, 10, 55, 0, 1, tzinfo=UTC))
@example(datetime(1, 1, 1, tzinfo=UTC))
@example(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
@example(datetime(2026, 10, 25, 1, 30, fold=1, tzinfo=ZoneInfo("Europe/London")))
def test_fmt_time_is_the_general_form(t: datetime) -> None:
    assert fmt_time(t) == general_fmt_time(t)


def test_fmt_time_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="naive"):
        fmt_time(datetime(2026, 12, 1))
