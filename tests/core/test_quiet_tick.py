"""The quiet tick (machine._quiet_tick, issue 12 item 4) decides only what the general path decides.

`reduce` hands a tick of a running course to `_quiet_tick` first; it says "nothing happens" only when the tick
comes before the earliest instant at which the general path's tick may act (`_tick_due`: the course cap and its
taper, the next step, the end of the hold, the next taper entry), and then the general path must return the very
same state and no command. Checked on every tick of generated courses (both paths from the same state), and at the
edge of each instant: one microsecond before it the tick is quiet and the general path agrees; at it the quiet
tick defers and the general path acts. The general path itself is checked against the verbatim old core in
test_oracle_equivalence.py (which runs `step`, so the quiet tick too).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driverd.core import machine
from driverd.core.commands import ApplySetpoint
from driverd.core.events import Event, SetpointResult, Tick
from driverd.core.state import RUNNING, CourseState, Phase, evolve
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.test_oracle_equivalence import ACTIONS, SECONDS, Course

D = Decimal
US = timedelta(microseconds=1)


def general(state: CourseState, at: datetime) -> Any:
    """The general path's tick: (state, commands), or the exception it raises."""
    try:
        return machine._reduce(state, Tick(at), PROTOCOL)
    except (ArithmeticError, AssertionError) as exc:
        return exc


def check_tick(state: CourseState, at: datetime) -> bool:
    """Both paths from the same state: a quiet tick is the general path's unchanged state, without a command."""
    quiet = machine._quiet_tick(state, at, PROTOCOL)
    assert machine.tick_changes_nothing(state, at, PROTOCOL) is quiet
    if quiet:
        g = general(state, at)
        assert not isinstance(g, Exception), g
        assert g[0] is state and g[1] == ()
        stepped = machine.step(state, Tick(at), PROTOCOL)  # what the channel skips when the core says so
        assert stepped[0] is state and stepped[1] == ()
    return quiet


def check_edge(state: CourseState) -> bool:
    """At the state's due instant the quiet tick defers and the general path acts (or repeats a refusal it
    already logged); a microsecond before, the tick is quiet and the general path agrees. False: no finite
    instant to check."""
    due = machine._tick_due(state, PROTOCOL)
    if due is None or due == machine._NEVER or state.interrupted_at is not None or state.commanded_since is None:
        return False
    assert check_tick(state, due - US)
    assert not machine._quiet_tick(state, due, PROTOCOL)
    g = general(state, due)
    acted = isinstance(g, Exception) or g[0] is not state or g[1] != ()
    assert acted or (state.phase is Phase.TITRATING and state.last_refusal), (state.phase, due)
    return True


class Checked(Course):
    """A course played through the old and the new core (the oracle test's `Course`), every tick also decided by
    both paths of the new core from the same state, and the edge of each state's due instant checked."""

    def __init__(self, taper: bool) -> None:
        self.ticks = self.quiet = self.edges = 0
        super().__init__(taper)

    def feed(self, ev: Event) -> None:
        if isinstance(ev, Tick) and hasattr(self, "ticks"):
            self.ticks += 1
            self.quiet += check_tick(self.new, ev.at)
            self.edges += check_edge(self.new)
        super().feed(ev)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(ACTIONS, SECONDS), max_size=60), st.booleans())
def test_the_quiet_tick_decides_as_the_general_path(actions: list[tuple[str, int]], taper: bool) -> None:
    course = Checked(taper)
    for action, seconds in actions:
        course.act(action, seconds if action != "run" else min(seconds, 300))


def _driven(state: CourseState, at: datetime) -> CourseState:
    """A tick at `at` with any setpoint it sends verified at once."""
    state, cmds = machine.step(state, Tick(at), PROTOCOL)
    for c in cmds:
        if isinstance(c, ApplySetpoint):
            state, _ = machine.step(state, SetpointResult(at, c.setpoint.id, c.setpoint.rate_ml_per_h), PROTOCOL)
    return state


def test_a_whole_course_is_mostly_quiet_ticks_and_every_instant_is_exact() -> None:
    """A course through its steps, the hold and the taper, ticked every 60 s (setpoints read back at once): most
    ticks are quiet, and every instant at which a tick acts (each step, the end of the hold, each taper entry) is
    found to the microsecond."""
    state = primed(schedule(taper=((250, 0), (100, 12), (0, 24))))
    ticks = quiet = edges = 0
    at = T0
    while state.phase is not Phase.STOPPED:
        ticks += 1
        quiet += check_tick(state, at)
        edges += check_edge(state)
        state = _driven(state, at)
        at += timedelta(seconds=60)
    assert ticks > 6 * 24 * 60
    assert quiet > 0.99 * ticks
    assert edges > 0.99 * ticks


@pytest.mark.parametrize(("spacing", "due_hours"), [(24, 24), (30, 30), (12, 24)])
def test_the_next_step_is_due_at_its_time_or_a_step_interval_after_the_last_change(spacing: int,
                                                                                   due_hours: int) -> None:
    """The next step acts at the later of its not-before time and the last change plus the step interval
    (24 h): spaced 24 h both coincide, 30 h its time decides, 12 h the interval."""
    state = _driven(primed(schedule(spacing_hours=spacing)), T0)
    assert state.phase is Phase.TITRATING and state.last_change_at == T0
    due = T0 + timedelta(hours=due_hours)
    assert machine._tick_due(state, PROTOCOL) == due
    assert check_edge(state)
    after = _driven(state, due)
    assert after.level_mg_per_24h == D(300)


def test_a_pending_setpoint_or_a_manual_step_leaves_only_the_cap() -> None:
    state = _driven(primed(schedule(auto=(True, False, False))), T0)
    times = machine._cap_times(state, PROTOCOL)
    assert times is not None
    assert machine._tick_due(state, PROTOCOL) == min(times)  # a manual next step: only the cap's taper
    assert check_edge(state)
    running = _driven(primed(), T0)
    pending = evolve(running, pending=running.pending or object())  # a setpoint not yet read back
    assert machine._tick_due(pending, PROTOCOL) == min(times)
    assert check_edge(pending)


def test_the_end_of_the_hold_and_each_taper_entry() -> None:
    state = _driven(primed(schedule(taper=((250, 0), (100, 12), (0, 24)))), T0)
    at = T0
    for _ in range(2):  # the two steps after the first, each at its due instant
        due = machine._tick_due(state, PROTOCOL)
        assert due is not None and check_edge(state)
        at = due
        state = _driven(state, at)
    assert state.phase is Phase.HOLDING
    assert state.hold_started_at is not None
    assert machine._tick_due(state, PROTOCOL) == state.hold_started_at + timedelta(days=3)
    entries = 0
    while state.phase in RUNNING:
        due = machine._tick_due(state, PROTOCOL)
        assert due is not None and check_edge(state)
        state = _driven(state, due)
        entries += state.phase is Phase.TAPERING
    assert entries == 2 and state.phase is Phase.STOPPED  # the hold's end (the first entry), 12 h; 24 h stops


def test_the_course_cap() -> None:
    """Manual steps never come due: the cap decides (its taper while titrating, the stop while tapering)."""
    state = _driven(primed(schedule(auto=(True, False, False), taper=((50, 0), (0, 48)))), T0)
    times = machine._cap_times(state, PROTOCOL)
    assert times is not None
    taper_at, cap = times
    assert machine._tick_due(state, PROTOCOL) == taper_at
    assert check_edge(state)
    state = _driven(state, taper_at)
    assert state.phase is Phase.TAPERING
    assert machine._tick_due(state, PROTOCOL) == cap  # the last entry (48 h) is after the cap (24 h of taper)
    assert check_edge(state)
    assert _driven(state, cap).phase is Phase.STOPPED


def test_the_cache_follows_the_state() -> None:
    """The answer is cached per pump for the fields it is computed from: a state with another of them (here the
    last change, then a pending setpoint) is computed afresh, never answered from the cache."""
    state = _driven(primed(), T0)
    due = T0 + timedelta(hours=24)
    assert check_tick(state, due - US) and not machine._quiet_tick(state, due, PROTOCOL)
    later = evolve(state, last_change_at=T0 + timedelta(hours=1))
    assert check_tick(later, due) and not machine._quiet_tick(later, due + timedelta(hours=1), PROTOCOL)
    assert check_edge(later)
    assert not machine._quiet_tick(state, due, PROTOCOL)


def test_no_quiet_tick_outside_a_running_course_or_with_a_naive_time() -> None:
    state = _driven(primed(), T0)
    assert check_tick(state, T0 + timedelta(hours=1))
    assert not machine._quiet_tick(state, (T0 + timedelta(hours=1)).replace(tzinfo=None), PROTOCOL)
    assert not machine._quiet_tick(evolve(state, interrupted_at=T0), T0 + timedelta(hours=1), PROTOCOL)
    assert not machine._quiet_tick(evolve(state, commanded_since=None), T0 + timedelta(hours=1), PROTOCOL)
    for phase in (Phase.PRIMED, Phase.PAUSED, Phase.ALARM, Phase.STOPPED, Phase.IDLE):
        assert not machine._quiet_tick(evolve(state, phase=phase), T0 + timedelta(hours=1), PROTOCOL)
    assert not machine._quiet_tick(primed(), T0 - timedelta(minutes=1), PROTOCOL)
