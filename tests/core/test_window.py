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
