"""Volume planning: how much each day of a course needs and when each syringe runs empty, at the planned rates.

The planned rates are the rates the pump is really sent (dose / 24 / concentration, quantized toward less drug).
Volumes are kept exact as "rate-microseconds" (mL/h x µs, like the simulator) and only turned into mL for
display, rounded UP; times a syringe runs empty are rounded DOWN (earlier). So the plan never under-states what
the course needs nor over-states how long a syringe lasts. The nominal timeline is the schedule as written:
each step at its `not_before`, the hold from the top step for `hold_days`, the taper from the end of the hold.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal, localcontext
from typing import Final, Literal

from driverd.core.canonical import decimal_text
from driverd.core.errors import Problem
from driverd.core.quantities import NEW_ERA_RESOLUTION, Resolution, dose_to_rate, quantize_down
from driverd.core.schedule import Schedule

US_PER_HOUR: Final = Decimal(3_600_000_000)
US_PER_DAY: Final = 24 * US_PER_HOUR
ML_STEP: Final = Decimal("0.001")
_UP: Final = Context(prec=60, rounding=ROUND_CEILING)
_DOWN: Final = Context(prec=60, rounding=ROUND_FLOOR)
#: A plan never lists more syringes than this (a schedule asking for more is refused, not planned forever).
MAX_PLANNED_SYRINGES: Final = 1000

SyringeEnd = Literal["change", "empty", "course_end"]


@dataclass(frozen=True, slots=True)
class Segment:
    """The course at one dose level from `start` to `end` (nominal times)."""

    start: datetime
    end: datetime
    dose_mg_per_24h: Decimal


@dataclass(frozen=True, slots=True)
class PlannedSyringe:
    number: int  # 1 = the syringe the course starts with
    fill_ml: Decimal
    concentration_mg_per_ml: Decimal
    starts_at: datetime
    ends_at: datetime
    ends: SyringeEnd  # planned change, runs empty (change it then), or the course ends first
    used_ml: Decimal  # rounded up
    left_ml: Decimal  # rounded down


@dataclass(frozen=True, slots=True)
class PlannedDay:
    day: int  # 1-based from the first step
    start: datetime
    volume_ml: Decimal  # rounded up
    drug_mg: Decimal  # rounded up


@dataclass(frozen=True, slots=True)
class VolumePlan:
    start: datetime
    end: datetime
    syringes: tuple[PlannedSyringe, ...]
    days: tuple[PlannedDay, ...]
    total_ml: Decimal  # rounded up: volume the whole course needs at the planned rates
    total_mg: Decimal  # rounded up
    problems: tuple[Problem, ...]  # empty: the approved syringes deliver the course as written

    @property
    def changes(self) -> int:
        return max(len(self.syringes) - 1, 0)


def segments(schedule: Schedule) -> tuple[Segment, ...]:
    """The nominal dose timeline: steps at not_before, hold from the top step, then the taper (0 ends it)."""
    steps = schedule.steps
    out: list[Segment] = []
    for i, st in enumerate(steps[:-1]):
        out.append(Segment(st.not_before, steps[i + 1].not_before, st.dose_mg_per_24h))
    top = steps[-1]
    hold_end = top.not_before + _delta(schedule.hold_days * US_PER_DAY)
    out.append(Segment(top.not_before, hold_end, top.dose_mg_per_24h))
    level = top.dose_mg_per_24h
    at = hold_end
    for t in schedule.taper:
        when = hold_end + _delta(t.after_hours * US_PER_HOUR)
        if when > at:
            out.append(Segment(at, when, level))
            at = when
        level = t.dose_mg_per_24h
        if level == 0:
            break
    return tuple(s for s in out if s.end > s.start and s.dose_mg_per_24h > 0)


def _delta(us: Decimal) -> timedelta:
    return timedelta(microseconds=int(us.to_integral_value(rounding=ROUND_FLOOR)))


def _us(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


#: The finest rate grid a Resolution has. Every pump's rate for a dose is quantized down on a grid of at most 9
#: decimals, which this grid contains, so a plan at this resolution never plans less drug than any pump runs (New
#: Era 0.012 mL/h for 30 mg/24h at 100 mg/mL, Harvard 0.0125): for upper bounds such as the patient's cumulative
#: exposure, never for a pump's own volume plan.
UPPER_BOUND_RESOLUTION: Final = Resolution(decimals=9)


def planned_rate(dose: Decimal, concentration: Decimal, resolution: Resolution) -> Decimal:
    return quantize_down(dose_to_rate(dose, concentration), resolution)


def _supply(schedule: Schedule) -> Iterator[tuple[Decimal, Decimal]]:
    """(fill mL, concentration) of every syringe in order; the change-every supply repeats the first."""
    yield schedule.fill_volume_ml, schedule.concentration_mg_per_ml
    sup = schedule.syringes
    if sup is None:
        return
    if sup.change_every_hours is not None:
        while True:
            yield schedule.fill_volume_ml, schedule.concentration_mg_per_ml
    for f in sup.fills:
        yield f.fill_volume_ml, f.concentration_mg_per_ml


def plan_course(schedule: Schedule, resolution: Resolution = NEW_ERA_RESOLUTION) -> VolumePlan:
    """The volume plan of a (validated) schedule, with the problems that make it undeliverable."""
    segs = segments(schedule)
    start = schedule.steps[0].not_before
    end = segs[-1].end if segs else start
    sup = schedule.syringes
    every_us = None if sup is None or sup.change_every_hours is None else sup.change_every_hours * US_PER_HOUR
    supply = _supply(schedule)
    fill, conc = next(supply)
    day_rus: dict[int, Decimal] = {}  # day index -> rate-µs (mL x 3.6e9)
    day_mg: dict[int, Decimal] = {}
    planned: list[PlannedSyringe] = []
    problems: list[Problem] = []
    t = Decimal(0)  # µs since start
    left = fill * US_PER_HOUR  # what the current syringe still holds, in rate-µs
    began = Decimal(0)
    change_at = every_us

    def add(t0: Decimal, t1: Decimal, rate: Decimal, c: Decimal) -> None:
        while t0 < t1:
            day = int(t0 // US_PER_DAY)
            stop = min(t1, Decimal(day + 1) * US_PER_DAY)
            rus = rate * (stop - t0)
            day_rus[day] = day_rus.get(day, Decimal(0)) + rus
            day_mg[day] = day_mg.get(day, Decimal(0)) + rus * c
            t0 = stop

    def close(ends: SyringeEnd, at: Decimal) -> None:
        planned.append(PlannedSyringe(len(planned) + 1, fill, conc, _at(start, began), _at(start, at), ends,
                                      _ml_up(fill * US_PER_HOUR - left), _ml_down(left)))

    with localcontext(Context(prec=60)):
        for seg in segs:
            t = max(t, Decimal(_us(seg.start - start)))
            seg_end = Decimal(_us(seg.end - start))
            while t < seg_end and not problems:
                rate = planned_rate(seg.dose_mg_per_24h, conc, resolution)
                boundary = seg_end if change_at is None else min(seg_end, change_at)
                need = rate * (boundary - t)
                if need <= left:
                    add(t, boundary, rate, conc)
                    left -= need
                    t = boundary
                    if change_at is not None and t == change_at and t < Decimal(_us(end - start)):
                        close("change", t)
                        fill, conc = next(supply)
                        left, began, change_at = fill * US_PER_HOUR, t, change_at + (every_us or Decimal(0))
                        if len(planned) >= MAX_PLANNED_SYRINGES:
                            problems.append(Problem("/syringes/change_every_hours", "volume-plan",
                                                    f"more than {MAX_PLANNED_SYRINGES} syringe changes"))
                    continue
                with localcontext(_DOWN):
                    empty = (t + left / rate).to_integral_value(rounding=ROUND_FLOOR)
                add(t, empty, rate, conc)
                left = Decimal(0)
                close("empty", empty)
                nxt = next(supply, None) if every_us is None else None
                if nxt is None:
                    problems.append(_shortfall(schedule, planned[-1], segs, resolution, every_us, change_at))
                    break
                fill, conc = nxt
                left, began, t = fill * US_PER_HOUR, empty, empty
        if not problems:
            close("course_end", t)
    days = tuple(PlannedDay(d + 1, _at(start, Decimal(d) * US_PER_DAY), _ml_up(day_rus[d]), _mg_up(day_mg[d]))
                 for d in sorted(day_rus))
    total_rus = sum(day_rus.values(), Decimal(0))
    total_mg = sum(day_mg.values(), Decimal(0))
    if problems:  # what the whole course would need, for the message and the output
        total_rus = _course_rus(segs, start, schedule.concentration_mg_per_ml, resolution)
    return VolumePlan(start, end, tuple(planned), days, _ml_up(total_rus), _mg_up(total_mg), tuple(problems))


def _course_rus(segs: tuple[Segment, ...], start: datetime, conc: Decimal, resolution: Resolution) -> Decimal:
    return sum((planned_rate(s.dose_mg_per_24h, conc, resolution) * _us(s.end - s.start) for s in segs), Decimal(0))


def _shortfall(schedule: Schedule, last: PlannedSyringe, segs: tuple[Segment, ...], resolution: Resolution,
               every_us: Decimal | None, change_at: Decimal | None) -> Problem:
    need = _ml_up(_course_rus(segs, schedule.steps[0].not_before, schedule.concentration_mg_per_ml, resolution))
    where = f"syringe {last.number} ({_t(last.fill_ml)} mL at {_t(last.concentration_mg_per_ml)} mg/mL) runs empty " \
            f"at {last.ends_at.isoformat()}"
    if every_us is not None and change_at is not None:
        due = _at(schedule.steps[0].not_before, change_at)
        return Problem("/syringes/change_every_hours", "volume-plan",
                       f"{where}, before its change at {due.isoformat()}: change syringes more often or fill more")
    if schedule.syringes is None:
        return Problem("/syringes", "volume-plan",
                       f"{where}; the course needs {_t(need)} mL at {_t(schedule.concentration_mg_per_ml)} mg/mL: "
                       "state how syringes are supplied (`syringes`)")
    return Problem("/syringes", "volume-plan",
                   f"{where} and no approved syringe is left; the course runs to {segs[-1].end.isoformat()}")


def _at(start: datetime, us: Decimal) -> datetime:
    return start + _delta(us)


def _ml_up(rus: Decimal) -> Decimal:
    with localcontext(_UP):
        return (rus / US_PER_HOUR).quantize(ML_STEP, rounding=ROUND_CEILING)


def _ml_down(rus: Decimal) -> Decimal:
    with localcontext(_DOWN):
        return (rus / US_PER_HOUR).quantize(ML_STEP, rounding=ROUND_FLOOR)


def _mg_up(mg_rus: Decimal) -> Decimal:
    return _ml_up(mg_rus)


def _t(d: Decimal) -> str:
    return decimal_text(d)
