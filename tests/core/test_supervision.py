"""What the pump really does, supervised by the pure core in every phase (issue #10, docs/safety.md SUP-*).

Each test plays a course through the core with an exact pump and then does to the pump what a real one does
(RUN at the panel, runs fast, ignores a stop, alarms during an alarm). It asserts the pump was made safe: what the
pump runs after the core's commands, not only which records came out.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D

from driverd.core.commands import ApplySetpoint, Notice, RaiseAlarm, Refused
from driverd.core.events import ClinicianCommand, LinkLost, LinkRestored, ScheduleAccepted, SetpointResult
from driverd.core.machine import step
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
M = timedelta(minutes=1)


def play(sched=None) -> Player:  # type: ignore[no-untyped-def]
    return Player(primed(sched), PROTOCOL, ExactPump(at=T0 - 10 * M))


def alarms(cmds) -> list[str]:  # type: ignore[no-untyped-def]
    return [c.code for c in cmds if isinstance(c, RaiseAlarm)]


def panel_run(p: Player, rate: D) -> None:
    """Someone presses RUN at the pump's panel (the core did not command it)."""
    p.pump.rate, p.pump.infusing = rate, True


def test_infusion_in_primed_is_stopped_within_one_report() -> None:
    p = play(schedule(auto=(False, False, False)))
    panel_run(p, D("0.5"))
    cmds = p.feed(p.pump.report())
    assert alarms(cmds) == ["unexpected_infusion"]
    assert [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)] == [D(0)]
    assert not p.pump.infusing and p.state.phase is Phase.ALARM and p.state.pending is None


def test_panel_restart_while_paused_is_stopped() -> None:
    p = play()
    p.run_until(T0 + 2 * H)
    p.pump.infusing = False  # stopped at the panel
    p.feed(p.pump.report())
    assert p.state.phase is Phase.PAUSED
    panel_run(p, D("0.083"))  # and restarted at the panel
    cmds = p.feed(p.pump.report())
    assert alarms(cmds) == ["unexpected_infusion"] and not p.pump.infusing


def test_infusion_after_stop_is_stopped_and_course_stays_stopped() -> None:
    p = play()
    p.run_until(T0 + 2 * H)
    p.feed(ClinicianCommand(T0 + 2 * H, "stop", "dr", "done"))
    panel_run(p, D("0.25"))
    cmds = p.feed(p.pump.report())
    assert alarms(cmds) == ["unexpected_infusion"] and not p.pump.infusing
    assert p.state.phase is Phase.STOPPED


def test_a_stop_the_pump_ignores_is_resent_on_every_report_until_read_back() -> None:
    p = play()
    p.run_until(T0 + 2 * H)
    p.feed(ClinicianCommand(T0 + 2 * H, "stop", "dr", "done"), ack=False)
    panel_run(p, D("0.083"))  # the stop did not take
    sid = p.state.pending.setpoint.id if p.state.pending else -1
    cmds = p.feed(SetpointResult(T0 + 2 * H, sid, D("0.083")), ack=False)  # first miss: re-sent at once
    assert [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)] == [D(0)]
    panel_run(p, D("0.083"))
    cmds = p.feed(SetpointResult(T0 + 2 * H, sid, D("0.083")), ack=False)  # second miss: alarm, wait for a report
    assert alarms(cmds) == ["readback_mismatch"] and not any(isinstance(c, ApplySetpoint) for c in cmds)
    for i in range(3):  # each report while it still runs sends the stop again; it is never dropped
        panel_run(p, D("0.083"))
        p.pump.advance(T0 + 2 * H + (i + 1) * 10 * M)
        cmds = p.feed(p.pump.report(), ack=False)
        assert [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)] == [D(0)]
    p.pump.apply(D(0))  # finally taken
    p.feed(p.pump.report())
    assert p.state.pending is None and not p.pump.infusing


def test_a_reduce_the_pump_refuses_becomes_a_stop_after_the_second_miss() -> None:
    """Review finding (2026-12-03): a decrease the pump refuses (a New Era in other rate units answers ?NA) was
    re-sent on every report while the pump ran on above it. After the second miss the course alarms and sends a
    stop instead; the stop is then re-sent until read back, like any stop."""
    p = play()
    p.run_until(T0 + 25 * H)  # 300 mg/24h: 0.250 mL/h
    p.feed(ClinicianCommand(T0 + 25 * H, "reduce", "dr", "drowsy", D(100)), ack=False)
    sid = p.state.pending.setpoint.id if p.state.pending else -1
    cmds = p.feed(SetpointResult(T0 + 25 * H, sid, D("0.250")), ack=False)  # first miss: the reduce again
    assert [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)] == [D("0.083")]
    cmds = p.feed(SetpointResult(T0 + 25 * H, sid, D("0.250")), ack=False)  # second miss: alarm and a stop
    sent = [c.setpoint for c in cmds if isinstance(c, ApplySetpoint)]
    assert alarms(cmds) == ["readback_mismatch"] and [(s.intent, s.rate_ml_per_h) for s in sent] == [("stop", D(0))]
    assert p.state.phase is Phase.ALARM and p.state.commanded_rate == 0
    p.feed(SetpointResult(T0 + 25 * H, sent[0].id, D(0)), ack=False)  # the pump takes a stop (STP)
    cmds = p.feed(p.pump.report())
    assert p.state.pending is None and not p.pump.infusing and cmds == ()


def test_reduce_in_alarm_reaches_a_pump_that_still_infuses() -> None:
    p = play()
    p.run_until(T0 + 25 * H)  # 300 mg/24h
    p.feed(LinkLost(T0 + 25 * H, "cut"))
    p.feed(LinkRestored(T0 + 26 * H))
    p.feed(p.pump.report())
    assert p.state.phase is Phase.ALARM and p.pump.infusing
    cmds = p.feed(ClinicianCommand(T0 + 26 * H, "reduce", "dr", "drowsy", D(100)))
    assert [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)] == [D("0.083")]
    assert p.pump.rate == D("0.083") and p.state.phase is Phase.ALARM


def test_pushed_lower_maximum_in_alarm_reaches_the_pump() -> None:
    p = play()
    p.run_until(T0 + 25 * H)
    p.feed(LinkLost(T0 + 25 * H, "cut"))
    p.feed(LinkRestored(T0 + 26 * H))
    p.feed(p.pump.report())
    assert p.state.schedule is not None
    lower = replace(p.state.schedule, version=2, steps=p.state.schedule.steps[:1])
    p.feed(ScheduleAccepted(T0 + 26 * H, lower))
    assert p.pump.rate == D("0.083")


def test_a_pump_alarm_during_another_alarm_is_its_own_cause() -> None:
    p = play()
    p.run_until(T0 + 2 * H)
    p.feed(LinkLost(T0 + 2 * H, "cut"))
    p.feed(LinkRestored(T0 + 3 * H))
    p.pump.alarms = ("occlusion",)
    p.pump.apply(p.pump.rate)
    cmds = p.feed(p.pump.report())
    assert alarms(cmds) == ["pump_alarm:occlusion"]
    assert p.state.alarm_causes == ("link_lost", "pump_alarm:occlusion")
    cmds = p.feed(ClinicianCommand(T0 + 3 * H, "resume", "dr", "checked"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["alarm_active"]
    assert p.state.alarm_causes == ("link_lost", "pump_alarm:occlusion")  # a refused resume clears nothing
    p.pump.alarms = ()
    p.pump.apply(D(0))
    p.feed(p.pump.report())
    cmds = p.feed(ClinicianCommand(T0 + 3 * H, "resume", "dr", "line flushed"))
    assert [c.detail for c in cmds if isinstance(c, Notice) and c.code == "alarm_cleared"] == [
        "link_lost, pump_alarm:occlusion"]
    assert p.state.alarm_causes == () and p.pump.infusing


def test_delivery_above_the_ceiling_is_stopped() -> None:
    # 500 mg/24h at 50 mg/mL is 10 mL/24h. A pump running 20 % fast at the top step crosses it.
    p = play()
    p.run_until(T0 + 48 * H + 10 * M)
    assert p.state.level_mg_per_24h == D(500)
    p.pump.rate = p.pump.rate * D("1.2")  # runs fast: the pump's own fault
    seen: list[str] = []
    t = p.pump.at
    while not seen and t < T0 + 80 * H:
        t += 10 * M
        p.pump.advance(t)
        seen = alarms(p.feed(p.pump.report()))
    assert seen and seen[0] in ("rate_mismatch", "over_infusion", "dose_ceiling")
    assert not p.pump.infusing


def test_a_fault_after_days_of_correct_running_is_caught_within_the_window() -> None:
    p = play()
    p.run_until(T0 + 96 * H)  # holding at 500 for two days
    assert p.state.phase is Phase.HOLDING
    start = p.pump.at
    t = start
    rate = p.pump.rate
    while p.state.phase is Phase.HOLDING:
        t += M
        p.pump.delivered += rate * D("0.8") / 60  # delivers 20 % less, reports the commanded rate
        p.pump.at = t
        p.feed(p.pump.report())
    assert p.state.alarm_causes == ("under_infusion",)
    # One window (stretched to 29 min at this low rate so the counter step is within 10 %), not diluted by days.
    assert t - start <= timedelta(minutes=31)


def test_schedule_update_refused_under_taper_lock_in_alarm() -> None:
    p = play(schedule(taper=((250, 0), (100, 12), (0, 24))))
    p.run_until(T0 + 121 * H)
    p.feed(LinkLost(T0 + 121 * H, "cut"))
    assert p.state.phase is Phase.ALARM and p.state.taper_lock
    assert p.state.schedule is not None
    newer = replace(p.state.schedule, version=2)
    _, cmds = step(p.state, ScheduleAccepted(T0 + 122 * H, newer), PROTOCOL)
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["taper_lock"]


def test_nan_and_huge_doses_are_refusals_not_exceptions() -> None:
    p = play()
    p.run_until(T0 + 25 * H)
    for bad in (D("NaN"), D("sNaN"), D("Infinity"), D("1E+999999"), D("-1E+999999")):
        before = p.state
        after, cmds = step(before, ClinicianCommand(T0 + 25 * H, "reduce", "dr", "x", bad), PROTOCOL)
        assert after == before and any(isinstance(c, Refused) for c in cmds), bad


def test_running_above_the_commanded_rate_in_alarm_is_stopped() -> None:
    p = play()
    p.run_until(T0 + 2 * H)  # 100 mg/24h: 0.083 mL/h
    p.feed(LinkLost(T0 + 2 * H, "cut"))
    p.feed(LinkRestored(T0 + 3 * H))
    panel_run(p, D("0.5"))  # someone reprogrammed it at the panel during the outage
    cmds = p.feed(p.pump.report())
    assert alarms(cmds) == ["unexpected_infusion"]
    assert p.state.alarm_causes == ("link_lost", "unexpected_infusion") and not p.pump.infusing


def test_gate_refuses_huge_exponents_without_raising() -> None:
    from driverd.core.kernel import Proposal, Refusal, gate

    p = play()
    p.run_until(T0 + 25 * H)
    for bad in (D("1E+999999"), D("1E+99"), D("NaN"), D("-Infinity")):
        for intent in ("escalate", "reduce", "resume", "stop"):
            verdict = gate(p.state, PROTOCOL, Proposal(bad, intent, "clinician", "x"), T0 + 25 * H)  # type: ignore[arg-type]
            assert isinstance(verdict, Refusal), (bad, intent)
