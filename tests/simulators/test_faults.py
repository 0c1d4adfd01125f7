"""FaultPlan: queued faults, scripted scenarios (and their malformed forms), wire time."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import AlarmKind, PumpState
from simulators.clock import ManualClock
from simulators.faults import FaultPlan, FaultScenarioError, ScheduledFault, garble, parse_scenario
from simulators.world import World

REPLY = b"\x0200S\x03"


def test_no_faults_sends_unchanged() -> None:
    plan = FaultPlan()
    for _ in range(3):
        a = plan.on_reply(REPLY)
        assert (a.kind, a.payload, a.delay_s) == ("send", REPLY, 0.0)
    assert plan.replies_seen == 3 and plan.history == []


def test_queued_faults_apply_in_order_then_stop() -> None:
    plan = FaultPlan()
    plan.drop_next(2)
    plan.garble_next()
    plan.delay_next(1, 0.25)
    plan.disconnect_next()
    kinds = [plan.on_reply(REPLY) for _ in range(6)]
    assert [a.kind for a in kinds] == ["drop", "drop", "garble", "delay", "disconnect", "send"]
    assert kinds[0].payload == b"" and kinds[4].payload == b""
    assert kinds[2].payload != REPLY and len(kinds[2].payload) == len(REPLY)
    assert kinds[3].payload == REPLY and kinds[3].delay_s == 0.25
    assert plan.pending == 0 and len(plan.history) == 5


def test_drop_all_drops_every_reply_until_cleared_without_a_queue() -> None:
    plan = FaultPlan()
    plan.garble_next()
    plan.drop_all()
    assert plan.dropping_all and plan.pending == 1  # no entry per reply: a long outage holds no memory
    actions = [plan.on_reply(REPLY) for _ in range(5000)]
    assert {(a.kind, a.payload) for a in actions} == {("drop", b"")}
    assert plan.pending == 1 and plan.replies_seen == 5000 and len(plan.history) == 5000
    plan.clear()  # the link is back: the waiting garble is forgotten with it
    assert not plan.dropping_all and plan.pending == 0
    assert plan.on_reply(REPLY).kind == "send"


def test_queued_fault_waits_while_dropping_all() -> None:
    plan = FaultPlan()
    plan.drop_all()
    plan.garble_next()
    assert plan.on_reply(REPLY).kind == "drop"
    plan.drop_next(1)
    assert plan.pending == 2 and plan.on_reply(REPLY).kind == "drop" and plan.pending == 2


def test_scheduled_alarm_still_fires_while_dropping_all() -> None:
    fired: list[AlarmKind] = []
    plan = FaultPlan(alarm_hook=fired.append)
    plan.schedule(ScheduledFault(after_requests=2, kind="alarm", alarm=AlarmKind.OCCLUSION))
    plan.drop_all()
    assert [plan.on_reply(REPLY).kind for _ in range(3)] == ["drop"] * 3
    assert fired == [AlarmKind.OCCLUSION]


@given(st.binary(min_size=0, max_size=64))
def test_garble_always_changes_the_reply(reply: bytes) -> None:
    g = garble(reply)
    assert g != reply and len(g) == max(len(reply), 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.drop_next(0),
        lambda p: p.garble_next(-1),
        lambda p: p.drop_next(True),
        lambda p: p.delay_next(1, -0.1),
        lambda p: p.delay_next(1, float("nan")),
        lambda p: p.delay_next(1, 1e9),
        lambda p: p.set_baud(0),
    ],
)
def test_bad_arguments_name_the_field_and_change_nothing(call: object) -> None:
    plan = FaultPlan()
    with pytest.raises(FaultScenarioError) as exc:
        call(plan)  # type: ignore[operator]
    assert exc.value.problems[0].rule == "range"
    assert plan.pending == 0


def test_wire_time() -> None:
    plan = FaultPlan()
    assert plan.wire_delay_s(100) == 0.0
    plan.set_baud(19200)
    assert plan.wire_delay_s(5) == pytest.approx(5 * 10 / 19200)
    assert FaultPlan(wire_time_per_byte_s=0.001).wire_delay_s(3) == pytest.approx(0.003)


SCENARIO = """
baud = 9600

[[fault]]
after_requests = 1
kind = "drop"
count = 2

[[fault]]
after_requests = 4
kind = "delay"
seconds = 0.5

[[fault]]
after_requests = 5
kind = "alarm"
alarm = "occlusion"

[[fault]]
after_requests = 6
kind = "disconnect"
"""


def test_scenario_counts_replies_and_fires_alarms_into_the_world(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO, encoding="utf-8")
    world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
    plan = world.set_faults("bed-1", FaultPlan.from_scenario(path))
    assert plan.wire_time_per_byte_s == pytest.approx(10 / 9600)
    kinds = [plan.on_reply(REPLY).kind for _ in range(5)]
    assert kinds == ["send", "drop", "drop", "send", "delay"]
    # the alarm fires right after reply 5, so request 6 sees it
    assert world.pump("bed-1").status().state is PumpState.ALARM
    assert AlarmKind.OCCLUSION in world.pump("bed-1").status().alarms
    assert [plan.on_reply(REPLY).kind for _ in range(3)] == ["send", "disconnect", "send"]
    # the same text parses as text, and str paths work too
    assert FaultPlan.from_scenario(SCENARIO).wire_time_per_byte_s == plan.wire_time_per_byte_s
    assert FaultPlan.from_scenario(str(path)).wire_time_per_byte_s == plan.wire_time_per_byte_s


def test_scenario_alarm_without_a_hook_is_an_error() -> None:
    plan = FaultPlan.from_scenario('[[fault]]\nafter_requests = 1\nkind = "alarm"\nalarm = "occlusion"\n')
    with pytest.raises(RuntimeError, match="alarm_hook"):
        plan.on_reply(REPLY)  # the alarm is due right after reply 1


@pytest.mark.parametrize(
    ("text", "path", "rule"),
    [
        ("[[fault", "scenario", "toml"),
        ("extra = 1", "extra", "known-key"),
        ("fault = 3", "fault", "array"),
        ("baud = 0", "baud", "range"),
        ("baud = 9600\nwire_time_per_byte_s = 0.1", "baud", "exclusive"),
        ("wire_time_per_byte_s = -1", "wire_time_per_byte_s", "range"),
        ('[[fault]]\nkind = "drop"', "fault[0].after_requests", "range"),
        ('[[fault]]\nafter_requests = -1\nkind = "drop"', "fault[0].after_requests", "range"),
        ("[[fault]]\nafter_requests = 1\nkind = \"explode\"", "fault[0].kind", "enum"),
        ('[[fault]]\nafter_requests = 1\nkind = "drop"\ncount = 0', "fault[0].count", "range"),
        ('[[fault]]\nafter_requests = 1\nkind = "disconnect"\ncount = 2', "fault[0].count", "not-applicable"),
        ('[[fault]]\nafter_requests = 1\nkind = "delay"', "fault[0].seconds", "range"),
        ('[[fault]]\nafter_requests = 1\nkind = "delay"\nseconds = nan', "fault[0].seconds", "range"),
        ('[[fault]]\nafter_requests = 1\nkind = "drop"\nseconds = 1', "fault[0].seconds", "not-applicable"),
        ('[[fault]]\nafter_requests = 1\nkind = "alarm"\nalarm = "fire"', "fault[0].alarm", "enum"),
        ('[[fault]]\nafter_requests = 1\nkind = "drop"\nalarm = "occlusion"', "fault[0].alarm", "not-applicable"),
        ('[[fault]]\nafter_requests = 1\nkind = "drop"\nwhen = 1', "fault[0].when", "known-key"),
    ],
)
def test_malformed_scenarios_name_field_and_rule(text: str, path: str, rule: str) -> None:
    with pytest.raises(FaultScenarioError) as exc:
        parse_scenario(text)
    assert (path, rule) in [(p.path, p.rule) for p in exc.value.problems]


def test_scenario_reports_every_problem_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FaultScenarioError) as exc:
        parse_scenario('bogus = 1\n[[fault]]\nafter_requests = "x"\nkind = "nope"')
    assert {p.path for p in exc.value.problems} == {"bogus", "fault[0].after_requests", "fault[0].kind"}
    with pytest.raises(FaultScenarioError) as exc:
        FaultPlan.from_scenario(tmp_path / "missing.toml")
    assert exc.value.problems[0].rule == "readable"


def test_scenario_power_interruption_is_a_power_cycle() -> None:
    world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
    pump = world.pump("p")
    pump.set_deadman(5)
    pump.host_contact()
    plan = world.set_faults(
        "p", FaultPlan.from_scenario('[[fault]]\nafter_requests = 0\nkind = "alarm"\nalarm = "power_interrupted"')
    )
    assert plan.on_reply(REPLY).kind == "send"
    s = pump.status()
    assert AlarmKind.POWER_INTERRUPTED in s.alarms and not s.deadman_armed
    assert [e.kind for e in pump.events()][-2:] == ["power_cycle", "power_interrupted"]
