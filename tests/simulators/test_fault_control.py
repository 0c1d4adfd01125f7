"""simulators.control: the fault words an operator types and the control request line, malformed forms included
(each error names the field and the rule, and nothing is applied)."""

from __future__ import annotations

import json

import pytest

from drivers.base import AlarmKind
from simulators.control import FaultCommand, FaultControlError, apply_fault, parse_fault, parse_request
from simulators.faults import FaultPlan


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["cut"], FaultCommand("cut")),
        (["RESTORE"], FaultCommand("restore")),
        (["drop-all"], FaultCommand("drop-all")),
        (["clear"], FaultCommand("clear")),
        (["disconnect"], FaultCommand("disconnect")),
        (["drop"], FaultCommand("drop", count=1)),
        (["drop", "3"], FaultCommand("drop", count=3)),
        (["garble", "2"], FaultCommand("garble", count=2)),
        (["delay", "2.5"], FaultCommand("delay", count=1, seconds=2.5)),
        (["delay", "0", "4"], FaultCommand("delay", count=4, seconds=0.0)),
        (["occlusion"], FaultCommand("alarm", alarm=AlarmKind.OCCLUSION)),
        (["alarm", "power_interrupted"], FaultCommand("alarm", alarm=AlarmKind.POWER_INTERRUPTED)),
    ],
)
def test_fault_words(words: list[str], expected: FaultCommand) -> None:
    assert parse_fault(words) == expected


@pytest.mark.parametrize(
    ("words", "field", "rule"),
    [
        ([], "fault", "required"),
        (["explode"], "fault", "enum"),
        (["cut", "now"], "fault", "arity"),
        (["drop", "0"], "fault.count", "range"),
        (["drop", "-1"], "fault.count", "range"),
        (["drop", "1.5"], "fault.count", "range"),
        (["drop", "2000000"], "fault.count", "range"),
        (["drop", "1", "2"], "fault", "arity"),
        (["delay"], "fault", "arity"),
        (["delay", "nan"], "fault.seconds", "range"),
        (["delay", "inf"], "fault.seconds", "range"),
        (["delay", "-1"], "fault.seconds", "range"),
        (["delay", "3601"], "fault.seconds", "range"),
        (["delay", "1", "x"], "fault.count", "range"),
        (["alarm"], "fault", "arity"),
        (["alarm", "fire"], "fault", "enum"),
        (["occlusion", "twice"], "fault", "arity"),
    ],
)
def test_malformed_fault_words_name_the_field_and_rule(words: list[str], field: str, rule: str) -> None:
    with pytest.raises(FaultControlError) as info:
        parse_fault(words)
    assert [(p.path, p.rule) for p in info.value.problems] == [(field, rule)]


@pytest.mark.parametrize(
    ("raw", "field", "rule"),
    [
        (b"not json\n", "request", "json"),
        (b"\xff\xfe\n", "request", "json"),
        (b"[1, 2]\n", "request", "object"),
        (b'{"fault": "cut"}\n', "request.fault", "type"),
        (b'{"fault": ["cut"], "unit": 9}\n', "request.unit", "served"),
        (b'{"fault": ["cut"], "unit": true}\n', "request.unit", "served"),
        (b'{"fault": ["cut"], "units": 1}\n', "request.units", "known-key"),
        (b'{"fault": [1]}\n', "fault", "type"),
    ],
)
def test_malformed_requests_are_refused(raw: bytes, field: str, rule: str) -> None:
    with pytest.raises(FaultControlError) as info:
        parse_request(raw, [1, 2])
    assert [(p.path, p.rule) for p in info.value.problems] == [(field, rule)]


def test_a_request_without_unit_goes_to_every_unit() -> None:
    cmd, units = parse_request(json.dumps({"fault": ["drop", "2"], "unit": None}).encode(), [2, 1])
    assert cmd == FaultCommand("drop", count=2) and units == [2, 1]
    assert parse_request(b'{"fault": ["cut"], "unit": 1}', [1, 2])[1] == [1]


def test_apply_acts_on_the_plan() -> None:
    alarms: list[AlarmKind] = []
    plan = FaultPlan(alarm_hook=alarms.append)
    apply_fault(parse_fault(["cut"]), plan)
    assert plan.is_cut
    apply_fault(parse_fault(["restore"]), plan)
    assert not plan.is_cut
    apply_fault(parse_fault(["garble", "2"]), plan)
    apply_fault(parse_fault(["delay", "1.5"]), plan)
    assert [plan.on_reply(b"abc").kind for _ in range(4)] == ["garble", "garble", "delay", "send"]
    apply_fault(parse_fault(["end_of_syringe"]), plan)
    assert alarms == [AlarmKind.END_OF_SYRINGE]
    apply_fault(parse_fault(["drop-all"]), plan)
    assert plan.dropping_all
    apply_fault(parse_fault(["clear"]), plan)
    assert not plan.dropping_all
