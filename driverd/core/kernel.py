"""The safety kernel: the single gate every setpoint passes before it can reach a driver.

`gate()` takes the course state, the drug-library limits, a proposed dose and the time, quantizes the rate the
pump will really receive (toward less drug) and checks *that* value. It returns a `Setpoint` (which only this
module can construct) or a `Refusal` with a stable reason code. Decreases and stop are always allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, localcontext
from functools import lru_cache
from typing import Literal

from driverd.core.protocol import ProtocolSpec
from driverd.core.quantities import _CTX, MAX_DOSE_MG_PER_24H, dose_to_rate, quantize_down, rate_to_dose
from driverd.core.state import DECREASE_INTENTS, CourseState, Phase, Sample

_KERNEL_TOKEN = object()
WINDOW = timedelta(hours=24)

#: What a proposal is for; only "escalate" and "start" may raise the dose level.
Intent = Literal["start", "escalate", "resume", "reduce", "taper", "stop"]


@dataclass(frozen=True, slots=True)
class Setpoint:
    """A rate the kernel approved. Only the kernel can construct one (checked in __post_init__)."""

    id: int
    rate_ml_per_h: Decimal  # quantized toward less drug: exactly what goes on the wire (0 = stop)
    dose_mg_per_24h: Decimal  # what that quantized rate delivers
    requested_mg_per_24h: Decimal
    intent: str
    source: str
    reason: str
    token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.token is not _KERNEL_TOKEN:
            raise TypeError("only the safety kernel creates setpoints")

    @property
    def is_stop(self) -> bool:
        return self.rate_ml_per_h == 0


@dataclass(frozen=True, slots=True)
class Proposal:
    dose_mg_per_24h: Decimal
    intent: Intent
    source: str  # "schedule" | "clinician" | "recovery" | "push" | "machine"
    reason: str


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # stable code
    detail: str


def pump_rate(state: CourseState, dose: Decimal) -> Decimal:
    """The rate (mL/h) this pump would really run for `dose`: dose / 24 / concentration of the syringe in the
    pump, quantized down."""
    assert state.schedule is not None and state.resolution is not None
    return quantize_down(dose_to_rate(dose, state.concentration), state.resolution)


def gate(state: CourseState, protocol: ProtocolSpec, proposal: Proposal, now: datetime) -> Setpoint | Refusal:
    """The one gate. Pure: the same inputs always give the same answer (replay depends on it)."""
    dose = proposal.dose_mg_per_24h
    if not isinstance(dose, Decimal) or not dose.is_finite():
        return Refusal("not_a_number", f"dose {dose!r} is not a finite decimal")
    if dose < 0:
        return Refusal("negative", f"negative dose {dose} mg/24h")
    if dose > MAX_DOSE_MG_PER_24H:
        # Before any arithmetic: a huge exponent must be a refusal, not an overflow out of the gate.
        return Refusal("out_of_range", f"dose above {MAX_DOSE_MG_PER_24H} mg/24h is not a dose")
    schedule = state.schedule
    if schedule is None or state.resolution is None:
        if dose == 0:  # stopping needs no schedule
            return _approve(state, proposal, Decimal(0), Decimal(0))
        return Refusal("not_primed", "no verified schedule and pump")
    conc = state.concentration
    rate = pump_rate(state, dose)
    delivered_dose = rate_to_dose(rate, conc)
    if rate == 0:
        if dose > 0:
            return Refusal("below_resolution", f"{dose} mg/24h quantizes to 0 mL/h at this pump's resolution")
        return _approve(state, proposal, rate, delivered_dose)

    # Checks that hold for every non-zero rate, decreases included: these are about what the pump can do
    # and whether this is the drug/syringe that was approved, not about raising the dose.
    if conc not in protocol.concentrations_mg_per_ml:
        return Refusal("concentration", f"{conc} mg/mL is not in the drug library")
    if conc not in schedule.approved_concentrations:
        return Refusal("concentration", f"{conc} mg/mL is not approved by the signed schedule")
    spec = protocol.syringe(schedule.syringe_model)
    if spec is None or spec.inner_diameter_mm != schedule.inner_diameter_mm:
        return Refusal("syringe", f"syringe {schedule.syringe_model!r} does not match the drug library")
    if state.pump_diameter_mm != schedule.inner_diameter_mm:
        return Refusal(
            "syringe_mismatch",
            f"pump reads back {state.pump_diameter_mm} mm, schedule says {schedule.inner_diameter_mm} mm",
        )
    # Per syringe (issue 16): the pump's plunger speed range times this syringe's bore, within [device].
    min_rate, max_rate = protocol.rate_limits(spec)
    if rate < min_rate:
        return Refusal("device_min", f"{rate} mL/h is below the device minimum {min_rate} with {spec.model!r}")
    if rate > max_rate:
        return Refusal("device_max", f"{rate} mL/h exceeds the device maximum {max_rate} with {spec.model!r}")
    if delivered_dose > protocol.ceiling_mg_per_24h:
        # Also for decreases: a value above the hard ceiling is never sent, whatever is running now.
        return Refusal("ceiling", f"{delivered_dose} mg/24h exceeds the ceiling {protocol.ceiling_mg_per_24h}")

    if rate <= state.commanded_rate and proposal.intent in DECREASE_INTENTS:
        return _approve(state, proposal, rate, delivered_dose)  # a decrease: always allowed
    # Everything else may raise the rate (a resume raises it from a stopped pump): full checks.
    return _check_increase(state, protocol, proposal, now, rate, delivered_dose)


def _check_increase(
    state: CourseState, protocol: ProtocolSpec, proposal: Proposal, now: datetime, rate: Decimal, dose: Decimal
) -> Setpoint | Refusal:
    schedule = state.schedule
    assert schedule is not None and state.resolution is not None
    if state.phase is Phase.STOPPED:
        return Refusal("course_stopped", "the course has stopped; a new approved course is needed")
    if state.phase is Phase.ALARM and proposal.intent != "resume":
        return Refusal("alarm", f"no increase while in alarm ({state.alarm_code})")
    if state.pending is not None:
        return Refusal("uncertain", f"setpoint {state.pending.setpoint.id} is not yet verified")
    change = state.syringe_change
    if change is not None:
        # Which syringe is in the pump is not known until the new one is read back and verified: a rate worked out
        # for the old syringe's concentration could deliver twice the drug from a stronger new one. Only the
        # verified load (SyringeLoaded, which ends the change first) resumes.
        return Refusal("syringe_change_waiting",
                       f"a syringe change ({change.fill_ml} mL at {change.concentration_mg_per_ml} mg/mL) waits for "
                       "the new syringe's verified read-back")
    if state.taper_lock and (state.lock_ceiling_rate is None or rate > state.lock_ceiling_rate):
        return Refusal("taper_lock", f"taper lock: no rate above {state.lock_ceiling_rate} mL/h")
    if state.started_at is not None and now >= state.started_at + span_days(protocol.max_course_days):
        return Refusal("course_length", f"course reached its {protocol.max_course_days}-day cap")
    if rate > pump_rate(state, schedule.max_dose_mg_per_24h):
        return Refusal("schedule_max", f"{dose} mg/24h is above the approved schedule's highest step")
    level_rate = pump_rate(state, state.level_mg_per_24h)
    if proposal.intent in ("start", "escalate"):
        if state.clock_fault:  # time-based rules cannot be trusted until a clinician acknowledges the step
            return Refusal("clock_step", f"no start or escalation after a clock step: {state.clock_fault}")
        refusal = _check_step(state, protocol, proposal, now)
        if refusal is not None:
            return refusal
    elif proposal.intent == "resume":
        if rate > level_rate:
            return Refusal("above_level", f"resume may not exceed the course level {state.level_mg_per_24h} mg/24h")
        if rate > state.verified_run_rate:
            return Refusal("unverified", f"resume capped at the last verified rate {state.verified_run_rate} mL/h")
    else:
        return Refusal("not_an_increase", f"a {proposal.intent} may not raise the rate")
    window_mg = max_window_mg(state, rate, now)
    # The past comes from the pump's counter, which moves in display steps: read at both ends of the window it may
    # show up to two steps more than was delivered. The read-back ceiling monitor (machine._ceiling_breach) allows
    # the same; without it a resume at the top dose at 100 mg/mL (4.992 mL/24h against 5 mL) is refused on noise.
    if window_mg > protocol.ceiling_mg_per_24h + 2 * protocol.counter_resolution_ml * state.concentration:
        return Refusal(
            "rolling_24h",
            f"delivered + proposed would reach {window_mg} mg in a 24-h window (ceiling {protocol.ceiling_mg_per_24h})",
        )
    return _approve(state, proposal, rate, dose)


def _check_step(state: CourseState, protocol: ProtocolSpec, proposal: Proposal, now: datetime) -> Refusal | None:
    schedule = state.schedule
    assert schedule is not None
    target = proposal.dose_mg_per_24h
    index = schedule.next_step_index(state.level_mg_per_24h)
    if index is None:
        return Refusal("no_next_step", "already at the schedule's highest step")
    step = schedule.steps[index]
    if target != step.dose_mg_per_24h:
        return Refusal("not_next_step", f"only the next scheduled step ({step.dose_mg_per_24h} mg/24h) is allowed")
    if target not in protocol.allowed_mg_per_24h:
        return Refusal("allowed_dose", f"{target} mg/24h is not an allowed step")
    if state.level_mg_per_24h == 0 and target > protocol.start_max_mg_per_24h:
        return Refusal("start_max", f"start dose above {protocol.start_max_mg_per_24h} mg/24h")
    if target - state.level_mg_per_24h > protocol.max_step_mg_per_24h:
        return Refusal("max_step", f"step of {target - state.level_mg_per_24h} exceeds {protocol.max_step_mg_per_24h}")
    if now < step.not_before:
        return Refusal("not_before", f"step {index} not before {step.not_before.isoformat()}")
    interval = span_hours(protocol.step_interval_hours)
    if state.last_change_at is not None and now < state.last_change_at + interval:
        return Refusal("interval", f"next change not before {(state.last_change_at + interval).isoformat()}")
    if proposal.intent == "start" and now >= schedule.expires_at:
        # Approval is for a course that starts while it is current; a primed pump never starts on a stale one.
        return Refusal("expired", f"the schedule expired at {schedule.expires_at.isoformat()}; not started")
    if proposal.intent == "start" and state.phase is not Phase.PRIMED:
        return Refusal("not_primed", "a course starts only from primed")
    if proposal.intent == "escalate" and state.phase not in (Phase.TITRATING, Phase.HOLDING):
        return Refusal("phase", f"no escalation in {state.phase.value}")
    return None


def max_window_mg(state: CourseState, rate: Decimal, now: datetime) -> Decimal:
    """Largest drug amount (mg) any 24-h window ending in [now, now+24h] would hold if `rate` ran from now on.

    The past part comes from the pump's delivered-volume read-backs (linear between samples; the newest
    read-back is extrapolated at the commanded rate up to `now`), so over-delivery already seen counts. It is
    counted in mg, each volume at the concentration of the syringe it came from (syringe changes, issue 13).
    The amount is piecewise linear in the window's end, so checking every breakpoint finds the maximum.
    """
    last = state.last_sample
    samples = state.samples if last is None else (*state.samples, last)
    with localcontext(_CTX):
        conc = state.concentration
        running = state.commanded_rate * conc if state.pump_infusing else Decimal(0)
        rate = rate * conc

        def cum_at(t: datetime) -> Decimal:
            """Course-cumulative delivered drug at t (after the newest read-back: at the commanded rate)."""
            if last is not None and t > last.at:
                return last.delivered_mg + running * _hours(t - last.at)
            return _cumulative(state, t, mg=True)

        cum_now = cum_at(now)

        ends = {now, now + WINDOW}
        ends.update(s.at + WINDOW for s in samples if now - WINDOW < s.at <= now)
        at_sample = _cumulative_at_samples(state, now - WINDOW, now)
        best = Decimal(0)
        for end in ends:
            start = end - WINDOW
            if start < now:
                known = at_sample.get(start)
                past = cum_now - (known if known is not None else cum_at(start))
            else:
                past = Decimal(0)
            future = rate * _hours(end - max(now, start))
            best = max(best, past + future)
        return best


def _cumulative_at_samples(state: CourseState, after: datetime, until: datetime) -> dict[datetime, Decimal]:
    """cumulative_drug(state, s.at) for every kept sample s with after < s.at <= until, in one pass: the same
    values `_cumulative` gives (the same `_between` on the same bracket), without a bisect per sample. At a
    kept sample's time `bracket` gives (None, first) for the first, else (s, the next sample or the newest report).
    The newest report's own time is left to `_cumulative` (it answers with the report's value)."""
    last = state.last_sample
    out: dict[datetime, Decimal] = {}
    if last is None:
        return out
    samples = state.samples
    n = len(samples)
    first = samples.index_after(after)
    for i in range(first, n):
        s = samples[i]
        if s.at > until:
            break
        if s.at >= last.at:
            continue
        if i == 0:
            out[s.at] = s.delivered_mg
        else:
            out[s.at] = _between(s, samples[i + 1] if i + 1 < n else last, s.at, True)
    return out


def window_volume(state: CourseState, start: datetime, end: datetime) -> Decimal:
    """Volume the pump's read-backs show delivered in [start, end] (end <= the newest report): the
    course-cumulative counter, linear between kept samples. O(log n): checked on every report."""
    return _cumulative(state, end) - _cumulative(state, start)


def window_drug(state: CourseState, start: datetime, end: datetime) -> Decimal:
    """Like `window_volume`, in mg (each volume at the concentration of the syringe it came from)."""
    return _cumulative(state, end, mg=True) - _cumulative(state, start, mg=True)


def cumulative_drug(state: CourseState, t: datetime) -> Decimal:
    """Course-cumulative delivered drug (mg) at t (t <= the newest report): window_drug(a, b) is
    cumulative_drug(b) - cumulative_drug(a)."""
    return _cumulative(state, t, mg=True)


def cumulative_drug_bounds(state: CourseState, t: datetime) -> tuple[Decimal, Decimal]:
    """(low, high) around cumulative_drug(state, t), without interpolating: the values of the two samples t falls
    between (the value itself where cumulative_drug does not interpolate). Interpolation stays between them up to
    its roundings in _CTX (34 digits; relative error below 1E-32 of the values)."""
    last = state.last_sample
    if last is None:
        return Decimal(0), Decimal(0)
    if t >= last.at:
        return last.delivered_mg, last.delivered_mg
    a, b = state.samples.bracket(t)
    if a is None:
        v = (b if b is not None else last).delivered_mg
        return v, v
    va, vb = a.delivered_mg, (b if b is not None else last).delivered_mg
    return (va, vb) if va <= vb else (vb, va)


def _value(sample: Sample, mg: bool) -> Decimal:
    return sample.delivered_mg if mg else sample.delivered_ml


def _cumulative(state: CourseState, t: datetime, *, mg: bool = False) -> Decimal:
    """Course-cumulative delivered volume (or drug) at t from the kept samples and the newest report (no copy
    of the history: this runs on every report)."""
    last = state.last_sample
    if last is None:
        return Decimal(0)
    if t >= last.at:
        return _value(last, mg)
    # Empty history: the newest report; at or before the first sample: its value; after the newest kept sample:
    # between it and the newest report; else between the two kept samples around t.
    a, b = state.samples.bracket(t)
    if a is None:
        return _value(b if b is not None else last, mg)
    return _between(a, b if b is not None else last, t, mg)


def _between(a: Sample, b: Sample, t: datetime, mg: bool = False) -> Decimal:
    span = _hours(b.at - a.at)
    if span == 0:
        return _value(b, mg)
    va, vb = _value(a, mg), _value(b, mg)
    # (vb - va) * h / span + va, each operation rounded in _CTX exactly as under localcontext(_CTX).
    return _CTX.add(va, _CTX.divide(_CTX.multiply(_CTX.subtract(vb, va), _hours(t - a.at)), span))


def sample_at(sample: Sample) -> datetime:
    """Bisect key over the delivered-volume history (kept sorted by time)."""
    return sample.at


@lru_cache(maxsize=256)
def span_days(days: Decimal) -> timedelta:
    """timedelta(days=float(days)), cached: limits from the library and the schedule, read on every event."""
    return timedelta(days=float(days))


@lru_cache(maxsize=256)
def span_hours(hours: Decimal) -> timedelta:
    """timedelta(hours=float(hours)), cached (see span_days)."""
    return timedelta(hours=float(hours))


@lru_cache(maxsize=256)
def span_minutes(minutes: Decimal) -> timedelta:
    """timedelta(minutes=float(minutes)), cached (see span_days)."""
    return timedelta(minutes=float(minutes))


def hours_between(a: datetime, b: datetime) -> Decimal:
    """Exact hours from a to b (microsecond resolution, no float)."""
    return _hours(b - a)


def hours_in(delta: timedelta) -> Decimal:
    """Exact hours in `delta`: what hours_between(a, a + delta) gives for any a."""
    return _hours(delta)


_MICROS_PER_HOUR = Decimal(3_600_000_000)


@lru_cache(maxsize=4096)
def _hours(delta: timedelta) -> Decimal:
    """Exact hours in `delta`, rounded in _CTX. Cached: the same spans recur on every report (the 60-s sample
    spacing, a poll period, 24 h); a Decimal is immutable, so sharing one is safe."""
    micro = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return _CTX.divide(Decimal(micro), _MICROS_PER_HOUR)


def restore_setpoint(
    *, id: int, rate_ml_per_h: Decimal, dose_mg_per_24h: Decimal, requested_mg_per_24h: Decimal, intent: str,
    source: str, reason: str,
) -> Setpoint:
    """A setpoint the kernel approved earlier, read back from a signed state snapshot (a pending setpoint is part
    of a course's state). Only for that: it approves nothing new. The snapshot is trusted only if its checkpoint
    signature verifies, and `audit verify --full` checks it equals what replay of the log gives."""
    return Setpoint(id=id, rate_ml_per_h=rate_ml_per_h, dose_mg_per_24h=dose_mg_per_24h,
                    requested_mg_per_24h=requested_mg_per_24h, intent=intent, source=source, reason=reason,
                    token=_KERNEL_TOKEN)


def _approve(state: CourseState, proposal: Proposal, rate: Decimal, dose: Decimal) -> Setpoint:
    return Setpoint(
        id=state.next_setpoint_id,
        rate_ml_per_h=rate,
        dose_mg_per_24h=dose,
        requested_mg_per_24h=proposal.dose_mg_per_24h,
        intent=proposal.intent,
        source=proposal.source,
        reason=proposal.reason,
        token=_KERNEL_TOKEN,
    )


