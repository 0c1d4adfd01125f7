"""Time faults in the core: a wall-clock step blocks escalation until acknowledged (decreases and stop stay
allowed); a resume keeps the course level and, after a long stop, restarts the step interval."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

from driverd.core.commands import ApplySetpoint, Notice, RaiseAlarm, Refused
from driverd.core.events import ClinicianCommand, ClockStepped, ScheduleAccepted, Tick
from driverd.core.kernel import Proposal, Refusal, gate
from driverd.core.machine import LONG_STOP, reduce
from driverd.core.records import event_from_record, event_to_record
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
TWO_DAYS = D(2 * 86_400)


def play(sched=None) -> Player:  # type: ignore[no-untyped-def]
    return Player(primed(sched), PROTOCOL, ExactPump(at=T0 - timedelta(minutes=10)))


def stepped(at, delta_s=TWO_DAYS) -> ClockStepped:  # type: ignore[no-untyped-def]
    return ClockStepped(at, delta_s, at + timedelta(seconds=float(delta_s)))


def reasons(cmds) -> list[str]:  # type: ignore[no-untyped-def]
    return [c.reason for c in cmds if isinstance(c, Refused)]


def sent(cmds) -> list[D]:  # type: ignore[no-untyped-def]
    return [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)]


def clinician(at, action, dose=None) -> ClinicianCommand:  # type: ignore[no-untyped-def]
    return ClinicianCommand(at, action, "dr-a", "test", dose)


# ------------------------------------------------------------------------------------------------ clock steps


def test_a_clock_step_blocks_automatic_and_clinician_escalation_until_acknowledged() -> None:
    p = play()
    p.run_until(T0 + 2 * H)
    assert p.state.level_mg_per_24h == 100
    cmds = p.feed(stepped(T0 + 2 * H))
    alarms = [c for c in cmds if isinstance(c, RaiseAlarm)]
    assert [a.code for a in alarms] == ["clock_step"] and "forward by 172800 s" in alarms[0].detail
    assert p.state.phase is Phase.TITRATING  # the pump keeps running its verified rate
    before = len(p.setpoints())
    p.run_until(T0 + 30 * H)  # the 300 step fell due at T0 + 24 h
    assert len(p.setpoints()) == before, "no escalation while the clock is suspect"
    refusals = [c for _, c in p.log if isinstance(c, Refused) and c.reason == "clock_step"]
    assert len(refusals) == 1, "an automatic step's refusal is logged once, not on every tick"
    assert reasons(p.feed(clinician(T0 + 30 * H, "escalate"))) == ["clock_step"]
    assert p.pump.rate == D("0.083")
    # A clinician acknowledges: the due step goes out on the next tick.
    cmds = p.feed(clinician(T0 + 30 * H, "ack_clock"))
    assert [c.code for c in cmds if isinstance(c, Notice)] == ["clock_acknowledged"] and not p.state.clock_fault
    p.run_until(T0 + 31 * H)
    assert p.pump.rate == D("0.25")


def test_decreases_and_stop_are_allowed_during_a_clock_fault() -> None:
    p = play(schedule(auto=(True, False, False)))
    p.run_until(T0 + 25 * H)
    p.feed(clinician(T0 + 25 * H, "escalate"))
    assert p.pump.rate == D("0.25")
    p.feed(stepped(T0 + 26 * H, D(-3600)))
    assert "backward by 3600 s" in p.state.clock_fault
    assert sent(p.feed(clinician(T0 + 26 * H, "reduce"))) == [D("0.083")]
    assert p.pump.rate == D("0.083")
    assert sent(p.feed(clinician(T0 + 27 * H, "stop"))) == [D(0)]
    assert p.state.phase is Phase.STOPPED


def test_a_clock_step_blocks_the_start_of_a_course() -> None:
    p = play()
    p.feed(stepped(T0 - timedelta(minutes=5)))
    p.run_until(T0 + 2 * H)
    assert p.setpoints() == [] and p.state.phase is Phase.PRIMED
    assert reasons(p.feed(clinician(T0 + 2 * H, "escalate"))) == ["clock_step"]


def test_the_kernel_refuses_an_escalation_while_the_clock_is_suspect() -> None:
    p = play(schedule(auto=(True, False, False)))
    p.run_until(T0 + 25 * H)
    p.feed(stepped(T0 + 25 * H))
    verdict = gate(p.state, PROTOCOL, Proposal(D(300), "escalate", "clinician", "forged"), T0 + 25 * H)
    assert isinstance(verdict, Refusal) and verdict.reason == "clock_step"
    down = gate(p.state, PROTOCOL, Proposal(D(50), "reduce", "clinician", "less"), T0 + 25 * H)
    assert not isinstance(down, Refusal)


def test_acknowledging_without_a_clock_fault_is_refused() -> None:
    p = play()
    assert reasons(p.feed(clinician(T0, "ack_clock"))) == ["no_clock_fault"]


def test_a_clock_fault_outlives_the_course_into_the_next_one() -> None:
    p = play()
    p.run_until(T0 + H)
    p.feed(stepped(T0 + H))
    p.feed(clinician(T0 + H, "stop"))
    state, _ = reduce(p.state, ScheduleAccepted(T0 + 2 * H, schedule(schedule_id="S-2")), PROTOCOL)
    assert state.clock_fault and state.phase is Phase.IDLE


def test_clock_stepped_round_trips_through_its_audit_record() -> None:
    ev = stepped(T0, D("-3600.25"))
    name, fields = event_to_record(ev)
    assert name == "clock_stepped" and fields["direction"] == "backward" and fields["delta_s"] == "-3600.25"
    assert event_from_record({"event": name, **fields}) == ev


# ------------------------------------------------------------------------------------------------ resume


def _stop_at_pump(p: Player, at, alarm: str | None = None) -> None:  # type: ignore[no-untyped-def]
    p.pump.advance(at)
    p.pump.infusing = False
    if alarm:
        p.pump.alarms = (alarm,)
    p.feed(Tick(at))
    p.feed(p.pump.report())
    assert p.state.phase is (Phase.ALARM if alarm else Phase.PAUSED)


def _resume(p: Player, at) -> None:  # type: ignore[no-untyped-def]
    p.pump.alarms = ()
    p.pump.advance(at)
    p.feed(p.pump.report())
    cmds = p.feed(clinician(at, "resume"))
    assert not reasons(cmds), cmds
    assert p.state.phase is Phase.TITRATING


def test_a_resume_keeps_the_level_whose_rate_was_verified() -> None:
    """Regression: the resume lowered 100 to 99.6 (what 0.083 mL/h delivers), so a later "escalation" to 100
    was a change at the same rate."""
    p = play(schedule(auto=(True, False, False)))
    p.run_until(T0 + H)
    _stop_at_pump(p, T0 + 2 * H)
    _resume(p, T0 + 2 * H + timedelta(minutes=10))
    assert p.state.level_mg_per_24h == 100 and p.pump.rate == D("0.083")
    p.run_until(T0 + 25 * H)
    p.feed(clinician(T0 + 25 * H, "escalate"))
    assert [c.setpoint.requested_mg_per_24h for _, c in p.setpoints()][-1] == 300
    assert p.pump.rate == D("0.25")


def test_a_resume_above_the_verified_rate_still_lowers_the_level() -> None:
    p = play(schedule(auto=(True, False, False)))
    p.run_until(T0 + H)
    _stop_at_pump(p, T0 + 2 * H)
    # A level above what the pump ever verified (here forced): the resume is capped at the verified rate.
    from dataclasses import replace

    p.state = replace(p.state, level_mg_per_24h=D(150))
    _resume(p, T0 + 3 * H)
    assert p.pump.rate == D("0.083") and p.state.level_mg_per_24h == D("99.6")


def test_a_resume_after_a_long_stop_restarts_the_step_interval() -> None:
    """No escalation one second after resuming from a 2-day stop: the next one waits a full interval."""
    p = play(schedule(auto=(True, False, False)))
    p.run_until(T0 + H)
    _stop_at_pump(p, T0 + 2 * H, alarm="occlusion")
    resumed = T0 + 50 * H
    _resume(p, resumed)
    cmds = p.feed(clinician(resumed + timedelta(seconds=1), "escalate"))
    assert reasons(cmds) == ["interval"] and p.pump.rate == D("0.083")
    interval = timedelta(hours=float(PROTOCOL.step_interval_hours))
    p.run_until(resumed + interval)
    p.feed(clinician(resumed + interval, "escalate"))
    assert p.pump.rate == D("0.25")


def test_a_resume_after_a_short_stop_keeps_the_step_interval() -> None:
    p = play(schedule(auto=(True, False, False)))
    p.run_until(T0 + 20 * H)
    _stop_at_pump(p, T0 + 20 * H)
    _resume(p, T0 + 20 * H + LONG_STOP - timedelta(minutes=1))
    p.run_until(T0 + 24 * H + timedelta(minutes=1))
    p.feed(clinician(T0 + 24 * H + timedelta(minutes=1), "escalate"))
    assert p.pump.rate == D("0.25")
    assert p.state.interrupted_at is None
