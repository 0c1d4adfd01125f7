"""An unordered drop of the pump's delivered-volume counter (docs/safety.md, SUP-21).

The core counts what the pump delivered off its counter, each report's increment. A counter that reads lower than
the last report without a clear driverd ordered (a clear at the panel, a power cut on a pump that resets it, a
corrupt reading) has lost what the pump delivered between the last count and the drop: the course's totals and the
24-h ceiling would under-count. Before this rule only the Harvard driver noticed (as POWER_INTERRUPTED, a pump
alarm, which stops nothing that still runs). Now in a live course it is the alarm `counter_drop` and a stop, on
every pump; driverd's own clears (`CounterCleared`, `SyringeLoaded`) re-baseline and never alarm.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.core import machine
from driverd.core.commands import ApplySetpoint, RaiseAlarm, Refused
from driverd.core.events import ClinicianCommand, CounterCleared, PumpReport, SyringeLoaded
from driverd.core.state import Phase, evolve
from tests.core.factories import PROTOCOL, T0, primed
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
M = timedelta(minutes=1)


def running(hours: int = 30) -> Player:
    p = Player(primed(), PROTOCOL, ExactPump(at=T0 - 10 * M))
    p.run_until(T0 + hours * H)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing and p.pump.delivered > 1
    return p


def alarms(cmds: tuple) -> list[str]:
    return [c.code for c in cmds if isinstance(c, RaiseAlarm)]


def stops(cmds: tuple) -> list[D]:
    return [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)]


@pytest.mark.parametrize("to", [D(0), D("0.5"), D("-0.001")])
def test_a_counter_that_goes_back_while_infusing_alarms_and_stops_the_pump(to: D) -> None:
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    before = p.state.raw_delivered_ml
    p.pump.delivered = to  # cleared at the panel (or a corrupt reading) between two polls
    cmds = p.feed(p.pump.report())
    assert alarms(cmds) == ["counter_drop"] and stops(cmds) == [D(0)]
    assert p.state.phase is Phase.ALARM and not p.pump.infusing  # the harness pump applied the stop
    detail = next(c.detail for c in cmds if isinstance(c, RaiseAlarm))
    assert f"from {before} mL to {to} mL" in detail
    # Later polls: raised once while active, nothing sent again; the counter counts on from the lower reading.
    for k in range(2, 5):
        p.pump.advance(T0 + 30 * H + k * M)
        assert p.feed(p.pump.report()) == ()
    assert p.state.raw_delivered_ml == to


def test_only_a_verified_syringe_load_acknowledges_it_and_the_next_drop_alarms_again() -> None:
    """Between two polls a nurse may stop, swap, clear and run again: a resume would run the old syringe's rate on
    whatever is in (review, 2026-12-03). It is refused; change_syringe (stating the syringe in the pump) loads and
    verifies it, and the course resumes on it."""
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    p.pump.delivered = D(0)
    p.feed(p.pump.report())
    cmds = p.feed(ClinicianCommand(p.pump.at, "resume", "dr-a", "counter cleared at the panel by mistake"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["counter_drop"] and not p.pump.infusing
    assert p.state.phase is Phase.ALARM
    conc = p.state.concentration
    p.feed(p.pump.report())  # the channel reads the pump before every change command: stopped
    p.feed(ClinicianCommand(p.pump.at, "change_syringe", "rn-1", "the syringe in the pump", None, D(10), conc))
    assert p.state.syringe_change is not None and p.state.syringe_change.loaded and not p.pump.infusing
    diameter = p.state.schedule.inner_diameter_mm if p.state.schedule is not None else D(0)
    cmds = p.feed(SyringeLoaded(p.pump.at, diameter, p.pump.delivered))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing and stops(cmds) != []
    p.run_until(T0 + 32 * H)
    assert p.state.phase is Phase.TITRATING  # counting on from the new baseline: no false alarm
    p.pump.advance(T0 + 32 * H + M)
    p.pump.delivered -= D("0.01")
    assert alarms(p.feed(p.pump.report())) == ["counter_drop"] and not p.pump.infusing


def test_a_drop_on_a_stopped_pump_in_a_live_course_alarms() -> None:
    """Stopped at the panel (the course pauses), then the counter cleared there: the counts are still lost to the
    course, and a resume must be a clinician's decision."""
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    p.pump.infusing = False
    p.feed(p.pump.report())
    assert p.state.phase is Phase.PAUSED
    p.pump.advance(p.pump.at + M)
    p.pump.delivered = D(0)
    cmds = p.feed(p.pump.report())
    assert alarms(cmds) == ["counter_drop"] and p.state.phase is Phase.ALARM and not p.pump.infusing
    # The syringe may have been swapped while the pump stood: a resume is refused (change_syringe verifies it).
    cmds = p.feed(ClinicianCommand(p.pump.at, "resume", "dr-a", "counter cleared at the panel"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["counter_drop"] and not p.pump.infusing


def test_a_harvard_power_cut_is_also_driverds_own_alarm_and_a_stop() -> None:
    """The Harvard driver latches power_interrupted on the same drop; a pump alarm alone sends no stop (a stopped
    pump is assumed), so a pump that runs on would have run: counter_drop stops it."""
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    p.pump.delivered = D(0)
    ev = replace(p.pump.report(), alarms=("power_interrupted",))  # still infusing, as the Elite reports it
    cmds = p.feed(ev)
    assert alarms(cmds) == ["counter_drop", "pump_alarm:power_interrupted"] and stops(cmds) == [D(0)]


def test_driverds_own_clear_is_no_drop() -> None:
    """`CounterCleared` re-baselines on its read-back: the next reports count on from 0, no alarm."""
    p = running()
    at = T0 + 30 * H + M
    p.pump.advance(at)
    before = p.pump.delivered
    p.pump.delivered = D(0)
    assert alarms(p.feed(CounterCleared(at, before, D(0)))) == []
    p.run_until(T0 + 31 * H)
    assert p.state.phase is Phase.TITRATING and "counter_drop" not in p.state.alarms_raised


def test_a_counter_reset_during_a_syringe_change_is_no_alarm_and_the_load_resumes() -> None:
    """A loaded change waits with the pump stopped: its load clears the counter (a crash between the clear and the
    logged outcome shows the lower counter at the restart). Nothing was delivered since the last count."""
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    p.pump.infusing = False
    p.feed(p.pump.report())  # stopped for the swap: paused
    cmds = p.feed(ClinicianCommand(p.pump.at, "change_syringe", "rn-1", "empty soon", None, D(17)))
    assert p.state.syringe_change is not None and p.state.syringe_change.loaded
    p.pump.advance(p.pump.at + M)
    p.pump.delivered = D(0)
    cmds = p.feed(p.pump.report())
    assert alarms(cmds) == [] and p.state.phase is Phase.PAUSED
    cmds = p.feed(SyringeLoaded(p.pump.at, D("19.13"), D(0)))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing


def test_the_same_drop_while_a_change_waits_on_a_running_pump_alarms() -> None:
    """The exemption is only for a stopped pump: a pump that reports infusing during the change is not being
    loaded, and a lower counter there is lost counts."""
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    p.feed(ClinicianCommand(p.pump.at, "change_syringe", "rn-1", "empty soon", None, D(17)))
    p.pump.advance(p.pump.at + M)
    p.pump.apply(p.state.verified_run_rate)  # RUN pressed at the panel again
    p.pump.delivered = D(0)
    assert "counter_drop" in alarms(p.feed(p.pump.report()))


@pytest.mark.parametrize("phase", [Phase.IDLE, Phase.STOPPED])
def test_outside_a_live_course_a_drop_is_no_alarm(phase: Phase) -> None:
    """Nothing is being delivered under a course there; the next course's prime clears the counter (SUP-15)."""
    p = running()
    state = evolve(p.state, phase=phase, commanded_rate=D(0), pending=None)
    ev = PumpReport(T0 + 30 * H + M, "stopped", D(0), D(0), ())
    after, cmds = machine.step(state, ev, PROTOCOL)
    assert alarms(cmds) == [] and after.phase is phase and after.raw_delivered_ml == 0


@given(change=st.decimals(min_value=D("-40"), max_value=D("40"), places=3),
       minutes=st.integers(min_value=1, max_value=59))
def test_the_quiet_path_never_takes_a_drop_and_only_a_drop_alarms(change: D, minutes: int) -> None:
    """From the same running state both paths decide alike; the quiet report declines every lower reading, the
    general path alarms exactly on a lower one (a reading that did not move or moved up is never a drop)."""
    p = running(26)
    p.pump.advance(T0 + 26 * H + minutes * M)
    assert p.state.raw_delivered_ml is not None
    ev = replace(p.pump.report(), delivered_ml=p.state.raw_delivered_ml + change)
    quiet = machine._quiet_report(p.state, ev, PROTOCOL)
    general = machine._reduce(p.state, ev, PROTOCOL)
    assert (quiet is None or quiet == general[0])
    if change < 0:
        assert quiet is None and "counter_drop" in alarms(general[1]) and stops(general[1]) == [D(0)]
    else:
        assert "counter_drop" not in alarms(general[1])
