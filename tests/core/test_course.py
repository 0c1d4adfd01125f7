"""Whole courses through the pure core, and the state machine's rules one by one."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import pytest

from driverd.core.commands import ApplySetpoint, RaiseAlarm, Refused
from driverd.core.errors import IllegalTransition
from driverd.core.events import ClinicianCommand, LinkLost, LinkRestored, PumpReport, PumpVerified, SetpointResult, Tick
from driverd.core.kernel import Proposal, Refusal, Setpoint, gate
from driverd.core.machine import TRANSITIONS, initial_state, reduce
from driverd.core.quantities import NEW_ERA_RESOLUTION
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)


def play(sched=None, start=T0 - timedelta(minutes=10)) -> Player:
    return Player(primed(sched), PROTOCOL, ExactPump(at=start))


def test_full_burst_course_100_300_500_hold_stop() -> None:
    p = play()
    p.run_until(T0 + 6 * 24 * H)
    rates = [(t - T0, c.setpoint.rate_ml_per_h) for t, c in p.setpoints()]
    # 50 mg/mL: 100 -> 0.083, 300 -> 0.25, 500 -> 0.416 mL/h (rounded down), stop after 3 days' hold
    assert rates == [(timedelta(0), D("0.083")), (24 * H, D("0.25")), (48 * H, D("0.416")), (120 * H, D(0))]
    assert p.phases() == ["titrating", "holding", "stopped"]  # taper "stop": no taper steps
    assert p.state.phase is Phase.STOPPED and p.state.taper_lock
    # mg delivered: 100 + 300 (+ 3 days at 500) with rounding toward less drug
    delivered_mg = p.pump.delivered * D(50)
    expected = D("0.083") * 24 * 50 + D("0.25") * 24 * 50 + D("0.416") * 72 * 50
    assert abs(delivered_mg - expected) < D("1e-20")


def test_taper_steps_then_stop() -> None:
    p = play(schedule(taper=((250, 0), (100, 12), (0, 24))))
    p.run_until(T0 + 7 * 24 * H)
    rates = [(t - T0, c.setpoint.rate_ml_per_h) for t, c in p.setpoints()]
    assert rates[3:] == [(120 * H, D("0.208")), (132 * H, D("0.083")), (144 * H, D(0))]
    assert "tapering" in p.phases() and p.state.phase is Phase.STOPPED


def test_manual_steps_wait_for_clinician() -> None:
    p = play(schedule(auto=(True, False, False)))
    p.run_until(T0 + 30 * H)
    assert [c.setpoint.dose_mg_per_24h for _, c in p.setpoints()] == [D("99.6")]
    p.feed(ClinicianCommand(T0 + 30 * H, "escalate", "dr-a", "pain uncontrolled"))
    assert p.setpoints()[-1][1].setpoint.rate_ml_per_h == D("0.25")


def test_escalation_refused_before_interval_and_not_before() -> None:
    p = play(schedule(auto=(True, False, False)))
    p.run_until(T0 + 2 * H)
    cmds = p.feed(ClinicianCommand(T0 + 2 * H, "escalate", "dr-a", "too soon"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["not_before"]


def test_hold_stops_auto_escalation_and_reduce_always_allowed() -> None:
    p = play()
    p.run_until(T0 + 25 * H)  # at 300
    p.feed(ClinicianCommand(T0 + 25 * H, "hold", "dr-a", "effective"))
    p.run_until(T0 + 60 * H)
    assert p.state.level_mg_per_24h == D(300) and p.state.phase is Phase.HOLDING
    cmds = p.feed(ClinicianCommand(T0 + 60 * H, "reduce", "dr-a", "dysphoria"))
    assert [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)] == [D("0.083")]


def test_taper_lock_refuses_escalation_and_resume_above_lock() -> None:
    p = play(schedule(taper=((250, 0), (100, 12), (0, 24))))
    p.run_until(T0 + 121 * H)
    assert p.state.phase is Phase.TAPERING
    with pytest.raises(IllegalTransition):
        reduce(p.state, ClinicianCommand(T0 + 121 * H, "escalate", "dr-a", "more"), PROTOCOL)
    # a forged resume-style proposal straight to the kernel is refused too
    verdict = gate(p.state, PROTOCOL, Proposal(D(500), "resume", "recovery", "restart"), T0 + 121 * H)
    assert isinstance(verdict, Refusal) and verdict.reason == "taper_lock"


def test_setpoints_only_from_the_kernel() -> None:
    with pytest.raises(TypeError):
        Setpoint(1, D(1), D(1), D(1), "start", "x", "y")


def test_readback_mismatch_retries_once_then_alarms_and_stops_over_rate() -> None:
    p = play()
    p.run_until(T0)
    p.run_until(T0 + 24 * H - timedelta(minutes=1))
    cmds = p.feed(Tick(T0 + 24 * H), ack=False)
    sp = next(c.setpoint for c in cmds if isinstance(c, ApplySetpoint))
    again = p.feed(SetpointResult(T0 + 24 * H, sp.id, D("0.3")), ack=False)
    assert [c.attempt for c in again if isinstance(c, ApplySetpoint)] == [2]
    final = p.feed(SetpointResult(T0 + 24 * H, sp.id, D("0.3")), ack=False)
    assert any(isinstance(c, RaiseAlarm) and c.code == "readback_mismatch" for c in final)
    assert [c.setpoint.rate_ml_per_h for c in final if isinstance(c, ApplySetpoint)] == [D(0)]
    assert p.state.phase is Phase.ALARM


def test_stop_not_confirmed_alarms_but_the_course_stays_stopped() -> None:
    """Regression (found by the stateful test in CI): a stop whose read-back fails twice raised an alarm that moved
    the course from STOPPED to ALARM, and a clinician "resume" then took a stopped course to HOLDING."""
    p = play()
    p.run_until(T0 + 2 * H)
    cmds = p.feed(ClinicianCommand(T0 + 2 * H, "stop", "dr-a", "done"), ack=False)
    stop = next(c.setpoint for c in cmds if isinstance(c, ApplySetpoint))
    assert p.state.phase is Phase.STOPPED
    again = p.feed(SetpointResult(T0 + 2 * H, stop.id, D("0.083")), ack=False)  # the pump still runs
    assert [(c.setpoint.rate_ml_per_h, c.attempt) for c in again if isinstance(c, ApplySetpoint)] == [(D(0), 2)]
    final = p.feed(SetpointResult(T0 + 2 * H, stop.id, D("0.084")), ack=False)
    assert any(isinstance(c, RaiseAlarm) and c.code == "readback_mismatch" for c in final)
    assert p.state.phase is Phase.STOPPED and p.state.taper_lock
    refused = p.feed(ClinicianCommand(T0 + 3 * H, "resume", "dr-a", "try"))
    assert [c.reason for c in refused if isinstance(c, Refused)] == ["illegal_transition"]
    assert p.state.phase is Phase.STOPPED
    assert not [c for c in p.feed(Tick(T0 + 4 * H)) if isinstance(c, ApplySetpoint)]


def test_stop_sent_while_link_down_is_reconciled_by_the_next_report() -> None:
    p = play()
    p.run_until(T0 + 2 * H)
    p.feed(LinkLost(T0 + 2 * H, "no reply"))
    cmds = p.feed(ClinicianCommand(T0 + 2 * H, "stop", "dr-a", "done"), ack=False)
    stop = next(c.setpoint for c in cmds if isinstance(c, ApplySetpoint))
    p.feed(SetpointResult(T0 + 2 * H, stop.id, None, "timeout"), ack=False)
    assert p.state.phase is Phase.STOPPED and p.state.pending is not None and p.state.pending.uncertain
    p.feed(LinkRestored(T0 + 3 * H))
    # the pump stopped (dead-man or the stop got through) but still holds its programmed rate: that is a stop
    # (the only output: the end-of-course record, which waits for the stopped pump's report)
    out = p.feed(PumpReport(T0 + 3 * H, "stopped", D("0.083"), p.pump.delivered, ()))
    assert [type(c).__name__ for c in out] == ["CourseEnded"]
    assert p.state.pending is None and p.state.verified_rate == 0 and p.state.phase is Phase.STOPPED


def test_uncertain_rate_is_not_verified_by_a_stopped_pump_that_holds_it() -> None:
    p = play()
    p.run_until(T0 + 24 * H - timedelta(minutes=1))  # verified at 100 mg/24h (0.041 mL/h at 100 mg/mL)
    before = p.state.verified_run_rate
    cmds = p.feed(Tick(T0 + 24 * H), ack=False)
    sp = next(c.setpoint for c in cmds if isinstance(c, ApplySetpoint))
    p.feed(SetpointResult(T0 + 24 * H, sp.id, None, "timeout"), ack=False)
    # the pump took the new rate but never ran it (e.g. RUN was lost): programmed, not delivered
    p.feed(PumpReport(T0 + 24 * H + timedelta(minutes=1), "stopped", sp.rate_ml_per_h, p.pump.delivered, ()),
           ack=False)
    assert p.state.verified_run_rate == before < sp.rate_ml_per_h


def test_resume_during_titration_does_not_start_the_hold_clock() -> None:
    """Regression (seen in `driverd demo --faults`): an occlusion on day 2 resumed during titration started the
    hold clock then, so the hold at the top step was 11 h short of its 3 days."""
    p = play()
    p.run_until(T0 + 36 * H)
    p.pump.alarms = ("occlusion",)
    p.pump.infusing = False
    p.run_until(T0 + 37 * H)
    assert p.state.phase is Phase.ALARM
    p.pump.alarms = ()
    p.feed(p.pump.report())
    p.feed(ClinicianCommand(T0 + 37 * H, "resume", "dr-a", "line cleared"))
    assert p.state.phase is Phase.TITRATING and p.state.hold_started_at is None
    p.run_until(T0 + 48 * H + timedelta(minutes=10))
    assert p.state.phase is Phase.HOLDING and p.state.hold_started_at == T0 + 48 * H


def test_link_loss_alarms_and_resume_capped_at_last_verified() -> None:
    p = play()
    p.run_until(T0 + 24 * H - timedelta(minutes=1))  # verified at 100 mg/24h
    cmds = p.feed(Tick(T0 + 24 * H), ack=False)  # 300 sent, never acknowledged
    assert any(isinstance(c, ApplySetpoint) for c in cmds)
    p.feed(LinkLost(T0 + 24 * H + timedelta(seconds=5), "no reply"))
    assert p.state.phase is Phase.ALARM
    p.feed(LinkRestored(T0 + 25 * H))
    assert p.state.phase is Phase.ALARM  # stays in alarm until a clinician resumes
    # reconcile: the pump reports it is stopped at the old rate (dead-man fired)
    p.pump.apply(D("0.083"))
    p.pump.infusing = False
    p.feed(PumpReport(T0 + 25 * H, "stopped", D("0.083"), p.pump.delivered, ()))
    cmds = p.feed(ClinicianCommand(T0 + 25 * H, "resume", "dr-a", "checked"))
    rates = [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)]
    assert rates == [D("0.083")]  # never above the last verified rate


def test_pump_alarm_enters_alarm_and_no_escalation() -> None:
    p = play()
    p.run_until(T0 + 2 * H)
    p.pump.alarms = ("occlusion",)
    p.pump.apply(p.pump.rate)
    p.feed(p.pump.report())
    assert p.state.phase is Phase.ALARM and p.state.alarm_code == "pump_alarm:occlusion"
    p.run_until(T0 + 50 * H)
    assert len(p.setpoints()) == 1  # nothing after the alarm
    refused = p.feed(ClinicianCommand(T0 + 50 * H, "resume", "dr-a", "x"))
    assert [c.reason for c in refused if isinstance(c, Refused)] == ["alarm_active"]


def test_course_cap_forces_stop() -> None:
    p = play(schedule(hold_days="3"))
    p.run_until(T0 + 40 * H)
    p.feed(ClinicianCommand(T0 + 40 * H, "hold", "dr-a", "x"))
    # A stuck hold would be bounded by the cap even if the hold were longer: jump past 9 days in one event.
    p.feed(Tick(T0 + 9 * 24 * H + H))
    assert p.state.phase is Phase.STOPPED


def test_over_infusion_alarm_after_15_minutes() -> None:
    p = play()
    p.run_until(T0 + H)
    p.pump.delivered += D("0.05")  # the pump pushed more than it was told
    p.feed(Tick(T0 + 2 * H))
    cmds = p.feed(p.pump.report())
    assert any(isinstance(c, RaiseAlarm) and c.code == "over_infusion" for c in cmds)
    assert p.pump.rate == 0


def test_syringe_mismatch_refuses_priming() -> None:
    state = initial_state("pump-1")
    from driverd.core.events import ScheduleAccepted

    state, _ = reduce(state, ScheduleAccepted(T0, schedule()), PROTOCOL)
    state, cmds = reduce(state, PumpVerified(T0, D("21.59"), NEW_ERA_RESOLUTION, "NE-1000"), PROTOCOL)
    assert state.phase is Phase.IDLE and [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_mismatch"]


def test_wrong_pump_and_old_version_refused() -> None:
    from driverd.core.events import ScheduleAccepted

    p = play()
    p.run_until(T0 + H)
    _, cmds = reduce(p.state, ScheduleAccepted(T0 + H, schedule(pump_id="other")), PROTOCOL)
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["wrong_pump"]
    _, cmds = reduce(p.state, ScheduleAccepted(T0 + H, schedule(version=1)), PROTOCOL)
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["version"]


def test_every_phase_has_an_exit_and_table_is_total_for_stop() -> None:
    live = {Phase.PRIMED, Phase.TITRATING, Phase.HOLDING, Phase.TAPERING, Phase.PAUSED, Phase.ALARM}
    assert TRANSITIONS["clinician:stop"][0] == live
