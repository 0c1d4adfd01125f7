"""The 24-h delivered-volume window kept in the course state: trimmed by bisect, equal to the plain filter."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from driverd.core.events import PumpReport
from driverd.core.machine import SAMPLE_SPACING, WINDOW, _accumulate
from driverd.core.state import CourseState, Sample
from tests.core.factories import T0


@given(st.lists(st.integers(min_value=0, max_value=4 * 3600), min_size=1, max_size=120),
       st.integers(min_value=1, max_value=1000))
def test_window_equals_the_plain_filter(gaps_s: list[int], ml_per_report: int) -> None:
    state = CourseState(pump_id="p")
    at = T0
    expected: list[Sample] = []
    for i, gap in enumerate(gaps_s):
        at += timedelta(seconds=gap)
        delivered = Decimal(ml_per_report * (i + 1)) / 1000
        state = _accumulate(state, PumpReport(at, "infusing", Decimal("0.1"), delivered, ()))
        sample = Sample(at, state.delivered_ml)
        if not expected or at - expected[-1].at >= SAMPLE_SPACING:
            horizon = at - WINDOW - SAMPLE_SPACING
            expected = [s for s in expected if s.at >= horizon] + [sample]
        assert list(state.samples) == expected
        assert state.last_sample == sample


@given(st.lists(st.tuples(st.integers(min_value=1, max_value=3 * 3600), st.integers(min_value=-50, max_value=5000)),
                min_size=1, max_size=80),
       st.integers(min_value=-2 * 86_400, max_value=2 * 86_400), st.sampled_from(["0", "10", "50", "100"]))
def test_cumulative_bounds_hold_the_interpolated_value(steps: list[tuple[int, int]], offset_s: int,
                                                       conc: str) -> None:
    """The ceiling check's short cut (machine._surely_within) rests on this: the interpolated cumulative drug at any
    time lies within the bounds read off the two samples around it (counter resets and decreases included)."""
    from dataclasses import replace

    from driverd.core.kernel import cumulative_drug, cumulative_drug_bounds
    from tests.core.factories import schedule

    state = replace(CourseState(pump_id="p"), schedule=schedule(conc="50"), syringe_concentration=Decimal(conc))
    at = T0
    raw = Decimal(0)
    for gap, change in steps:
        at += timedelta(seconds=gap, microseconds=gap * 13)
        raw = max(raw + Decimal(change) / 1000, Decimal(0)) if change >= 0 else Decimal(-change) / 1000
        state = _accumulate(state, PumpReport(at, "infusing", Decimal("0.1"), raw, ()))
    t = at + timedelta(seconds=offset_s, microseconds=offset_s % 997)
    low, high = cumulative_drug_bounds(state, t)
    value = cumulative_drug(state, t)
    assert low - Decimal("1E-20") <= value <= high + Decimal("1E-20")
