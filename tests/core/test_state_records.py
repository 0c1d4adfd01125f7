"""CourseState <-> snapshot fields: every state a course passes through comes back identical (issue 12, item 1)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core.commands import ApplySetpoint
from driverd.core.errors import ValidationError
from driverd.core.events import (
    ClinicianCommand,
    Event,
    PumpReport,
    PumpVerified,
    ScheduleAccepted,
    SetpointResult,
    Tick,
)
from driverd.core.kernel import hours_between
from driverd.core.machine import initial_state, step
from driverd.core.quantities import NEW_ERA_RESOLUTION
from driverd.core.records import exact_dec
from driverd.core.state import CourseState
from driverd.core.state_records import state_from_fields, state_to_fields
from tests.core.factories import PROTOCOL, T0, schedule

D = Decimal


def round_trip(state: CourseState) -> CourseState:
    # Through JSON text, as the log stores it.
    return state_from_fields(json.loads(json.dumps(state_to_fields(state), sort_keys=True)))


def assert_identical(a: CourseState, b: CourseState) -> None:
    assert a == b
    assert repr(a) == repr(b)  # repr shows every Decimal's exponent and every datetime's microseconds


def course_states(actions: list[tuple[int, str]], *, conc: str = "50") -> list[CourseState]:
    """Every state of a course played with a pump that drifts, alarms, resets its counter, and clinicians."""
    state = initial_state("pump-1")
    out = [state]
    at = T0 - timedelta(minutes=2)
    rate, infusing, delivered, alarms = D(0), False, D(0), ()

    def feed(ev: Event) -> None:
        nonlocal state, rate, infusing
        state, cmds = step(state, ev, PROTOCOL)
        out.append(state)
        for c in cmds:
            if isinstance(c, ApplySetpoint):
                rate, infusing = c.setpoint.rate_ml_per_h, c.setpoint.rate_ml_per_h > 0
                if "lost" not in alarms:
                    feed(SetpointResult(ev.at, c.setpoint.id, rate))
                else:
                    feed(SetpointResult(ev.at, c.setpoint.id, None, "no answer"))

    feed(ScheduleAccepted(at, schedule(conc=conc)))
    feed(PumpVerified(at, D("19.13"), NEW_ERA_RESOLUTION, "NE-1000"))
    for dt, action in actions:
        prev = at
        at += timedelta(seconds=dt, microseconds=dt * 7)
        if infusing:
            delivered += rate * hours_between(prev, at)
        if action == "occlusion":
            alarms, infusing = ("occlusion",), False
        elif action == "near_end":
            alarms = ("near_end",)
        elif action == "lost":
            alarms = ("lost",)
        elif action == "clear":
            alarms = ()
        elif action == "reset":
            delivered = D(0)
        elif action in ("hold", "resume", "reduce", "escalate", "stop", "taper"):
            feed(ClinicianCommand(at, action, "dr-a", "test"))  # type: ignore[arg-type]
        elif action == "change_syringe":
            feed(ClinicianCommand(at, "change_syringe", "dr-a", "test", fill_volume_ml=D("17")))
        blocking = [a for a in alarms if a in ("occlusion",)]
        shown = delivered.quantize(D("0.01"), rounding=ROUND_DOWN)
        feed(PumpReport(at, "alarm" if blocking else ("infusing" if infusing else "stopped"), rate, shown,
                        tuple(a for a in alarms if a != "lost")))
        feed(Tick(at))
    return out


ACTIONS = st.sampled_from(["poll"] * 6 + ["occlusion", "near_end", "lost", "clear", "reset", "hold", "resume",
                                          "reduce", "escalate", "stop", "taper", "change_syringe"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 30, 61, 900, 3600, 6 * 3600]), ACTIONS), max_size=120),
       st.sampled_from(["50", "100"]))
def test_every_state_of_a_course_round_trips_identically(actions: list[tuple[int, str]], conc: str) -> None:
    for state in course_states(actions, conc=conc):
        assert_identical(round_trip(state), state)


def test_a_pending_setpoint_and_a_syringe_change_round_trip() -> None:
    states = course_states([(61, "poll"), (61, "lost"), (3600, "escalate"), (61, "change_syringe"), (61, "poll")])
    assert any(s.pending is not None for s in states)
    assert any(s.syringe_change is not None for s in states)
    for s in states:
        assert_identical(round_trip(s), s)


@pytest.mark.parametrize("text", ["1E+2", "100", "1.50", "-0", "0E-7", "123456789.000000001", "5E+1"])
def test_decimals_keep_their_exponent(text: str) -> None:
    d = Decimal(text)
    back = Decimal(exact_dec(d))
    assert back.as_tuple() == d.as_tuple()


def _fields() -> dict[str, Any]:
    states = course_states([(61, "poll"), (61, "poll")])
    return state_to_fields(states[-1])


@pytest.mark.parametrize(("mutate", "path", "rule"), [
    (lambda f: f.update(phase="flying"), "state.phase", "enum"),
    (lambda f: f.update(commanded_rate=1.5), "state.commanded_rate", "type"),
    (lambda f: f.update(commanded_rate="NaN"), "state.commanded_rate", "finite"),
    (lambda f: f.update(commanded_rate="fast"), "state.commanded_rate", "number"),
    (lambda f: f.update(started_at="yesterday"), "state.started_at", "format"),
    (lambda f: f.update(started_at="2026-11-23T09:00:00"), "state.started_at", "format"),
    (lambda f: f.update(taper_index=True), "state.taper_index", "type"),
    (lambda f: f.update(link_up="yes"), "state.link_up", "type"),
    (lambda f: f.update(samples={}), "state.samples", "type"),
    (lambda f: f["samples"][0].__setitem__(0, None), "state.samples[0].at", "format"),
    (lambda f: f["samples"][0].pop(), "state.samples[0]", "type"),
    (lambda f: f["samples"][0].__setitem__(1, "x"), "state.samples[0].delivered_ml", "number"),
    (lambda f: f.pop("pump_id"), "state.pump_id", "required"),
    (lambda f: f.update(extra=1), "state.extra", "unknown"),
    (lambda f: f.update(resolution={"decimals": 12, "significant": None}), "state.resolution", "value"),
    (lambda f: f.update(schedule=[]), "state.schedule", "type"),
])
def test_malformed_snapshot_state_is_refused_naming_the_field(mutate: Any, path: str, rule: str) -> None:
    fields = _fields()
    mutate(fields)
    with pytest.raises(ValidationError) as info:
        state_from_fields(fields)
    assert [(p.path, p.rule) for p in info.value.problems] == [(path, rule)]


def test_not_an_object_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        state_from_fields(["state"])
    assert info.value.problems[0].path == "state"


def test_replace_keeps_round_trip_for_unusual_exponents() -> None:
    s = replace(course_states([(61, "poll")])[-1], commanded_mg=D("1E+2"), level_mg_per_24h=D("1.000"))
    assert_identical(round_trip(s), s)


@given(st.decimals(allow_nan=False, allow_infinity=False) | st.builds(Decimal, st.from_regex(
    r"-?[0-9]{1,12}(\.[0-9]{0,12})?(E[+-]?[0-9]{1,2})?", fullmatch=True)))
def test_exact_dec_is_plain_for_exponents_up_to_zero_else_scientific(d: Decimal) -> None:
    exp = d.as_tuple().exponent
    assert isinstance(exp, int)
    assert exact_dec(d) == (format(d, "f") if exp <= 0 else str(d))
    assert Decimal(exact_dec(d)).as_tuple() == d.as_tuple()
