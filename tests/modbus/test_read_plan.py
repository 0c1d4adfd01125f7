"""The driver's read plan (pure): which requests a set of points becomes, and the map's cached tables.

The status poll's plan is computed once per driver (bench/scale.py showed re-planning on every poll cost a
measurable share of it); these tests pin that the plan is still the same requests the map implies.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus.driver import _MAX_BITS, _MAX_REGS, ModbusDriver, ReadSpan, plan_reads
from drivers.modbus.regmap import BIT_TABLES, TABLES, Point, load_map
from drivers.url import parse_url

MAP = load_map()
ALL_POINTS = sorted(MAP.points.values(), key=lambda p: (p.table, p.address))


def _check_plan(points: list[Point], plan: tuple[ReadSpan, ...]) -> None:
    planned = [p.name for span in plan for p in span.points]
    assert sorted(planned) == sorted(p.name for p in points)  # every point read exactly once
    for span in plan:
        limit = _MAX_BITS if span.table in BIT_TABLES else _MAX_REGS
        assert 1 <= span.count <= limit
        assert all(p.table == span.table for p in span.points)
        assert span.start == span.points[0].address
        assert span.start + span.count == max(p.end for p in span.points)  # no trailing addresses
        covered: set[int] = set()
        for p in span.points:
            assert span.start <= p.address and p.end <= span.start + span.count
            covered.update(range(p.address, p.end))
        # contiguous: no unmapped address inside a request (a device may refuse a read across a gap)
        assert covered == set(range(span.start, span.start + span.count))


def test_status_plan_of_the_shipped_map_is_two_requests() -> None:
    driver = ModbusDriver(parse_url("modbus+tcp://127.0.0.1:1502?unit=3"), regmap=MAP)
    plan = driver._status_plan
    assert [(s.table, s.start, s.count) for s in plan] == [("discrete_inputs", 0, 9), ("input_registers", 0, 5)]
    names = {p.name for s in plan for p in s.points}
    assert {"running", "alarm_active", "rate_readback", "delivered_volume", "diameter_readback"} <= names
    assert {p.name for p in MAP.alarm_points()} <= names


def test_a_gap_splits_requests() -> None:
    plan = plan_reads([MAP["rate_readback"], MAP["map_version"], MAP["model"]])
    assert [(s.table, s.start, s.count) for s in plan] == [("input_registers", 0, 2), ("input_registers", 100, 9)]


def test_empty_plan() -> None:
    assert plan_reads([]) == ()


@given(st.lists(st.sampled_from(ALL_POINTS), unique_by=lambda p: p.name))
def test_plan_reads_every_point_once_in_contiguous_requests(points: list[Point]) -> None:
    _check_plan(points, plan_reads(points))


def test_map_tables_are_cached_sorted_and_not_shared() -> None:
    for table in TABLES:
        pts = MAP.table(table)
        assert pts == sorted((p for p in MAP.points.values() if p.table == table), key=lambda p: p.address)
        pts.clear()  # a caller's list is its own: the map is unchanged
        assert MAP.table(table)
    alarms = MAP.alarm_points()
    assert [p.name for p in alarms] == [p.name for p in MAP.table("discrete_inputs") + MAP.table("coils")
                                        if p.alarm is not None]
    alarms.clear()
    assert MAP.alarm_points()
