"""`--tz` and the time format of human output: ISO 8601 with the zone, never a bare local time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.cli.timefmt import BadZone, format_time, parse_zone

AT = datetime(2026, 12, 1, 9, 0, 5, 123456, tzinfo=UTC)


def test_zones_and_offsets() -> None:
    assert format_time(AT) == "2026-12-01T09:00:05Z"
    assert format_time(AT, precise=True) == "2026-12-01T09:00:05.123456Z"
    assert format_time("2026-12-01T09:00:05Z", parse_zone("Europe/Paris")) == "2026-12-01T10:00:05+01:00"
    assert format_time("2026-07-01T09:00:00Z", parse_zone("Europe/Paris")) == "2026-07-01T11:00:00+02:00"  # DST
    assert format_time(AT, parse_zone("utc")) == "2026-12-01T09:00:05Z"
    local = format_time(AT, parse_zone("local"))
    assert datetime.fromisoformat(local).utcoffset() is not None  # local time always says its offset
    assert format_time(None) == "-" and format_time("not a time") == "not a time"
    assert format_time(datetime(2026, 1, 1)) == "2026-01-01T00:00:00"  # a naive time is never given a zone


@pytest.mark.parametrize("spec", ["", "Mars/Olympus", "../../etc/passwd", "/etc/localtime", "Europe/", "UTC+1",
                                  "\x00", "Europe/Paris/x", "a" * 300])
def test_unknown_zones_are_refused_by_name(spec: str) -> None:
    with pytest.raises(BadZone, match="--tz: unknown zone"):
        parse_zone(spec)


@given(st.text(max_size=60))
def test_any_tz_text_is_a_zone_or_bad_zone(spec: str) -> None:
    try:
        zone = parse_zone(spec)
    except BadZone:
        return
    shown = format_time(AT, zone)
    assert datetime.fromisoformat(shown.replace("Z", "+00:00")) == AT.replace(microsecond=0)


@given(st.datetimes(timezones=st.just(timezone(timedelta(hours=5, minutes=30)))))
def test_the_same_instant_in_any_zone(at: datetime) -> None:
    for spec in ("UTC", "Asia/Kolkata", "America/New_York"):
        shown = datetime.fromisoformat(format_time(at, parse_zone(spec), precise=True).replace("Z", "+00:00"))
        assert shown == at
