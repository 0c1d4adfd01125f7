"""The quiet pump report (machine._quiet_report, issue 12) decides only what the general path decides.

`reduce` hands a pump report of a running course to `_quiet_report` first; it returns a state only when every
check of the general path (`_reduce`) provably yields no command, and that state must be exactly the general
path's. Checked here on generated courses (every report of them, both paths from the same state), on a whole
course that fills the 24-h window, and at the exact edges of each bound it uses: the 24-h ceiling at the limit
(and 1E-9 either side), the near-empty warning at its threshold, the accuracy window at its limit. The general
path itself is checked against the verbatim old core in test_oracle_equivalence.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driverd.core import machine
from driverd.core.events import Event, PumpReport
from driverd.core.history import History
from driverd.core.kernel import cumulative_drug, hours_between, span_minutes
from driverd.core.schedule import TaperStep
from driverd.core.state import RUNNING, CourseState, Phase, Sample, evolve
from tests.core.factories import PROTOCOL
from tests.core.oracle_v1 import machine as old_machine
from tests.core.oracle_v1 import state as old_state
from tests.core.test_oracle_equivalence import ACTIONS, SECONDS, Course, projection

D = Decimal


def both_paths(state: CourseState, ev: PumpReport, protocol: Any = PROTOCOL) -> tuple[CourseState | None, Any]:
    """(the quiet path's state or None, the general path's (state, commands) or its exception)."""
    quiet = machine._quiet_report(state, ev, protocol)
    try:
        general: Any = machine._reduce(state, ev, protocol)
    except ArithmeticError as exc:
        general = exc
    if quiet is not None:
        assert not isinstance(general, Exception), general
        g_state, g_cmds = general
        assert g_cmds == ()
        assert projection(quiet, True) == projection(g_state, True)
        assert quiet == g_state
    report_step_agrees(state, ev, protocol, quiet)
    return quiet, general


def report_step_agrees(state: CourseState, ev: PumpReport, protocol: Any, quiet: CourseState | None) -> None:
    """`machine.report_step` gives what `step` gives (state by repr, commands), says quiet exactly when the quiet
    path decides, and then has replaced nothing but the accumulated fields (every other field the same object:
    the telemetry compactor's shortcut relies on it)."""
    after, cmds, was_quiet = machine.report_step(state, ev, protocol)
    s_after, s_cmds = machine.step(state, ev, protocol)
    assert repr(after) == repr(s_after) and after == s_after
    assert cmds == s_cmds
    assert was_quiet == (quiet is not None)
    if was_quiet:
        assert cmds == ()
        changed = {k for k, v in after.__dict__.items() if v is not state.__dict__[k]}
        assert changed <= machine.ACCUMULATED
        assert after.__dict__.keys() == state.__dict__.keys()


def _to_old(value: Any) -> Any:
    """A field of the new core's state as the old core holds it (its own Phase and Sample; a tuple history)."""
    if isinstance(value, Phase):
        return old_state.Phase(value.value)
    if isinstance(value, Sample):
        return old_state.Sample(value.at, value.delivered_ml, value.delivered_mg)
    if isinstance(value, History):
        return tuple(_to_old(s) for s in value)
    return value


def oracle_agrees(state: CourseState, ev: PumpReport) -> None:
    """The old core (tests/core/oracle_v1), given the same state, decides as the new core's `step`."""
    assert state.pending is None and state.syringe_change is None  # the crafted states here hold neither
    old = old_state.CourseState(**{f.name: _to_old(getattr(state, f.name)) for f in fields(state)})
    new_after, new_cmds = machine.step(state, ev, PROTOCOL)
    old_after, old_cmds = old_machine.step(old, ev, PROTOCOL)
    assert repr(new_cmds) == repr(old_cmds)
    assert projection(new_after, True) == projection(old_after, True)


class Checked(Course):
    """A course played through the old and the new core (the oracle test's `Course`), with every pump report
    also decided by both paths of the new core from the same state."""

    def __init__(self, taper: bool) -> None:
        self.quiet = 0
        self.reports = 0
        super().__init__(taper)

    def feed(self, ev: Event) -> None:
        if isinstance(ev, PumpReport) and hasattr(self, "quiet"):
            self.reports += 1
            quiet, _ = both_paths(self.new, ev)
            self.quiet += quiet is not None
        super().feed(ev)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(ACTIONS, SECONDS), max_size=60), st.booleans())
def test_the_quiet_path_decides_as_the_general_path(actions: list[tuple[str, int]], taper: bool) -> None:
    course = Checked(taper)
    for action, seconds in actions:
        course.act(action, seconds if action != "run" else min(seconds, 300))


def test_a_course_that_fills_the_window_is_mostly_quiet_and_decides_alike() -> None:
    """Thirty hours at a 60-s poll (the window full, samples trimmed), a counter reset, a syringe change, a pump
    alarm and its clearing: the quiet path takes most reports, and every one equals the general path's."""
    course = Checked(taper=True)
    for _ in range(30 * 60):
        course.poll(60)
    for action in ("reset", "near_end", "clear", "occlusion", "clear", "change_syringe", "resume"):
        course.act(action, 60)
        for _ in range(20):
            course.poll(60)
    assert len(course.new.samples) > 1400
    assert course.quiet > 0.9 * course.reports


def running_state() -> tuple[CourseState, Course]:
    """A course running steadily for five hours (a deviation base, commanded_since set, nothing pending)."""
    course = Course(taper=False)
    for _ in range(300):
        course.poll(60)
    state = course.new
    assert state.phase in RUNNING and state.pending is None and state.deviation_base is not None
    assert state.commanded_since is not None
    return state, course


def report_after(state: CourseState, seconds: int = 60) -> PumpReport:
    """The next report, 60 s on, the counter one display step (0.01 mL) further."""
    add_ml = D("0.01")
    assert state.last_sample is not None and state.raw_delivered_ml is not None
    return PumpReport(state.last_sample.at + timedelta(seconds=seconds), "infusing", state.commanded_rate,
                      state.raw_delivered_ml + add_ml, ())


def full_window(state: CourseState, per_sample_mg: Decimal) -> CourseState:
    """The state with 24 h of samples 60 s apart up to its newest report, growing by `per_sample_mg` each."""
    last = state.last_sample
    assert last is not None
    n = 24 * 60 + 1
    samples = [Sample(last.at - timedelta(seconds=60 * (n - 1 - i)), last.delivered_ml, per_sample_mg * i)
               for i in range(n)]
    return evolve(state, samples=History(samples), last_sample=samples[-1], deviation_base=samples[-1])


def worst_after(pre: CourseState, ev: PumpReport) -> tuple[Decimal, Decimal]:
    """(max(past, ahead) of _ceiling_breach after `ev`, its limit): the exact check's own arithmetic."""
    post = machine._accumulate(pre, ev)
    now, conc = ev.at, post.concentration
    limit = PROTOCOL.ceiling_mg_per_24h + 2 * PROTOCOL.counter_resolution_ml * conc
    lookahead = ev.rate_ml_per_h * conc * hours_between(now, now + machine.CEILING_LOOKAHEAD)
    start = cumulative_drug(post, now - machine.WINDOW)
    past = cumulative_drug(post, now) - start
    ahead = past - (cumulative_drug(post, now - machine.WINDOW + machine.CEILING_LOOKAHEAD) - start) + lookahead
    return max(past, ahead), limit


@pytest.mark.parametrize("offset", [D("-0.5"), D("-1E-6"), D("-1E-9"), D(0), D("1E-9"), D("1E-6"), D("0.5")])
def test_the_ceiling_at_the_exact_limit(offset: Decimal) -> None:
    """The window's worst case shifted to the limit and 1E-9/1E-6 either side: the quiet path takes the report
    exactly when the general path finds no breach, and a breach by 1E-9 mg is an alarm either way."""
    state, _ = running_state()
    pre = full_window(state, D("0.2"))
    ev = report_after(pre)
    worst, limit = worst_after(pre, ev)
    last = pre.last_sample
    assert last is not None
    shifted = replace(last, delivered_mg=last.delivered_mg + (limit - worst) + offset)
    pre = evolve(pre, last_sample=shifted, samples=History([*list(pre.samples)[:-1], shifted]))
    assert worst_after(pre, ev)[0] == limit + offset
    quiet, general = both_paths(pre, ev)
    oracle_agrees(pre, ev)
    breach = "dose_ceiling" in general[0].alarms_raised
    assert breach == (offset > 0)
    # Within 1E-6 of the limit the bound does not decide: the exact check runs, inside the quiet path or not.
    assert (quiet is None) == breach


@pytest.mark.parametrize(("extra_ml", "warns"), [(D("-1E-12"), True), (D(0), True), (D("2.30E-11"), True),
                                                  (D("2.31E-11"), False), (D("1E-10"), False), (D("0.01"), False)])
def test_near_empty_at_its_threshold(extra_ml: Decimal, warns: bool) -> None:
    """What is left lasts `syringe_warning_minutes` at the commanded rate (0.083 mL/h), plus `extra_ml`: the
    prediction is truncated to whole microseconds (1 us is 2.3056E-11 mL here), so it warns up to just below one
    extra microsecond and not from just above it; the quiet path takes the report exactly when it does not warn."""
    state, _ = running_state()
    ev = report_after(state)
    post = machine._accumulate(state, ev)
    rate = state.commanded_rate
    assert rate == D("0.083")
    remaining = rate * hours_between(ev.at, ev.at + span_minutes(PROTOCOL.syringe_warning_minutes)) + extra_ml
    # remaining = fill - (delivered - started): set `started` so that it is that.
    started = post.delivered_ml - post.fill_ml + remaining
    pre = evolve(state, syringe_started_ml=started, empty_warned=False)
    assert machine._accumulate(pre, ev).remaining_ml == remaining
    quiet, general = both_paths(pre, ev)
    oracle_agrees(pre, ev)
    assert general[0].empty_warned == warns
    assert (quiet is None) == warns


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("delta", [D("-1E-12"), D(0), D("1E-12")])
def test_the_accuracy_window_at_its_limit(sign: int, delta: Decimal) -> None:
    """Delivered volume off the expected by exactly the allowed deviation (over and under, and 1E-12 mL either
    side): at the limit it is accepted, beyond it alarms, and the quiet path agrees with the general path."""
    state, _ = running_state()
    ev = report_after(state)
    post = machine._accumulate(state, ev)
    rate = state.commanded_rate
    window = machine._deviation_window(PROTOCOL, rate)
    base_at = ev.at - window - timedelta(minutes=5)  # older than the window: the window's start is a sample or it
    start = post.samples.at_or_before(ev.at - window)
    assert start is not None
    begin = start if start.at >= base_at else None
    base = Sample(base_at, D(0), D(0))
    anchor = begin if begin is not None else base
    expected = rate * hours_between(anchor.at, ev.at)
    allowed = max(expected * PROTOCOL.deviation_limit, 2 * PROTOCOL.counter_resolution_ml)
    # actual = delivered_now - anchor.delivered_ml: move the anchor's delivered volume to put actual where we want.
    target = expected + sign * (allowed + delta)
    moved = replace(anchor, delivered_ml=post.delivered_ml - target)
    samples = [moved if s is anchor else s for s in state.samples]
    pre = evolve(state, samples=History(samples), deviation_base=moved if anchor is base else base)
    quiet, general = both_paths(pre, ev)
    oracle_agrees(pre, ev)
    alarmed = any(a in general[0].alarms_raised for a in ("over_infusion", "under_infusion"))
    assert alarmed == (delta > 0)
    assert (quiet is None) == alarmed


def test_a_report_that_would_act_is_never_quiet() -> None:
    """Each way a report can act, from a steady running state: the quiet path declines, the general path acts."""
    state, _ = running_state()
    ev = report_after(state)
    variants: list[tuple[str, Callable[[PumpReport], PumpReport]]] = [
        ("alarm", lambda e: replace(e, alarms=("occlusion",))),
        ("warning", lambda e: replace(e, alarms=("near_end",))),
        ("stopped", lambda e: replace(e, state="stopped")),
        ("faster", lambda e: replace(e, rate_ml_per_h=e.rate_ml_per_h + D("0.001"))),
        ("slower", lambda e: replace(e, rate_ml_per_h=e.rate_ml_per_h - D("0.001"))),
    ]
    for name, change in variants:
        quiet, general = both_paths(state, change(ev))
        oracle_agrees(state, change(ev))
        assert quiet is None, name
        assert general[1], name
    quiet, general = both_paths(state, ev)
    assert quiet is not None and general[1] == ()
    # A warning the previous report showed already (near_end while the syringe runs out) stays quiet; a new
    # warning is a notice, a blocking alarm is an alarm.
    warned = machine._accumulate(state, replace(ev, alarms=("near_end",)))
    again = report_after(warned)
    for alarms, quiet_expected in [(("near_end",), True), (("near_end", "low_battery"), False),
                                   (("low_battery",), False), (("near_end", "occlusion"), False), ((), True)]:
        quiet, general = both_paths(warned, replace(again, alarms=alarms))
        oracle_agrees(warned, replace(again, alarms=alarms))
        assert (quiet is not None) == quiet_expected, alarms
        assert (general[1] == ()) == quiet_expected, alarms


def test_report_step_refuses_as_step_does() -> None:
    """Outside the quiet path `report_step` is `step`, refusals included: a NaN counter (in a live course the alarm
    `report_unreadable` and a stop, SUP-22; outside one an invalid number) and a report of a course that is not
    running."""
    state, _ = running_state()
    assert state.last_sample is not None
    nan = PumpReport(state.last_sample.at + timedelta(seconds=1), "infusing", state.commanded_rate, D("NaN"), ())
    after, cmds, quiet = machine.report_step(state, nan, PROTOCOL)
    assert repr((after, cmds)) == repr(machine.step(state, nan, PROTOCOL)) and not quiet
    assert after.phase is Phase.ALARM and "report_unreadable" in after.alarm_causes
    idle = evolve(state, phase=Phase.IDLE)
    nan = replace(nan, state="stopped")  # (an infusing pump outside a live course is unexpected_infusion)
    after, cmds, quiet = machine.report_step(idle, nan, PROTOCOL)
    assert (after, cmds) == machine.step(idle, nan, PROTOCOL) and not quiet
    assert after is idle and cmds[0].reason == "invalid_number"  # type: ignore[attr-defined]
    stopped = report_after(state, 1)
    idle = evolve(state, phase=Phase.IDLE)
    after, cmds, quiet = machine.report_step(idle, stopped, PROTOCOL)
    assert repr((after, cmds)) == repr(machine.step(idle, stopped, PROTOCOL)) and not quiet


@pytest.mark.parametrize("bad_step", [D("NaN"), D("sNaN"), D("Infinity")])
def test_a_reading_step_that_is_no_number_is_doubt_not_a_refusal(bad_step: Decimal) -> None:
    """Review finding (2026-12-03): the quiet path compared the reading's step before its `try`, so a NaN step (a
    plug-in driver's; the shipped ones give finite steps) made `step` refuse the whole report, while the general
    path stops a pump running 10x its rate. Now it is doubt: the general path decides, and stops the pump (since
    SUP-20 such a step is itself the alarm `counter_step`: tests/core/test_counter_step.py)."""
    from driverd.core.commands import ApplySetpoint
    from tests.core.factories import T0, primed
    from tests.core.harness import ExactPump, Player

    p = Player(primed(), PROTOCOL, ExactPump(at=T0 - timedelta(minutes=10)))
    p.run_until(T0 + timedelta(hours=30))
    s = p.state
    ev = PumpReport(T0 + timedelta(hours=30, minutes=1), "infusing", s.commanded_rate * 10,
                    s.delivered_ml + D("0.001"), (), bad_step)
    assert machine._quiet_report(s, ev, PROTOCOL) is None
    _, general = machine._reduce(s, ev, PROTOCOL)
    _, live = machine.step(s, ev, PROTOCOL)
    assert live == general and any(isinstance(c, ApplySetpoint) and c.setpoint.rate_ml_per_h == 0 for c in live)


def test_the_quiet_report_follows_every_input_of_its_memo() -> None:
    """The quiet report remembers the last course's cache inputs (their very objects: started_at, schedule,
    protocol, syringe concentration, rate) and what the caches gave. Right after a quiet report primed it, each
    input replaced alone by one that makes the report act must reach the general path: an earlier start (the cap
    is due), a schedule with a long taper (the taper is due), a protocol with a lower ceiling, a syringe of a far
    higher concentration and a far higher rate (each: the ceiling's lookahead, with the counter unchanged so that
    only the cached constants can see it; near-empty warned already and the accuracy window not reached, so that
    nothing else declines first)."""
    state, _ = running_state()
    ev = report_after(state)
    assert state.started_at is not None and state.schedule is not None and state.last_sample is not None
    still = replace(ev, delivered_ml=state.raw_delivered_ml)  # the counter did not move: no new mg
    calm = evolve(state, empty_warned=True, deviation_base=state.last_sample)
    fast = calm.commanded_rate * 1000
    variants: list[tuple[str, CourseState, Any, PumpReport]] = [
        ("started_at", evolve(state, started_at=state.started_at - timedelta(days=30)), PROTOCOL, ev),
        ("schedule", evolve(state, schedule=replace(state.schedule, taper=(TaperStep(D(0), D(24 * 365)),))),
         PROTOCOL, ev),
        ("protocol", state, replace(PROTOCOL, ceiling_mg_per_24h=D(1)), ev),
        ("syringe_concentration", evolve(calm, syringe_concentration=calm.concentration * 10_000), PROTOCOL, still),
        ("rate", evolve(calm, commanded_rate=fast), PROTOCOL, replace(still, rate_ml_per_h=fast)),
    ]
    for name, changed, protocol, report in variants:
        base = calm if name in ("syringe_concentration", "rate") else state
        quiet, _ = both_paths(base, still if base is calm else ev)  # primes the memo with this course's inputs
        assert quiet is not None, name
        quiet, general = both_paths(changed, report, protocol)
        assert quiet is None, name
        assert not isinstance(general, Exception) and general[1], name


def test_the_ceiling_range_check_of_the_limits_is_the_general_expression() -> None:
    """_QuietLimits.bounded is the ceiling bound's range checks on its two constants, computed once."""
    b = machine._BOUNDED
    for ceiling in (D(1), D("999999999999"), D("1E12"), D("1E15")):
        for rate in (D("0.1"), D("1E11"), D("1E13")):
            q = machine._QuietLimits(replace(PROTOCOL, ceiling_mg_per_24h=ceiling), D(10), rate)
            assert q.bounded == (-b < q.limit < b and -b < q.lookahead < b), (ceiling, rate)
