"""Property tests of the physics: delivered volume is the exact integral of the rate schedule, never negative,
and the syringe empties exactly when the fill is used."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Context, Decimal, localcontext

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import AlarmKind, PumpState
from simulators.clock import ManualClock
from simulators.pump import PumpModel

T0 = datetime(2026, 3, 1, tzinfo=UTC)
US_PER_H = Decimal(3_600_000_000)


def to_ml(rate_us: Decimal) -> Decimal:
    with localcontext(Context(prec=34)):  # the model reports volumes to 34 significant digits
        return rate_us / US_PER_H


# Rates a New Era pump can hold: at most 4 digits, at most 3 decimals.
rates = st.builds(lambda n, k: Decimal(n).scaleb(-k), st.integers(1, 9999), st.integers(0, 3)).filter(
    lambda r: r <= 5
)
# (rate, microseconds, running) segments; total at most ~5 days so 5 mL/h never empties 1000 mL.
segments = st.lists(
    st.tuples(rates, st.integers(0, 12 * 3600 * 10**6), st.booleans()), min_size=1, max_size=10
)


@settings(max_examples=150, deadline=None)
@given(segments)
def test_delivered_is_the_exact_integral_of_the_rate_schedule(plan: list[tuple[Decimal, int, bool]]) -> None:
    clock = ManualClock(T0)
    pump = PumpModel(clock, fill_volume_ml=Decimal(1000), near_end_ml=Decimal(0), plunger=None)
    integral = Decimal(0)  # rate-microseconds, exact
    previous = Decimal(0)
    for rate, us, running in plan:
        pump.set_rate(rate)
        if running:
            pump.run()
        else:
            pump.stop()
        clock.advance(Decimal(us) / 1_000_000)
        if running:
            with localcontext(Context(prec=80)):
                integral += rate * us
        s = pump.status()
        assert s.delivered_ml == to_ml(integral)
        assert s.delivered_ml >= 0 and s.delivered_ml >= previous
        assert s.remaining_ml == to_ml(Decimal(1000) * US_PER_H - integral)
        assert s.state is (PumpState.INFUSING if running else PumpState.STOPPED)
        previous = s.delivered_ml
    pump.clear_delivered()
    assert pump.status().delivered_ml == 0


fills = st.builds(lambda n: Decimal(n).scaleb(-2), st.integers(1, 6000))  # 0.01 .. 60.00 mL


@settings(max_examples=150, deadline=None)
@given(fills, rates, st.integers(0, 10**6))
def test_end_of_syringe_fires_exactly_when_the_fill_is_used(fill: Decimal, rate: Decimal, extra_us: int) -> None:
    clock = ManualClock(T0)
    pump = PumpModel(
        clock, fill_volume_ml=fill, near_end_ml=Decimal(0), max_rate_ml_per_h=Decimal(10), plunger=None
    )
    pump.set_rate(rate)
    pump.run()
    with localcontext(Context(prec=80)):
        end_us = fill * US_PER_H / rate  # exact instant the fill is used, possibly between microseconds
    # the last whole microsecond strictly before the end: still infusing, something left
    before = int(end_us) - 1 if end_us == int(end_us) else int(end_us)
    if before > 0:
        clock.advance(Decimal(before) / 1_000_000)
        s = pump.status()
        assert s.state is PumpState.INFUSING and s.remaining_ml > 0
        assert AlarmKind.END_OF_SYRINGE not in s.alarms
    clock.advance(Decimal(int(end_us) + 1 + extra_us - max(before, 0)) / 1_000_000)
    s = pump.status()
    assert s.state is PumpState.ALARM and AlarmKind.END_OF_SYRINGE in s.alarms
    assert s.remaining_ml == 0 and s.delivered_ml == fill
    ends = [e for e in pump.events() if e.kind == AlarmKind.END_OF_SYRINGE.value]
    assert len(ends) == 1
    with localcontext(Context(prec=80)):
        assert ends[0].at_us == end_us
    assert ends[0].delivered_ml == fill


@settings(max_examples=100, deadline=None)
@given(rates, st.integers(1, 255), st.lists(st.integers(0, 300 * 10**6), min_size=1, max_size=8))
def test_deadman_stops_exactly_at_expiry(rate: Decimal, deadman_s: int, gaps_us: list[int]) -> None:
    clock = ManualClock(T0)
    pump = PumpModel(clock, fill_volume_ml=Decimal(1000), near_end_ml=Decimal(0), plunger=None)
    pump.set_rate(rate)
    pump.set_deadman(deadman_s)
    pump.host_contact()
    pump.run()
    infused_us = 0
    for gap in gaps_us:
        clock.advance(Decimal(gap) / 1_000_000)
        limit = deadman_s * 10**6
        if gap >= limit:
            infused_us += limit
            s = pump.status()
            assert s.state is PumpState.ALARM and AlarmKind.SAFE_MODE_TIMEOUT in s.alarms
            with localcontext(Context(prec=80)):
                assert s.delivered_ml == to_ml(rate * infused_us)
            return
        infused_us += gap
        pump.host_contact()
        assert pump.status().state is PumpState.INFUSING
    with localcontext(Context(prec=80)):
        assert pump.status().delivered_ml == to_ml(rate * infused_us)
