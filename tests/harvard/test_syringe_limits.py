"""The Pump 11 Elite's plunger speed range (driverd.core.syringe_limits.ELITE11_PLUNGER) against its manual."""

from __future__ import annotations

from decimal import Decimal

import pytest

from driverd.core.quantities import quantize_down
from driverd.core.syringe_limits import ELITE11_DIAMETER_RESOLUTION, ELITE11_PLUNGER
from drivers.harvard.codec import ELITE_RATE_RESOLUTION
from tests.core.factories import PROTOCOL

D = Decimal
ML_MIN_PER_ML_H = D(60)


@pytest.mark.parametrize(
    ("diameter", "min_nl_min", "max_ml_min"),
    # Appendix B, Pump 11 Elite nominal min/max rates (publication 5420-002 Rev C, p. 60)
    [("4.608", "2.553", "2.652"), ("8.585", "8.863", "9.204"), ("11.99", "17.29", "17.95"),
     ("14.43", "25.03", "25.99"), ("19.05", "43.64", "45.32"), ("21.59", "56.05", "58.21"),
     ("26.59", "85.05", "88.32")],
)
def test_range_agrees_with_appendix_b(diameter: str, min_nl_min: str, max_ml_min: str) -> None:
    lo, hi = ELITE11_PLUNGER.exact_range_ml_per_h(D(diameter))
    lo_nl_min = lo * 1_000_000 / ML_MIN_PER_ML_H
    hi_ml_min = hi / ML_MIN_PER_ML_H
    assert abs(lo_nl_min / D(min_nl_min) - 1) < D("0.001")
    assert abs(hi_ml_min / D(max_ml_min) - 1) < D("0.001")


def test_reported_range_is_runnable_and_the_library_fits_inside() -> None:
    for spec in PROTOCOL.syringes:
        lo, hi = ELITE11_PLUNGER.range_ml_per_h(spec.inner_diameter_mm, ELITE_RATE_RESOLUTION)
        assert ELITE11_PLUNGER.allows(lo, spec.inner_diameter_mm) and ELITE11_PLUNGER.allows(hi, spec.inner_diameter_mm)
        lib_lo, lib_hi = PROTOCOL.rate_limits(spec)
        exact_lo, exact_hi = ELITE11_PLUNGER.exact_range_ml_per_h(spec.inner_diameter_mm)
        assert lib_lo >= exact_lo and lib_hi <= exact_hi, spec.model  # the kernel refuses before the pump would
    assert ELITE11_PLUNGER.range_ml_per_h(D("19.13"), ELITE_RATE_RESOLUTION) == (D("0.0027"), D("2742"))


def test_diameter_resolution_is_four_decimals() -> None:
    assert quantize_down(D("14.56789"), ELITE11_DIAMETER_RESOLUTION) == D("14.5678")
