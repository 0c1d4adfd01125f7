"""Canonical values and line parsing: one conversion function, floats refused, malformed lines rejected."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.audit.canonical import AuditFieldError, canonicalize, dumps, format_ts, loads_line, parse_ts
from driverd.core.errors import AuditError, DriverdError, ValidationError


def test_values_convert_exactly() -> None:
    t = datetime(2026, 3, 2, 9, 30, tzinfo=timezone(timedelta(hours=1)))
    got = canonicalize({"d": Decimal("1E+2"), "r": Decimal("2.0830"), "t": t, "l": (1, True, None, "x")})
    assert got == {"d": "100", "r": "2.0830", "t": "2026-03-02T08:30:00Z", "l": [1, True, None, "x"]}
    assert format_ts(datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=UTC)) == "2026-01-01T00:00:00.000005Z"


@pytest.mark.parametrize(
    ("value", "path", "rule"),
    [
        (1.5, "f", "no-float"),
        ({"a": [1, 0.1]}, "f.a[1]", "no-float"),
        (Decimal("NaN"), "f", "finite"),
        (datetime(2026, 1, 1), "f", "timezone"),
        (b"bytes", "f", "type"),
        ({1: "x"}, "f.1", "key-type"),
        ("\ud800", "f", "utf-8"),
    ],
)
def test_bad_values_name_field_and_rule(value: object, path: str, rule: str) -> None:
    with pytest.raises(AuditFieldError) as info:
        canonicalize(value, "f")
    (problem,) = info.value.problems
    assert (problem.path, problem.rule) == (path, rule)
    assert isinstance(info.value, AuditError) and isinstance(info.value, ValidationError)
    assert isinstance(info.value, DriverdError)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json",
        b"[1,2]",
        b'{"a": 1}',  # space: not canonical
        b'{"b":1,"a":2}',  # keys unsorted
        b'{"a":1.5}',  # float literal
        b'{"a":NaN}',
        b'{"a":1,"a":1}',  # duplicate key
        b'{"a":"\\u00fc"}',  # escaped non-ASCII: not canonical
        b'{"a":"\xff"}',  # invalid UTF-8
    ],
)
def test_malformed_lines_rejected(line: bytes) -> None:
    with pytest.raises(ValueError):
        loads_line(line)


@pytest.mark.parametrize("text", ["", "2026-01-01T00:00:00", "2026-01-01T00:00:00+01:00", "nonsenseZ", 5])
def test_parse_ts_malformed(text: object) -> None:
    with pytest.raises(AuditFieldError):
        parse_ts(text)  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.decimals(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_canonical_round_trip(obj: dict[str, object]) -> None:
    canon = canonicalize(obj)
    assert isinstance(canon, dict)
    line = dumps(canon)
    assert b"\n" not in line
    assert loads_line(line) == canon


class _Text(str):
    """A str subclass: canonicalize turns it into a plain str, element by element or not."""


@given(st.lists(st.one_of(st.text(), st.text().map(_Text), st.integers(), st.none()), max_size=8))
def test_lists_of_strings_convert_like_their_elements(items: list[object]) -> None:
    """The fast path for lists of ASCII strings (a snapshot's history rows) gives what the element-wise path gives:
    the same values, plain `str`, and the same error naming the element for a lone surrogate."""
    try:
        expected = [canonicalize(v, f"f[{i}]") for i, v in enumerate(items)]
    except AuditFieldError as exc:
        with pytest.raises(AuditFieldError) as got:
            canonicalize(items, "f")
        assert str(got.value) == str(exc)
        return
    out = canonicalize(tuple(items), "f")
    assert out == expected and all(type(a) is type(b) for a, b in zip(out, expected, strict=True))
    assert out is not items  # a new list: the record never aliases the caller's data
