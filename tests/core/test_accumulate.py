"""`machine._accumulate` (a pump report's counters into the course state) is `evolve` with the five fields a
report sets: the same copy, the same keys in the same order, every other field the very same object."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core import machine
from driverd.core.events import PumpReport
from driverd.core.state import CourseState, evolve
from tests.core.test_quiet_report import running_state

D = Decimal
STATE, _ = running_state()


def by_evolve(state: CourseState, ev: PumpReport) -> CourseState:
    """_accumulate as it was written with `evolve`."""
    raw, prev = ev.delivered_ml, state.raw_delivered_ml
    increment = Decimal(0) if prev is None else (raw - prev if raw >= prev else raw)
    samples, sample = machine._counted(state, ev.at, increment)
    return evolve(state, samples=samples, last_sample=sample, raw_delivered_ml=raw, pump_alarms=ev.alarms,
                  pump_infusing=ev.state == "infusing")


@settings(max_examples=200, deadline=None)
@given(seconds=st.integers(0, 200), add=st.decimals(D("-30"), D("30"), places=3),
       state_name=st.sampled_from(["infusing", "stopped", "paused", "alarm"]),
       alarms=st.sampled_from([(), ("near_end",), ("occlusion", "low_battery")]), fresh=st.booleans())
def test_accumulate_is_evolve_of_the_report_fields(seconds: int, add: Decimal, state_name: str,
                                                   alarms: tuple[str, ...], fresh: bool) -> None:
    state = STATE if not fresh else evolve(STATE, raw_delivered_ml=None, last_sample=None)
    assert STATE.last_sample is not None and STATE.raw_delivered_ml is not None
    ev = PumpReport(STATE.last_sample.at + timedelta(seconds=seconds), state_name,  # type: ignore[arg-type]
                    STATE.commanded_rate, STATE.raw_delivered_ml + add, alarms)
    got, want = machine._accumulate(state, ev), by_evolve(state, ev)
    assert type(got) is CourseState
    assert list(got.__dict__) == list(want.__dict__) == list(state.__dict__)
    assert repr(got) == repr(want) and got == want
    for k, v in got.__dict__.items():
        if k not in machine.ACCUMULATED:
            assert v is state.__dict__[k], k
    assert got.pump_alarms is ev.alarms and got.raw_delivered_ml is ev.delivered_ml
