"""canonical_bytes: fixed vectors from the spec in docs/schedules.md, refusals, and invariance properties."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core.canonical import (
    MAX_DIGITS,
    canonical_bytes,
    content_digest,
    decimal_text,
    signed_content,
    to_json_text,
)


def load(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 1, "a": [True, False, None]}, b'{"a":[true,false,null],"b":1}'),
        ({}, b"{}"),
        ([], b"[]"),
        ({"a": {"d": 1, "c": {}}}, b'{"a":{"c":{},"d":1}}'),
        # keys by code point: upper case before lower case, "aa" after "a", non-ASCII last
        ({"b": 0, "a": 0, "B": 0, "é": 0, "aa": 0, "€": 0}, '{"B":0,"a":0,"aa":0,"b":0,"é":0,"€":0}'.encode()),
        # astral code point sorts after U+FFFF (code points, not UTF-16 units as in RFC 8785)
        ({"\U0001f600": 0, "\uffff": 0}, '{"\uffff":0,"\U0001f600":0}'.encode()),
        (0, b"0"),
        (-7, b"-7"),
        (10**20, b"100000000000000000000"),
        (Decimal("2.50"), b"2.5"),
        (Decimal("1E+2"), b"100"),
        (Decimal("100"), b"100"),
        (Decimal("19.130"), b"19.13"),
        (Decimal("0.0001"), b"0.0001"),
        (Decimal("1E-7"), b"0.0000001"),
        (Decimal("-0.0"), b"0"),
        (Decimal("-1.50"), b"-1.5"),
        (Decimal("0E+5"), b"0"),
        (Decimal("123.456000"), b"123.456"),
        ("plain", b'"plain"'),
        ('q"b\\s', b'"q\\"b\\\\s"'),
        ("\b\t\n\f\r", b'"\\b\\t\\n\\f\\r"'),
        ("\x00\x1f", b'"\\u0000\\u001f"'),
        ("\x7f é € 😀 \u2028", '"\x7f é € 😀 \u2028"'.encode()),
        ("/", b'"/"'),
    ],
)
def test_vectors(value: object, expected: bytes) -> None:
    assert canonical_bytes(value) == expected


@pytest.mark.parametrize("value", [1.0, {"a": 2.5}, [0.1], float("nan")])
def test_floats_refused(value: object) -> None:
    with pytest.raises(TypeError):
        canonical_bytes(value)


@pytest.mark.parametrize(
    "value",
    [
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        Decimal("1E+999999999"),
        Decimal("1E-999999999"),
        10 ** (MAX_DIGITS + 1),
        "lone \ud800 surrogate",
    ],
)
def test_unencodable_refused(value: object) -> None:
    with pytest.raises(ValueError):
        canonical_bytes(value)


@pytest.mark.parametrize("value", [{1: "a"}, b"bytes", {1, 2}, object()])
def test_non_json_types_refused(value: object) -> None:
    with pytest.raises(TypeError):
        canonical_bytes(value)


def test_digit_limit_boundary() -> None:
    assert canonical_bytes(Decimal(f"1E+{MAX_DIGITS - 1}")) == b"1" + b"0" * (MAX_DIGITS - 1)
    assert canonical_bytes(Decimal(f"1E-{MAX_DIGITS - 1}")) == b"0." + b"0" * (MAX_DIGITS - 2) + b"1"
    with pytest.raises(ValueError):
        canonical_bytes(Decimal(f"1E-{MAX_DIGITS}"))


def test_signed_content_drops_only_top_level_signature() -> None:
    doc = {"a": 1, "signature": {"value": "x"}, "nested": {"signature": 2}}
    assert signed_content(doc) == {"a": 1, "nested": {"signature": 2}}
    assert content_digest(doc) == content_digest({"nested": {"signature": 2}, "a": 1})


# --- properties ---------------------------------------------------------------------------------------------

_decimals = st.decimals(allow_nan=False, allow_infinity=False).filter(lambda d: -40 < d.adjusted() < 40)
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    _decimals,
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=10),
)
_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=6), inner, max_size=4)
    ),
    max_leaves=15,
)


def _spelled(d: Decimal, rng: random.Random) -> str:
    """One of several JSON spellings of the same number: plain, trailing zeros, exponent form."""
    base = decimal_text(d)
    choice = rng.randrange(3)
    if choice == 0:
        return base
    if choice == 1:
        return base + ("0" if "." in base else ".0")
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    return ("-" if sign and d != 0 else "") + "".join(map(str, digits)) + f"E{exponent:+d}"


def _messy_json(value: Any, rng: random.Random) -> str:
    """Serialize with shuffled keys, random whitespace and random number spellings."""
    ws = lambda: rng.choice(["", " ", "\n", "\t", "  \r\n "])  # noqa: E731
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        body = ",".join(
            f"{ws()}{json.dumps(k, ensure_ascii=rng.random() < 0.5)}{ws()}:{ws()}{_messy_json(v, rng)}{ws()}"
            for k, v in items
        )
        return "{" + body + ws() + "}"
    if isinstance(value, list):
        return "[" + ",".join(ws() + _messy_json(v, rng) + ws() for v in value) + ws() + "]"
    if isinstance(value, Decimal):
        return _spelled(value, rng)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=rng.random() < 0.5)


@settings(max_examples=200)
@given(value=_value)
def test_deterministic_and_round_trips(value: Any) -> None:
    first = canonical_bytes(value)
    assert canonical_bytes(value) == first
    assert canonical_bytes(load(first.decode("utf-8"))) == first  # idempotent through a JSON parser
    assert b"\n" not in first.replace(b"\\n", b"")


@settings(max_examples=200)
@given(value=_value, seed=st.integers(0, 2**32))
def test_insensitive_to_key_order_whitespace_and_number_spelling(value: Any, seed: int) -> None:
    text = _messy_json(value, random.Random(seed))
    assert canonical_bytes(load(text)) == canonical_bytes(value)


@settings(max_examples=100)
@given(value=_value)
def test_pretty_text_reads_back_to_same_canonical_bytes(value: Any) -> None:
    assert canonical_bytes(load(to_json_text(value))) == canonical_bytes(value)


@given(d=_decimals)
def test_decimal_text_is_exact_and_plain(d: Decimal) -> None:
    text = decimal_text(d)
    assert Decimal(text) == d
    assert "E" not in text and "e" not in text
    assert not (("." in text) and text.endswith("0"))
    assert not text.endswith(".")


def test_worked_example_in_docs() -> None:
    """The vector printed in docs/schedules.md, so a third-party implementation can check itself."""
    text = '{ "b": "x", "a": [1, 2.50, 1E+2, true, null], "\\u00e9": "tab\\there", "signature": {"key_id": "0"} }'
    body = canonical_bytes(signed_content(load(text)))
    assert body == '{"a":[1,2.5,100,true,null],"b":"x","é":"tab\\there"}'.encode()
    assert content_digest(load(text)) == "03f238ed21eed80f99676e8255971bec9eabca8fc1d5649baeebe068d02aa0f9"
