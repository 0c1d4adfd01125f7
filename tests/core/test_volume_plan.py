"""Volume planning (issue 13, part 1): the plan never under-states what a course needs at its quantized rates.

The reference below is computed independently with Fractions over the nominal timeline, never through the plan's
own Decimal arithmetic.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from driverd.core.quantities import NEW_ERA_RESOLUTION, Resolution, dose_to_rate, quantize_down
from driverd.core.schedule import Schedule, SyringeFill, SyringeSupply, TaperStep
from driverd.core.volume_plan import UPPER_BOUND_RESOLUTION, plan_course, segments

from .factories import T0, schedule

D = Decimal

doses_st = st.lists(st.sampled_from([D(x) for x in ("30", "50", "100", "150", "250", "300", "500", "720", "1000")]),
                    min_size=1, max_size=5)
conc_st = st.sampled_from([D("10"), D("50"), D("100"), D("7.5"), D("33")])
fill_st = st.decimals(min_value=D("0.5"), max_value=D("60"), places=2)


def _rate(dose: Decimal, conc: Decimal) -> Fraction:
    return Fraction(quantize_down(dose_to_rate(dose, conc), NEW_ERA_RESOLUTION))


def _reference(sched: Schedule, conc: Decimal) -> tuple[Fraction, Fraction]:
    """(mL, mg) the nominal timeline needs at the quantized rates, exactly."""
    ml = Fraction(0)
    mg = Fraction(0)
    for seg in segments(sched):
        hours = Fraction((seg.end - seg.start) // timedelta(microseconds=1), 3_600_000_000)
        vol = _rate(seg.dose_mg_per_24h, conc) * hours
        ml += vol
        mg += vol * Fraction(conc)
    return ml, mg


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    doses = tuple(draw(doses_st))
    hold = draw(st.decimals(min_value=D("0.1"), max_value=D("3"), places=3))
    spacing = draw(st.integers(min_value=1, max_value=48))
    taper = draw(st.sampled_from([(), ((0, 0),), ((20, 0), (0, 24)), ((10, 6), (5, 12), (0, 30))]))
    sched = schedule(doses=tuple(int(d) for d in doses), conc=str(draw(conc_st)), hold_days=str(hold),
                     spacing_hours=spacing, taper=taper)
    return replace(sched, fill_volume_ml=draw(fill_st))


@given(schedules(), st.one_of(st.none(), st.integers(min_value=1, max_value=48)))
def test_plan_never_understates_the_volume(sched: Schedule, every: int | None) -> None:
    if every is not None:
        sched = replace(sched, syringes=SyringeSupply(change_every_hours=D(every)))
    plan = plan_course(sched)
    ml, mg = _reference(sched, sched.concentration_mg_per_ml)
    assert Fraction(plan.total_ml) >= ml
    assert Fraction(plan.total_ml) - ml < Fraction(1, 1000) * (len(plan.days) + 1)  # rounding up only
    if not plan.problems:
        assert Fraction(plan.total_mg) >= mg
        assert sum(Fraction(d.volume_ml) for d in plan.days) >= ml
        assert sum(Fraction(s.used_ml) for s in plan.syringes) >= ml
        for s in plan.syringes:
            assert s.used_ml <= s.fill_ml and s.used_ml + s.left_ml <= s.fill_ml + D("0.001")
    else:
        # undeliverable: the course needs more than the supply, and the error names the field
        assert plan.problems[0].path.startswith("/syringes")
        assert plan.problems[0].rule == "volume-plan"


@given(schedules(), st.integers(min_value=1, max_value=48))
def test_change_every_verdict_matches_an_independent_check(sched: Schedule, every: int) -> None:
    """A fresh syringe every N hours delivers the course iff no N-hour interval needs more than one fill."""
    sched = replace(sched, syringes=SyringeSupply(change_every_hours=D(every)))
    conc = sched.concentration_mg_per_ml
    per_interval: dict[int, Fraction] = {}
    step = timedelta(hours=every)
    for seg in segments(sched):
        t = seg.start
        while t < seg.end:
            k = (t - T0) // step
            stop = min(seg.end, T0 + (k + 1) * step)
            hours = Fraction((stop - t) // timedelta(microseconds=1), 3_600_000_000)
            per_interval[k] = per_interval.get(k, Fraction(0)) + _rate(seg.dose_mg_per_24h, conc) * hours
            t = stop
    fits = all(v <= Fraction(sched.fill_volume_ml) for v in per_interval.values())
    plan = plan_course(sched)
    assert (not plan.problems) == fits
    if fits:
        assert plan.changes == max(per_interval) if per_interval else plan.changes == 0


@given(schedules(), st.lists(st.tuples(fill_st, conc_st), min_size=1, max_size=6))
def test_fill_list_mixed_concentrations(sched: Schedule, fills: list[tuple[Decimal, Decimal]]) -> None:
    """With syringes of different concentrations, every syringe but the last is used to empty, no syringe is used
    beyond its fill, and the drug (mg) planned is at least what the quantized rates deliver over the course."""
    sched = replace(sched, syringes=SyringeSupply(fills=tuple(SyringeFill(f, c) for f, c in fills)))
    plan = plan_course(sched)
    used = plan.syringes
    for s in used[:-1]:
        assert s.ends == "empty" and s.used_ml == s.fill_ml and s.left_ml == 0
    for s in used:
        assert s.used_ml <= s.fill_ml
    if not plan.problems:
        assert used[-1].ends == "course_end"
        # in mg the course is bounded below by, segment by segment, the lowest-delivering concentration
        concs = {sched.concentration_mg_per_ml, *(c for _, c in fills)}
        lowest = sum((min(_rate(seg.dose_mg_per_24h, c) * Fraction(c) for c in concs)
                      * Fraction((seg.end - seg.start) // timedelta(microseconds=1), 3_600_000_000)
                      for seg in segments(sched)), Fraction(0))
        assert Fraction(plan.total_mg) >= lowest
    else:
        assert all(s.ends == "empty" for s in used)
        assert len(used) == len(fills) + 1


def test_shipped_example_needs_about_38_ml() -> None:
    """The issue's figure: 100 -> 300 -> 500 mg/24h at 50 mg/mL, hold 3 days, is about 38 mL; in one 17 mL syringe
    it runs empty on day 3; a fresh syringe every 24 h delivers it."""
    sched = schedule()
    plan = plan_course(sched)
    assert plan.total_ml == D("37.944")
    assert plan.problems and plan.problems[0].path == "/syringes"
    assert T0 + timedelta(days=2) <= plan.syringes[0].ends_at < T0 + timedelta(days=3)  # on day 3
    daily = plan_course(replace(sched, syringes=SyringeSupply(change_every_hours=D(24))))
    assert not daily.problems and daily.changes == 4
    assert [d.volume_ml for d in daily.days] == [D("1.992"), D("6.000"), D("9.984"), D("9.984"), D("9.984")]


def test_taper_segments_follow_the_hold() -> None:
    sched = schedule(doses=(100,), hold_days="1", taper=((50, 0), (0, 12)))
    segs = segments(sched)
    assert [(s.dose_mg_per_24h, s.end - s.start) for s in segs] == [
        (D(100), timedelta(days=1)), (D(50), timedelta(hours=12))]
    # a taper step at the hold's end with after_hours > 0 keeps the top dose until then
    sched = replace(sched, taper=(TaperStep(D(50), D(6)), TaperStep(D(0), D(12))))
    assert [(s.dose_mg_per_24h, s.end - s.start) for s in segments(sched)] == [
        (D(100), timedelta(days=1)), (D(100), timedelta(hours=6)), (D(50), timedelta(hours=6))]


# ---- review 2026-12-03 item 3: the exposure check's plan is an upper bound for every pump ---------------------

PUMP_RESOLUTIONS = (NEW_ERA_RESOLUTION, Resolution(decimals=4, significant=4), Resolution(decimals=3),
                    Resolution(decimals=4), Resolution(decimals=6))  # New Era, Harvard Elite, Modbus maps


@given(schedules(), st.one_of(st.none(), st.integers(min_value=1, max_value=48)))
def test_the_upper_bound_plan_never_plans_less_drug_than_any_pump_runs(sched: Schedule, every: int | None) -> None:
    if every is not None:
        sched = replace(sched, syringes=SyringeSupply(change_every_hours=D(every)))
    bound = plan_course(sched, UPPER_BOUND_RESOLUTION)
    for resolution in PUMP_RESOLUTIONS:
        pump = plan_course(sched, resolution)
        assert bound.total_mg >= pump.total_mg, resolution
    if not bound.problems:  # and it is the exact dose, rounded up to whole µg-ish steps only
        exact = Fraction(0)
        for seg in segments(sched):
            hours = Fraction((seg.end - seg.start) // timedelta(microseconds=1), 3_600_000_000)
            exact += Fraction(dose_to_rate(seg.dose_mg_per_24h, sched.concentration_mg_per_ml)) * hours * Fraction(
                sched.concentration_mg_per_ml)
        assert Fraction(bound.total_mg) <= exact + Fraction(1, 1000) * (len(bound.days) + 1)


def test_new_era_plan_understates_a_harvard_course_and_the_bound_does_not() -> None:
    """30 mg/24h at 100 mg/mL: New Era runs 0.012 mL/h, a Harvard Elite 0.0125 (the exact rate)."""
    sched = schedule(doses=(30,), conc="100", hold_days="1")
    new_era = plan_course(sched).total_mg
    harvard = plan_course(sched, Resolution(decimals=4, significant=4)).total_mg
    bound = plan_course(sched, UPPER_BOUND_RESOLUTION).total_mg
    assert new_era < harvard <= bound
    assert harvard == D(30) * D(1) and bound == harvard  # 1 day at exactly 30 mg/24h
