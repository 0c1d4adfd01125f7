"""A counter reading's own step is bounded (docs/safety.md, SUP-20).

`PumpReport.delivered_step_ml` widens the 24-h ceiling's allowance (two steps at the syringe's concentration), the
empty-syringe test and the near-empty warning (SUP-15). A driver, or a corrupt report, claiming a huge step widened
the ceiling without bound (5 mL at 100 mg/mL: 1000 mg over a 500 mg/24h ceiling). Now a step must be a positive
number up to the drug library's `[supervision] max_counter_step_ml` (at most, and by default, 0.1 mL: a New Era
display from 100 mL; Modbus maps are held to 0.01 mL). Anything else is doubt: it widens nothing (the library's
step is used), and in a live course it is the alarm `counter_step` and a stop, on the quiet and the general path
alike. A NaN step was already doubt for the allowance; now it alarms too.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.core import machine
from driverd.core.commands import ApplySetpoint, RaiseAlarm
from driverd.core.errors import ConfigError
from driverd.core.events import PumpReport
from driverd.core.protocol import MAX_COUNTER_STEP_ML, parse_protocol
from driverd.core.state import Phase, evolve
from tests.core.factories import PROTOCOL, PROTOCOL_TEXT, T0, primed, schedule
from tests.core.harness import ExactPump, Player

H = timedelta(hours=1)
M = timedelta(minutes=1)
BAD = [D("0.11"), D("0.2"), D(1), D(5), D(0), D("-0.01"), D("NaN"), D("sNaN"), D("Infinity"), D("-Infinity")]


def running(hours: int = 30, conc: str = "50") -> Player:
    p = Player(primed(schedule(conc=conc)), PROTOCOL, ExactPump(at=T0 - 10 * M))
    p.run_until(T0 + hours * H)
    assert p.state.phase is Phase.TITRATING and p.pump.infusing
    return p


def alarms(cmds: tuple) -> list[str]:
    return [c.code for c in cmds if isinstance(c, RaiseAlarm)]


def stops(cmds: tuple) -> list[D]:
    return [c.setpoint.rate_ml_per_h for c in cmds if isinstance(c, ApplySetpoint)]


def test_the_shipped_library_bounds_the_step_at_0_1_ml() -> None:
    assert PROTOCOL.max_counter_step_ml == MAX_COUNTER_STEP_ML == D("0.1")


@pytest.mark.parametrize("step", BAD)
def test_a_step_that_cannot_be_judged_alarms_and_stops_the_pump(step: D) -> None:
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    ev = replace(p.pump.report(), delivered_step_ml=step)
    assert machine._quiet_report(p.state, ev, PROTOCOL) is None
    cmds = p.feed(ev)
    assert alarms(cmds) == ["counter_step"] and stops(cmds) == [D(0)]
    assert p.state.phase is Phase.ALARM and not p.pump.infusing
    for k in range(2, 4):  # raised once while active; nothing sent again
        p.pump.advance(T0 + 30 * H + k * M)
        assert p.feed(replace(p.pump.report(), delivered_step_ml=step)) == ()


@pytest.mark.parametrize("step", [None, D("0.001"), D("0.01"), D("0.1")])
def test_steps_up_to_the_bound_are_judged_as_before(step: D | None) -> None:
    p = running()
    p.pump.advance(T0 + 30 * H + M)
    assert p.feed(replace(p.pump.report(), delivered_step_ml=step)) == () and p.state.phase is Phase.TITRATING


@given(step=st.one_of(st.decimals(allow_nan=True, allow_infinity=True), st.decimals(min_value=D("-2"),
                                                                                     max_value=D("2"), places=4)))
def test_no_step_widens_an_allowance_beyond_the_bound(step: D) -> None:
    """The one function every allowance goes through (ceiling, empty syringe, near-empty warning, accuracy)
    never allows more than the library's bound, and takes the reading's step only when it is no doubt."""
    res = machine.counter_resolution(PROTOCOL, step)
    assert PROTOCOL.counter_resolution_ml <= res <= PROTOCOL.max_counter_step_ml
    assert res == PROTOCOL.counter_resolution_ml or (step.is_finite() and res == step)
    if machine.counter_step_problem(PROTOCOL, step):
        assert res == PROTOCOL.counter_resolution_ml


def test_a_huge_step_no_longer_lets_a_fast_pump_past_the_ceiling() -> None:
    """The review's case: a pump at the top dose at 100 mg/mL, 8 % fast (within the 10 % accuracy limit, so only
    the ceiling on read-backs catches it), reporting a 5 mL step. Before, the ceiling allowed 2 x 5 mL x 100 mg/mL
    = 1000 mg more; now the first such report stops it (counter_step), and the ceiling is judged at 0.01 mL."""
    p = running(conc="100")
    state = p.state
    ev = replace(p.pump.report(), at=p.pump.at + M, delivered_step_ml=D(5))
    limit_then = PROTOCOL.ceiling_mg_per_24h + 2 * D(5) * 100
    assert machine.counter_resolution(PROTOCOL, ev.delivered_step_ml) * 2 * 100 + PROTOCOL.ceiling_mg_per_24h \
        < limit_then
    _, cmds = machine.step(state, ev, PROTOCOL)
    assert alarms(cmds) == ["counter_step"] and stops(cmds) == [D(0)]


def test_outside_a_live_course_a_bad_step_is_no_alarm() -> None:
    p = running()
    state = evolve(p.state, phase=Phase.STOPPED, commanded_rate=D(0), pending=None)
    ev = PumpReport(T0 + 30 * H + M, "stopped", D(0), p.pump.delivered, (), D(5))
    _, cmds = machine.step(state, ev, PROTOCOL)
    assert alarms(cmds) == []


@pytest.mark.parametrize(("text", "path"), [
    ('max_counter_step_ml = "0.2"', "supervision.max_counter_step_ml"),
    ('max_counter_step_ml = "0"', "supervision.max_counter_step_ml"),
    ('max_counter_step_ml = "0.005"', "supervision.counter_resolution_ml"),  # below the library's own step
    ('counter_resolution_ml = "0.5"', "supervision.counter_resolution_ml"),  # the old maximum was 1 mL
])
def test_the_library_cannot_widen_the_bound(text: str, path: str) -> None:
    lib = PROTOCOL_TEXT
    if text.startswith("counter_resolution_ml"):
        lib = "\n".join(x for x in lib.splitlines() if not x.startswith("counter_resolution_ml"))
    with pytest.raises(ConfigError) as info:
        parse_protocol(lib.replace("[supervision]\n", f"[supervision]\n{text}\n"))
    assert path in [p.path for p in info.value.problems], info.value.problems


def test_a_library_may_lower_the_bound() -> None:
    lib = parse_protocol(PROTOCOL_TEXT.replace("[supervision]\n", '[supervision]\nmax_counter_step_ml = "0.01"\n'))
    assert lib.max_counter_step_ml == D("0.01")
    assert machine.counter_step_problem(lib, D("0.1")) and not machine.counter_step_problem(lib, D("0.01"))
