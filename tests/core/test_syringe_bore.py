"""The syringe bore the pump reports on every poll (review finding, 2026-12-03).

A pump turns mL/h into plunger speed with the bore it is set to, and computes its rate and counter read-backs with
the same bore: a bore changed at the panel (another syringe picked in the menu, a decimal slip) looks right in
every read-back while the pump delivers (d/d')^2 times the drug: 2.24x for 14.43 mm instead of 21.59, 100x for a
tenth of the bore. The check used to run only at prime and at a syringe load. Now every report carries the bore
(`PumpReport.diameter_mm`), and in a live course another bore than the schedule's is the alarm `syringe_mismatch`
and a stop; a resume is refused until a syringe change loads and verifies the syringe.
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
from driverd.core.errors import ValidationError
from driverd.core.events import ClinicianCommand, PumpReport, SyringeLoaded, Tick
from driverd.core.records import event_from_record, event_to_record
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
M = timedelta(minutes=1)
RIGHT = D("19.13")  # the factories' schedule and pump


def running(hours: int = 30) -> Player:
    p = Player(primed(), PROTOCOL, ExactPump(at=T0 - 10 * M))
    p.run_until(T0 + hours * H)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing
    return p


def report(p: Player, bore: D | None) -> PumpReport:
    return replace(p.pump.report(), diameter_mm=bore)


def alarms(cmds: tuple) -> list[str]:
    return [c.code for c in cmds if isinstance(c, RaiseAlarm)]


def stops(cmds: tuple) -> list[D]:
    return [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)]


@pytest.mark.parametrize("bore", [D("14.43"), D("1.913"), D("26.6"), D("NaN"), D("sNaN")])
def test_another_bore_while_infusing_alarms_and_stops_the_pump(bore: D) -> None:
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    cmds = p.feed(report(p, bore))
    assert alarms(cmds) == ["syringe_mismatch"] and stops(cmds) == [D(0)]
    assert p.state.phase is Phase.ALARM and not p.pump.infusing  # the harness pump applied the stop
    for k in range(2, 6):  # the same bore on later polls: raised once, the stop not sent again
        p.pump.advance(T0 + 30 * H + k * M)
        assert p.feed(report(p, bore)) == ()


def test_a_resume_is_refused_until_a_syringe_change_verifies_the_bore() -> None:
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    p.feed(report(p, D("14.43")))
    for bore in (D("14.43"), RIGHT):  # set back at the panel or not: the read-backs since are not to be trusted
        p.pump.advance(p.pump.at + M)
        p.feed(report(p, bore))
        cmds = p.feed(ClinicianCommand(p.pump.at, "resume", "dr-a", "resume"))
        assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_mismatch"] and stops(cmds) == []
        assert p.state.phase is Phase.ALARM and not p.pump.infusing
    # The syringe change: acknowledged, the bore loaded and read back, the course resumes through the kernel.
    cmds = p.feed(ClinicianCommand(p.pump.at, "change_syringe", "rn-1", "bore set wrong", None, D(17)))
    assert p.state.phase is Phase.PAUSED and not p.state.alarm_causes
    cmds = p.feed(SyringeLoaded(p.pump.at, RIGHT, p.pump.delivered))
    assert p.state.phase is Phase.TITRATING and stops(cmds) == [D("0.250")] and p.pump.infusing  # 300 mg/24h


def test_another_bore_on_a_stopped_pump_alarms_and_nothing_starts() -> None:
    """Primed before the start: the alarm holds the course; the start time passes and nothing runs."""
    p = Player(primed(), PROTOCOL, ExactPump(at=T0 - 10 * M))
    p.pump.advance(T0 - 2 * M)
    cmds = p.feed(report(p, D("14.43")))
    assert alarms(cmds) == ["syringe_mismatch"] and stops(cmds) == [] and p.state.phase is Phase.ALARM
    for k in range(0, 30):
        assert stops(p.feed(Tick(T0 + k * M))) == []
    assert not p.pump.infusing and p.state.started_at is None


@given(bore=st.one_of(st.none(), st.just(RIGHT), st.decimals(min_value=D("0.1"), max_value=D("40"), places=2)),
       minutes=st.integers(min_value=1, max_value=59))
def test_the_quiet_path_never_takes_another_bore(bore: D | None, minutes: int) -> None:
    """Both paths from the same state decide alike: the quiet report only when the bore is unknown or right."""
    p = running(26)
    p.pump.advance(T0 + 26 * H + minutes * M)
    ev = report(p, bore)
    quiet = machine._quiet_report(p.state, ev, PROTOCOL)
    general = machine._reduce(p.state, ev, PROTOCOL)
    if bore is not None and bore != RIGHT:
        assert quiet is None and "syringe_mismatch" in alarms(general[1])
    else:
        assert general[1] == () and (quiet is None or quiet == general[0])


def test_no_bore_read_is_no_check() -> None:
    """A driver that cannot read the bore (and every log written before this field): supervised as before."""
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    assert p.feed(report(p, None)) == () and p.state.phase is Phase.TITRATING


def test_the_record_carries_the_bore_and_old_records_parse() -> None:
    ev = PumpReport(T0, "infusing", D("0.083"), D("1.5"), (), None, D("19.13"))
    name, fields = event_to_record(ev)
    assert fields["diameter_mm"] == "19.13" and event_from_record({"event": name, **fields}) == ev
    old = {k: v for k, v in fields.items() if k != "diameter_mm"}
    assert event_from_record({"event": name, **old}) == replace(ev, diameter_mm=None)


@pytest.mark.parametrize("value", ["x", "", "19,13", 19, 19.13])  # not decimals (0, -19.13, NaN: the core judges)
def test_a_malformed_bore_in_a_record_names_the_field(value: object) -> None:
    fields = {"event": "pump_report", "at": "2026-11-23T09:00:00Z", "state": "infusing", "rate_ml_per_h": "1",
              "delivered_ml": "1", "alarms": [], "diameter_mm": value}
    with pytest.raises(ValidationError) as info:
        event_from_record(fields)
    assert info.value.problems[0].path == "diameter_mm"


# ---- while a syringe change waits for its load (review of 2026-12-03: the nuisance re-alarm). The change loads the
# schedule's bore and verifies it before anything runs; a wrong bore reported meanwhile is what it deals with.


def _mismatch_then_change(p: Player, bore: D = D("14.43")) -> None:
    p.pump.advance(T0 + 30 * H + M)
    p.feed(report(p, bore))
    assert p.state.phase is Phase.ALARM and not p.pump.infusing
    p.pump.advance(p.pump.at + M)
    assert p.feed(report(p, bore)) == ()  # the poll before the command (the channel acknowledges and reads first)
    p.feed(ClinicianCommand(p.pump.at, "change_syringe", "rn-1", "bore set wrong", None, D(17)))
    assert p.state.phase is Phase.PAUSED and p.state.syringe_change.loaded and not p.state.alarm_causes


@given(bores=st.lists(st.decimals(min_value=D("0.1"), max_value=D("40"), places=2), min_size=1, max_size=8))
def test_a_wrong_bore_while_the_change_waits_is_not_raised_again_and_nothing_runs(bores: list[D]) -> None:
    p = running()
    _mismatch_then_change(p)
    for bore in bores:  # the pump still shows a wrong (or by now the right) bore on every poll before the load
        p.pump.advance(p.pump.at + M)
        assert p.feed(report(p, bore)) == ()
        assert p.state.phase is Phase.PAUSED and not p.state.alarm_causes and not p.pump.infusing
        for action in ("resume", "resume"):  # refused until the load: the pump stays stopped
            cmds = p.feed(ClinicianCommand(p.pump.at, action, "dr-a", "resume"))
            assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_change_waiting"]
            assert stops(cmds) == [] and p.state.phase is Phase.PAUSED
    assert alarms([c for _, c in p.log]) == ["syringe_mismatch"]  # the one raised at the panel change
    cmds = p.feed(SyringeLoaded(p.pump.at, RIGHT, p.pump.delivered))
    assert p.state.phase is Phase.TITRATING and stops(cmds) == [D("0.250")] and p.pump.infusing


def test_a_load_that_reads_back_the_wrong_bore_keeps_the_change_waiting_without_new_alarms() -> None:
    p = running()
    _mismatch_then_change(p)
    cmds = p.feed(SyringeLoaded(p.pump.at, D("14.43"), p.pump.delivered))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_mismatch"]
    for _ in range(3):
        p.pump.advance(p.pump.at + M)
        assert p.feed(report(p, D("14.43"))) == () and p.state.phase is Phase.PAUSED
    cmds = p.feed(ClinicianCommand(p.pump.at, "resume", "dr-a", "resume"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_change_waiting"] and stops(cmds) == []
    p.feed(ClinicianCommand(p.pump.at, "change_syringe", "rn-1", "again", None, D(17)))
    p.feed(SyringeLoaded(p.pump.at, RIGHT, p.pump.delivered))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing


def test_a_pump_that_infuses_on_a_wrong_bore_while_the_change_waits_still_alarms_and_stops() -> None:
    p = running()
    _mismatch_then_change(p)
    p.pump.advance(p.pump.at + M)
    p.pump.apply(D("0.5"))  # someone pressed RUN at the panel
    cmds = p.feed(report(p, D("14.43")))
    assert "syringe_mismatch" in alarms(cmds) and stops(cmds) == [D(0)] and not p.pump.infusing
    assert p.state.phase is Phase.ALARM


def test_a_change_given_while_the_old_syringe_ran_is_not_resumed_on_the_wrong_bore() -> None:
    """The change was given with the pump running (the daemon stops it; the nurse swaps the syringe, picks its
    type in the pump's menu and gives change_syringe again). A wrong bore meanwhile is not an alarm, and a resume is
    refused: nothing runs before the load verifies the bore."""
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    p.feed(ClinicianCommand(p.pump.at, "change_syringe", "rn-1", "daily", None, D(17)))
    assert p.state.phase is Phase.PAUSED and not p.state.syringe_change.loaded and not p.pump.infusing
    p.pump.advance(p.pump.at + M)
    assert p.feed(report(p, D("14.43"))) == () and p.state.phase is Phase.PAUSED
    cmds = p.feed(ClinicianCommand(p.pump.at, "resume", "dr-a", "resume"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_change_waiting"] and stops(cmds) == []
    assert p.state.syringe_change is not None and not p.pump.infusing
    p.feed(ClinicianCommand(p.pump.at, "change_syringe", "rn-1", "new syringe in", None, D(17)))
    p.feed(SyringeLoaded(p.pump.at, RIGHT, p.pump.delivered))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing and p.state.pump_diameter_mm == RIGHT


@pytest.mark.parametrize("bore", [D("NaN"), D("sNaN")])
def test_a_bore_that_is_not_a_number_while_the_change_waits_still_alarms(bore: D) -> None:
    p = running()
    _mismatch_then_change(p)
    p.pump.advance(p.pump.at + M)
    assert alarms(p.feed(report(p, bore))) == ["syringe_mismatch"] and not p.pump.infusing


def test_a_resume_refused_for_the_bore_acknowledges_a_lost_link_that_is_back() -> None:
    """The link lost and the bore changed meanwhile: resume (refused for the bore) and change_syringe (refused for the
    lost link) each blocked the other. The resume now acknowledges the lost link, and the change goes on."""
    from driverd.core.events import LinkLost, LinkRestored

    p = running()
    p.pump.advance(T0 + 30 * H + M)
    p.feed(LinkLost(p.pump.at, "cable"))
    p.pump.advance(p.pump.at + M)
    p.feed(LinkRestored(p.pump.at))
    p.feed(report(p, D("14.43")))
    assert p.state.alarm_causes == ("link_lost", "syringe_mismatch") and not p.pump.infusing
    p.pump.advance(p.pump.at + M)
    assert p.feed(report(p, D("14.43"))) == ()
    cmds = p.feed(ClinicianCommand(p.pump.at, "resume", "dr-a", "link back"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_mismatch"] and stops(cmds) == []
    assert p.state.phase is Phase.ALARM and p.state.alarm_causes == ("syringe_mismatch",)
    cmds = p.feed(ClinicianCommand(p.pump.at, "change_syringe", "rn-1", "bore set wrong", None, D(17)))
    assert not [c for c in cmds if isinstance(c, Refused)] and p.state.phase is Phase.PAUSED
    p.feed(SyringeLoaded(p.pump.at, RIGHT, p.pump.delivered))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing
