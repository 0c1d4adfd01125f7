"""`next_step` (what `driverd status` announces) against what the machine then does on its ticks."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from driverd.core.events import ClinicianCommand, Tick
from driverd.core.next_step import next_step
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.harness import ExactPump, Player

EVERY = timedelta(minutes=10)


def _player(**kw: object) -> Player:
    state = primed(schedule(**kw))  # type: ignore[arg-type]
    return Player(state, PROTOCOL, ExactPump(T0 - timedelta(minutes=5)))


@pytest.mark.parametrize("taper", [(), ((250, 0), (100, 12), (0, 24)), ((500, 0), (0, 6))])
def test_every_change_is_announced_with_its_time_and_dose(taper: tuple[tuple[int, int], ...]) -> None:
    """Run a whole course tick by tick: each dose change (and the stop) happens at the first tick at or after the
    announced time, to the announced dose; while an automatic step is announced in the future, nothing changes."""
    p = _player(taper=taper)
    t = p.pump.at
    changes = 0
    end = T0 + timedelta(days=12)
    while t < end and p.state.phase is not Phase.STOPPED:
        before = p.state
        announced = next_step(before, PROTOCOL)
        t += EVERY
        p.feed(Tick(t))
        p.feed(p.pump.report())
        after = p.state
        moved = after.level_mg_per_24h != before.level_mg_per_24h or after.phase is Phase.STOPPED
        if moved:
            changes += 1
            assert announced is not None, (t, before.phase)
            assert t - EVERY < announced.at <= t
            expected = announced.dose_mg_per_24h
            if announced.kind == "stop":
                assert after.phase is Phase.STOPPED
            else:
                assert after.level_mg_per_24h == expected
        elif announced is not None and announced.auto:
            assert announced.at > t, (t, announced)
    assert p.state.phase is Phase.STOPPED
    dose_changes = 3 + sum(1 for d, _ in taper if 0 < d < 500)
    assert changes == dose_changes + 1  # every step, every real taper step, and the stop


def test_a_step_that_needs_confirmation_is_pending_once_due_and_waits() -> None:
    p = _player(auto=(True, False, False))
    p.run_until(T0 + timedelta(minutes=10))
    assert p.state.level_mg_per_24h == Decimal(100)
    nxt = next_step(p.state, PROTOCOL)
    assert nxt is not None and nxt.kind == "escalate" and nxt.dose_mg_per_24h == 300 and not nxt.auto
    assert nxt.at == T0 + timedelta(hours=24, minutes=5)  # 24 h after the first step (the first tick after T0)
    assert not nxt.awaiting_confirmation(T0 + timedelta(hours=23))
    p.run_until(T0 + timedelta(hours=30))
    assert p.state.level_mg_per_24h == Decimal(100)  # not applied on its own
    assert next_step(p.state, PROTOCOL) == nxt and nxt.awaiting_confirmation(T0 + timedelta(hours=30))
    p.feed(ClinicianCommand(T0 + timedelta(hours=30), "escalate", "dr-a", "confirmed"))
    assert p.state.level_mg_per_24h == Decimal(300)
    after = next_step(p.state, PROTOCOL)
    assert after is not None and after.dose_mg_per_24h == 500
    assert after.at == T0 + timedelta(hours=54)  # the 24-h interval runs from the confirmed step


@pytest.mark.parametrize("action", ["hold", "stop"])
def test_nothing_scheduled_without_a_course_or_after_stop_and_hold_ends_in_taper(action: str) -> None:
    p = _player()
    p.run_until(T0 + timedelta(minutes=10))
    p.feed(ClinicianCommand(p.pump.at, action, "dr-a", "x"))
    nxt = next_step(p.state, PROTOCOL)
    if action == "stop":
        assert nxt is None
    else:  # a clinician's hold runs the schedule's hold, then stops (no taper in this schedule)
        assert nxt is not None and nxt.kind == "stop" and nxt.at == p.pump.at + timedelta(days=3)
    assert next_step(primed().__class__(pump_id="x"), PROTOCOL) is None
