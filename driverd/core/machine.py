"""The course state machine: `reduce(state, event, protocol) -> (state, commands)`.

Pure and synchronous. Which events a phase accepts is one table (`TRANSITIONS`); anything else raises
`IllegalTransition`. Every setpoint is produced by `_propose`, which goes through the safety kernel's `gate` —
there is no other way to build an `ApplySetpoint` (a `Setpoint` can only be constructed by the kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache

from driverd.core.commands import ApplySetpoint, Command, CourseEnded, Notice, RaiseAlarm, Refused, Transitioned
from driverd.core.errors import IllegalTransition
from driverd.core.events import (
    WARNING_ALARMS,
    ClinicianCommand,
    ClockStepped,
    CounterCleared,
    Event,
    LinkLost,
    LinkRestored,
    PumpReport,
    PumpVerified,
    ScheduleAccepted,
    SetpointResult,
    SyringeLoaded,
    Tick,
)
from driverd.core.history import History
from driverd.core.kernel import (
    Intent,
    Proposal,
    Refusal,
    Setpoint,
    cumulative_drug,
    cumulative_drug_bounds,
    gate,
    hours_between,
    hours_in,
    pump_rate,
    span_days,
    span_hours,
    span_minutes,
)
from driverd.core.protocol import ProtocolSpec, SyringeSpec
from driverd.core.pump_range import PLANNED_RATE, PUMP_RANGE, PumpRange, plan_problem, range_problem
from driverd.core.quantities import Resolution, dose_to_rate, quantize_down, rate_to_dose
from driverd.core.schedule import Schedule
from driverd.core.state import ACTIVE, RUNNING, CourseState, Pending, Phase, Sample, SyringeChange, evolve

Out = tuple[CourseState, tuple[Command, ...]]
Handler = Callable[[CourseState, Event, ProtocolSpec], Out]

P = Phase
_ALL = frozenset(Phase)
SAMPLE_SPACING = timedelta(seconds=60)  # thinning of delivered-volume history kept for the 24-h window
WINDOW = timedelta(hours=24)
CEILING_LOOKAHEAD = timedelta(hours=1)  # the delivered-dose check looks this far ahead at the reported rate


def initial_state(pump_id: str) -> CourseState:
    return CourseState(pump_id=pump_id)


def reduce(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    """Apply one event. Raises IllegalTransition if the current phase does not accept it."""
    if event.__class__ is PumpReport:
        quiet = _quiet_report(state, event, protocol)
        if quiet is not None:
            return quiet, ()
    elif event.__class__ is Tick and _quiet_tick(state, event.at, protocol):
        return state, ()
    return _reduce(state, event, protocol)


def _reduce(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    """The general path: every event, every check (`reduce` without the quiet pump report's short cut)."""
    start = state
    state, pre = _enforce_cap(state, event.at, protocol)
    key: type | str = type(event)
    if isinstance(event, ClinicianCommand):
        key = f"clinician:{event.action}"
    phases_handler = TRANSITIONS.get(key)
    if phases_handler is None or state.phase not in phases_handler[0]:
        raise IllegalTransition(state.phase.value, _event_name(event))
    before = state
    state, cmds = phases_handler[1](state, event, protocol)
    state = _track_interruption(before, state, event.at)
    state = _track_commanded(start, state, event.at)
    if start.phase is not P.STOPPED and state.phase is P.STOPPED and state.schedule is not None:
        causes = [c.cause for c in pre + cmds if isinstance(c, Transitioned)]
        state = evolve(state, summary_due=causes[-1] if causes else "stopped", stopped_at=event.at)
    if state.summary_due and isinstance(event, PumpReport) and not state.pump_infusing:
        # The handover record waits for the first report of the stopped pump: its counter then holds everything
        # the course delivered.
        cmds += (_course_ended(state),)
        state = evolve(state, summary_due="")
    return state, pre + cmds


def _running_mg_per_h(state: CourseState) -> Decimal:
    if state.phase not in RUNNING or state.schedule is None or state.commanded_rate <= 0:
        return Decimal(0)
    return state.commanded_rate * state.concentration


def _track_commanded(before: CourseState, after: CourseState, now: datetime) -> CourseState:
    """Integrate the commanded rate (mg) for the end-of-course record, touching the state only when it changes
    (an idle tick must leave the state identical: the channel does not log those)."""
    if after.commanded_since is not None and after.phase is before.phase and \
            after.commanded_rate is before.commanded_rate and after.schedule is before.schedule and \
            after.syringe_concentration is before.syringe_concentration:
        return after  # the same inputs to _running_mg_per_h: was == will, and commanded_since is set
    was, will = _running_mg_per_h(before), _running_mg_per_h(after)
    if was == will and (after.commanded_since is not None or will == 0):
        return after
    total = after.commanded_mg
    if was > 0 and before.commanded_since is not None:
        total += was * hours_between(before.commanded_since, now)
    return evolve(after, commanded_mg=total, commanded_since=now if will > 0 else None)


def _course_ended(state: CourseState) -> CourseEnded:
    assert state.schedule is not None
    cause = state.summary_due
    return CourseEnded(delivered_mg=state.delivered_mg, delivered_ml=state.delivered_ml,
                       commanded_mg=state.commanded_mg, syringes=state.syringe_changes + 1,
                       alarms=state.alarms_raised, handover_note=state.schedule.handover_note, cause=cause)


def step(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    """`reduce`, but an illegal transition becomes a logged refusal and leaves the state unchanged.

    The daemon and the audit replay both use this, so they agree on what an illegal event produces.
    """
    source = "clinician" if isinstance(event, ClinicianCommand) else "machine"
    try:
        return reduce(state, event, protocol)
    except IllegalTransition as exc:
        return state, (Refused(source, "illegal_transition", str(exc)),)
    except ArithmeticError as exc:
        # A NaN, an infinity or a huge exponent somewhere in the event: refused, the state unchanged.
        return state, (Refused(source, "invalid_number", f"{type(exc).__name__}: a number is out of range"),)


def report_step(state: CourseState, event: PumpReport, protocol: ProtocolSpec) -> tuple[CourseState,
                                                                                      tuple[Command, ...], bool]:
    """`step(state, event, protocol)` for a pump report, and whether the quiet path (`_quiet_report`) decided it.
    When it did, there is no command and the new state is `state` with only the fields `_accumulate` sets replaced
    (`ACCUMULATED`): every other field holds the very same object (the telemetry compactor relies on this)."""
    try:  # as in `step`: the same refusals, from the same exceptions
        if event.__class__ is PumpReport:
            quiet = _quiet_report(state, event, protocol)
            if quiet is not None:
                return quiet, (), True
        after, cmds = _reduce(state, event, protocol)
    except IllegalTransition as exc:
        return state, (Refused("machine", "illegal_transition", str(exc)),), False
    except ArithmeticError as exc:
        return state, (Refused("machine", "invalid_number", f"{type(exc).__name__}: a number is out of range"),), False
    return after, cmds, False


def _event_name(event: Event) -> str:
    if isinstance(event, ClinicianCommand):
        return f"clinician:{event.action}"
    return type(event).__name__


# ---------------------------------------------------------------------------------------------- helpers


def _goto(state: CourseState, phase: Phase, cause: str) -> Out:
    if state.phase is phase:
        return state, ()
    return evolve(state, phase=phase), (Transitioned(state.phase.value, phase.value, cause),)


def _propose(
    state: CourseState, protocol: ProtocolSpec, now: datetime, dose: Decimal, intent: Intent, source: str, reason: str
) -> tuple[CourseState, Setpoint | Refusal, tuple[Command, ...]]:
    """Ask the kernel; on approval record the setpoint as pending and emit it."""
    verdict = gate(state, protocol, Proposal(dose, intent, source, reason), now)
    if isinstance(verdict, Refusal):
        return state, verdict, (Refused(source, verdict.reason, verdict.detail),)
    state = evolve(
        state,
        commanded_rate=verdict.rate_ml_per_h,
        pending=Pending(verdict, attempts=1),
        next_setpoint_id=state.next_setpoint_id + 1,
        started_at=state.started_at if state.started_at or verdict.is_stop else now,
        last_refusal="",
    )
    return state, verdict, (ApplySetpoint(verdict),)


def _set_level(state: CourseState, dose: Decimal, now: datetime) -> CourseState:
    if dose == state.level_mg_per_24h:
        return state
    lock = state.lock_ceiling_rate
    if state.taper_lock and state.schedule is not None and state.resolution is not None:
        lvl = pump_rate(state, dose)
        lock = lvl if lock is None else min(lock, lvl)
    return evolve(state, level_mg_per_24h=dose, last_change_at=now, lock_ceiling_rate=lock)


def _stop(state: CourseState, protocol: ProtocolSpec, now: datetime, source: str, reason: str) -> Out:
    state, verdict, cmds = _propose(state, protocol, now, Decimal(0), "stop", source, reason)
    assert isinstance(verdict, Setpoint), "the kernel always allows a stop"
    state = evolve(state, taper_lock=True, lock_ceiling_rate=Decimal(0), level_mg_per_24h=Decimal(0),
                    resume_to=None)
    state, t = _goto(state, P.STOPPED, reason)
    return state, cmds + t


def _alarm(state: CourseState, code: str, detail: str) -> Out:
    if code in state.alarm_causes and (state.phase is P.ALARM or state.phase not in ACTIVE):
        return state, ()  # already an active cause: raised once, acknowledged once
    cmds: tuple[Command, ...] = (RaiseAlarm(code, detail),)
    state = evolve(state, alarm_causes=(*state.alarm_causes, code), alarms_raised=(*state.alarms_raised, code))
    if state.phase not in ACTIVE:
        # A stopped (or not yet started) course stays where it is: an alarm there is raised, never a way back in.
        return evolve(state, alarm_code=code), cmds
    if state.phase is P.ALARM:
        return evolve(state, alarm_code=code), cmds
    resume_to = state.resume_to if state.phase is P.PAUSED else state.phase
    state = evolve(state, alarm_code=code, resume_to=resume_to)
    state, t = _goto(state, P.ALARM, code)
    return state, cmds + t


def _cap_times(state: CourseState, protocol: ProtocolSpec) -> tuple[datetime, datetime] | None:
    if state.started_at is None or state.schedule is None:
        return None
    cap = state.started_at + span_days(protocol.max_course_days)
    taper_len = state.schedule.taper[-1].after_hours if state.schedule.taper else Decimal(0)
    return cap - span_hours(taper_len), cap


def _enforce_cap(state: CourseState, now: datetime, protocol: ProtocolSpec) -> Out:
    """The course-length cap holds on every event, not only on ticks: at the cap the course is stopped."""
    times = _cap_times(state, protocol)
    if times is None or state.phase not in ACTIVE:
        return state, ()
    taper_at, cap = times
    if now >= cap:
        return _stop(state, protocol, now, "machine", "course_cap")
    if now >= taper_at and state.phase in (P.TITRATING, P.HOLDING):
        return _begin_taper(state, protocol, now, "machine", "course_cap")
    return state, ()


# ---------------------------------------------------------------------------------------------- schedule


def _on_schedule(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, ScheduleAccepted)
    new = event.schedule
    if new.pump_id != state.pump_id:
        return state, (Refused("push", "wrong_pump", f"schedule is for {new.pump_id!r}, not {state.pump_id!r}"),)
    if new.protocol != protocol.id:
        return state, (Refused("push", "protocol", f"schedule protocol {new.protocol!r} is not {protocol.id!r}"),)
    old = state.schedule
    if state.phase in (P.IDLE, P.STOPPED):
        if old is not None and old.schedule_id == new.schedule_id:
            if state.phase is P.STOPPED:
                return state, (Refused("push", "course_ended", "this course has stopped; a new course needs a new "
                                       "schedule_id"),)
            if new.version <= old.version:
                return state, (Refused("push", "version", f"version {new.version} is not above {old.version}"),)
        fresh = CourseState(pump_id=state.pump_id, schedule=new, next_setpoint_id=state.next_setpoint_id,
                            link_up=state.link_up, clock_fault=state.clock_fault)
        note = Notice("schedule_accepted", f"{new.schedule_id} v{new.version} ({new.digest[:16]})")
        fresh, t = _goto(evolve(fresh, phase=state.phase), P.IDLE, "new_course")
        return fresh, (note, *t)
    assert old is not None
    if new.schedule_id != old.schedule_id:
        return state, (Refused("push", "course_active", f"course {old.schedule_id} is still active"),)
    if new.version <= old.version:
        return state, (Refused("push", "version", f"version {new.version} is not above {old.version}"),)
    if (new.drug_name, new.concentration_mg_per_ml, new.syringe_model, new.inner_diameter_mm) != (
        old.drug_name, old.concentration_mg_per_ml, old.syringe_model, old.inner_diameter_mm
    ):
        return state, (Refused("push", "course_mismatch", "drug, concentration or syringe differ: a new course"),)
    if state.phase is P.TAPERING or state.taper_lock:
        # In every phase (alarm and paused included): the approved tail-off cannot be moved once it began.
        return state, (Refused("push", "taper_lock", "no schedule update once the taper has begun"),)
    state = evolve(state, schedule=new)
    cmds: tuple[Command, ...] = (Notice("schedule_updated", f"{new.schedule_id} v{new.version}"),)
    if state.level_mg_per_24h > new.max_dose_mg_per_24h:
        state, more = _reduce_to(state, protocol, event.at, new.max_dose_mg_per_24h, "push", "schedule_lowered")
        cmds += more
    return state, cmds


def _on_verified(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, PumpVerified)
    sch = state.schedule
    if sch is None:
        return state, (Refused("machine", "no_schedule", "pump verified before any schedule"),)
    spec = protocol.syringe(sch.syringe_model)
    if event.diameter_mm != sch.inner_diameter_mm or spec is None or spec.inner_diameter_mm != event.diameter_mm:
        state, t = _goto(evolve(state, pump_diameter_mm=event.diameter_mm), P.IDLE, "syringe_mismatch")
        return state, (Refused("machine", "syringe_mismatch",
                               f"pump reads back {event.diameter_mm} mm; schedule {sch.inner_diameter_mm} mm"), *t)
    checked: tuple[Command, ...] = ()
    if event.pump_range is not None:  # None: a log from before the check (replayed as it was decided)
        failed = _out_of_range(protocol, spec, sch, event.diameter_mm, event.resolution, event.pump_range)
        if failed is not None:
            return _prime_refused(evolve(state, pump_diameter_mm=event.diameter_mm), failed)
        state, checked = _range_checked(state, spec, event.diameter_mm, event.pump_range, protocol)
    state = evolve(state, pump_diameter_mm=event.diameter_mm, resolution=event.resolution, pump_model=event.model)
    state, t = _goto(state, P.PRIMED, "pump_verified")
    return state, checked + t


#: Alarm causes of a pump that cannot run the course (core/pump_range.py): before the course runs they end with a
#: check that passes; at a syringe load a new change_syringe retries the load (and the check).
RANGE_CAUSES = frozenset({PUMP_RANGE, PLANNED_RATE})


def _out_of_range(protocol: ProtocolSpec, spec: SyringeSpec, sch: Schedule, diameter: Decimal,
                  resolution: Resolution, pump: PumpRange) -> Refused | None:
    """The refusal if the pump cannot run the library's rates for this syringe or the course's planned rates."""
    problem = range_problem(protocol, spec, pump, diameter)
    if problem is not None:
        return Refused("machine", PUMP_RANGE, problem)
    problem = plan_problem(protocol, spec, sch, resolution)
    return None if problem is None else Refused("machine", PLANNED_RATE, problem)


def _prime_refused(state: CourseState, refusal: Refused) -> Out:
    """The course does not prime: it stays (or goes back to) idle, the pump stopped, and the cause is an alarm."""
    state, t = _goto(state, P.IDLE, refusal.reason)
    state, raised = _alarm(state, refusal.reason, refusal.detail)
    return state, (refusal, *raised, *t)


def _range_checked(state: CourseState, spec: SyringeSpec, diameter: Decimal, pump: PumpRange,
                   protocol: ProtocolSpec) -> Out:
    """The check passed: say so, and end a range cause raised before the course ran (no drug flowed on it)."""
    lo, hi = protocol.rate_limits(spec)
    cmds: tuple[Command, ...] = (Notice(
        "pump_range_checked", f"syringe {spec.model!r} ({diameter} mm) on {pump.url}: drug library {lo}..{hi} mL/h "
                              f"inside the pump's {pump.text()}; every planned rate is sent"),)
    ended = [c for c in state.alarm_causes if c in RANGE_CAUSES]
    if ended and state.phase not in ACTIVE:
        causes = tuple(c for c in state.alarm_causes if c not in RANGE_CAUSES)
        code = "" if state.alarm_code in RANGE_CAUSES else state.alarm_code
        state = evolve(state, alarm_causes=causes, alarm_code=code)
        cmds += (Notice("alarm_cleared", f"{', '.join(ended)} (checked again: in range)"),)
    return state, cmds


# ---------------------------------------------------------------------------------------------- time


def _on_tick(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    now = event.at
    sch = state.schedule
    if sch is None:
        return state, ()
    if state.phase is P.PRIMED:
        if sch.steps[0].auto and now >= sch.steps[0].not_before:
            return _auto(state, protocol, now, sch.steps[0].dose_mg_per_24h, "start")
    elif state.phase is P.TITRATING:
        i = sch.next_step_index(state.level_mg_per_24h)
        interval = span_hours(protocol.step_interval_hours)
        if i is None:
            return _begin_hold(state, now, "top_step")
        due = state.last_change_at is None or now >= state.last_change_at + interval
        if sch.steps[i].auto and due and now >= sch.steps[i].not_before and state.pending is None:
            return _auto(state, protocol, now, sch.steps[i].dose_mg_per_24h, "escalate")
    elif state.phase is P.HOLDING:
        assert state.hold_started_at is not None
        if now >= state.hold_started_at + span_days(sch.hold_days):
            return _begin_taper(state, protocol, now, "schedule", "hold_complete")
    elif state.phase is P.TAPERING:
        return _taper_steps(state, protocol, now)
    return state, ()


def _auto(state: CourseState, protocol: ProtocolSpec, now: datetime, dose: Decimal, intent: Intent) -> Out:
    """An automatic step from the schedule; a refusal is logged once per (step, reason), not on every tick."""
    before = state
    state, verdict, cmds = _propose(state, protocol, now, dose, intent, "schedule", "step_due")
    if isinstance(verdict, Refusal):
        tag = f"{dose}:{verdict.reason}"
        if before.last_refusal == tag:
            return before, ()
        return evolve(before, last_refusal=tag), cmds
    return _after_step(state, now, dose, cmds)


def _after_step(state: CourseState, now: datetime, dose: Decimal, cmds: tuple[Command, ...]) -> Out:
    state = _set_level(state, dose, now)
    assert state.schedule is not None
    if state.schedule.next_step_index(dose) is None:
        state, t = _begin_hold(state, now, "top_step")
    else:
        state, t = _goto(state, P.TITRATING, "step")
    return state, cmds + t


def _begin_hold(state: CourseState, now: datetime, cause: str) -> Out:
    state = evolve(state, hold_started_at=state.hold_started_at or now)
    return _goto(state, P.HOLDING, cause)


def _begin_taper(state: CourseState, protocol: ProtocolSpec, now: datetime, source: str, cause: str) -> Out:
    assert state.schedule is not None
    if not state.schedule.taper:
        return _stop(state, protocol, now, source, cause)
    ceiling = pump_rate(state, state.level_mg_per_24h) if state.resolution else Decimal(0)
    state = evolve(state, taper_lock=True, lock_ceiling_rate=min(ceiling, state.commanded_rate) if
                    state.phase in RUNNING else ceiling, taper_started_at=now, taper_index=0)
    state, t = _goto(state, P.TAPERING, cause)
    state, more = _taper_steps(state, protocol, now)
    return state, t + more


def _taper_steps(state: CourseState, protocol: ProtocolSpec, now: datetime) -> Out:
    sch = state.schedule
    assert sch is not None and state.taper_started_at is not None
    cmds: tuple[Command, ...] = ()
    while state.taper_index < len(sch.taper):
        entry = sch.taper[state.taper_index]
        if now < state.taper_started_at + span_hours(entry.after_hours):
            break
        state = evolve(state, taper_index=state.taper_index + 1)
        if entry.dose_mg_per_24h == 0:
            state, more = _stop(state, protocol, now, "schedule", "taper_complete")
            return state, cmds + more
        if entry.dose_mg_per_24h >= state.level_mg_per_24h:
            cmds += (Notice("taper_step_skipped", f"{entry.dose_mg_per_24h} mg/24h is not below the current level"),)
            continue
        state, more = _reduce_to(state, protocol, now, entry.dose_mg_per_24h, "schedule", "taper_step", "taper")
        cmds += more
    return state, cmds


# ---------------------------------------------------------------------------------------------- clinician


def _reduce_to(
    state: CourseState, protocol: ProtocolSpec, now: datetime, dose: Decimal, source: str, reason: str,
    intent: Intent = "reduce",
) -> Out:
    """Lower the level and send the lower rate to a pump that runs: while the course runs, and also in alarm or
    paused when the pump still infuses above it (a decrease must reach the pump, not wait for a resume)."""
    infusing_above = (state.pump_infusing and state.resolution is not None and state.schedule is not None
                      and pump_rate(state, dose) < state.commanded_rate)
    if state.phase in RUNNING or infusing_above:
        state, verdict, cmds = _propose(state, protocol, now, dose, intent, source, reason)
        if isinstance(verdict, Refusal):
            return state, cmds
        return _set_level(state, dose, now), cmds
    return _set_level(state, dose, now), (Notice("level_lowered", f"{dose} mg/24h (applies on resume)"),)


def _on_hold(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, ClinicianCommand)
    return _begin_hold(state, event.at, "clinician_hold")


def _on_escalate(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, ClinicianCommand) and state.schedule is not None
    i = state.schedule.next_step_index(state.level_mg_per_24h)
    if i is None:
        return state, (Refused("clinician", "no_next_step", "already at the schedule's highest step"),)
    dose = state.schedule.steps[i].dose_mg_per_24h
    if event.dose_mg_per_24h is not None and event.dose_mg_per_24h != dose:
        return state, (Refused("clinician", "not_next_step", f"the next step is {dose} mg/24h"),)
    intent: Intent = "start" if state.phase is P.PRIMED else "escalate"
    state, verdict, cmds = _propose(state, protocol, event.at, dose, intent, "clinician", event.reason)
    if isinstance(verdict, Refusal):
        return state, cmds
    if intent == "escalate" and state.phase is P.HOLDING:
        state = evolve(state, hold_started_at=None)
    return _after_step(state, event.at, dose, cmds)


def _on_reduce(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, ClinicianCommand) and state.schedule is not None
    level = state.level_mg_per_24h
    target = event.dose_mg_per_24h
    if target is None:
        lower = [s.dose_mg_per_24h for s in state.schedule.steps if s.dose_mg_per_24h < level]
        if not lower:
            return state, (Refused("clinician", "no_lower_step", "no lower step: give a dose, or stop"),)
        target = lower[-1]
    if target <= 0:
        return state, (Refused("clinician", "use_stop", "reduce to 0 is a stop: use stop"),)
    if target >= level:
        return state, (Refused("clinician", "not_a_reduction", f"{target} is not below {level} mg/24h"),)
    state, cmds = _reduce_to(state, protocol, event.at, target, "clinician", event.reason)
    if state.phase is P.TITRATING and state.level_mg_per_24h == target:
        state, t = _begin_hold(state, event.at, "reduced")
        cmds += t
    return state, cmds


def _on_taper(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, ClinicianCommand)
    return _begin_taper(state, protocol, event.at, "clinician", "clinician_taper")


def _on_stop(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, ClinicianCommand)
    return _stop(state, protocol, event.at, "clinician", "clinician_stop")


def _on_resume(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, ClinicianCommand)
    before = state
    if not state.link_up:
        return state, (Refused("clinician", "link_down", "no link to the pump"),)
    blocking = [a for a in state.pump_alarms if a not in WARNING_ALARMS]
    if blocking:
        refused = Refused("clinician", "alarm_active", f"pump still reports {', '.join(blocking)}")
        if set(blocking) <= {"end_of_syringe"} and state.pending is None:
            # change_syringe is the way on (it acknowledges the pump's end of syringe): what a change does not
            # acknowledge (a lost link that is back) is, else the two refusals lock the course (review 2026-12-03).
            return _acknowledge_but(state, refused)
        return state, (refused,)
    if state.pending is not None:
        return state, (Refused("clinician", "uncertain", "a setpoint is still unverified"),)
    if "unexpected_infusion" in state.alarm_causes and state.pump_infusing:
        return state, (Refused("clinician", "alarm_active", "the pump still infuses on its own"),)
    # The cause alone refuses: it was raised with the reading's counter step, which the state does not keep, and
    # only a syringe change (new fill) ends it (review, 2026-12-03: re-judged at the library's finer step, an
    # empty syringe read on a 0.1 mL display was resumed as a cleared occlusion).
    # The same for the pump's own end of syringe, once it no longer reports it: a syringe swapped at the panel is
    # not verified until a change loads it (review, 2026-12-03: a resume ran the old syringe's rate on it).
    empty = [c for c in state.alarm_causes if c in END_OF_SYRINGE_CAUSES]
    if empty:
        return _acknowledge_but(state, Refused("clinician", "syringe_empty",
                                               "the syringe is empty: change it (change_syringe)"))
    if SYRINGE_MISMATCH in state.alarm_causes:
        return _acknowledge_but(state, Refused(
            "clinician", SYRINGE_MISMATCH, "the pump was set to another syringe bore: its read-backs are not to be "
                                           "trusted; give change_syringe, which loads and verifies the syringe"))
    if COUNTER_DROP in state.alarm_causes:
        return _acknowledge_but(state, Refused("clinician", COUNTER_DROP, "the pump's counter went back without a "
                                                                         "clear driverd ordered: the syringe may "
                                                                         "have been swapped; give change_syringe, "
                                                                         "stating the syringe in the pump, which "
                                                                         "loads and verifies it"))
    change = state.syringe_change
    ranged = RANGE_CAUSES.intersection(state.alarm_causes)
    if ranged and change is None:  # (a change waiting: acknowledged for its load, which checks the range again)
        why = ("the pump cannot run this course (see the alarm): give change_syringe, stating the syringe in the "
               "pump, which loads its bore and checks the pump's range again")
        return _acknowledge_but(state, Refused("clinician", PUMP_RANGE, why) if PUMP_RANGE in ranged
                                else Refused("clinician", PLANNED_RATE, why))
    acked: tuple[Command, ...] = (Notice("alarm_cleared", ", ".join(state.alarm_causes)),) if state.alarm_causes \
        else ()
    if change is not None:
        # Loaded or not, which syringe the pump holds is known only from a verified load. A change asked while the
        # pump infused was once abandoned by a resume ("the old syringe is still in"), but the nurse may have
        # swapped it as told (review, 2026-12-03: 5x the drug from a stronger syringe); change_syringe, stating the
        # syringe in the pump (the old one, if no change is wanted), loads and verifies it.
        return _acknowledge_for_syringe_load(state, change, acked)
    resumed, cmds = _resume(evolve(state, alarm_causes=()), event, protocol)
    if any(isinstance(c, Refused) for c in cmds):
        return before, cmds  # refused: every cause stays active, and a change waits on
    return resumed, acked + cmds


def _acknowledge_but(state: CourseState, refused: Refused) -> Out:
    """A resume refused for a cause only a syringe change ends: the causes a change does not acknowledge are
    acknowledged, as a resume would (the checks before passed: link up, no pump alarm, nothing unverified), the
    others stay and the course stays in alarm. Else a lost link that is back, raised with it, left the course stuck:
    change_syringe acknowledges only SYRINGE_CHANGE_CAUSES ("resolve and resume link_lost first"), resume refused."""
    rest = [c for c in state.alarm_causes if c not in SYRINGE_CHANGE_CAUSES]
    if not rest:
        return state, (refused,)
    kept = tuple(c for c in state.alarm_causes if c in SYRINGE_CHANGE_CAUSES)
    code = state.alarm_code if state.alarm_code in SYRINGE_CHANGE_CAUSES else kept[-1]
    return evolve(state, alarm_causes=kept, alarm_code=code), (Notice("alarm_cleared", ", ".join(rest)), refused)


def _acknowledge_for_syringe_load(state: CourseState, change: SyringeChange, acked: tuple[Command, ...]) -> Out:
    """A resume while a change's new syringe is in the pump but not verified (its load was refused: a counter that
    did not clear, a diameter that did not match; or an alarm came first). Which syringe the pump holds is known
    only from a verified load, so nothing runs: the alarm is acknowledged, the course waits paused (primed before
    it started) with the change, and the resume is refused, saying how to go on. The course resumes on the new
    syringe's verified read-back, which the daemon takes when the course is paused or primed; after a refused
    load, change_syringe again (stating the syringe in the pump) retries it."""
    if change.loaded:
        detail = (f"the new syringe ({change.fill_ml} mL at {change.concentration_mg_per_ml} mg/mL) is not verified: "
                  "the course resumes on its verified read-back; if its load was refused, give change_syringe "
                  "again, stating the syringe that is in the pump")
    else:
        detail = ("a syringe change waits (the pump was infusing when it was asked): once the syringe is in, give "
                  "change_syringe again, stating the syringe that is in the pump (the old one, if no change is "
                  "wanted); the course resumes on its verified read-back")
    refused = Refused("clinician", "syringe_change_waiting", detail)
    if state.phase is not P.ALARM:
        return state, (refused,)
    target = P.PRIMED if state.started_at is None else P.PAUSED
    state, t = _goto(evolve(state, alarm_causes=(), alarm_code=""), target, "alarm_acknowledged")
    return state, (*acked, *t, refused)


def _resume(state: CourseState, event: ClinicianCommand, protocol: ProtocolSpec) -> Out:
    target_phase = state.resume_to or P.HOLDING
    if target_phase is P.PRIMED or state.level_mg_per_24h == 0:
        if state.started_at is None:
            return _goto(evolve(state, alarm_code="", resume_to=None), P.PRIMED, "clinician_resume")
        state = evolve(state, alarm_code="", resume_to=None, hold_started_at=state.hold_started_at or event.at)
        return _goto(state, P.HOLDING, "clinician_resume")
    assert state.schedule is not None
    dose = _resume_dose(state)
    state, verdict, cmds = _propose(state, protocol, event.at, dose, "resume", "clinician", event.reason)
    if isinstance(verdict, Refusal):
        return state, cmds
    # The hold clock starts only when the course holds: a resume during titration must not start it early.
    hold_at = state.hold_started_at or event.at if target_phase is P.HOLDING else state.hold_started_at
    state = evolve(_set_level(state, dose, event.at), alarm_code="", resume_to=None, hold_started_at=hold_at)
    state = _restart_interval_after_long_stop(state, event.at)
    state, t = _goto(state, target_phase, "clinician_resume")
    return state, cmds + t


# ---------------------------------------------------------------------------------------------- syringe change

#: Alarm causes a syringe change deals with (the syringe ran empty): the only alarm a change may acknowledge.
END_OF_SYRINGE_CAUSES = frozenset({"pump_alarm:end_of_syringe", "syringe_empty"})
#: ... and a counter clear at the last syringe load that did not read back 0: a new change_syringe retries the load;
#: and a counter that went back without an ordered clear (the syringe may have been swapped at the panel: a change
#: loads and verifies whichever syringe is in).
SYRINGE_CHANGE_CAUSES = END_OF_SYRINGE_CAUSES | {"counter_not_cleared", "syringe_mismatch", "counter_drop"} | \
    RANGE_CAUSES


def _on_change_syringe(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    """A clinician changes the syringe: stop the pump (a decrease), wait for the new syringe's read-back
    (`SyringeLoaded`). The new fill and concentration are checked here against the library and the signed
    schedule; nothing else of the course changes (level, step-interval clock, hold clock, taper lock)."""
    assert isinstance(event, ClinicianCommand) and state.schedule is not None
    sch = state.schedule
    fill = event.fill_volume_ml
    conc = event.concentration_mg_per_ml if event.concentration_mg_per_ml is not None else state.concentration
    spec = protocol.syringe(sch.syringe_model)
    if fill is None or spec is None or not 0 < fill <= spec.max_fill_ml:
        most = spec.max_fill_ml if spec is not None else 0
        return state, (Refused("clinician", "fill_volume", f"fill {fill} mL: must be > 0 and <= {most} mL "
                                                           f"for {sch.syringe_model}"),)
    if conc not in protocol.concentrations_mg_per_ml:
        return state, (Refused("clinician", "concentration", f"{conc} mg/mL is not in the drug library"),)
    if conc not in sch.approved_concentrations:
        approved = ", ".join(str(c) for c in sorted(sch.approved_concentrations))
        return state, (Refused("clinician", "concentration_not_approved",
                               f"{conc} mg/mL is not approved by the signed schedule ({approved} mg/mL)"),)
    if state.phase is P.ALARM and not set(state.alarm_causes) <= SYRINGE_CHANGE_CAUSES:
        others = ", ".join(c for c in state.alarm_causes if c not in SYRINGE_CHANGE_CAUSES)
        return state, (Refused("clinician", "alarm_active", f"a syringe change acknowledges only an end of "
                                                            f"syringe; resolve and resume {others} first"),)
    if state.pending is not None and not state.pending.is_decrease:
        return state, (Refused("clinician", "uncertain", "a setpoint is still unverified"),)
    # Infusing now means the old syringe is still in: stop, and wait for the command given after the swap.
    loaded = not state.pump_infusing
    change = SyringeChange(fill, conc, event.by, event.reason, event.at, loaded)
    cmds: tuple[Command, ...] = ()
    if state.alarm_causes:
        cmds += (Notice("alarm_cleared", ", ".join(state.alarm_causes) + " (syringe change)"),)
    state = evolve(state, syringe_change=change, alarm_causes=(), alarm_code="")
    cmds += (Notice("syringe_change_started", f"syringe {state.syringe_changes + 2}: {fill} mL at {conc} mg/mL "
                                              f"by {event.by}: {event.reason}" + (
                                                  "" if loaded else "; pump stopped: load the new syringe, then "
                                                                    "give change_syringe again")),)
    if state.commanded_rate > 0 or state.pump_infusing:
        state, _, stop = _propose(state, protocol, event.at, Decimal(0), "stop", "clinician", "syringe_change")
        cmds += stop
    if state.phase in RUNNING:
        state = evolve(state, resume_to=state.phase)
    if state.phase is not P.PRIMED:
        state, t = _goto(state, P.PAUSED, "syringe_change")
        cmds += t
    return state, cmds


def _on_syringe_loaded(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    """The pump's read-back for the new syringe: verify it, carry the accounting over, resume at the same dose
    level with the rate recomputed for the new concentration (quantized down, through the kernel as any resume).
    A refused check leaves the change waiting and the pump stopped; a refused resume leaves the course paused
    with the new syringe in (a clinician resumes)."""
    assert isinstance(event, SyringeLoaded) and state.schedule is not None
    change = state.syringe_change
    sch = state.schedule
    if change is None:
        return state, (Refused("machine", "no_syringe_change", "no syringe change in progress"),)
    if not change.loaded:
        return state, (Refused("machine", "syringe_not_loaded", "the pump was infusing at the change: give "
                                                                "change_syringe again once the new syringe is in"),)
    state = evolve(state, pump_diameter_mm=event.diameter_mm)
    if event.diameter_mm != sch.inner_diameter_mm:
        return state, (Refused("machine", "syringe_mismatch",
                               f"pump reads back {event.diameter_mm} mm; schedule {sch.inner_diameter_mm} mm"),)
    if state.pending is not None:
        return state, (Refused("machine", "uncertain", "the stop is not yet verified"),)
    blocking = [a for a in state.pump_alarms if a not in WARNING_ALARMS]
    if blocking:
        return state, (Refused("machine", "alarm_active", f"pump still reports {', '.join(blocking)}"),)
    if not (event.delivered_ml.is_finite() and event.delivered_ml >= 0):
        # (is_finite first: ordering a NaN raises) A counter that is no count: nothing can be carried over.
        return state, (Refused("machine", "counter_not_cleared",
                               f"the new syringe's counter reads back {event.delivered_ml} mL"),)
    failed = _load_out_of_range(state, event, protocol)
    if failed is not None:
        return failed
    # Accounting: what the old syringe delivered since the last report counts at its concentration; the new
    # syringe's counter is the baseline from here (a pump that resets it on loading loses nothing).
    prev = state.raw_delivered_ml
    raw = event.delivered_ml
    increment = Decimal(0) if prev is None or raw < prev else raw - prev
    state = _count(state, event.at, increment, raw)
    old_conc = state.concentration
    lock = state.lock_ceiling_rate
    state = evolve(state, syringe_concentration=change.concentration_mg_per_ml, syringe_fill_ml=change.fill_ml,
                    syringe_started_ml=state.delivered_ml, syringe_changes=state.syringe_changes + 1,
                    syringe_change=None, empty_warned=False)
    # The resume ceiling (last verified rate) and the taper lock are limits on drug: carried to the new
    # concentration as the same mg/24h, quantized down. Never higher than before.
    state = evolve(state, verified_run_rate=_same_drug(state, state.verified_run_rate, old_conc),
                    lock_ceiling_rate=None if lock is None else _same_drug(state, lock, old_conc))
    done = Notice("syringe_changed", f"syringe {state.syringe_changes + 1}: {change.fill_ml} mL at "
                                     f"{change.concentration_mg_per_ml} mg/mL; course delivered "
                                     f"{state.delivered_mg} mg so far")
    target = state.resume_to
    if target is None or target is P.PRIMED or state.level_mg_per_24h == 0:
        return state, (done,)
    dose = _resume_dose(state)
    state, verdict, cmds = _propose(state, protocol, event.at, dose, "resume", "clinician", "syringe_change")
    if isinstance(verdict, Refusal):
        return state, (done, *cmds)  # stays paused with the new syringe in: a clinician resumes
    # Same level and hold clock; the step interval restarts only after a long stop, as at any resume (a change that
    # waited hours for its syringe leaves the patient unobserved at the level as long as a stop does).
    state = _restart_interval_after_long_stop(evolve(state, alarm_code="", resume_to=None), event.at)
    state, t = _goto(state, target, "syringe_changed")
    return state, (done, *cmds, *t)


def _load_out_of_range(state: CourseState, event: SyringeLoaded, protocol: ProtocolSpec) -> Out | None:
    """The range check again at a syringe load (core/pump_range.py): if it fails the load is refused, the pump stays
    stopped and the course alarms with the change waiting (as for a counter not cleared). None: passed, or not
    reported (an older log)."""
    sch, spec, pump = state.schedule, None, event.pump_range
    if sch is not None:
        spec = protocol.syringe(sch.syringe_model)
    if pump is None or sch is None or state.resolution is None:
        return None
    if spec is None:
        failed: Refused | None = Refused("machine", PUMP_RANGE, f"syringe {sch.syringe_model!r} is not in the drug "
                                                                 "library")
    else:
        failed = _out_of_range(protocol, spec, sch, event.diameter_mm, state.resolution, pump)
    if failed is None:
        return None
    state, raised = _alarm(state, failed.reason, failed.detail)
    return state, (failed, *raised)


#: The daemon cleared the pump's delivered-volume counter (priming a course, loading a syringe) and it did not read
#: back 0: nothing starts or resumes on a counter nobody can trust (docs/safety.md, SUP-15).
COUNTER_NOT_CLEARED = "counter_not_cleared"


def _on_counter_cleared(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    """An ordered clear of the pump's counter and its read-back. What the counter added up to the clear counts (as
    at a syringe load); the clear itself is no delivery and no lost count: the read-back is the next report's
    baseline. A clear that did not read back 0 is an alarm (raised once): before the course runs it stays idle,
    and the channel feeds no `PumpVerified`; at a syringe load the course alarms with the change waiting, and a
    clinician gives change_syringe again (which retries the load) or resumes on the syringe in the pump."""
    assert isinstance(event, CounterCleared)
    if event.before_ml is not None:
        prev = state.raw_delivered_ml
        before = event.before_ml
        state = _count(state, event.at, Decimal(0) if prev is None or before < prev else before - prev, before)
    shown_before = "unread" if event.before_ml is None else f"{event.before_ml} mL"
    if not event.verified:
        if event.after_ml is not None:
            state = evolve(state, raw_delivered_ml=event.after_ml)  # what the counter reads now
        after = "nothing" if event.after_ml is None else f"{event.after_ml} mL"
        why = f" ({event.error})" if event.error else ""
        detail = f"pump's delivered-volume counter not cleared: {shown_before} before, read back {after}{why}"
        waiting = state.syringe_change is not None
        state, raised = _alarm(state, COUNTER_NOT_CLEARED, detail)
        if waiting:  # the syringe load it belongs to is refused, as a refused read-back of the syringe is
            raised += (Refused("machine", COUNTER_NOT_CLEARED, detail),)
        return state, raised
    state = evolve(state, raw_delivered_ml=event.after_ml)
    cmds: tuple[Command, ...] = (Notice("counter_cleared", f"pump's delivered-volume counter cleared "
                                                           f"({shown_before} before); reads back 0"),)
    if COUNTER_NOT_CLEARED in state.alarm_causes and state.phase not in ACTIVE:
        # Before the course runs no drug flowed on the untrusted counter: the cause ends with a verified clear.
        # In a running course the alarm is acknowledged by a clinician, as every cause.
        causes = tuple(c for c in state.alarm_causes if c != COUNTER_NOT_CLEARED)
        code = "" if state.alarm_code == COUNTER_NOT_CLEARED else state.alarm_code
        state = evolve(state, alarm_causes=causes, alarm_code=code)
        cmds += (Notice("alarm_cleared", f"{COUNTER_NOT_CLEARED} (cleared and read back 0)"),)
    return state, cmds


def _same_drug(state: CourseState, rate: Decimal, old_conc: Decimal) -> Decimal:
    """The rate at the syringe now in the pump that delivers at most what `rate` delivered at `old_conc`."""
    if rate == 0 or state.resolution is None:
        return rate
    return quantize_down(dose_to_rate(rate_to_dose(rate, old_conc), state.concentration), state.resolution)


# ---------------------------------------------------------------------------------------------- time faults

#: A resume after an interruption at least this long restarts the step interval (docs/safety.md, "Time").
LONG_STOP = timedelta(hours=2)


def _on_clock_stepped(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    """A wall-clock step: course time did not follow it, but schedule times are absolute and nobody knows which
    reading was right. No start or escalation until a clinician acknowledges; decreases and stop stay allowed."""
    assert isinstance(event, ClockStepped)
    direction = "forward" if event.delta_s > 0 else "backward"
    detail = f"wall clock stepped {direction} by {abs(event.delta_s)} s (wall reads {event.wall_at.isoformat()})"
    # last_refusal reset: an automatic step refused before the step is logged again with the new reason.
    return evolve(state, clock_fault=detail, last_refusal=""), (RaiseAlarm("clock_step", detail),)


def _on_ack_clock(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, ClinicianCommand)
    if not state.clock_fault:
        return state, (Refused("clinician", "no_clock_fault", "no clock step to acknowledge"),)
    return evolve(state, clock_fault=""), (Notice("clock_acknowledged", f"{state.clock_fault}; by {event.by}: "
                                                                         f"{event.reason}"),)


def _track_interruption(before: CourseState, after: CourseState, now: datetime) -> CourseState:
    """Remember when delivery under the course stopped (left a running phase for PAUSED or ALARM)."""
    if after.phase in RUNNING:
        return after if after.interrupted_at is None else evolve(after, interrupted_at=None)
    if before.phase in RUNNING and after.phase in (P.PAUSED, P.ALARM) and after.interrupted_at is None:
        return evolve(after, interrupted_at=now)
    return after


def _resume_dose(state: CourseState) -> Decimal:
    """The dose a resume asks for: the course level if the pump runs it at or below the last verified rate,
    else what that verified rate delivers. Never the quantized dose of an unchanged level: lowering 100 to the
    99.84 its rate delivers would make the next "escalation" back to 100 a change at the same rate."""
    assert state.schedule is not None
    if pump_rate(state, state.level_mg_per_24h) <= state.verified_run_rate:
        return state.level_mg_per_24h
    return rate_to_dose(state.verified_run_rate, state.concentration)


def _restart_interval_after_long_stop(state: CourseState, now: datetime) -> CourseState:
    """After a long stop the patient was not observed at the level for the interval: start it again."""
    if state.interrupted_at is None or now - state.interrupted_at < LONG_STOP:
        return state
    return evolve(state, last_change_at=now)


# ---------------------------------------------------------------------------------------------- pump


#: The fields `_accumulate` sets (all that a quiet report changes: `report_step`).
ACCUMULATED = frozenset({"samples", "last_sample", "raw_delivered_ml", "pump_alarms", "pump_infusing"})


def _accumulate(state: CourseState, event: PumpReport) -> CourseState:
    raw = event.delivered_ml
    prev = state.raw_delivered_ml
    # The pump's counter can reset (power cycle, new syringe, cleared): count only what it added.
    increment = Decimal(0) if prev is None else (raw - prev if raw >= prev else raw)
    samples, sample = _counted(state, event.at, increment)
    # `evolve(state, samples=..., last_sample=..., raw_delivered_ml=..., pump_alarms=..., pump_infusing=...)` with
    # its field names known (once per poll: no keyword dict, no name check): the same copy, the same keys in the
    # same order (tests/core/test_accumulate.py).
    new = _new_object(CourseState)
    d = new.__dict__
    d.update(state.__dict__)
    d["samples"] = samples
    d["last_sample"] = sample
    d["raw_delivered_ml"] = raw
    d["pump_alarms"] = event.alarms
    d["pump_infusing"] = event.state == "infusing"
    return new


_new_object = object.__new__


def _count(state: CourseState, at: datetime, increment: Decimal, raw: Decimal) -> CourseState:
    """Add what the pump's counter added (at the concentration of the syringe in the pump) to the course totals."""
    samples, sample = _counted(state, at, increment)
    return evolve(state, samples=samples, last_sample=sample, raw_delivered_ml=raw)


def _counted(state: CourseState, at: datetime, increment: Decimal) -> tuple[History, Sample]:
    conc = state.concentration if state.schedule is not None else Decimal(0)
    last = state.last_sample
    if last is None:
        sample = Sample(at, Decimal(0) + increment, Decimal(0) + increment * conc)
    else:
        sample = Sample(at, last.delivered_ml + increment, last.delivered_mg + increment * conc)
    samples = state.samples
    newest = samples.newest()
    if newest is None or at - newest.at >= SAMPLE_SPACING:
        # Samples are strictly increasing in time (appended only SAMPLE_SPACING apart): trimmed by bisect, and
        # appended without copying the ~1,440 kept (driverd.core.history).
        samples = samples.push(sample, at - WINDOW - SAMPLE_SPACING)
    return samples, sample


def _on_report(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    """What the pump really does, checked on every report and in every phase: reconcile a setpoint still open,
    stop infusion nobody commanded, record every new pump alarm, watch the 24-h dose and the delivery accuracy."""
    assert isinstance(event, PumpReport)
    unreadable = _unreadable(event)
    if unreadable:
        return _on_unreadable_report(state, protocol, event, unreadable)
    before = state
    state = _accumulate(state, event)
    cmds: tuple[Command, ...] = ()
    new_warnings = sorted(set(event.alarms) & WARNING_ALARMS - set(before.pump_alarms))
    cmds += tuple(Notice(f"pump_warning:{w}", "the pump warns") for w in new_warnings)
    wrong_bore = _wrong_bore(state, event)
    if wrong_bore:
        state, more = _alarm_and_stop(state, protocol, event, SYRINGE_MISMATCH, wrong_bore)
        cmds += more
    # The counter itself (SUP-20, SUP-21): a reading no check can judge, or counts lost. Judged on every report of
    # a live course, before anything may return early (a re-sent decrease, a pump alarm).
    dropped = _counter_drop(before, event)
    if dropped:
        state, more = _alarm_and_stop(state, protocol, event, COUNTER_DROP, dropped)
        cmds += more
    coarse = counter_step_problem(protocol, event.delivered_step_ml) if state.phase in ACTIVE else ""
    if coarse:
        state, more = _alarm_and_stop(state, protocol, event, COUNTER_STEP, coarse)
        cmds += more
    pending = state.pending
    if pending is not None and (pending.uncertain or pending.resend):
        state, more = _check_readback(state, protocol, event.at, _reported_readback(event), from_report=True)
        cmds += more
        if state.pending is not None:
            return state, cmds
        pending = None
    if pending is None:
        unexpected = _unexpected_infusion(state, event)
        if unexpected:
            state, more = _alarm(state, "unexpected_infusion", unexpected)
            state, stop = _stop_in_alarm(state, protocol, event.at, "unexpected_infusion")
            return state, cmds + more + stop
    if state.phase not in ACTIVE:
        return state, cmds
    blocking = sorted(a for a in event.alarms if a not in WARNING_ALARMS)
    fresh = [a for a in blocking if f"pump_alarm:{a}" not in state.alarm_causes or state.phase is not P.ALARM]
    if fresh:
        empty = _syringe_empty(state, protocol, event.delivered_step_ml)
        for a in fresh:  # each pump alarm is its own cause and record, also during another alarm
            if empty and a in _EMPTY_LOOKALIKES:
                # The syringe is used up by the read-backs: that is the cause, whatever the pump calls it (a New Era
                # pump reports a motor stall).
                state, more = _alarm(state, "syringe_empty", f"end of syringe: {empty}; pump reports {a}")
            else:
                state, more = _alarm(state, f"pump_alarm:{a}", f"pump reports {', '.join(blocking)}")
            cmds += more
        return state, cmds
    breach = _ceiling_breach(state, protocol, event) if pending is None else ""
    if breach:
        state, more = _alarm(state, "dose_ceiling", breach)
        state, stop = _stop_in_alarm(state, protocol, event.at, "dose_ceiling")
        return state, cmds + more + stop
    if state.phase not in RUNNING or pending is not None:
        return state, cmds
    if event.state == "infusing" and event.rate_ml_per_h != state.commanded_rate:
        state, more = _alarm(state, "rate_mismatch",
                             f"pump runs {event.rate_ml_per_h} mL/h, commanded {state.commanded_rate}")
        if event.rate_ml_per_h > state.commanded_rate:
            state, stop = _stop_in_alarm(state, protocol, event.at, "over_rate")
            more += stop
        return state, cmds + more
    if event.state != "infusing" and state.commanded_rate > 0:
        state = evolve(state, resume_to=state.phase)
        state, t = _goto(state, P.PAUSED, "stopped_at_pump")
        return state, (*cmds, Notice("stopped_at_pump", f"pump reports {event.state}"), *t)
    state, cmds = _warn_near_empty(state, protocol, event.at, cmds, event.delivered_step_ml)
    return _check_deviation(state, protocol, event.at, cmds, event.delivered_step_ml)


#: The pump reports another syringe bore than the schedule's (set at its panel, or another syringe picked): its
#: rate and counter read-backs are computed with that bore, so they look right while it delivers (d/d')^2 times
#: the drug. Stop, alarm; only a syringe change (which loads and verifies the bore) goes on (docs/safety.md).
SYRINGE_MISMATCH = "syringe_mismatch"


#: A pump report whose rate or counter is not a finite number (NaN, infinity: a driver or pump fault). Nothing in it
#: can be judged, and a refusal that leaves the state as it was would leave a running pump unsupervised for as long
#: as its reports stay so (review, 2026-12-03): in a live course it is doubt, the alarm and a stop.
REPORT_UNREADABLE = "report_unreadable"


def _unreadable(event: PumpReport) -> str:
    """Why the report's rate or counter cannot be read as a number ("" if both can)."""
    bad = [name for name, v in (("rate_ml_per_h", event.rate_ml_per_h), ("delivered_ml", event.delivered_ml))
           if not v.is_finite()]
    return f"pump report's {' and '.join(bad)} not a finite number" if bad else ""


def _on_unreadable_report(state: CourseState, protocol: ProtocolSpec, event: PumpReport, why: str) -> Out:
    """Nothing of the report is taken (not its counter, its alarms or its bore). In a live course: the alarm
    `report_unreadable` and a stop (always allowed), again on every such report of a pump still infusing; outside
    one, refused as an invalid number (nothing runs there)."""
    pending = state.pending
    if pending is not None and pending.is_decrease and event.state == "infusing":
        # A stop or decrease not yet read back and the pump says it infuses (in any phase: a clinician's stop ends
        # the course first): sent again, as a readable report's read-back check does (review, 2026-12-03: else a
        # pump that missed its stop ran on unsupervised).
        state, cmds = _alarm(state, REPORT_UNREADABLE, why)
        state, more = _resend_decrease(state, protocol, event.at, pending, event.rate_ml_per_h, from_report=True)
        return state, cmds + more
    if state.phase not in ACTIVE:
        if event.state == "infusing" and state.schedule is not None:
            # A course that ended, its pump infusing: what a readable report would make of it (unexpected_infusion).
            return _alarm_and_stop(state, protocol, event, "unexpected_infusion", f"pump infuses; {why}")
        return state, (Refused("machine", "invalid_number", why),)
    return _alarm_and_stop(state, protocol, event, REPORT_UNREADABLE, why)


def _alarm_and_stop(state: CourseState, protocol: ProtocolSpec, event: PumpReport, code: str, detail: str) -> Out:
    """Alarm `code` (raised once while active) and stop the pump through the kernel: at once if the course commands
    a rate, and again on a report of the pump infusing with no stop still open (a stop is always allowed)."""
    state, cmds = _alarm(state, code, detail)
    if state.commanded_rate > 0 or (event.state == "infusing" and state.pending is None):
        state, stop = _stop_in_alarm(state, protocol, event.at, code)
        cmds += stop
    return state, cmds


#: The pump's counter reads less than at the last report, and driverd ordered no clear (SUP-21): what the pump
#: delivered between the last count and the drop is lost to the course's totals and the 24-h ceiling.
#: A resume does not acknowledge it: between two polls a nurse may stop the pump, swap the syringe, clear the volume
#: and even run it again, so which syringe is in is known only from a verified load (change_syringe), which it
#: acknowledges (review, 2026-12-03: a resume ran the old syringe's rate on a stronger one).
COUNTER_DROP = "counter_drop"
#: A counter reading whose step is not a positive number or is coarser than the drug library's
#: `max_counter_step_ml` (SUP-20): it would widen every allowance that follows the reading's step without bound,
#: and it under-reads delivery by up to that step.
COUNTER_STEP = "counter_step"


def _counter_drop(before: CourseState, event: PumpReport) -> str:
    """Why this report's counter is an unordered drop ("" if it is not): in a live course, below the last reading
    (`before` is the state before the report). driverd's own clears never show here: `CounterCleared` and
    `SyringeLoaded` re-baseline on their read-back. Only while a syringe change waits (loaded or not) with the pump
    stopped now, and stopped at the last report or its stop verified since (the channel reads the pump just before
    every change command, so nothing went uncounted), is a lower reading no alarm: the nurse may clear the counter
    at the panel while swapping (as told), a loaded change's load clears it (a crash between that clear and its
    logged outcome must not alarm at the restart), and the change's verified load is what the course goes on from:
    a resume cannot skip it (`_on_resume`). Not across a lost link not yet acknowledged: the pump may have run
    at its panel meanwhile, and those counts must not go uncounted (review, 2026-12-03)."""
    prev = before.raw_delivered_ml
    if prev is None or before.phase not in ACTIVE or not event.delivered_ml < prev:
        return ""
    change = before.syringe_change
    if change is not None and event.state != "infusing" and "link_lost" not in before.alarm_causes and (
            not before.pump_infusing or (before.commanded_rate == 0 and before.pending is None)):
        return ""  # a swap (loaded or not) on a stopped pump: the change's verified load re-baselines
    return (f"pump's delivered-volume counter went back from {prev} mL to {event.delivered_ml} mL without a clear "
            "ordered by driverd: what it delivered before the drop may not be counted")


def counter_step_problem(protocol: ProtocolSpec, step: Decimal | None) -> str:
    """Why a reading's counter step cannot be used ("" if it can): None (not known: the library's is assumed) and
    positive steps up to the library's `max_counter_step_ml` can. `counter_resolution` never widens an allowance
    with a step this rejects."""
    if step is None or (step.is_finite() and 0 < step <= protocol.max_counter_step_ml):
        return ""  # (is_finite first: ordering a NaN raises)
    return (f"counter reading's step is {step} mL, not a positive number up to {protocol.max_counter_step_ml} mL "
            "(drug library): the delivered volume cannot be judged on it")


def _wrong_bore(state: CourseState, event: PumpReport) -> str:
    bore = event.diameter_mm
    sch = state.schedule
    if bore is None or sch is None or state.phase not in ACTIVE or (bore.is_finite() and bore == sch.inner_diameter_mm):
        return ""  # (is_finite first: comparing a signalling NaN raises)
    if _bore_change_waiting(state, event):
        return ""  # what the waiting syringe change deals with: not raised again
    return f"pump is set to a {bore} mm syringe; the schedule's is {sch.inner_diameter_mm} mm ({sch.syringe_model})"


def _bore_change_waiting(state: CourseState, event: PumpReport) -> bool:
    """A syringe change waits (paused or primed) with the pump stopped and nothing commanded: its load sets the
    schedule's bore and verifies it before anything runs, so another bore now (picked in the pump's menu with the
    new syringe, or the one a syringe_mismatch alarm was raised for) is what the change deals with, not a new alarm;
    raised again it also held the load back (the channel loads only paused or primed). A resume stays refused until
    the load (`_on_resume`). A pump that infuses, a rate commanded, or a bore that is not a number: alarm, stop."""
    if state.syringe_change is None:
        return False
    bore = event.diameter_mm
    return state.phase in (P.PAUSED, P.PRIMED) and state.commanded_rate == 0 and event.state != "infusing" \
        and bore is not None and bore.is_finite() and bore > 0


def predicted_empty_at(state: CourseState) -> datetime | None:
    """When the syringe in the pump runs empty at the commanded rate, from its remaining volume by the pump's
    read-backs (rounded down to the microsecond: never later than it will). None when nothing runs."""
    if state.schedule is None or state.commanded_rate <= 0 or state.last_sample is None:
        return None
    hours = state.remaining_ml / state.commanded_rate
    return state.last_sample.at + timedelta(microseconds=int(hours * 3_600_000_000))


def _warn_near_empty(state: CourseState, protocol: ProtocolSpec, now: datetime, cmds: tuple[Command, ...],
                     step: Decimal | None = None) -> Out:
    """Once per syringe: a warning `syringe_warning_minutes` before it is predicted to run empty. A reading coarser
    than the library's counter step (`step`) may under-read what was used by up to that step: the warning comes
    earlier by the time the excess takes at the commanded rate (with a 0.1 mL display at 0.04 mL/h, over 2 h),
    so it still comes before the syringe really runs empty."""
    if state.empty_warned:
        return state, cmds
    empty_at = predicted_empty_at(state)
    if empty_at is None or now < empty_at - span_minutes(protocol.syringe_warning_minutes) \
            - _coarse_reading_time(protocol, step, state.commanded_rate):
        return state, cmds
    detail = (f"syringe {state.syringe_changes + 1} predicted empty at {empty_at.isoformat()}: "
              f"{state.remaining_ml:.3f} mL left at {state.commanded_rate} mL/h")
    return evolve(state, empty_warned=True), (*cmds, Notice("syringe_near_empty", detail))


def _coarse_reading_time(protocol: ProtocolSpec, step: Decimal | None, rate: Decimal) -> timedelta:
    """How long the commanded rate takes to deliver what a reading's step adds over the library's (0 when the
    reading is no coarser: the warning's margin already covers the library's step)."""
    excess = counter_resolution(protocol, step) - protocol.counter_resolution_ml
    if excess <= 0 or rate <= 0:
        return timedelta(0)
    return timedelta(microseconds=int(excess / rate * 3_600_000_000) + 1)


#: Phases in which the course commands no infusion at all: a pump infusing there does so on its own.
_NO_INFUSION = frozenset({P.IDLE, P.PRIMED, P.PAUSED, P.STOPPED})


#: Pump alarms an empty syringe shows as (New Era: a motor stall at the plunger's end).
_EMPTY_LOOKALIKES = frozenset({"end_of_syringe", "occlusion"})


def _syringe_empty(state: CourseState, protocol: ProtocolSpec, step: Decimal | None = None) -> str:
    """Why the syringe in the pump counts as empty by the read-backs ("" if it does not): what it delivered is
    within two counter steps of its fill (`step`: the last reading's, if known; never finer than the library's)."""
    if state.schedule is None:
        return ""
    used = state.delivered_ml - state.syringe_started_ml
    if state.fill_ml - used > 2 * counter_resolution(protocol, step):
        return ""
    return f"{used} mL of the {state.fill_ml} mL fill delivered"


def _unexpected_infusion(state: CourseState, event: PumpReport) -> str:
    """Why this report shows infusion the course did not command ("" if it does not): RUN pressed at the panel,
    an old rate left running, a restart at the panel while paused, or running above the commanded rate in alarm."""
    if event.state != "infusing":
        return ""
    rate = event.rate_ml_per_h
    if state.phase in _NO_INFUSION:
        return f"pump infuses {rate} mL/h while the course is {state.phase.value} (nothing commanded)"
    if state.phase is P.ALARM and (state.commanded_rate == 0 or rate > state.commanded_rate):
        return f"pump infuses {rate} mL/h in alarm; commanded {state.commanded_rate} mL/h"
    return ""


def _ceiling_breach(state: CourseState, protocol: ProtocolSpec, event: PumpReport) -> str:
    """The drug-library ceiling, watched on what the pump delivers (its read-backs), not only on what is
    proposed: the 24-h window ending now, and ending an hour from now at the rate the pump reports."""
    sch = state.schedule
    if sch is None or event.state != "infusing":
        return ""
    now = event.at
    conc = state.concentration
    # The counter's display step, read twice (start and end of the window), is the only slack allowed: the
    # reading's own step when it is coarser than the library's (`counter_resolution`), as the accuracy check.
    limit = protocol.ceiling_mg_per_24h + 2 * counter_resolution(protocol, event.delivered_step_ml) * conc
    lookahead = event.rate_ml_per_h * conc * hours_between(now, now + CEILING_LOOKAHEAD)
    cum_now = cumulative_drug(state, now)
    if _surely_within(state, now, cum_now, lookahead, limit):
        return ""
    # In mg: a window can span syringes of different concentration (each volume counted at its own).
    # window_drug(start, end) is cumulative(end) - cumulative(start): the window's start is computed once.
    start = cumulative_drug(state, now - WINDOW)
    past = cum_now - start
    ahead = past - (cumulative_drug(state, now - WINDOW + CEILING_LOOKAHEAD) - start) + lookahead
    worst = max(past, ahead)
    if worst <= limit:
        return ""
    return (f"{worst:.3f} mg in a 24-h window at the delivered rate, above the ceiling "
            f"{protocol.ceiling_mg_per_24h} mg/24h")


#: Below this magnitude every rounding in the ceiling check is far below _SLACK (28-34 significant digits).
_BOUNDED = Decimal("1E12")
_SLACK = Decimal("1E-6")


def _surely_within(state: CourseState, now: datetime, cum_now: Decimal, lookahead: Decimal, limit: Decimal) -> bool:
    """True only if the exact check of `_ceiling_breach` cannot find a breach, decided without interpolating.

    A cumulative value between two kept samples is interpolated linearly, so it lies between their values
    (`cumulative_drug_bounds`; the roundings of the interpolation move it by far less than _SLACK at these
    magnitudes). past = now - start <= cum_now - low(start); ahead = cum_now - at(start + 1 h) + lookahead, with
    the window's start cancelling, <= cum_now - low(start + 1 h) + lookahead. If both bounds plus _SLACK are
    within the limit, so is the exact maximum; otherwise the exact check decides. It is the common case: a
    window holding less than the ceiling by more than one sample's delivery."""
    low0 = cumulative_drug_bounds(state, now - WINDOW)[0]
    low1 = cumulative_drug_bounds(state, now - WINDOW + CEILING_LOOKAHEAD)[0]
    b = _BOUNDED
    if not (-b < cum_now < b and -b < low0 < b and -b < low1 < b and -b < lookahead < b and -b < limit < b):
        return False
    return cum_now - low0 + _SLACK <= limit and cum_now - low1 + lookahead + _SLACK <= limit


def _reported_readback(event: PumpReport) -> Decimal:
    """What a report tells about an uncertain setpoint: the rate the pump delivers. A stopped pump keeps its
    programmed rate, but a rate it does not run was never delivered: counting it as verified would raise the
    ceiling a clinician may resume to."""
    return event.rate_ml_per_h if event.state == "infusing" else Decimal(0)


def counter_resolution(protocol: ProtocolSpec, step: Decimal | None) -> Decimal:
    """The counter step the accuracy check allows for: the drug library's `counter_resolution_ml`, or the reading's
    own step when the driver reports a coarser one (a 4-digit display above 100 mL reads in 0.1 mL steps). Never
    finer than the library's: with a fine counter the check is exactly as strict as the library says."""
    res = protocol.counter_resolution_ml
    if counter_step_problem(protocol, step) or step is None:
        # Doubt (NaN, infinite, not positive, coarser than the library's max_counter_step_ml): the library's step,
        # the strictest; such a reading is the alarm `counter_step` in a live course (SUP-20).
        return res
    return step if step > res else res


def _check_deviation(state: CourseState, protocol: ProtocolSpec, now: datetime, cmds: tuple[Command, ...],
                     step: Decimal | None = None) -> Out:
    """Delivered vs commanded volume over a sliding window (GIP 1.2.2-1.2.3): a fault that starts after days of
    correct running is caught within about one window, not diluted by the whole run. The window never reaches
    back before the first report at the current verified rate (`deviation_base`). A difference within two steps
    of the counter reading (`counter_resolution`: each end of the window is truncated by less than one step) is
    never a deviation: a coarse display must not raise a false under_infusion."""
    base = state.deviation_base
    if base is None or state.commanded_rate == 0:
        if state.commanded_rate > 0 and state.last_sample is not None:
            state = evolve(state, deviation_base=state.last_sample)
        return state, cmds
    # At least the configured window; at low rates up to the stretched one, so small faults show above the
    # counter's step while a large one is caught as soon as the configured window has passed.
    if now - base.at < span_minutes(protocol.deviation_window_minutes):
        return state, cmds
    resolution = counter_resolution(protocol, step)
    start = _sample_before(state, now - _deviation_window(protocol, state.commanded_rate, resolution))
    if start is None or start.at < base.at:
        start = base
    expected = state.commanded_rate * hours_between(start.at, now)
    actual = state.delivered_ml - start.delivered_ml
    if abs(actual - expected) <= max(expected * protocol.deviation_limit, 2 * resolution):
        return state, cmds
    code = "over_infusion" if actual > expected else "under_infusion"
    detail = f"delivered {actual} mL vs expected {expected:.4f} mL over {now - start.at}"
    state, more = _alarm(state, code, detail)
    if code == "over_infusion":
        state, stop = _stop_in_alarm(state, protocol, now, code)
        more += stop
    return state, cmds + more


def _deviation_window(protocol: ProtocolSpec, rate: Decimal, resolution: Decimal | None = None) -> timedelta:
    """The configured window, stretched at low rates until the counter's display step (read at both ends) is at
    most `deviation_limit` of the expected volume: then a correct pump never alarms and a fault twice the limit
    always does. At 0.416 mL/h with a 0.01 mL step and 10 % that is 29 min instead of 15. `resolution`: the step
    allowed for (`counter_resolution`); None is the drug library's."""
    return _stretched_window(protocol.deviation_window_minutes,
                             protocol.counter_resolution_ml if resolution is None else resolution,
                             protocol.deviation_limit, rate)


@lru_cache(maxsize=1024)
def _stretched_window(minutes: Decimal, resolution: Decimal, limit: Decimal, rate: Decimal) -> timedelta:
    """_deviation_window's arithmetic, cached: it depends only on these (the rate changes with setpoints only)."""
    configured = span_minutes(minutes)
    needed_h = 2 * resolution / (limit * rate)
    return max(configured, timedelta(microseconds=int(needed_h * 3_600_000_000)))


def _sample_before(state: CourseState, at: datetime) -> Sample | None:
    """The newest kept sample at or before `at` (bisect: the history holds up to ~1,440 samples)."""
    return state.samples.at_or_before(at)


def _stop_in_alarm(state: CourseState, protocol: ProtocolSpec, now: datetime, reason: str) -> Out:
    """Stop the pump but keep the course (in alarm) so a clinician can decide; the rate is never raised."""
    state, _, cmds = _propose(state, protocol, now, Decimal(0), "stop", "machine", reason)
    return state, cmds


def _on_result(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, SetpointResult)
    pending = state.pending
    if pending is None or pending.setpoint.id != event.setpoint_id:
        return state, (Notice("stale_result", f"result for setpoint {event.setpoint_id} not pending"),)
    if event.readback_ml_per_h is None or not event.readback_ml_per_h.is_finite():
        # No read-back, or none that is a number (NaN, infinity): the setpoint is uncertain, never taken as applied.
        state = evolve(state, pending=replace(pending, uncertain=True))
        return state, (Notice("setpoint_uncertain", f"setpoint {event.setpoint_id} unacknowledged: {event.error}"),)
    return _check_readback(state, protocol, event.at, event.readback_ml_per_h)


def _check_readback(
    state: CourseState, protocol: ProtocolSpec, now: datetime, readback: Decimal, *, from_report: bool = False
) -> Out:
    pending = state.pending
    assert pending is not None
    sp = pending.setpoint
    if readback == sp.rate_ml_per_h:
        state = evolve(
            state,
            pending=None,
            verified_rate=readback,
            verified_run_rate=readback if readback > 0 else state.verified_run_rate,
            deviation_base=None,
        )
        return state, ()
    if pending.is_decrease and readback > sp.rate_ml_per_h:
        return _resend_decrease(state, protocol, now, pending, readback, from_report)
    if state.phase is P.ALARM:
        # Reconciling after a fault: the pump did not take it. Never re-send (that could raise the rate in alarm).
        state = evolve(state, pending=None)
        return state, (Notice("setpoint_not_applied", f"pump holds {readback} mL/h, not {sp.rate_ml_per_h}"),)
    if pending.attempts == 1 and state.link_up:
        state = evolve(state, pending=Pending(sp, attempts=2))
        return state, (Notice("readback_retry", f"read back {readback}, sent {sp.rate_ml_per_h}"),
                       ApplySetpoint(sp, attempt=2))
    state = evolve(state, pending=None)
    state, cmds = _alarm(state, "readback_mismatch", f"read back {readback} mL/h, sent {sp.rate_ml_per_h}")
    if readback > sp.rate_ml_per_h and not sp.is_stop:
        state, stop = _stop_in_alarm(state, protocol, now, "readback_over")
        cmds += stop
    return state, cmds


def _resend_decrease(state: CourseState, protocol: ProtocolSpec, now: datetime, pending: Pending, readback: Decimal,
                     from_report: bool) -> Out:
    """A decrease or stop the pump has not taken (it still delivers more): it stays pending and is sent again,
    at once after the first miss and then once per pump report, until a read-back shows it. It is never dropped:
    giving up on a stop would leave the pump running. After the second miss the course alarms (once), and a
    decrease that is not a stop becomes a stop: a pump that refuses a lower rate (a New Era infusing in other rate
    units answers a RAT in mL/h with ?NA) would otherwise run on above it for as long as it is re-sent (review
    finding, 2026-12-03), and a stop is a command every pump takes (STP)."""
    sp = pending.setpoint
    cmds: tuple[Command, ...] = ()
    if pending.attempts >= 2:
        state, cmds = _alarm(state, "readback_mismatch",
                             f"pump still delivers {readback} mL/h; {sp.rate_ml_per_h} sent {pending.attempts} times")
        if not sp.is_stop:
            state, stop = _stop_in_alarm(evolve(state, pending=None), protocol, now, "decrease_not_taken")
            return state, cmds + stop
    if pending.attempts == 1 or from_report:
        attempt = pending.attempts + 1
        state = evolve(state, pending=Pending(sp, attempts=attempt, resend=True))
        return state, (*cmds, Notice("readback_retry", f"read back {readback}, sent {sp.rate_ml_per_h}"),
                       ApplySetpoint(sp, attempt=attempt))
    # Straight after a failed re-send: wait for the next report rather than loop on the wire.
    return evolve(state, pending=Pending(sp, attempts=pending.attempts, resend=True)), cmds


def _on_link_lost(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, LinkLost)
    pending = state.pending
    state = evolve(state, link_up=False, pending=replace(pending, uncertain=True) if pending else None)
    if state.phase in ACTIVE:
        return _alarm(state, "link_lost", event.detail)
    return state, (Notice("link_lost", event.detail),)


def _on_link_restored(state: CourseState, event: Event, protocol: ProtocolSpec) -> Out:
    assert isinstance(event, LinkRestored)
    # (The link is up already at the first contact after a daemon start and on a transport reopened within the link
    # timeout: no outage for a clinician to resume.)
    note = "pump answers again; clinician must resume" if not state.link_up else "pump answers on a new connection"
    state, cmds = evolve(state, link_up=True), (Notice("link_restored", note),)
    if event.pump_range is None or event.diameter_mm is None:
        return state, cmds  # no primed course, or a log from before the check (replayed as it was decided)
    return _reconnect_range(state, event.diameter_mm, event.pump_range, protocol, event.at, cmds)


def _reconnect_range(state: CourseState, diameter: Decimal, pump: PumpRange, protocol: ProtocolSpec, now: datetime,
                     cmds: tuple[Command, ...]) -> Out:
    """SUP-19 at a reconnect: the pump answering may be another pump, or reconfigured, since the course was checked.
    A live course whose pump cannot run it alarms (the range cause), the pump is stopped, and a resume is refused
    while the cause stands (`_on_resume`); change_syringe retries (it loads the bore and checks the range again)."""
    sch = state.schedule
    if sch is None or state.phase not in ACTIVE or state.resolution is None:
        return state, cmds
    spec = protocol.syringe(sch.syringe_model)
    if spec is None:
        failed: Refused | None = Refused("machine", PUMP_RANGE, f"syringe {sch.syringe_model!r} is not in the drug "
                                                                 "library")
    else:
        failed = _out_of_range(protocol, spec, sch, diameter, state.resolution, pump)
    if failed is None:
        assert spec is not None
        state, checked = _range_checked(state, spec, diameter, pump, protocol)
        return state, cmds + checked
    state, raised = _alarm(state, failed.reason, failed.detail)
    cmds += (failed, *raised)
    if state.commanded_rate > 0 or state.pump_infusing:
        state, stop = _stop_in_alarm(state, protocol, now, failed.reason)
        cmds += stop
    return state, cmds


# ---------------------------------------------------------------------------------------------- the table

_LIVE = frozenset({P.PRIMED, P.TITRATING, P.HOLDING, P.TAPERING, P.PAUSED, P.ALARM})

#: event kind -> (phases that accept it, handler). Everything not listed is an IllegalTransition.
TRANSITIONS: dict[type | str, tuple[frozenset[Phase], Handler]] = {
    ScheduleAccepted: (_ALL, _on_schedule),
    PumpVerified: (frozenset({P.IDLE, P.PRIMED}), _on_verified),
    Tick: (_ALL, _on_tick),
    PumpReport: (_ALL, _on_report),
    SetpointResult: (_ALL, _on_result),
    LinkLost: (_ALL, _on_link_lost),
    LinkRestored: (_ALL, _on_link_restored),
    "clinician:hold": (frozenset({P.TITRATING}), _on_hold),
    "clinician:escalate": (frozenset({P.PRIMED, P.TITRATING, P.HOLDING}), _on_escalate),
    "clinician:reduce": (frozenset({P.TITRATING, P.HOLDING, P.TAPERING, P.PAUSED, P.ALARM}), _on_reduce),
    "clinician:taper": (frozenset({P.TITRATING, P.HOLDING}), _on_taper),
    "clinician:stop": (_LIVE, _on_stop),
    "clinician:resume": (frozenset({P.PAUSED, P.ALARM}), _on_resume),
    ClockStepped: (_ALL, _on_clock_stepped),
    "clinician:ack_clock": (_ALL, _on_ack_clock),
    "clinician:change_syringe": (frozenset({P.PRIMED, P.TITRATING, P.HOLDING, P.TAPERING, P.PAUSED, P.ALARM}),
                                 _on_change_syringe),
    SyringeLoaded: (frozenset({P.PRIMED, P.PAUSED}), _on_syringe_loaded),
    CounterCleared: (_ALL, _on_counter_cleared),
}


# ---------------------------------------------------------------------------------------------- the quiet report
#
# Issue 12 (replay at 100,000 records/s): nearly every pump report of a running course changes nothing but the
# counters. `_quiet_report` decides that case in one function, with per-protocol and per-rate constants cached,
# and hands every other case to the general path (`_on_report` through the transition table). It never decides
# anything the general path would decide otherwise: it returns a state only when each check of the general path,
# run on the same inputs, provably produces no command and changes nothing but what `_accumulate` changes, and
# then that state is `_accumulate`'s own result. Any doubt (a bound that does not decide, a number out of range,
# an exception) returns None, and the general path decides from the original state. Proved against the verbatim
# old core (tests/core/test_oracle_equivalence.py) and against the general path alone (tests/core/test_quiet_report.py).

#: Identity caches: keyed by id() of immutable objects that the entry holds (so an id cannot be reused while the
#: entry lives). The core runs in the default decimal context (nothing in driverd changes it), so a value computed
#: once is the value the same expression gives on every report.
_CAPS: dict[tuple[int, int, int], tuple[object, object, object, tuple[datetime, datetime] | None]] = {}
_LIMITS: dict[tuple[int, int, int], tuple[object, object, object, _QuietLimits]] = {}
_CACHE_MAX = 4096
_ZERO = Decimal(0)


class _QuietLimits:
    """What the quiet report's checks need for one (protocol, concentration, commanded rate)."""

    __slots__ = ("bounded", "deviation_min", "deviation_window", "limit", "lookahead", "two_steps_ml", "warn_us")

    def __init__(self, protocol: ProtocolSpec, conc: Decimal, rate: Decimal) -> None:
        # _ceiling_breach's limit; its lookahead is event.rate * conc * (1 h in hours): the quiet report requires
        # event.rate == rate (by value), and a product's value does not depend on its factors' exponents.
        self.limit = protocol.ceiling_mg_per_24h + 2 * protocol.counter_resolution_ml * conc
        self.lookahead = rate * conc * hours_in(CEILING_LOOKAHEAD)
        # _warn_near_empty warns iff now >= last.at + timedelta(us=int(x)) - W with last.at == now, i.e. iff
        # int(x) <= W in microseconds; x >= W + 1 proves it does not.
        w = span_minutes(protocol.syringe_warning_minutes)
        self.warn_us = (w.days * 86_400 + w.seconds) * 1_000_000 + w.microseconds
        self.deviation_min = span_minutes(protocol.deviation_window_minutes)
        self.deviation_window = _deviation_window(protocol, rate)
        self.two_steps_ml = 2 * protocol.counter_resolution_ml
        # The part of the ceiling's bound (_surely_within's range checks) that depends on these constants only.
        self.bounded = -_BOUNDED < self.limit < _BOUNDED and -_BOUNDED < self.lookahead < _BOUNDED


class _LastCourse:
    """The inputs of the quiet report's two caches last seen (their very objects) and what the caches gave: a
    course reporting again and again (one pump, or replay of one course) is answered without building the caches'
    keys. Any of the five objects replaced (a restart of the course, a new schedule, a syringe of another
    concentration, a new rate, another protocol) goes to the caches."""

    __slots__ = ("conc", "limits", "protocol", "rate", "schedule", "started", "syringe_conc", "times")

    def __init__(self) -> None:
        self.started: object = _NOTHING
        self.schedule: object = _NOTHING
        self.protocol: object = _NOTHING
        self.syringe_conc: object = _NOTHING
        self.rate: object = _NOTHING
        self.times: tuple[datetime, datetime] | None = None
        self.conc = _ZERO
        self.limits: _QuietLimits | None = None


_NOTHING = object()  # no course seen yet: no field of a state is this object


def _quiet_limits(protocol: ProtocolSpec, conc: Decimal, rate: Decimal) -> _QuietLimits:
    key = (id(protocol), id(conc), id(rate))
    hit = _LIMITS.get(key)
    if hit is not None and hit[0] is protocol and hit[1] is conc and hit[2] is rate:
        return hit[3]
    limits = _QuietLimits(protocol, conc, rate)
    if len(_LIMITS) >= _CACHE_MAX:
        _LIMITS.clear()
    _LIMITS[key] = (protocol, conc, rate, limits)
    return limits


def _cached_cap_times(state: CourseState, protocol: ProtocolSpec) -> tuple[datetime, datetime] | None:
    started, sch = state.started_at, state.schedule
    key = (id(started), id(sch), id(protocol))
    hit = _CAPS.get(key)
    if hit is not None and hit[0] is started and hit[1] is sch and hit[2] is protocol:
        return hit[3]
    times = _cap_times(state, protocol)
    if len(_CAPS) >= _CACHE_MAX:
        _CAPS.clear()
    _CAPS[key] = (started, sch, protocol, times)
    return times


#: |x| below this many microseconds (about 317 years) and a report dated before year 9000: no datetime arithmetic
#: of the checks can overflow.
_FAR_US = Decimal(10) ** 16
_LAST = _LastCourse()


def _warnings_seen(alarms: tuple[str, ...], before: tuple[str, ...]) -> bool:
    """Every alarm of the report is a warning the previous report already showed: no new warning notice, no
    blocking pump alarm (`_on_report` acts on nothing else of a report's alarms)."""
    return all(a in WARNING_ALARMS and a in before for a in alarms)


def _quiet_report(state: CourseState, event: PumpReport, protocol: ProtocolSpec) -> CourseState | None:
    """The state after a pump report that provably yields no command, or None (the general path decides).

    The general path for a report in a running phase, with nothing pending, the pump infusing at the commanded
    rate and no pump alarm other than warnings the previous report showed already, runs: the course cap
    (`_enforce_cap`), `_accumulate`, no new warning and no blocking alarm, the bore, the counter (no drop, a step
    within the library's: `_counter_drop`, `counter_step_problem`), no read-back (nothing pending), no
    unexpected infusion (a running phase), the ceiling (`_ceiling_breach`), no rate mismatch, `_warn_near_empty`,
    `_check_deviation` (with a deviation base), then `_track_interruption` and `_track_commanded`, which return the
    state as it is when it is running and `commanded_since` is set (the rate and the phase did not change). Each
    check is repeated here with the same operands, or decided by a bound that implies its answer."""
    if not (event.rate_ml_per_h.is_finite() and event.delivered_ml.is_finite()):
        return None  # an unreadable report (sNaN would even raise in a comparison): the general path alarms
    phase = state.phase
    rate = state.commanded_rate
    if event.alarms and not _warnings_seen(event.alarms, state.pump_alarms):
        return None
    if _wrong_bore(state, event) or (
            phase not in RUNNING or state.pending is not None or event.state != "infusing"
            or state.deviation_base is None or state.interrupted_at is not None
            or state.commanded_since is None or state.summary_due or state.schedule is None
            or event.rate_ml_per_h != rate or not rate > 0):
        return None
    now = event.at
    if not 1 < now.year < 9000:
        return None
    try:
        step = event.delivered_step_ml  # compared inside the try: a NaN step is doubt, not a refused report
        if step is not None and not _ZERO < step <= protocol.counter_resolution_ml:
            return None  # a coarse counter reading (the general path widens the checks for it) or doubt (an alarm)
        prev = state.raw_delivered_ml
        if prev is not None and event.delivered_ml < prev:
            return None  # the counter went back: the general path alarms (counter_drop)
        m = _LAST
        # The caches' inputs the very objects of the last report seen: _cap_times reads started_at, schedule and
        # protocol; the concentration is syringe_concentration, else the schedule's; _quiet_limits (protocol,
        # concentration, rate). _accumulate changes none of them.
        same = (m.started is state.started_at and m.schedule is state.schedule and m.protocol is protocol
                and m.syringe_conc is state.syringe_concentration and m.rate is rate)
        times = m.times if same else _cached_cap_times(state, protocol)
        if times is not None and (now >= times[1] or (now >= times[0] and phase is not P.TAPERING)):
            return None  # the cap stops or tapers the course
        new = _accumulate(state, event)
        if same and m.limits is not None:
            conc, q = m.conc, m.limits
        else:
            conc = new.concentration
            q = _quiet_limits(protocol, conc, rate)
            m.started, m.schedule, m.protocol, m.syringe_conc, m.rate = (state.started_at, state.schedule, protocol,
                                                                         state.syringe_concentration, rate)
            m.times, m.conc, m.limits = times, conc, q
        last = new.last_sample
        assert last is not None and last.at == now
        # The ceiling: _surely_within's bound, else the exact check itself.
        cum_now = last.delivered_mg
        t0 = now - WINDOW
        low0 = cumulative_drug_bounds(new, t0)[0]
        low1 = cumulative_drug_bounds(new, t0 + CEILING_LOOKAHEAD)[0]
        b, limit, lookahead = _BOUNDED, q.limit, q.lookahead
        surely_within = (-b < cum_now < b and -b < low0 < b and -b < low1 < b and q.bounded
                         and cum_now - low0 + _SLACK <= limit and cum_now - low1 + lookahead + _SLACK <= limit)
        if not surely_within and _ceiling_breach(new, protocol, event):
            return None
        # Near empty (once per syringe): predicted_empty_at's arithmetic, compared in microseconds.
        if not new.empty_warned:
            # CourseState.remaining_ml without its three properties: max(fill - (delivered - started), 0).
            fill = new.syringe_fill_ml
            if fill is None:
                fill = state.schedule.fill_volume_ml  # new's schedule is state's (not None: checked above)
            remaining = fill - (last.delivered_ml - new.syringe_started_ml)
            if remaining < _ZERO:  # max(remaining, Decimal(0)), as the property
                remaining = _ZERO
            x = (remaining / rate) * 3_600_000_000
            if not q.warn_us + 1 <= x < _FAR_US:
                return None
        # Delivery accuracy: _check_deviation's arithmetic, its window constants cached.
        base = new.deviation_base
        assert base is not None
        if now - base.at < q.deviation_min:
            return new
        start = new.samples.at_or_before(now - q.deviation_window)
        if start is None or start.at < base.at:
            start = base
        expected = rate * hours_between(start.at, now)
        actual = last.delivered_ml - start.delivered_ml
        if abs(actual - expected) <= max(expected * protocol.deviation_limit, q.two_steps_ml):
            return new
        return None
    except ArithmeticError:
        return None


# ---------------------------------------------------------------------------------------------- the quiet tick
#
# Issue 12 (a 1-s poll in virtual time): the channel steps the core with a tick after every poll, and nearly every
# tick of a running course decides nothing. The general path's tick acts only from an instant that depends on a
# few fields of the state: the course cap and its taper (`_enforce_cap`), the next step's time (titrating), the end
# of the hold (holding), the next taper entry (tapering). `_tick_due` computes that instant with the general path's
# own operations; `_quiet_tick` says the tick changes nothing when it comes earlier, and the rest of the general
# path (`_track_interruption`, `_track_commanded`) returns the state as it is. Cached per pump, for the inputs
# `_tick_due` reads. Proved against the general path on generated courses and at each instant's edge
# (tests/core/test_quiet_tick.py) and against the old core (tests/core/test_oracle_equivalence.py).

_NEVER = datetime.max.replace(tzinfo=UTC)  # later than any tick: nothing of this kind is ever due
#: pump_id -> (the inputs `_tick_due` read, its answer). Compared by `==` (identical objects short-cut): equal
#: inputs give the same answer, which comes from comparisons and sums of their values only.
_TICKS: dict[str, tuple[tuple[object, ...], datetime | None]] = {}


def _tick_due(state: CourseState, protocol: ProtocolSpec) -> datetime | None:
    """The earliest tick time at which the general path's tick may act on a running course (`_NEVER`: no such
    time), or None: it may act at any time, or the quiet tick does not decide this state."""
    phase, sch = state.phase, state.schedule
    if phase not in RUNNING or sch is None:
        return None
    times = _cap_times(state, protocol)
    due = _NEVER
    if times is not None:  # _enforce_cap: stop at the cap; taper from taper_at while titrating or holding
        taper_at, cap = times
        due = cap if phase is P.TAPERING else min(cap, taper_at)
    if phase is P.TITRATING:  # _on_tick: the next step, when automatic, due, not before its time, nothing pending
        i = sch.next_step_index(state.level_mg_per_24h)
        interval = span_hours(protocol.step_interval_hours)
        if i is None:
            return None  # the top step: the tick begins the hold
        nxt = sch.steps[i]
        if nxt.auto and state.pending is None:
            at = nxt.not_before if state.last_change_at is None else max(nxt.not_before,
                                                                        state.last_change_at + interval)
            due = min(due, at)
    elif phase is P.HOLDING:  # the end of the hold
        if state.hold_started_at is None:
            return None
        due = min(due, state.hold_started_at + span_days(sch.hold_days))
    else:  # tapering: the next taper entry, if any is left
        if state.taper_started_at is None:
            return None
        if state.taper_index < len(sch.taper):
            due = min(due, state.taper_started_at + span_hours(sch.taper[state.taper_index].after_hours))
    return due


def _quiet_tick(state: CourseState, now: datetime, protocol: ProtocolSpec) -> bool:
    """True only if the general path's tick at `now` returns `state` itself and no command (any doubt: False)."""
    if state.interrupted_at is not None or state.commanded_since is None or now.tzinfo is None:
        return False  # _track_interruption or _track_commanded would change the state (or a naive time)
    key = (protocol, state.schedule, state.phase, state.started_at, state.level_mg_per_24h, state.last_change_at,
           state.pending, state.hold_started_at, state.taper_started_at, state.taper_index)
    hit = _TICKS.get(state.pump_id)
    try:
        if hit is not None and hit[0] == key:
            due = hit[1]
        else:
            due = _tick_due(state, protocol)
            if len(_TICKS) >= _CACHE_MAX:
                _TICKS.clear()
            _TICKS[state.pump_id] = (key, due)
        return due is not None and now < due
    except (ArithmeticError, TypeError):
        return False  # the general path raises (or refuses) as it does


def tick_changes_nothing(state: CourseState, at: datetime, protocol: ProtocolSpec) -> bool:
    """True only if `step(state, Tick(at), protocol)` returns `state` itself and no command: the quiet tick, which
    `reduce` takes first for every tick. The channel asks this after each poll and then neither builds nor steps
    the tick (it would log nothing). False says nothing: step the tick."""
    return _quiet_tick(state, at, protocol)
