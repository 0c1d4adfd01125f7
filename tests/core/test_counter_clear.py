"""The pump's delivered-volume counter in the core: an ordered clear (`CounterCleared`) and the reading's own step.

- A clear the daemon ordered counts what the counter added up to the clear and re-baselines on the read-back: it
  is no delivery, no lost count, no alarm. A clear that does not read back 0 raises `counter_not_cleared` once.
- Defence in depth (docs/safety.md, SUP-15): the accuracy check never raises `under_infusion` from a difference
  within the counter reading's own step, which the driver reports exactly (a 4-significant-digit display above
  100 mL reads in 0.1 mL steps). With a fine step the check is exactly as strict as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_DOWN
from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core.commands import Notice, RaiseAlarm
from driverd.core.errors import ValidationError
from driverd.core.events import CounterCleared, PumpReport
from driverd.core.machine import initial_state, step
from driverd.core.records import event_from_record, event_to_record
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
M = timedelta(minutes=1)


@dataclass
class DisplayPump(ExactPump):
    """An exact pump whose counter is shown like a display: truncated to `step`, which it reports (or not)."""

    offset: D = D(0)  # what the counter held before this course (nobody cleared it)
    step: D = D("0.001")
    tell_step: bool = True

    def report(self) -> PumpReport:
        exact = self.offset + self.delivered
        shown = (exact / self.step).to_integral_value(rounding=ROUND_DOWN) * self.step
        base = super().report()
        return PumpReport(base.at, base.state, base.rate_ml_per_h, shown, base.alarms,
                          self.step if self.tell_step else None)


def course(pump: DisplayPump, until: datetime, every: timedelta = M) -> Player:
    p = Player(primed(schedule(doses=(100,), hold_days="10")), PROTOCOL, pump)
    p.run_until(until, every)
    return p


def raised(p: Player) -> list[str]:
    return [c.code for _, c in p.log if isinstance(c, RaiseAlarm)]


def test_a_coarse_display_above_100_ml_no_longer_raises_a_false_under_infusion() -> None:
    # 100 mg/24h at 50 mg/mL: 0.083 mL/h. The counter left at 99.9 mL passes 100 mL after ~1.2 h, then reads in
    # 0.1 mL steps: a correct pump.
    p = course(DisplayPump(T0 - 10 * M, offset=D("99.9"), step=D("0.1")), T0 + 30 * H)
    assert raised(p) == [] and p.state.phase is Phase.HOLDING
    assert p.pump.infusing


def test_without_the_reading_step_the_same_pump_raised_under_infusion() -> None:
    """What the defect did: the same readings with no step reported are judged at the library's 0.01 mL."""
    p = course(DisplayPump(T0 - 10 * M, offset=D("99.9"), step=D("0.1"), tell_step=False), T0 + 30 * H)
    assert "under_infusion" in raised(p)


def test_a_real_under_infusion_is_still_caught_on_a_coarse_display() -> None:
    pump = DisplayPump(T0 - 10 * M, offset=D("99.9"), step=D("0.1"))
    p = course(pump, T0 + 2 * H)
    assert raised(p) == []
    pump.rate = pump.rate / 2  # the plunger slips: half the programmed rate, while the pump reports the full one
    real = pump.rate * 2

    # Report the programmed (full) rate, deliver half: the core sees only the counter fall behind.
    def half_report() -> PumpReport:
        r = DisplayPump.report(pump)
        return PumpReport(r.at, r.state, real, r.delivered_ml, r.alarms, r.delivered_step_ml)

    pump.report = half_report  # type: ignore[method-assign]
    p.run_until(T0 + 12 * H)
    assert "under_infusion" in raised(p)


@settings(max_examples=60, deadline=None)
@given(step=st.sampled_from([D("0.001"), D("0.01")]), every=st.sampled_from([M, 7 * M, 30 * M]),
       factor=st.sampled_from([D("0.5"), D("0.8"), D("1.2"), D(2)]))
def test_with_a_fine_step_the_check_decides_exactly_as_without_one(step: D, every: timedelta, factor: D) -> None:
    """A step at or below the library's counter_resolution_ml changes nothing: every command is the same."""
    logs = []
    for tell in (True, False):
        pump = DisplayPump(T0 - 10 * M, step=step, tell_step=tell)
        p = course(pump, T0 + 3 * H, every)
        pump.rate = pump.rate * factor  # runs off: the check must fire (or not) the same way
        p.run_until(T0 + 10 * H, every)
        logs.append([(t, repr(c)) for t, c in p.log])
    assert logs[0] == logs[1]


# ---------------------------------------------------------------------------------------------- CounterCleared


def test_an_ordered_clear_counts_up_to_the_clear_and_rebaselines() -> None:
    state = primed()
    state, _ = step(state, PumpReport(T0 - 4 * M, "stopped", D(0), D("99.9")), PROTOCOL)
    before = state.delivered_ml
    state, cmds = step(state, CounterCleared(T0 - 3 * M, D("99.95"), D(0)), PROTOCOL)
    assert [c.code for c in cmds if isinstance(c, Notice)] == ["counter_cleared"]
    assert state.raw_delivered_ml == 0 and state.delivered_ml == before + D("0.05")
    state, cmds = step(state, PumpReport(T0 - 2 * M, "stopped", D(0), D(0)), PROTOCOL)
    assert cmds == () and state.delivered_ml == before + D("0.05")  # the drop to 0 is no new run


def test_a_clear_not_read_back_0_alarms_once_and_a_later_verified_clear_ends_it_before_the_course() -> None:
    state = initial_state("pump-1")
    for at, after, error in ((T0, D("99.9"), ""), (T0 + M, None, "DriverTimeout: no reply")):
        state, cmds = step(state, CounterCleared(at, D("99.9"), after, error), PROTOCOL)
        assert state.phase is Phase.IDLE and state.alarm_causes == ("counter_not_cleared",)
    assert state.alarms_raised == ("counter_not_cleared",)  # raised once, not per attempt
    state, cmds = step(state, CounterCleared(T0 + 2 * M, D("99.9"), D(0)), PROTOCOL)
    assert state.alarm_causes == () and state.alarm_code == ""
    assert [c.detail for c in cmds if isinstance(c, Notice) and c.code == "alarm_cleared"]


def test_a_failed_clear_in_a_running_course_alarms_and_stays_until_acknowledged() -> None:
    p = course(DisplayPump(T0 - 10 * M), T0 + 2 * H)
    p.feed(CounterCleared(T0 + 2 * H, D("0.16"), D("0.16"), ""))
    assert p.state.phase is Phase.ALARM and "counter_not_cleared" in p.state.alarm_causes
    p.feed(CounterCleared(T0 + 2 * H + M, D("0.16"), D(0), ""))
    assert p.state.phase is Phase.ALARM and "counter_not_cleared" in p.state.alarm_causes  # a clinician decides


@pytest.mark.parametrize("event", [
    CounterCleared(T0, D("99.9"), D(0)),
    CounterCleared(T0, None, None, "PumpRejected: ?NA"),
    PumpReport(T0, "infusing", D("0.083"), D("100.1"), (), D("0.1")),
    PumpReport(T0, "infusing", D("0.083"), D("1.5")),
])
def test_records_round_trip(event: object) -> None:
    name, fields = event_to_record(event)  # type: ignore[arg-type]
    assert event_from_record({"event": name, **fields}) == event


@pytest.mark.parametrize(("fields", "field"), [
    ({"event": "counter_cleared", "at": "2026-11-23T09:00:00Z", "before_ml": "x", "after_ml": "0", "error": ""},
     "before_ml"),
    ({"event": "counter_cleared", "at": "2026-11-23T09:00:00Z", "before_ml": None, "after_ml": 0, "error": ""},
     "after_ml"),
    ({"event": "counter_cleared", "at": "2026-11-23T09:00:00Z", "before_ml": None, "after_ml": None}, "error"),
    ({"event": "pump_report", "at": "2026-11-23T09:00:00Z", "state": "infusing", "rate_ml_per_h": "1",
      "delivered_ml": "1", "alarms": [], "delivered_step_ml": "0.1.2"}, "delivered_step_ml"),
    ({"event": "pump_report", "at": "2026-11-23T09:00:00Z", "state": "infusing", "rate_ml_per_h": "1",
      "delivered_ml": "1", "alarms": [], "delivered_step_ml": 0.1}, "delivered_step_ml"),
])  # (a step of "0" or "NaN" is a decimal: the core judges it, tests/core/test_report_records.py)
def test_malformed_records_name_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        event_from_record(fields)
    assert info.value.problems[0].path == field
