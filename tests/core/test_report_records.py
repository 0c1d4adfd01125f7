"""A pump report's record holds every reading the channel logs, exactly, and the replay folds it (SUP-20, SUP-16).

The core judges what a pump reports: a counter step of 0, negative, NaN or infinite is the alarm `counter_step`, a
bore that is no number `syringe_mismatch`, a NaN rate or counter a refused report, an infinite one the ceiling.
The channel logs the report as it was folded. Before (review, 2026-12-03) the record decoder refused such a
`delivered_step_ml` or `diameter_mm` (and any non-finite rate or counter), so `audit replay`, `verify --full` and the
start-up after a crash failed on that log for good. And a value with a positive exponent (a bore of 1E+1 mm) was
written "10": the replay worded the alarm otherwise than the daemon had and diverged. Now every Decimal a report can
hold is written so that it reads back as the very same value (sign, digits, exponent; a NaN's kind, sign and
payload), and folding the read-back gives the core's live outputs, word for word. A field that is not a decimal at
all is still refused, naming the field and the rule.

The other records that hold what a pump read back had the same hole and have the same rule: a setpoint's read-back
(`setpoint_result.readback_ml_per_h`: a NaN was a refused result the replay could not fold), the bore read back at
prime and at a syringe load (`pump_verified`, `syringe_loaded`: a NaN bore refused the course live and made the
log unstartable), the counter at a load and around a clear (`syringe_loaded.delivered_ml`, `counter_cleared`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D
from functools import cache
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from driverd.core import machine
from driverd.core.errors import ValidationError
from driverd.core.events import CounterCleared, Event, PumpReport, PumpVerified, SetpointResult, SyringeLoaded
from driverd.core.pump_range import PumpRange
from driverd.core.quantities import NEW_ERA_RESOLUTION
from driverd.core.records import command_to_record, event_from_record, event_to_record, exact_dec, fmt_dec
from driverd.core.state import CourseState, Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.harness import ExactPump, Player

FIELDS = ("delivered_step_ml", "diameter_mm", "rate_ml_per_h", "delivered_ml")
REPORT = PumpReport(T0, "infusing", D("0.083"), D("1.500"), (), D("0.001"), D("21.59"))

# The value a driver hands the channel, and the text its record holds: plain notation as before, except where that
# would lose the exponent.
WRITTEN = [
    ("NaN", "NaN"), ("-NaN", "-NaN"), ("NaN123", "NaN123"), ("sNaN", "sNaN"), ("-sNaN7", "-sNaN7"),
    ("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
    ("0", "0"), ("-0", "-0"), ("0.000", "0.000"), ("-0E-3", "-0.000"), ("0E+2", "0E+2"),
    ("-1", "-1"), ("-0.01", "-0.01"), ("1E+1", "1E+1"), ("1.00E+3", "1.00E+3"), ("-2E+1", "-2E+1"),
    ("0.001", "0.001"), ("1E-7", "0.0000001"), ("21.59", "21.59"), ("1000", "1000"),
]


def through_the_log(ev: PumpReport) -> PumpReport:
    """Encode, as JSON text and back (the log's own form), and decode."""
    name, fields = event_to_record(ev)
    decoded = event_from_record(json.loads(json.dumps({"event": name, **fields})))
    assert isinstance(decoded, PumpReport)
    return decoded


def exactly(a: D | None, b: D | None) -> bool:
    """The same Decimal: sign, digits, exponent, or a NaN's kind and payload (a NaN equals nothing)."""
    return (a is None) == (b is None) and (a is None or b is None or a.as_tuple() == b.as_tuple())


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(("value", "text"), WRITTEN)
def test_each_reading_is_written_as_its_exact_text_and_read_back_as_itself(field: str, value: str, text: str) -> None:
    ev = replace(REPORT, **{field: D(value)})
    assert event_to_record(ev)[1][field] == text
    assert exactly(getattr(through_the_log(ev), field), D(value))


FINITE = st.builds(lambda sign, digits, exponent: D((sign, tuple(digits), exponent)),
                   st.integers(0, 1), st.lists(st.integers(0, 9), min_size=1, max_size=30), st.integers(-40, 40))
SPECIAL = st.builds(lambda sign, kind: D(f"{'-' if sign else ''}{kind}"), st.booleans(),
                    st.sampled_from(["Infinity", "NaN", "NaN0", "NaN123456789", "sNaN", "sNaN1", "sNaN987"]))
VALUES = st.one_of(FINITE, SPECIAL, st.decimals(allow_nan=True, allow_infinity=True))


@given(VALUES, st.sampled_from(FIELDS))
@example(D("0E+2"), "delivered_step_ml")
@example(D("-sNaN12"), "diameter_mm")
def test_every_decimal_round_trips_exactly(value: D, field: str) -> None:
    ev = replace(REPORT, **{field: value})
    text = event_to_record(ev)[1][field]
    assert exactly(getattr(through_the_log(ev), field), value)
    exponent = value.as_tuple().exponent
    if not (isinstance(exponent, int) and exponent > 0):
        assert text == fmt_dec(value)  # what every log held before: plain notation, unchanged
    assert exact_dec(value) == text


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(("value", "rule"), [
    ("x", "number"), ("", "number"), ("0x10", "number"), ("1,5", "number"), ("NaN NaN", "number"),
    (1, "type"), (1.5, "type"), (True, "type"), ([], "type"), ({"v": "1"}, "type"),
])
def test_what_is_not_a_decimal_is_still_refused_naming_the_field(field: str, value: Any, rule: str) -> None:
    _, fields = event_to_record(REPORT)
    with pytest.raises(ValidationError) as info:
        event_from_record({"event": "pump_report", **fields, field: value})
    assert [(p.path, p.rule) for p in info.value.problems] == [(field, rule)]


@pytest.mark.parametrize("field", ["delivered_step_ml", "diameter_mm"])
def test_an_unread_step_or_bore_is_still_none(field: str) -> None:
    _, fields = event_to_record(REPORT)
    for record in ({k: v for k, v in fields.items() if k != field}, {**fields, field: None}):
        ev = event_from_record({"event": "pump_report", **record})
        assert isinstance(ev, PumpReport) and getattr(ev, field) is None


@cache
def _running() -> tuple[CourseState, PumpReport]:
    """A course titrating 30 h in, and the pump's next report (built once: every example starts from it)."""
    p = Player(primed(schedule()), PROTOCOL, ExactPump(at=T0 - timedelta(minutes=10)))
    p.run_until(T0 + timedelta(hours=30))
    assert p.state.phase is Phase.TITRATING and p.pump.infusing
    p.pump.advance(T0 + timedelta(hours=30, minutes=1))
    bore = p.state.schedule.inner_diameter_mm  # type: ignore[union-attr]
    return p.state, replace(p.pump.report(), delivered_step_ml=D("0.001"), diameter_mm=bore)


def outputs(cmds: tuple[Any, ...]) -> list[tuple[str, dict[str, Any]]]:
    return [command_to_record(c) for c in cmds]


@given(st.one_of(VALUES, st.sampled_from([D(0), D("-0.01"), D("NaN"), D("1E+1"), D("0E+2")])),
       st.sampled_from(FIELDS))
@example(D(0), "delivered_step_ml")
@example(D("NaN"), "delivered_step_ml")
@example(D("NaN"), "diameter_mm")
@example(D("1E+1"), "diameter_mm")
@example(D("sNaN"), "rate_ml_per_h")
@example(D("Infinity"), "delivered_ml")
def test_the_replay_folds_the_logged_report_to_the_daemons_own_outputs(value: D, field: str) -> None:
    state, report = _running()
    live = replace(report, **{field: value})
    _, live_cmds, _ = machine.report_step(state, live, PROTOCOL)  # the channel's entry point
    _, replayed = machine.step(state, through_the_log(live), PROTOCOL)  # the replay's
    assert outputs(replayed) == outputs(live_cmds)
    codes = [f.get("code") for name, f in outputs(live_cmds) if name == "alarm"]
    if field == "delivered_step_ml":  # doubt unless a positive number up to the library's bound: alarm (and stop)
        assert codes == ([] if value.is_finite() and 0 < value <= PROTOCOL.max_counter_step_ml else ["counter_step"])
    if field == "diameter_mm":  # any other bore than the schedule's, a NaN too
        assert codes == ([] if value.is_finite() and value == state.schedule.inner_diameter_mm  # type: ignore[union-attr]
                         else ["syringe_mismatch"])


# Every other input record holding a value the pump read back: (event, its field).
READ_BACKS: list[tuple[Event, str]] = [
    (SetpointResult(T0, 7, D("0.083")), "readback_ml_per_h"),
    (PumpVerified(T0, D("19.13"), NEW_ERA_RESOLUTION, "NE-1000", PumpRange("sim://p", D("0.01"), D("900"))),
     "diameter_mm"),
    (SyringeLoaded(T0, D("19.13"), D("0.000")), "diameter_mm"),
    (SyringeLoaded(T0, D("19.13"), D("0.000")), "delivered_ml"),
    (CounterCleared(T0, D("99.9"), D("0")), "before_ml"),
    (CounterCleared(T0, D("99.9"), D("0")), "after_ml"),
]


def _read_back(event: Event, field: str) -> D:
    name, fields = event_to_record(event)
    back = event_from_record(json.loads(json.dumps({"event": name, **fields})))
    assert type(back) is type(event)
    value = getattr(back, field)
    assert isinstance(value, D)
    return value


@given(VALUES, st.sampled_from(READ_BACKS))
@example(D("NaN"), READ_BACKS[0])
@example(D("NaN"), READ_BACKS[1])
@example(D("1E+1"), READ_BACKS[1])
def test_every_read_back_round_trips_exactly(value: D, case: tuple[Event, str]) -> None:
    event, field = case
    assert exactly(_read_back(replace(event, **{field: value}), field), value)  # type: ignore[type-var]


@pytest.mark.parametrize(("event", "field"), READ_BACKS)
@pytest.mark.parametrize(("value", "rule"), [("x", "number"), ("", "number"), (1, "type"), ([], "type")])
def test_a_read_back_that_is_not_a_decimal_is_still_refused(event: Event, field: str, value: Any, rule: str) -> None:
    name, fields = event_to_record(event)
    with pytest.raises(ValidationError) as info:
        event_from_record({"event": name, **fields, field: value})
    assert [(p.path, p.rule) for p in info.value.problems] == [(field, rule)]


@pytest.mark.parametrize(("after", "verified"), [("0", True), ("-0", True), ("0.000", True), ("0E+2", True),
                                                  ("0.001", False), ("NaN", False), ("sNaN", False), (None, False)])
def test_a_clear_is_verified_only_by_a_zero_read_back_and_a_nan_raises_nothing(after: str | None,
                                                                              verified: bool) -> None:
    event = CounterCleared(T0, D("99.9"), None if after is None else D(after))
    assert event.verified is verified
    assert event_to_record(event)[1]["verified"] is verified  # (an sNaN raised here, out of the channel's clear)
