"""Findings of a review of the session's late core changes (review6, 2026-12-03), each shown by its scenario:

- a stop the pump did not take is sent again on an unreadable report too (it was only on readable ones: a pump
  whose reports turned NaN ran on unsupervised);
- after a course ended, a pump infusing with an unreadable report is stopped, as a readable one is;
- the counter-drop exemption during a syringe change does not reach across a lost link not yet acknowledged (the
  pump may have run at its panel meanwhile: 3 h of delivery vanished from the 24-h totals);
- a resume does not acknowledge the pump's own end of syringe (the syringe swapped at the panel is not verified),
  and with a lost link that is back it acknowledges the link, so change_syringe can go on (they locked each other);
- a syringe load whose counter reads back as no count (-Infinity) is refused: the change keeps waiting.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D

from driverd.core.commands import ApplySetpoint, RaiseAlarm, Refused
from driverd.core.events import ClinicianCommand, LinkLost, LinkRestored, SetpointResult, SyringeLoaded
from driverd.core.machine import step
from driverd.core.schedule import SyringeFill, SyringeSupply
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
M = timedelta(minutes=1)
AT = T0 + 30 * H + M


def running(conc: str = "50") -> Player:
    sched = schedule(conc=conc)
    if conc == "10":
        sched = replace(sched, syringes=SyringeSupply(fills=(SyringeFill(D(17), D(50)),)))
    p = Player(primed(sched), PROTOCOL, ExactPump(at=T0 - 10 * M))
    p.run_until(T0 + 30 * H)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing
    return p


def rates(cmds: tuple[object, ...]) -> list[D]:
    return [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)]


def test_a_stop_not_taken_is_sent_again_on_unreadable_reports() -> None:
    p = running()
    rate = p.state.verified_run_rate
    cmds = p.feed(ClinicianCommand(AT, "stop", "dr-a", "enough"), ack=False)
    (sp,) = [c for c in cmds if isinstance(c, ApplySetpoint)]
    p.pump.rate, p.pump.infusing = rate, True  # the pump did not take the stop
    p.feed(SetpointResult(AT, sp.setpoint.id, rate), ack=False)  # read back: still the old rate
    p.pump.rate, p.pump.infusing = rate, True
    for i in range(2, 5):
        p.pump.advance(AT + i * M)
        out = p.feed(replace(p.pump.report(), rate_ml_per_h=D("NaN")), ack=False)
        assert rates(out) == [D(0)], out  # sent again on every such report
        p.pump.rate, p.pump.infusing = rate, True  # and still not taken
    assert "report_unreadable" in p.state.alarms_raised


def test_after_the_course_an_infusing_pump_with_an_unreadable_report_is_stopped() -> None:
    p = running()
    p.feed(ClinicianCommand(AT, "stop", "dr-a", "end"))
    p.pump.advance(AT + M)
    p.feed(p.pump.report())
    assert p.state.phase is Phase.STOPPED and not p.pump.infusing
    p.pump.rate, p.pump.infusing = D("0.25"), True  # RUN at the panel after the course ended
    p.pump.advance(AT + 2 * M)
    _, readable = step(p.state, p.pump.report(), PROTOCOL)
    _, unreadable = step(p.state, replace(p.pump.report(), rate_ml_per_h=D("NaN")), PROTOCOL)
    assert rates(readable) == rates(unreadable) == [D(0)]


def test_the_counter_drop_exemption_does_not_reach_across_a_lost_link() -> None:
    p = running(conc="10")
    p.pump.advance(AT)
    p.feed(ClinicianCommand(AT, "change_syringe", "rn-1", "empty soon", None, D(17), D(50)))
    p.pump.advance(AT + M)
    p.feed(p.pump.report())  # stopped, the change waits
    p.feed(LinkLost(AT + 2 * M, "cable"))
    p.pump.rate, p.pump.infusing = D("1.0"), True  # RUN at the panel for 3 h on the old syringe,
    p.pump.advance(AT + 3 * H)
    p.pump.infusing, p.pump.delivered = False, D(0)  # then stopped, swapped, volume cleared
    p.feed(LinkRestored(AT + 3 * H))
    cmds = p.feed(p.pump.report())
    assert "counter_drop" in [c.code for c in cmds if isinstance(c, RaiseAlarm)]
    # The way on: change_syringe (counter_drop is a change cause; link_lost acknowledged by the refused resume).
    cmds = p.feed(ClinicianCommand(AT + 3 * H + M, "resume", "dr-a", "link back"))
    assert rates(cmds) == [] and not p.pump.infusing


def test_a_resume_does_not_acknowledge_the_pumps_end_of_syringe() -> None:
    p = running()
    p.pump.advance(AT)
    p.pump.alarms, p.pump.infusing = ("end_of_syringe",), False
    p.feed(p.pump.report())
    assert p.state.alarm_causes == ("pump_alarm:end_of_syringe",)
    p.pump.alarms = ()  # a syringe swapped at the pump: its alarm is gone, the volume not cleared
    p.pump.advance(AT + M)
    p.feed(p.pump.report())
    cmds = p.feed(ClinicianCommand(AT + 2 * M, "resume", "dr-a", "go on"))
    assert rates(cmds) == [] and not p.pump.infusing
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_empty"]
    cmds = p.feed(ClinicianCommand(AT + 3 * M, "change_syringe", "rn-1", "new syringe", None, D(17), D(50)))
    assert not [c for c in cmds if isinstance(c, Refused)] and p.state.syringe_change is not None


def test_the_pumps_end_of_syringe_and_a_lost_link_do_not_lock_each_other() -> None:
    p = running()
    p.pump.advance(AT)
    p.pump.alarms, p.pump.infusing = ("end_of_syringe",), False  # the pump latches it until a syringe goes in
    p.feed(p.pump.report())
    p.feed(LinkLost(AT + M, "cable"))
    p.feed(LinkRestored(AT + 2 * M))
    p.pump.advance(AT + 2 * M)
    p.feed(p.pump.report())
    r1 = p.feed(ClinicianCommand(AT + 3 * M, "resume", "dr-a", "link back"))
    assert [c.reason for c in r1 if isinstance(c, Refused)] == ["alarm_active"] and rates(r1) == []
    assert "link_lost" not in p.state.alarm_causes
    r2 = p.feed(ClinicianCommand(AT + 3 * M, "change_syringe", "rn-1", "new", None, D(17), D(50)))
    assert not [c for c in r2 if isinstance(c, Refused)] and p.state.syringe_change is not None


def test_a_load_whose_counter_is_no_count_is_refused_and_the_change_waits() -> None:
    p = running()
    p.pump.advance(AT)
    p.pump.infusing = False
    p.feed(p.pump.report())
    p.feed(ClinicianCommand(AT, "change_syringe", "rn-1", "x", None, D(17), D(50)))
    for bad in (D("-Infinity"), D("NaN"), D("-0.5")):
        cmds = p.feed(SyringeLoaded(AT + M, D("19.13"), bad))
        assert [c.reason for c in cmds if isinstance(c, Refused)] == ["counter_not_cleared"]
        assert rates(cmds) == [] and not p.pump.infusing and p.state.syringe_change is not None
    cmds = p.feed(SyringeLoaded(AT + M, D("19.13"), D(0)))
    assert p.state.syringe_change is None and p.pump.infusing
