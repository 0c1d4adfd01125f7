"""Syringe change as a course event (issue 13, part 2), through the pure core."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D

import pytest

from driverd.core.commands import ApplySetpoint, Notice, Refused
from driverd.core.events import ClinicianCommand, PumpReport, SyringeLoaded, Tick
from driverd.core.kernel import max_window_mg
from driverd.core.records import event_from_record, event_to_record
from driverd.core.schedule import Schedule, SyringeFill, SyringeSupply
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
DIAMETER = D("19.13")


def play(sched: Schedule | None = None) -> Player:
    return Player(primed(sched), PROTOCOL, ExactPump(at=T0 - timedelta(minutes=10)))


def with_fills(sched: Schedule, *fills: tuple[str, str]) -> Schedule:
    return replace(sched, syringes=SyringeSupply(fills=tuple(SyringeFill(D(f), D(c)) for f, c in fills)))


def change(p: Player, at, fill: str = "17", conc: str | None = None) -> tuple:
    """The change as a nurse gives it: if the pump still runs (old syringe in), the first command stops it and
    the second, after the swap, is the one the read-back follows."""
    cmds = command(p, at, fill, conc)
    if p.state.syringe_change is not None and not p.state.syringe_change.loaded:
        p.feed(p.pump.report())  # the channel reads the pump before every change command
        cmds += command(p, at, fill, conc)
    return cmds


def command(p: Player, at, fill: str = "17", conc: str | None = None) -> tuple:
    return p.feed(ClinicianCommand(at, "change_syringe", "nurse-1", "daily change", None, D(fill),
                                   None if conc is None else D(conc)))


def loaded(p: Player, at, diameter: D = DIAMETER, counter: D | None = None) -> tuple:
    return p.feed(SyringeLoaded(at, diameter, p.pump.delivered if counter is None else counter))


def refusals(cmds: tuple) -> list[str]:
    return [c.reason for c in cmds if isinstance(c, Refused)]


def rates(cmds: tuple) -> list[D]:
    return [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)]


def test_change_in_hold_stops_then_resumes_at_the_same_level_and_clocks() -> None:
    p = play()
    p.run_until(T0 + 60 * H)  # holding at 500 (0.416 mL/h) since T0 + 48 h
    before = p.state
    assert before.phase is Phase.HOLDING
    cmds = command(p, T0 + 60 * H)  # the old syringe still runs: stop and wait for the swap
    assert rates(cmds) == [D(0)] and p.state.phase is Phase.PAUSED and p.state.syringe_change is not None
    assert [c.setpoint.intent for c in cmds if isinstance(c, ApplySetpoint)] == ["stop"]  # a decrease
    assert not p.pump.infusing and not p.state.syringe_change.loaded
    assert refusals(loaded(p, T0 + 60 * H)) == ["syringe_not_loaded"]  # no read-back before the swap
    p.feed(p.pump.report())
    cmds = command(p, T0 + 60 * H + timedelta(minutes=30))  # after the swap
    assert rates(cmds) == [] and p.state.syringe_change.loaded
    cmds = loaded(p, T0 + 61 * H)
    assert rates(cmds) == [D("0.416")]
    s = p.state
    assert s.phase is Phase.HOLDING and s.level_mg_per_24h == D(500) and s.syringe_change is None
    assert s.hold_started_at == before.hold_started_at and s.last_change_at == before.last_change_at
    assert s.syringe_changes == 1 and s.remaining_ml == D(17) and not s.taper_lock
    assert any(isinstance(c, Notice) and c.code == "syringe_changed" for c in cmds)
    # the hold still ends 3 days after it began: the change did not extend the course
    p.run_until(T0 + 121 * H)
    assert p.state.phase is Phase.STOPPED


def test_a_short_change_keeps_the_step_interval() -> None:
    p = play()
    p.run_until(T0 + 2 * H)
    change(p, T0 + 2 * H)
    p.run_until(T0 + 3 * H)  # one hour without a syringe: shorter than the 2-h "long stop"
    loaded(p, T0 + 3 * H)
    assert p.state.phase is Phase.TITRATING and p.state.last_change_at == T0
    p.run_until(T0 + 24 * H + 10 * timedelta(minutes=1))
    assert p.state.level_mg_per_24h == D(300)  # escalated on time, 24 h after the start


def test_a_long_change_restarts_the_step_interval_as_any_resume() -> None:
    """A change that waited longer than LONG_STOP for its syringe (here 28 h, across the step that was due) leaves
    the patient unobserved at the level as a stop does: no escalation one minute after the new syringe runs."""
    p = play()
    p.run_until(T0 + 2 * H)
    change(p, T0 + 2 * H)
    p.run_until(T0 + 30 * H)
    cmds = loaded(p, T0 + 30 * H)
    assert rates(cmds) == [D("0.083")] and p.state.last_change_at == T0 + 30 * H
    p.run_until(T0 + 53 * H)
    assert p.state.level_mg_per_24h == D(100)  # not before a full interval at the level
    p.run_until(T0 + 54 * H + 10 * timedelta(minutes=1))
    assert p.state.level_mg_per_24h == D(300)


def _failed_load_of_a_stronger_syringe(p: Player, at) -> None:
    """Holding at 500 mg/24h on 50 mg/mL (0.416 mL/h); the nurse puts in an approved 100 mg/mL syringe; the
    daemon's counter clear at the load does not read back 0: the load is refused, the course alarms."""
    from driverd.core.events import CounterCleared

    p.run_until(at)
    assert p.state.phase is Phase.HOLDING and p.state.commanded_rate == D("0.416")
    change(p, at, conc="100")
    assert p.state.syringe_change is not None and p.state.syringe_change.loaded
    cmds = p.feed(CounterCleared(at, p.pump.delivered, p.pump.delivered, ""))
    assert refusals(cmds) == ["counter_not_cleared"] and p.state.phase is Phase.ALARM


def test_a_resume_never_runs_the_old_rate_on_a_new_unverified_syringe() -> None:
    """Review finding (2026-12-03): a resume after a refused load dropped the change and ran 0.250/0.416 mL/h (the
    50 mg/mL rates) from the 100 mg/mL syringe in the pump: up to 998 mg/24h. Now the resume acknowledges the
    alarm, sends nothing, and the course waits paused with the change; the pump stays stopped. The verified load
    that follows resumes at the new concentration's rate, within the ceiling."""
    from driverd.core.events import CounterCleared

    p = play(with_fills(schedule(), ("17", "100")))
    at = T0 + 60 * H
    _failed_load_of_a_stronger_syringe(p, at)
    cmds = p.feed(ClinicianCommand(at + H, "resume", "dr-a", "resume on the syringe in the pump"))
    assert rates(cmds) == [] and refusals(cmds) == ["syringe_change_waiting"]
    assert p.state.phase is Phase.PAUSED and p.state.syringe_change is not None and not p.pump.infusing
    assert not p.state.alarm_causes and any(isinstance(c, Notice) and c.code == "alarm_cleared" for c in cmds)
    p.run_until(at + 30 * H)  # the hold's end and the taper come and go: nothing runs
    assert not p.pump.infusing and p.state.phase is Phase.PAUSED
    assert refusals(p.feed(ClinicianCommand(at + 30 * H, "resume", "dr-a", "again"))) == ["syringe_change_waiting"]
    # The load retried (change_syringe again, the counter now clears): the new syringe runs at its own rate.
    command(p, at + 30 * H, conc="100")
    before = p.pump.delivered
    p.pump.delivered = D(0)  # the simulated pump's counter is cleared
    assert "counter_cleared" in [c.code for c in p.feed(CounterCleared(at + 30 * H, before, D(0), ""))
                                 if isinstance(c, Notice)]
    cmds = loaded(p, at + 30 * H, counter=D(0))
    assert p.state.concentration == D(100) and p.pump.infusing
    assert all(r * 24 * 100 <= PROTOCOL.ceiling_mg_per_24h for r in rates(cmds)) and rates(cmds)


def test_an_alarm_while_a_loaded_change_waits_cannot_force_the_old_rate() -> None:
    """A lost link while the new syringe waits for its read-back: change_syringe is refused (another alarm), and
    the resume that used to be the only way on ran the old rate. Now it acknowledges into paused, and the load
    (which the daemon takes in paused) resumes at the new rate."""
    from driverd.core.events import LinkLost, LinkRestored

    p = play(with_fills(schedule(), ("17", "100")))
    at = T0 + 60 * H
    p.run_until(at)
    change(p, at, conc="100")
    assert p.state.syringe_change.loaded
    p.feed(LinkLost(at, "cable"))
    p.feed(LinkRestored(at + H))
    assert refusals(command(p, at + H, conc="100")) == ["alarm_active"]
    cmds = p.feed(ClinicianCommand(at + H, "resume", "dr-a", "link back"))
    assert rates(cmds) == [] and refusals(cmds) == ["syringe_change_waiting"] and p.state.phase is Phase.PAUSED
    cmds = loaded(p, at + H)
    assert p.state.concentration == D(100) and rates(cmds) == [D("0.208")]


def test_a_course_does_not_start_while_a_loaded_change_waits() -> None:
    """Primed; a change to a 100 mg/mL syringe given 5 minutes before the start, its read-back not yet in (the
    daemon loads it on its next poll; a slow or lost link delays that): at the start time the kernel refuses the
    start at 50 mg/mL (logged once), the pump stays stopped. The verified load lets the next tick start at the new
    concentration."""
    p = Player(primed(with_fills(schedule(), ("17", "100"))), PROTOCOL, ExactPump(at=T0 - timedelta(minutes=10)))
    command(p, T0 - timedelta(minutes=5), conc="100")
    assert p.state.phase is Phase.PRIMED and p.state.syringe_change.loaded
    seen = []
    for minute in range(0, 30):
        seen += refusals(p.feed(Tick(T0 + minute * timedelta(minutes=1))))
    assert seen == ["syringe_change_waiting"] and not p.pump.infusing and p.state.phase is Phase.PRIMED
    loaded(p, T0 + 30 * timedelta(minutes=1))
    assert p.state.concentration == D(100) and not p.pump.infusing and p.state.syringe_change is None
    cmds = p.feed(Tick(T0 + 31 * timedelta(minutes=1)))
    assert rates(cmds) == [D("0.041")]  # 100 mg/24h at 100 mg/mL, toward less drug


@pytest.mark.parametrize("intent", ["start", "escalate", "resume"])
def test_the_kernel_refuses_every_increase_while_a_change_waits(intent: str) -> None:
    from driverd.core.kernel import Proposal, Refusal, Setpoint, gate
    from driverd.core.state import SyringeChange

    p = play()
    p.run_until(T0 + 30 * H)
    waiting = replace(p.state, syringe_change=SyringeChange(D(17), D(50), "n", "r", T0 + 30 * H, True))
    verdict = gate(waiting, PROTOCOL, Proposal(D(300), intent, "clinician", "r"), T0 + 30 * H)
    assert isinstance(verdict, Refusal) and verdict.reason == "syringe_change_waiting"
    for decrease in ("reduce", "stop", "taper"):
        dose = D(0) if decrease == "stop" else D(100)
        assert isinstance(gate(waiting, PROTOCOL, Proposal(dose, decrease, "clinician", "r"), T0 + 30 * H),
                          Setpoint), decrease  # decreases and stop are always allowed


def test_concentration_change_recomputes_the_rate_down_and_counts_drug_in_mg() -> None:
    p = play(with_fills(schedule(), ("17", "100")))
    p.run_until(T0 + 60 * H)
    ml_before = p.state.delivered_ml
    change(p, T0 + 60 * H, conc="100")
    cmds = loaded(p, T0 + 60 * H)
    # 500 mg/24h at 100 mg/mL: 0.2083 -> 0.208 mL/h (toward less drug), never above the 499.2 mg/24h before
    assert rates(cmds) == [D("0.208")] and p.state.concentration == D(100)
    assert D("0.208") * 24 * 100 <= D("0.416") * 24 * 50
    p.run_until(T0 + 70 * H)
    new_ml = p.state.delivered_ml - ml_before
    assert close(new_ml, D("0.208") * 10)
    assert close(p.state.delivered_mg, ml_before * 50 + new_ml * 100)
    # the rolling 24-h window (T0+46 h .. T0+70 h) counts each syringe at its own concentration
    old_ml = D("0.25") * 2 + D("0.416") * 12
    assert close(max_window_mg(p.state, D(0), T0 + 70 * H), old_ml * 50 + D("0.208") * 10 * 100)


def close(a: D, b: D) -> bool:
    """Equal up to the harness pump's 34-digit arithmetic (its hours are divided, e.g. 10 min = 1/6 h)."""
    return abs(a - b) < D("1e-20")


def test_lower_concentration_resumes_at_the_same_dose_never_more() -> None:
    p = play(with_fills(schedule(conc="100"), ("17", "50")))
    p.run_until(T0 + 60 * H)
    assert p.state.commanded_rate == D("0.208")
    change(p, T0 + 60 * H, conc="50")
    cmds = loaded(p, T0 + 60 * H)
    assert rates(cmds) == [D("0.416")]  # 0.416 x 50 = 0.208 x 100 mg/h: the same drug
    assert p.state.phase is Phase.HOLDING


def test_refused_in_stopped_and_idle() -> None:
    p = play()
    p.run_until(T0 + 121 * H)
    assert p.state.phase is Phase.STOPPED
    assert refusals(change(p, T0 + 122 * H)) == ["illegal_transition"]
    from driverd.core.machine import initial_state, step

    idle, cmds = step(initial_state("pump-1"), ClinicianCommand(T0, "change_syringe", "n", "r", None, D(17)), PROTOCOL)
    assert refusals(cmds) == ["illegal_transition"] and idle.phase is Phase.IDLE


@pytest.mark.parametrize(("fill", "conc", "reason"), [
    ("18", None, "fill_volume"),  # above the 20 mL model's max fill
    ("0", None, "fill_volume"),
    ("17", "100", "concentration_not_approved"),  # in the library, not in the signed schedule
    ("17", "20", "concentration"),  # not in the drug library
])
def test_bad_fill_or_concentration_refused_and_nothing_changes(fill: str, conc: str | None, reason: str) -> None:
    p = play()
    p.run_until(T0 + 30 * H)
    before = p.state
    cmds = change(p, T0 + 30 * H, fill, conc)
    assert refusals(cmds) == [reason] and p.state == before and p.pump.infusing


def test_allowed_in_alarm_only_for_end_of_syringe() -> None:
    p = play()
    p.run_until(T0 + 30 * H)
    p.pump.alarms = ("occlusion",)
    p.pump.infusing = False
    p.feed(p.pump.report())
    assert p.state.phase is Phase.ALARM
    assert refusals(change(p, T0 + 30 * H)) == ["alarm_active"]

    p = play()
    p.run_until(T0 + 30 * H)
    p.pump.alarms = ("end_of_syringe",)
    p.pump.infusing = False
    p.feed(p.pump.report())
    assert p.state.phase is Phase.ALARM and "pump_alarm:end_of_syringe" in p.state.alarm_causes
    p.pump.alarms = ()  # acknowledged at the pump, new syringe in
    p.feed(p.pump.report())
    cmds = change(p, T0 + 31 * H)
    assert not refusals(cmds) and p.state.phase is Phase.PAUSED and p.state.alarm_causes == ()
    cmds = loaded(p, T0 + 31 * H)
    assert rates(cmds) == [D("0.25")] and p.state.phase is Phase.TITRATING


def test_diameter_mismatch_keeps_the_change_waiting() -> None:
    p = play()
    p.run_until(T0 + 30 * H)
    change(p, T0 + 30 * H)
    cmds = loaded(p, T0 + 30 * H, diameter=D("21.59"))
    assert refusals(cmds) == ["syringe_mismatch"] and p.state.phase is Phase.PAUSED and not p.pump.infusing
    assert p.state.syringe_change is not None
    cmds = loaded(p, T0 + 31 * H)
    assert rates(cmds) == [D("0.25")] and p.state.phase is Phase.TITRATING


def test_counter_reset_of_the_new_syringe_carries_over_exactly() -> None:
    p = play()
    p.run_until(T0 + 30 * H)
    total = p.state.delivered_ml
    change(p, T0 + 30 * H)
    p.pump.delivered = D(0)  # this pump resets its counter with a new syringe
    loaded(p, T0 + 30 * H, counter=D(0))
    assert p.state.delivered_ml == total
    p.run_until(T0 + 40 * H)
    assert close(p.state.delivered_ml, total + D("0.25") * 10)
    assert close(p.state.remaining_ml, D(17) - D("0.25") * 10)


def test_syringe_loaded_without_a_change_is_refused() -> None:
    p = play()
    p.run_until(T0 + 30 * H)
    p.feed(ClinicianCommand(T0 + 30 * H, "stop", "dr", "end"))
    from driverd.core.machine import step

    _, cmds = step(p.state, SyringeLoaded(T0 + 31 * H, DIAMETER, D(0)), PROTOCOL)
    assert refusals(cmds) == ["illegal_transition"]


def test_change_in_primed_before_the_start() -> None:
    p = play()
    cmds = change(p, T0 - timedelta(minutes=8))
    assert rates(cmds) == [] and p.state.phase is Phase.PRIMED
    loaded(p, T0 - timedelta(minutes=7))
    assert p.state.syringe_changes == 1
    p.feed(Tick(T0))
    assert p.state.phase is Phase.TITRATING


def test_records_round_trip() -> None:
    for ev in (ClinicianCommand(T0, "change_syringe", "n", "r", None, D("17"), D("100")),
               ClinicianCommand(T0, "change_syringe", "n", "r", None, D("17"), None),
               SyringeLoaded(T0, DIAMETER, D("12.345"))):
        name, fields = event_to_record(ev)
        assert event_from_record({"event": name, **fields}) == ev
    # other clinician commands keep their record shape
    _, fields = event_to_record(ClinicianCommand(T0, "resume", "n", "r"))
    assert "fill_volume_ml" not in fields
    assert PumpReport  # imported for the harness's reports


# --- time to empty (issue 13, part 3) -------------------------------------------------------------------------


def notices(p: Player, code: str) -> list[str]:
    return [c.detail for _, c in p.log if isinstance(c, Notice) and c.code == code]


def test_near_empty_warning_once_an_hour_before_the_predicted_empty_time() -> None:
    from driverd.core.machine import predicted_empty_at

    p = play()  # one 17 mL syringe at 50 mg/mL: 1.992 + 6 mL by T0 + 48 h, then 0.416 mL/h
    p.run_until(T0 + 68 * H)
    assert notices(p, "syringe_near_empty") == []
    empty_at = predicted_empty_at(p.state)
    assert empty_at is not None and T0 + 69 * H < empty_at < T0 + 70 * H  # 9.008 mL / 0.416 mL/h = 21.65 h
    p.run_until(T0 + 69 * H + 30 * timedelta(minutes=1))
    warned = notices(p, "syringe_near_empty")
    assert len(warned) == 1 and "syringe 1 predicted empty at" in warned[0]
    # at the end the pump stops on its own (a New Era pump reports a stall): the cause is the empty syringe
    p.run_until(empty_at + timedelta(minutes=10))
    p.pump.alarms = ("occlusion",)
    p.pump.infusing = False
    p.feed(p.pump.report())
    assert p.state.phase is Phase.ALARM and p.state.alarm_causes == ("syringe_empty",)
    p.pump.alarms = ()  # acknowledged at the pump (a resume does that first)
    p.feed(p.pump.report())
    cmds = p.feed(ClinicianCommand(p.pump.at, "resume", "rn", "try"))
    assert refusals(cmds) == ["syringe_empty"]
    change(p, p.pump.at)
    loaded(p, p.pump.at)
    assert p.state.phase is Phase.HOLDING and not p.state.empty_warned and p.state.remaining_ml == D(17)


def test_an_occlusion_with_syringe_left_is_not_an_empty_syringe() -> None:
    p = play()
    p.run_until(T0 + 30 * H)
    p.pump.alarms = ("occlusion",)
    p.pump.infusing = False
    p.feed(p.pump.report())
    assert p.state.alarm_causes == ("pump_alarm:occlusion",)


# --- end of course handover (issue 13, part 5) -------------------------------------------------------------------


def test_course_summary_when_the_course_stops() -> None:
    from driverd.core.commands import CourseEnded
    from driverd.core.records import command_to_record

    sched = replace(with_fills(schedule(), ("17", "100")), handover_note="oral ketamine 50 mg qds from day 7 (GP)")
    p = play(sched)
    p.run_until(T0 + 30 * H)
    change(p, T0 + 30 * H)
    loaded(p, T0 + 30 * H)
    p.run_until(T0 + 60 * H)
    change(p, T0 + 60 * H, conc="100")
    loaded(p, T0 + 60 * H)
    p.run_until(T0 + 121 * H)
    ended = [c for _, c in p.log if isinstance(c, CourseEnded)]
    assert len(ended) == 1
    e = ended[0]
    assert e.syringes == 3 and e.alarms == () and e.cause == "hold_complete"
    assert e.handover_note == "oral ketamine 50 mg qds from day 7 (GP)"
    # commanded: 24 h at 0.083 + 24 h at 0.25 + 12 h at 0.416 (50 mg/mL) + 60 h at 0.208 (100 mg/mL)
    commanded = (D("0.083") * 24 + D("0.25") * 24 + D("0.416") * 12) * 50 + D("0.208") * 60 * 100
    assert close(e.commanded_mg, commanded)
    assert close(e.delivered_mg, commanded)  # the read-backs: the record waits for the stopped pump's report
    name, fields = command_to_record(e)
    assert name == "course_summary" and fields["syringes"] == 3 and fields["handover_note"].startswith("oral")


def test_course_summary_lists_the_alarms() -> None:
    from driverd.core.commands import CourseEnded

    p = play()
    p.run_until(T0 + 30 * H)
    p.pump.alarms = ("occlusion",)
    p.pump.infusing = False
    p.feed(p.pump.report())
    p.feed(ClinicianCommand(T0 + 31 * H, "stop", "dr", "end of course"))
    assert not [c for _, c in p.log if isinstance(c, CourseEnded)]  # waits for the stopped pump's report
    p.feed(p.pump.report())
    e = next(c for _, c in p.log if isinstance(c, CourseEnded))
    assert e.alarms == ("pump_alarm:occlusion",) and e.cause == "clinician_stop" and e.syringes == 1


def test_a_resume_does_not_abandon_a_change_waiting_for_the_swap() -> None:
    """A change asked while the pump infused waits for the swap; a resume once abandoned it and ran the old
    syringe's rate, but the nurse may have swapped as told (review, 2026-12-03). The resume is refused and nothing
    runs; change_syringe, stating the syringe in the pump (here the old one: no change wanted), loads it."""
    p = play()
    p.run_until(T0 + 30 * H)
    command(p, T0 + 30 * H)  # pump running: stopped, waiting for the swap
    p.feed(p.pump.report())
    cmds = p.feed(ClinicianCommand(T0 + 31 * H, "resume", "rn", "change not needed after all"))
    assert rates(cmds) == [] and not p.pump.infusing and p.state.phase is Phase.PAUSED
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_change_waiting"]
    assert p.state.syringe_change is not None
    assert not any(isinstance(c, Notice) and c.code == "syringe_change_abandoned" for c in cmds)
