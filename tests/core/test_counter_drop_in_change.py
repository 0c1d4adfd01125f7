"""A counter that goes back during a syringe change (review 2026-12-03, HIGH): the nurse clears the volume at the
panel while swapping, as she may. Before, that raised `counter_drop`, the second change_syringe was refused
("resolve and resume counter_drop first"), and the resume abandoned the change and ran the old syringe's rate on the
new one: 5x the drug from a 50 mg/mL syringe in a 10 mg/mL course. Now a drop while a change waits with the pump
stopped is no alarm, a `counter_drop` alarm is acknowledged by a change (which loads and verifies the syringe), and
a resume never skips a waiting change's verified load. A drop with no change asked is `counter_drop`, which a resume
does not acknowledge (a swap between two polls is possible): only a change does."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

from driverd.core.commands import ApplySetpoint, RaiseAlarm, Refused
from driverd.core.events import ClinicianCommand, SyringeLoaded
from driverd.core.state import Phase
from tests.core.factories import T0
from tests.core.harness import Player
from tests.core.test_resume_and_doubt_edges import running
from tests.core.test_syringe_change import DIAMETER

H = timedelta(hours=1)
M = timedelta(minutes=1)


def _course() -> Player:
    return running("10")  # a 10 mg/mL course with 50 mg/mL syringes approved


def _rates(cmds: tuple[object, ...]) -> list[D]:
    return [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)]


def _load(p: Player, at: object) -> tuple[object, ...]:
    """The daemon's load of a loaded change (paused): counter cleared, syringe read back."""
    p.pump.delivered = D(0)
    return p.feed(SyringeLoaded(at, DIAMETER, D(0)))  # type: ignore[arg-type]


def test_a_panel_clear_while_a_change_asked_on_a_running_pump_waits_is_no_alarm_and_resume_cannot_skip_it() -> None:
    p = _course()
    at = T0 + 30 * H + M
    p.pump.advance(at)
    p.feed(ClinicianCommand(at, "change_syringe", "rn-1", "empty soon", None, D(17), D(50)))
    assert p.state.syringe_change is not None and not p.state.syringe_change.loaded and not p.pump.infusing
    p.pump.advance(at + M)
    p.feed(p.pump.report())
    p.pump.advance(at + 2 * M)
    p.pump.delivered = D(0)  # the nurse swaps in the 50 mg/mL syringe and clears the volume at the panel
    cmds = p.feed(p.pump.report())
    assert not [c for c in cmds if isinstance(c, RaiseAlarm)] and p.state.phase is Phase.PAUSED
    # A resume (the nurse forgot the second change_syringe) runs nothing: the syringe is not verified.
    cmds = p.feed(ClinicianCommand(at + 3 * M, "resume", "dr-a", "go on"))
    assert _rates(cmds) == [] and not p.pump.infusing
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["syringe_change_waiting"]
    # change_syringe as told: loaded, verified, and the course runs the rate for 50 mg/mL (a fifth of 10's).
    cmds = p.feed(ClinicianCommand(at + 4 * M, "change_syringe", "rn-1", "new syringe in", None, D(17), D(50)))
    assert not [c for c in cmds if isinstance(c, Refused)] and p.state.syringe_change is not None
    assert p.state.syringe_change.loaded
    cmds = _load(p, at + 5 * M)
    assert p.state.concentration == D(50) and p.state.syringe_change is None
    (rate,) = _rates(cmds)
    assert rate * D(50) <= p.state.level_mg_per_24h / 24  # the new concentration's rate, quantized down


def test_a_swap_and_clear_after_a_stop_at_the_panel_alarms_and_a_change_acknowledges_it() -> None:
    p = _course()
    old_rate = p.state.commanded_rate
    at = T0 + 30 * H + M
    p.pump.advance(at)
    p.pump.infusing = False  # STP at the panel: no change asked yet
    p.feed(p.pump.report())
    p.pump.advance(at + M)
    p.pump.delivered = D(0)  # swap + "clear volume" at the panel
    cmds = p.feed(p.pump.report())
    assert [c.code for c in cmds if isinstance(c, RaiseAlarm)] == ["counter_drop"]
    # A resume now would run the old rate on whatever is in the pump: refused, nothing runs.
    cmds = p.feed(ClinicianCommand(at + 2 * M, "resume", "dr-a", "counter cleared"))
    assert _rates(cmds) == [] and not p.pump.infusing and p.state.phase is Phase.ALARM
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["counter_drop"]
    cmds = p.feed(ClinicianCommand(at + 2 * M, "change_syringe", "rn-1", "new syringe in", None, D(17), D(50)))
    assert not [c for c in cmds if isinstance(c, Refused)] and p.state.phase is Phase.PAUSED
    assert p.state.syringe_change is not None and p.state.syringe_change.loaded and not p.pump.infusing
    cmds = _load(p, at + 3 * M)
    (rate,) = _rates(cmds)
    assert p.state.concentration == D(50) and rate < old_rate


def test_a_drop_while_a_change_waits_but_the_pump_runs_still_alarms() -> None:
    """The exemption needs the pump stopped: a counter that goes back while the pump infuses is lost counts."""
    p = _course()
    at = T0 + 30 * H + M
    p.pump.advance(at)
    p.feed(ClinicianCommand(at, "change_syringe", "rn-1", "empty soon", None, D(17), D(50)))
    p.pump.advance(at + M)
    p.feed(p.pump.report())
    p.pump.infusing = True  # started again at the panel
    p.pump.advance(at + 2 * M)
    p.pump.delivered = D(0)
    cmds = p.feed(p.pump.report())
    assert [c.code for c in cmds if isinstance(c, RaiseAlarm)] == ["counter_drop"]
    assert _rates(cmds) == [D(0)] and not p.pump.infusing and p.state.phase is Phase.ALARM


def test_a_lost_link_that_is_back_does_not_lock_a_counter_drop_or_an_empty_syringe() -> None:
    """A cause only a syringe change ends (counter_drop, syringe_empty) with a lost link raised beside it: the
    resume refused for the first acknowledged nothing, and change_syringe refused for the second ("resolve and
    resume link_lost first"): locked (found by helper reconnect). The resume now acknowledges the lost link."""
    from driverd.core.events import LinkLost, LinkRestored

    p = _course()
    at = T0 + 30 * H + M
    p.pump.advance(at)
    p.feed(LinkLost(at, "cable"))
    p.pump.advance(at + M)
    p.feed(LinkRestored(at + M))
    p.pump.delivered = D(0)  # cleared at the panel while the link was down
    p.feed(p.pump.report())
    assert set(p.state.alarm_causes) == {"link_lost", "counter_drop"} and not p.pump.infusing
    cmds = p.feed(ClinicianCommand(at + 2 * M, "resume", "dr-a", "link back"))
    assert [c.reason for c in cmds if isinstance(c, Refused)] == ["counter_drop"] and _rates(cmds) == []
    assert p.state.alarm_causes == ("counter_drop",) and p.state.phase is Phase.ALARM
    p.pump.advance(at + 3 * M)
    p.feed(p.pump.report())  # the channel reads the pump before every change command: stopped
    cmds = p.feed(ClinicianCommand(at + 3 * M, "change_syringe", "rn-1", "the syringe in the pump", None, D(17),
                                   D(10)))
    assert not [c for c in cmds if isinstance(c, Refused)] and p.state.phase is Phase.PAUSED
    _load(p, at + 4 * M)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing
