"""The pump's rate range against the drug library and the planned course (docs/safety.md, SUP-19), in the pure core.

What is checked is what the pump would be told: a course that fails the check never primes, so no setpoint other
than a stop ever reaches the (reference) pump, and a refused syringe load leaves the pump stopped.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.core.commands import ApplySetpoint, Notice, RaiseAlarm, Refused
from driverd.core.errors import ValidationError
from driverd.core.events import (
    ClinicianCommand,
    LinkLost,
    LinkRestored,
    PumpVerified,
    ScheduleAccepted,
    SyringeLoaded,
    Tick,
)
from driverd.core.machine import initial_state, step
from driverd.core.pump_range import PLANNED_RATE, PUMP_RANGE, PumpRange, plan_problem, range_problem
from driverd.core.quantities import NEW_ERA_RESOLUTION, Resolution
from driverd.core.records import event_from_record, event_to_record
from driverd.core.schedule import Schedule, SyringeFill, SyringeSupply
from driverd.core.state import Phase
from driverd.core.syringe_limits import ELITE11_PLUNGER, NE1000_PLUNGER
from tests.core.factories import PROTOCOL, T0, schedule
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
DIAMETER = D("19.13")
URL = "newera+serial:///dev/ttyUSB0"
SPEC = PROTOCOL.syringe("BD Plastipak 20 mL")
assert SPEC is not None
NE = PumpRange(URL, *NE1000_PLUNGER.range_ml_per_h(DIAMETER, NEW_ERA_RESOLUTION))  # 0.013..879.5
TOO_SLOW = PumpRange(URL, D("0.02"), D("879.5"))  # its slowest is faster than the library's 0.013
TOO_FAST = PumpRange(URL, D("0.013"), D("5"))  # its fastest is below the library's 10
UNKNOWN = PumpRange("modbus+tcp://10.0.0.5:502", None, None)


def verify(sched: Schedule, pump: PumpRange | None, resolution: Resolution = NEW_ERA_RESOLUTION,
           at=T0 - timedelta(minutes=5)):
    state, _ = step(initial_state(sched.pump_id), ScheduleAccepted(at, sched), PROTOCOL)
    return step(state, PumpVerified(at, DIAMETER, resolution, "NE-1000", pump), PROTOCOL)


def play(sched: Schedule, pump: PumpRange | None) -> Player:
    state, _ = verify(sched, pump)
    return Player(state, PROTOCOL, ExactPump(at=T0 - timedelta(minutes=10)))


def never_runs(p: Player) -> None:
    """Two days of the course's time: the pump is never told a non-zero rate and never infuses."""
    p.run_until(T0 + 48 * H, every=timedelta(hours=1))
    assert all(sp.setpoint.rate_ml_per_h == 0 for _, sp in p.setpoints())
    assert p.pump.delivered == 0 and not p.pump.infusing and p.state.phase is Phase.IDLE


def test_the_shipped_library_fits_the_new_era_and_elite_ranges() -> None:
    for spec in PROTOCOL.syringes:
        for plunger, res in ((NE1000_PLUNGER, NEW_ERA_RESOLUTION), (ELITE11_PLUNGER, Resolution(4, 4))):
            pump = PumpRange(URL, *plunger.range_ml_per_h(spec.inner_diameter_mm, res))
            assert range_problem(PROTOCOL, spec, pump, spec.inner_diameter_mm) is None, (spec.model, pump)


@given(lo=st.decimals("0.001", "0.05", places=3), hi=st.decimals("5", "20", places=1))
def test_range_problem_is_exactly_containment(lo: D, hi: D) -> None:
    lib_lo, lib_hi = PROTOCOL.rate_limits(SPEC)
    problem = range_problem(PROTOCOL, SPEC, PumpRange(URL, lo, hi), DIAMETER)
    assert (problem is None) == (lo <= lib_lo and lib_hi <= hi)


def test_a_pump_in_range_primes_and_says_so() -> None:
    state, cmds = verify(schedule(), NE)
    assert state.phase is Phase.PRIMED and not state.alarm_causes
    notes = [c.detail for c in cmds if isinstance(c, Notice) and c.code == "pump_range_checked"]
    assert notes == [f"syringe 'BD Plastipak 20 mL' (19.13 mm) on {URL}: drug library 0.013..10 mL/h inside the "
                     "pump's 0.013..879.5 mL/h; every planned rate is sent"]


@pytest.mark.parametrize(("pump", "side"), [(TOO_SLOW, "minimum"), (TOO_FAST, "maximum")])
def test_a_pump_that_cannot_run_the_library_range_never_primes(pump: PumpRange, side: str) -> None:
    state, cmds = verify(schedule(), pump)
    assert state.phase is Phase.IDLE and state.alarm_causes == (PUMP_RANGE,)
    refused = [c for c in cmds if isinstance(c, Refused)]
    alarms = [c for c in cmds if isinstance(c, RaiseAlarm)]
    assert [r.reason for r in refused] == [PUMP_RANGE] and [a.code for a in alarms] == [PUMP_RANGE]
    detail = refused[0].detail
    for part in ("'BD Plastipak 20 mL'", "19.13 mm", URL, "drug library 0.013..10 mL/h", pump.text(), side):
        assert part in detail, (part, detail)
    assert alarms[0].detail == detail
    never_runs(Player(state, PROTOCOL, ExactPump(at=T0 - timedelta(minutes=10))))


def test_a_pump_that_states_no_range_never_primes() -> None:
    state, cmds = verify(schedule(), UNKNOWN)
    assert state.phase is Phase.IDLE and state.alarm_causes == (PUMP_RANGE,)
    detail = next(c.detail for c in cmds if isinstance(c, Refused))
    assert "states no rate range" in detail and "modbus+tcp://10.0.0.5:502" in detail
    assert "plunger_min_mm_per_h" in detail  # says how to fix it


def test_a_taper_step_below_the_minimum_is_refused_at_prime_naming_the_step_and_rule() -> None:
    # 30 mg/24h at 100 mg/mL is 0.0125 mL/h, 0.012 at the New Era's resolution: below the library's 0.013 for this
    # syringe. Without the check the course would start and the kernel refuse the taper step mid-course.
    sched = schedule(conc="100", taper=((30, 12), (0, 24)))
    state, cmds = verify(sched, NE)
    assert state.phase is Phase.IDLE and state.alarm_causes == (PLANNED_RATE,)
    detail = next(c.detail for c in cmds if isinstance(c, Refused) and c.reason == PLANNED_RATE)
    assert detail.startswith("/taper/0/dose_mg_per_24h 30 mg/24h at 100 mg/mL is 0.012 mL/h")
    assert "rule device_min" in detail
    never_runs(Player(state, PROTOCOL, ExactPump(at=T0 - timedelta(minutes=10))))


def test_a_replacement_syringes_concentration_is_planned_too() -> None:
    sched = replace(schedule(conc="50", taper=((30, 12), (0, 24))),
                    syringes=SyringeSupply(fills=(SyringeFill(D(17), D(100)),)))
    assert verify(replace(sched, syringes=None), NE)[0].phase is Phase.PRIMED  # 30 mg at 50 mg/mL: 0.025 mL/h
    state, cmds = verify(sched, NE)
    assert state.phase is Phase.IDLE
    assert "at 100 mg/mL is 0.012 mL/h" in next(c.detail for c in cmds if isinstance(c, Refused))


def test_a_dose_that_quantizes_to_zero_is_named_below_resolution() -> None:
    problem = plan_problem(PROTOCOL, SPEC, schedule(conc="50"), Resolution(decimals=1))
    assert problem is not None and problem.startswith("/steps/0/dose_mg_per_24h 100 mg/24h at 50 mg/mL is 0.0 mL/h")
    assert "rule below_resolution" in problem


def test_an_older_log_without_a_range_replays_as_it_was_decided() -> None:
    """A pump_verified record written before the check has no pump_range: no check, the decision as logged."""
    state, cmds = verify(schedule(conc="100", taper=((30, 12), (0, 24))), None)
    assert state.phase is Phase.PRIMED and not any(isinstance(c, (Refused, RaiseAlarm, Notice)) for c in cmds)


def test_a_later_check_that_passes_ends_the_cause() -> None:
    sched = schedule()
    state, _ = verify(sched, TOO_SLOW)
    # The same course primed again (a restart with the pump's configuration fixed): the cause ends, no drug flowed.
    state, cmds = step(state, PumpVerified(T0 - timedelta(minutes=4), DIAMETER, NEW_ERA_RESOLUTION, "NE-1000", NE),
                       PROTOCOL)
    assert state.phase is Phase.PRIMED and state.alarm_causes == () and state.alarm_code == ""
    assert [c.detail for c in cmds if isinstance(c, Notice) and c.code == "alarm_cleared"] == [
        "pump_range (checked again: in range)"]
    p = Player(state, PROTOCOL, ExactPump(at=T0 - timedelta(minutes=10)))
    p.run_until(T0 + H)
    assert p.pump.infusing and p.pump.rate == D("0.083")  # 100 mg/24h at 50 mg/mL


def test_reverifying_a_primed_course_with_a_bad_range_goes_back_to_idle() -> None:
    state, _ = verify(schedule(), NE)
    state, _ = step(state, PumpVerified(T0 - timedelta(minutes=4), DIAMETER, NEW_ERA_RESOLUTION, "NE-1000",
                                        TOO_FAST), PROTOCOL)
    assert state.phase is Phase.IDLE and PUMP_RANGE in state.alarm_causes


def _running_change(pump: PumpRange | None) -> tuple[Player, tuple]:
    p = play(schedule(), NE)
    p.run_until(T0 + 30 * H)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing
    p.feed(ClinicianCommand(T0 + 30 * H, "change_syringe", "nurse-1", "daily", None, D(17)))
    p.feed(p.pump.report())
    p.feed(ClinicianCommand(T0 + 30 * H, "change_syringe", "nurse-1", "daily", None, D(17)))
    assert not p.pump.infusing and p.state.syringe_change is not None and p.state.syringe_change.loaded
    return p, p.feed(SyringeLoaded(T0 + 30 * H + timedelta(minutes=5), DIAMETER, p.pump.delivered, pump))


def test_a_syringe_load_on_a_pump_out_of_range_is_refused_and_the_pump_stays_stopped() -> None:
    p, cmds = _running_change(TOO_SLOW)
    assert [c.reason for c in cmds if isinstance(c, Refused)] == [PUMP_RANGE]
    assert [c.code for c in cmds if isinstance(c, RaiseAlarm)] == [PUMP_RANGE]
    assert p.state.phase is Phase.ALARM and p.state.syringe_change is not None  # the change waits
    assert not p.pump.infusing and not any(isinstance(c, ApplySetpoint) and c.setpoint.rate_ml_per_h > 0
                                           for c in cmds)
    # A change_syringe again is allowed in this alarm (it retries the load, and the check).
    p.feed(ClinicianCommand(T0 + 31 * H, "change_syringe", "nurse-1", "again", None, D(17)))
    assert p.state.phase is Phase.PAUSED and p.state.syringe_change is not None
    cmds = p.feed(SyringeLoaded(T0 + 31 * H, DIAMETER, p.pump.delivered, TOO_SLOW))  # still out of range
    assert [c.reason for c in cmds if isinstance(c, Refused)] == [PUMP_RANGE] and p.state.phase is Phase.ALARM
    # A resume runs nothing while the unverified load waits (SUP-12): it acknowledges the alarm, the course waits
    # paused with the change, and the pump stays stopped.
    cmds = p.feed(ClinicianCommand(T0 + 31 * H, "resume", "dr", "try"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_change_waiting"]
    assert not any(isinstance(c, ApplySetpoint) for c in cmds) and p.state.phase is Phase.PAUSED
    p.run_until(T0 + 33 * H)
    assert not p.pump.infusing and p.pump.rate == 0
    # Fixed: the change given again loads, the check passes, and the course resumes.
    p.feed(ClinicianCommand(T0 + 33 * H, "change_syringe", "nurse-1", "again", None, D(17)))
    assert p.state.phase is Phase.PAUSED
    cmds = p.feed(SyringeLoaded(T0 + 33 * H, DIAMETER, p.pump.delivered, NE))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing and p.pump.rate == D("0.25")  # 300 mg/24h


def test_a_syringe_load_in_range_resumes() -> None:
    p, cmds = _running_change(NE)
    assert not any(isinstance(c, Refused) for c in cmds)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing


def test_the_load_without_a_range_is_the_old_behaviour() -> None:
    p, _ = _running_change(None)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing


def test_records_round_trip_with_and_without_a_range() -> None:
    for rng in (NE, UNKNOWN, None):
        for ev in (PumpVerified(T0, DIAMETER, NEW_ERA_RESOLUTION, "NE-1000", rng),
                   SyringeLoaded(T0, DIAMETER, D("1.234"), rng)):
            name, fields = event_to_record(ev)
            assert ("pump_range" in fields) == (rng is not None)
            assert event_from_record({"event": name, **fields}) == ev


@pytest.mark.parametrize(("value", "path"), [
    ("0.013..879.5", "pump_range"),
    ({"url": URL, "min_ml_per_h": "0.013"}, "pump_range"),
    ({"url": URL, "min_ml_per_h": "0.013", "max_ml_per_h": "879.5", "extra": 1}, "pump_range"),
    ({"url": "", "min_ml_per_h": "0.013", "max_ml_per_h": "879.5"}, "pump_range.url"),
    ({"url": 5, "min_ml_per_h": "0.013", "max_ml_per_h": "879.5"}, "pump_range.url"),
    ({"url": URL, "min_ml_per_h": "fast", "max_ml_per_h": "879.5"}, "pump_range.min_ml_per_h"),
    ({"url": URL, "min_ml_per_h": "0.013", "max_ml_per_h": "NaN"}, "pump_range.max_ml_per_h"),
    ({"url": URL, "min_ml_per_h": 0.013, "max_ml_per_h": "879.5"}, "pump_range.min_ml_per_h"),
    ({"url": URL, "min_ml_per_h": None, "max_ml_per_h": "879.5"}, "pump_range"),
    ({"url": URL, "min_ml_per_h": "900", "max_ml_per_h": "879.5"}, "pump_range.min_ml_per_h"),
    ({"url": URL, "min_ml_per_h": "-1", "max_ml_per_h": "879.5"}, "pump_range.min_ml_per_h"),
])
def test_a_malformed_range_in_a_record_names_the_field(value: object, path: str) -> None:
    name, fields = event_to_record(PumpVerified(T0, DIAMETER, NEW_ERA_RESOLUTION, "NE-1000", NE))
    with pytest.raises(ValidationError) as exc:
        event_from_record({"event": name, **fields, "pump_range": value})
    assert exc.value.problems[0].path == path


def test_ticks_never_start_a_course_refused_at_prime() -> None:
    state, _ = verify(schedule(), TOO_SLOW)
    for h in range(0, 72, 6):
        state, cmds = step(state, Tick(T0 + h * H), PROTOCOL)
        assert not any(isinstance(c, ApplySetpoint) for c in cmds)
    assert state.phase is Phase.IDLE


# ---- at a reconnect (the link lost and back, or the first contact after a daemon start): the pump answering may be
# another one, or reconfigured, since the course was checked at priming or at its last syringe load.


def _running_then_lost() -> Player:
    p = play(schedule(), NE)
    p.run_until(T0 + 30 * H)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing
    p.feed(LinkLost(T0 + 30 * H, "cable"))
    assert p.state.phase is Phase.ALARM and p.state.alarm_causes == ("link_lost",)
    return p


@pytest.mark.parametrize("pump", [TOO_SLOW, TOO_FAST, UNKNOWN])
def test_a_reconnect_to_a_pump_that_cannot_run_the_course_alarms_stops_and_refuses_resume(pump: PumpRange) -> None:
    p = _running_then_lost()
    cmds = p.feed(LinkRestored(T0 + 31 * H, DIAMETER, pump))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == [PUMP_RANGE]
    assert [c.code for c in cmds if isinstance(c, RaiseAlarm)] == [PUMP_RANGE]
    assert [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)] == [D(0)]
    assert p.state.phase is Phase.ALARM and not p.pump.infusing and p.state.link_up
    # A resume acknowledges the lost link but not the range: refused, nothing runs, and the course stays in alarm.
    cmds = p.feed(ClinicianCommand(T0 + 31 * H, "resume", "dr", "link back"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == [PUMP_RANGE]
    assert [c.detail for c in cmds if isinstance(c, Notice) and c.code == "alarm_cleared"] == ["link_lost"]
    assert not any(isinstance(c, ApplySetpoint) for c in cmds)
    assert p.state.phase is Phase.ALARM and p.state.alarm_causes == (PUMP_RANGE,)
    for h in range(31, 40):  # no tick or report runs it (no escalation in alarm either)
        p.run_until(T0 + h * H)
        assert not p.pump.infusing and p.pump.rate == 0
    assert [c.reason for c in p.feed(ClinicianCommand(T0 + 40 * H, "escalate", "dr", "more"))
            if isinstance(c, Refused)] == ["illegal_transition"]
    # The clinician's retry: change_syringe (stating the syringe in the pump) acknowledges it, the load checks the
    # range again; still out of range, the load is refused and nothing runs.
    p.feed(ClinicianCommand(T0 + 40 * H, "change_syringe", "nurse-1", "pump swapped back", None, D(17)))
    assert p.state.phase is Phase.PAUSED and p.state.syringe_change is not None
    cmds = p.feed(SyringeLoaded(T0 + 40 * H, DIAMETER, p.pump.delivered, pump))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == [PUMP_RANGE] and not p.pump.infusing
    # Fixed (the right pump back): the change again loads, the check passes, and the course resumes at its level.
    p.feed(ClinicianCommand(T0 + 41 * H, "change_syringe", "nurse-1", "right pump", None, D(17)))
    cmds = p.feed(SyringeLoaded(T0 + 41 * H, DIAMETER, p.pump.delivered, NE))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing and p.pump.rate == D("0.25")  # 300 mg/24h


def test_a_reconnect_in_range_says_so_and_the_resume_runs() -> None:
    p = _running_then_lost()
    cmds = p.feed(LinkRestored(T0 + 31 * H, DIAMETER, NE))
    assert [c.code for c in cmds if isinstance(c, Notice)] == ["link_restored", "pump_range_checked"]
    assert not any(isinstance(c, (Refused, RaiseAlarm, ApplySetpoint)) for c in cmds)
    p.feed(ClinicianCommand(T0 + 31 * H, "resume", "dr", "link back"))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing


def test_the_range_is_checked_for_the_bore_read_back() -> None:
    """A pump set to a tenth of the bore runs at most a tenth squared of its plunger range: out of the library's."""
    p = _running_then_lost()
    bore = D("1.913")
    cmds = p.feed(LinkRestored(T0 + 31 * H, bore, PumpRange(URL, *NE1000_PLUNGER.range_ml_per_h(bore,
                                                                                               NEW_ERA_RESOLUTION))))
    [refusal] = [c for c in cmds if isinstance(c, Refused)]
    assert refusal.reason == PUMP_RANGE and "(1.913 mm)" in refusal.detail and "maximum" in refusal.detail


def test_the_first_contact_after_a_start_checks_a_running_course_and_stops_it() -> None:
    """A daemon restart resumes a running course with its link up: the first status read is checked the same way."""
    p = play(schedule(), NE)
    p.run_until(T0 + 30 * H)
    cmds = p.feed(LinkRestored(T0 + 30 * H, DIAMETER, TOO_FAST))
    notes = [c.detail for c in cmds if isinstance(c, Notice) and c.code == "link_restored"]
    assert notes == ["pump answers on a new connection"]
    assert [c.code for c in cmds if isinstance(c, RaiseAlarm)] == [PUMP_RANGE] and not p.pump.infusing
    assert p.state.phase is Phase.ALARM and p.state.alarm_causes == (PUMP_RANGE,)


@pytest.mark.parametrize("phase", ["idle", "stopped"])
def test_no_check_without_a_live_course(phase: str) -> None:
    """Idle: the prime checks (the channel primes again after a reconnect); stopped: nothing runs any more."""
    if phase == "idle":
        state, _ = verify(schedule(), TOO_SLOW)
    else:
        p = play(schedule(), NE)
        p.run_until(T0 + 2 * H)
        p.feed(ClinicianCommand(T0 + 2 * H, "stop", "dr", "done"))
        state = p.state
    assert state.phase.value == phase
    after, cmds = step(state, LinkRestored(T0 + 3 * H, DIAMETER, TOO_FAST), PROTOCOL)
    assert [type(c) for c in cmds] == [Notice] and after.alarm_causes == state.alarm_causes


def test_an_older_link_restored_record_replays_unchecked() -> None:
    p = _running_then_lost()
    cmds = p.feed(LinkRestored(T0 + 31 * H))
    assert [c.code for c in cmds if isinstance(c, Notice)] == ["link_restored"] and len(cmds) == 1


def test_link_restored_records_round_trip_with_and_without_the_check() -> None:
    for ev in (LinkRestored(T0), LinkRestored(T0, DIAMETER, NE), LinkRestored(T0, DIAMETER, UNKNOWN)):
        name, fields = event_to_record(ev)
        assert name == "link_restored" and ("pump_range" in fields) == (ev.pump_range is not None)
        assert event_from_record({"event": name, **fields}) == ev
    assert event_to_record(LinkRestored(T0))[1] == {"at": "2026-11-23T09:00:00Z"}  # as older logs wrote it
    name, fields = event_to_record(LinkRestored(T0, DIAMETER, NE))
    for bad in ("-1", "0", "NaN", "x", 19):  # the channel sends only a finite bore above 0
        with pytest.raises(ValidationError) as exc:
            event_from_record({"event": name, **fields, "diameter_mm": bad})
        assert exc.value.problems[0].path == "diameter_mm"


def test_a_resume_refused_for_the_bore_keeps_the_range_cause_too() -> None:
    """The bore changed while the link was down: both change-only causes stay through the refused resume (only the
    lost link is acknowledged), so the change that follows clears them by loading and checking the bore."""
    p = _running_then_lost()
    bore = D("1.913")
    p.feed(LinkRestored(T0 + 31 * H, bore, PumpRange(URL, *NE1000_PLUNGER.range_ml_per_h(bore, NEW_ERA_RESOLUTION))))
    p.feed(replace(p.pump.report(), diameter_mm=bore))
    assert p.state.alarm_causes == ("link_lost", PUMP_RANGE, "syringe_mismatch") and not p.pump.infusing
    cmds = p.feed(ClinicianCommand(T0 + 31 * H, "resume", "dr", "link back"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_mismatch"]
    assert p.state.alarm_causes == (PUMP_RANGE, "syringe_mismatch") and p.state.phase is Phase.ALARM
    p.feed(ClinicianCommand(T0 + 31 * H, "change_syringe", "nurse-1", "bore set back", None, D(17)))
    p.feed(SyringeLoaded(T0 + 31 * H, DIAMETER, p.pump.delivered, NE))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing and not p.state.alarm_causes
