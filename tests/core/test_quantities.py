"""Rate arithmetic against independent test vectors (computed by hand, not by the code under test)."""

from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.core.errors import QuantityError
from driverd.core.quantities import (
    NEW_ERA_RESOLUTION,
    Resolution,
    dose_to_rate,
    parse_decimal,
    quantize_down,
    rate_to_dose,
)

# (dose mg/24h, concentration mg/mL, expected mL/h on a New Era pump) — by hand: dose / 24 / conc, cut down.
VECTORS = [
    ("500", "10", "2.083"),  # 2.08333… never 2.084
    ("300", "10", "1.25"),
    ("100", "10", "0.416"),  # 0.41666…
    ("500", "50", "0.416"),  # 0.41666…
    ("300", "50", "0.25"),
    ("100", "50", "0.083"),  # 0.08333…
    ("30", "100", "0.012"),  # 0.0125 -> 3 decimals max -> 0.012
    ("500", "100", "0.208"),  # 0.208333…
    ("250", "10", "1.041"),  # 1.041666…
]


@pytest.mark.parametrize(("dose", "conc", "expected"), VECTORS)
def test_rate_vectors(dose: str, conc: str, expected: str) -> None:
    rate = quantize_down(dose_to_rate(D(dose), D(conc)), NEW_ERA_RESOLUTION)
    assert rate == D(expected)
    assert rate_to_dose(rate, D(conc)) <= D(dose)


def test_four_significant_digits_cap_decimals() -> None:
    assert quantize_down(D("12.3456"), NEW_ERA_RESOLUTION) == D("12.34")
    assert quantize_down(D("123.456"), NEW_ERA_RESOLUTION) == D("123.4")
    assert quantize_down(D("1234.9"), NEW_ERA_RESOLUTION) == D("1234")
    with pytest.raises(QuantityError):
        quantize_down(D("12345"), NEW_ERA_RESOLUTION)


@given(st.decimals(min_value=0, max_value=9999, allow_nan=False, allow_infinity=False, places=6))
def test_quantize_never_rounds_up(value: D) -> None:
    q = quantize_down(value, NEW_ERA_RESOLUTION)
    assert 0 <= q <= value
    digits = q.as_tuple()
    assert -int(digits.exponent) <= 3 if isinstance(digits.exponent, int) else True
    # and it is the largest representable value: one more unit in the last place would exceed the input
    assert quantize_down(q, NEW_ERA_RESOLUTION) == q


@given(st.decimals(min_value=0, max_value=10, places=3), st.integers(min_value=0, max_value=6))
def test_quantize_idempotent_for_any_resolution(value: D, decimals: int) -> None:
    res = Resolution(decimals=decimals)
    q = quantize_down(value, res)
    assert quantize_down(q, res) == q <= value


@pytest.mark.parametrize(
    ("raw", "rule"),
    [("NaN", "finite"), ("Infinity", "finite"), ("-1", "non-negative"), ("1e9", "magnitude"), (True, "type"),
     (None, "type"), ("abc", "number"), ([], "type"), (float("nan"), "finite"), ("", "number")],
)
def test_parse_decimal_rejects(raw: object, rule: str) -> None:
    with pytest.raises(QuantityError) as err:
        parse_decimal(raw, "steps/0/dose_mg_per_24h", maximum=D(100000))
    assert err.value.problems[0].rule == rule
    assert err.value.problems[0].path == "steps/0/dose_mg_per_24h"


def test_parse_decimal_float_goes_through_literal() -> None:
    assert parse_decimal(0.1, "x", maximum=D(1)) == D("0.1")  # not 0.1000000000000000055…
