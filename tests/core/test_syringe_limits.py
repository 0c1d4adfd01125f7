"""Per-syringe rate limits (issue 16.6): the pump's plunger speed range times the bore, in the library and kernel."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.core.errors import ConfigError, QuantityError
from driverd.core.kernel import Proposal, Refusal, gate
from driverd.core.protocol import parse_protocol
from driverd.core.quantities import NEW_ERA_RESOLUTION
from driverd.core.syringe_limits import NE1000_PLUNGER, PlungerLimits, bore_area_mm2
from tests.core.factories import PROTOCOL, PROTOCOL_TEXT, T0, primed, schedule

D = Decimal


def test_ne1000_range_with_the_manuals_reference_syringes() -> None:
    """NE-1000 manual §12.5: 0.73 µL/h with a B-D 1 mL (4.699 mm), about 1700 mL/h with a B-D 60 mL (26.59 mm)."""
    lo, _ = NE1000_PLUNGER.exact_range_ml_per_h(D("4.699"))
    _, hi = NE1000_PLUNGER.exact_range_ml_per_h(D("26.59"))
    assert D("0.00072") < lo < D("0.00074")
    assert D("1699") < hi < D("1701")
    assert NE1000_PLUNGER.range_ml_per_h(D("19.13"), NEW_ERA_RESOLUTION) == (D("0.013"), D("879.5"))
    assert NE1000_PLUNGER.range_ml_per_h(D("21.59"), NEW_ERA_RESOLUTION) == (D("0.016"), D("1120"))


@given(st.decimals(min_value=D("0.1"), max_value=D("50"), places=2))
def test_reported_limits_are_runnable(diameter: Decimal) -> None:
    lo, hi = NE1000_PLUNGER.range_ml_per_h(diameter, NEW_ERA_RESOLUTION)
    assert NE1000_PLUNGER.allows(lo, diameter) or lo == 0
    assert NE1000_PLUNGER.allows(hi, diameter)


def test_bad_diameter_names_the_field() -> None:
    with pytest.raises(QuantityError) as info:
        bore_area_mm2(D(0))
    assert info.value.problems[0].path == "inner_diameter_mm"


def test_library_limits_lie_inside_what_the_pump_can_run() -> None:
    """So the kernel refuses a step before the pump would answer ?OOR (the old 0.010 mL/h did not hold)."""
    for spec in PROTOCOL.syringes:
        lo, hi = PROTOCOL.rate_limits(spec)
        exact_lo, exact_hi = NE1000_PLUNGER.exact_range_ml_per_h(spec.inner_diameter_mm)
        assert lo >= exact_lo and hi <= exact_hi, spec.model
    assert PROTOCOL.min_rate_ml_per_h < NE1000_PLUNGER.exact_range_ml_per_h(D("19.13"))[0]  # why per syringe


def test_kernel_refuses_a_rate_the_syringe_cannot_run() -> None:
    # 30 mg/24h at 100 mg/mL = 0.0125 -> 0.012 mL/h: above [device] 0.010, below the 20 mL syringe's 0.013.
    state = primed(schedule(doses=(30,), conc="100"))
    verdict = gate(state, PROTOCOL, Proposal(D(30), "start", "schedule", "step 1"), T0)
    assert isinstance(verdict, Refusal) and verdict.reason == "device_min"
    assert "BD Plastipak 20 mL" in verdict.detail
    # Without the syringe's own limit the [device] minimum alone would have let it through.
    loose = dataclasses.replace(
        PROTOCOL, syringes=tuple(dataclasses.replace(s, min_rate_ml_per_h=None) for s in PROTOCOL.syringes)
    )
    assert not isinstance(gate(state, loose, Proposal(D(30), "start", "schedule", "step 1"), T0), Refusal)


@pytest.mark.parametrize(
    ("line", "path", "rule"),
    [
        ('min_rate_ml_per_h = "abc"', "min_rate_ml_per_h", None),
        ('min_rate_ml_per_h = "900"', "min_rate_ml_per_h", "range"),
        ('colour = "red"', "colour", "unknown-key"),
    ],
)
def test_malformed_syringe_limits_are_refused(line: str, path: str, rule: str | None) -> None:
    text = PROTOCOL_TEXT.replace('min_rate_ml_per_h = "0.013"\n', line + "\n", 1)
    assert text != PROTOCOL_TEXT
    with pytest.raises(ConfigError) as info:
        parse_protocol(text)
    hits = [p for p in info.value.problems if p.path.endswith(path)]
    assert hits and (rule is None or hits[0].rule == rule)
    assert hits[0].path.startswith("syringes.")


def test_plunger_limits_from_reference_rates() -> None:
    p = PlungerLimits.from_reference(D("0.00073"), D("4.699"), D("1700"), D("26.59"))
    assert abs(p.min_mm_per_h - NE1000_PLUNGER.min_mm_per_h) < D("0.0001")
    assert abs(p.max_mm_per_h - NE1000_PLUNGER.max_mm_per_h) < D("2")
