"""A pump report whose rate or counter is not a finite number (review 2026-12-03).

Before, such a report raised inside the core and `step` refused it with the state unchanged: no alarm, no stop,
and a pump whose driver kept reporting NaN ran on unsupervised for as long as it did. Now, in a live course, it is
the alarm `report_unreadable` and a stop (again on each such report of a pump still infusing); nothing of it is
taken. Outside a live course it is refused as before. A setpoint read-back that is no number leaves the setpoint
uncertain, as no read-back does."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D

import pytest

from driverd.core.commands import ApplySetpoint, Notice, RaiseAlarm, Refused
from driverd.core.events import ClinicianCommand, SetpointResult
from driverd.core.machine import _quiet_report, initial_state, report_step, step
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
M = timedelta(minutes=1)


def running() -> Player:
    p = Player(primed(), PROTOCOL, ExactPump(at=T0 - 10 * M))
    p.run_until(T0 + 30 * H)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing
    return p


@pytest.mark.parametrize(("field", "value"), [("rate_ml_per_h", "NaN"), ("rate_ml_per_h", "sNaN"),
                                              ("rate_ml_per_h", "Infinity"), ("delivered_ml", "NaN"),
                                              ("delivered_ml", "-Infinity"), ("delivered_ml", "sNaN")])
def test_a_report_that_is_no_number_alarms_and_stops_a_running_pump(field: str, value: str) -> None:
    p = running()
    counted = p.state.raw_delivered_ml
    p.pump.advance(T0 + 30 * H + M)
    bad = replace(p.pump.report(), **{field: D(value)})
    assert _quiet_report(p.state, bad, PROTOCOL) is None
    cmds = p.feed(bad)
    assert [c.code for c in cmds if isinstance(c, RaiseAlarm)] == ["report_unreadable"]
    assert [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)] == [D(0)]
    assert not p.pump.infusing and p.state.phase is Phase.ALARM and p.state.raw_delivered_ml == counted
    # Raised once; a pump that runs on regardless is stopped again on its next such report.
    p.pump.infusing = True
    p.pump.advance(T0 + 30 * H + 2 * M)
    cmds = p.feed(replace(p.pump.report(), **{field: D(value)}))
    assert [c.code for c in cmds if isinstance(c, RaiseAlarm)] == []
    assert [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)] == [D(0)] and not p.pump.infusing


def test_the_general_and_the_report_step_agree() -> None:
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    bad = replace(p.pump.report(), rate_ml_per_h=D("NaN"))
    assert step(p.state, bad, PROTOCOL)[1] == report_step(p.state, bad, PROTOCOL)[1]


def test_outside_a_live_course_it_is_refused_as_before() -> None:
    p = running()
    bad = replace(p.pump.report(), delivered_ml=D("NaN"))
    state, cmds = step(initial_state("pump-1"), bad, PROTOCOL)
    assert state == initial_state("pump-1") and [c.reason for c in cmds if isinstance(c, Refused)] == [
        "invalid_number"]


def test_a_setpoint_read_back_that_is_no_number_leaves_it_uncertain() -> None:
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    cmds = p.feed(ClinicianCommand(p.pump.at, "stop", "dr-a", "enough"), ack=False)  # the driver's reply: NaN
    (sp,) = [c for c in cmds if isinstance(c, ApplySetpoint)]
    state, out = step(p.state, SetpointResult(p.pump.at, sp.setpoint.id, D("NaN")), PROTOCOL)
    assert state.pending is not None and state.pending.uncertain
    assert [c.code for c in out if isinstance(c, Notice)] == ["setpoint_uncertain"]
