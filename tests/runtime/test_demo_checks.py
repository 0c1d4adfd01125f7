"""driverd.runtime.demo_checks: a demo run is judged from its audit records alone (pure: records in, reasons out)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from driverd.runtime.demo_checks import DemoJudge, counter_step_ml

CID = "demo-bed-1"
NEW_ERA = {"decimals": 3, "significant": 4}


def _schedule(steps: tuple[str, ...] = ("100", "300", "500"), fill: str = "8") -> dict[str, Any]:
    doc = {"schedule_id": CID, "pump_id": "bed-1", "drug": {"concentration_mg_per_ml": "100"},
           "syringe": {"fill_volume_ml": fill}, "steps": [{"dose_mg_per_24h": d} for d in steps]}
    return {"event": "schedule_accepted", "pump_id": "bed-1", "course_id": None, "document": json.dumps(doc)}


def _rec(event: str, **fields: Any) -> dict[str, Any]:
    return {"event": event, "pump_id": "bed-1", "course_id": CID, **fields}


def _step(dose: str) -> dict[str, Any]:
    return _rec("setpoint", reason="step_due", requested_mg_per_24h=dose, dose_mg_per_24h=dose)


def _summary(delivered: str, commanded: str, cause: str = "hold_complete", syringes: int = 1,
             delivered_ml: str = "1") -> dict[str, Any]:
    return _rec("course_summary", cause=cause, delivered_mg=delivered, commanded_mg=commanded, syringes=syringes,
                delivered_ml=delivered_ml)


def _clean_course() -> list[dict[str, Any]]:
    return [_schedule(), _rec("pump_verified", resolution=NEW_ERA), _rec("transition", to="primed", **{"from": "idle"}),
            _step("100"), _step("300"), _step("500"), _rec("setpoint", reason="hold_complete", dose_mg_per_24h="0"),
            _rec("transition", to="stopped", **{"from": "holding"}), _summary("1896.000", "1896.0000000")]


def judge(records: list[dict[str, Any]], pumps: tuple[str, ...] = ("bed-1",)) -> list[str]:
    j = DemoJudge(pumps, poll_period_s=60, deadman_s=180)
    for r in records:
        j.add(r)
    return j.reasons()


def test_a_clean_course_passes() -> None:
    assert judge(_clean_course()) == []


def test_a_pump_without_a_course_fails() -> None:
    assert judge(_clean_course(), pumps=("bed-1", "bed-2")) == ["bed-2: no course was started"]


def test_a_course_that_ends_in_alarm_fails_with_its_causes() -> None:
    records = [*_clean_course()[:4], _rec("alarm", code="link_lost"),
               _rec("transition", to="alarm", **{"from": "titrating"})]
    reasons = judge(records)
    assert reasons[0] == f"bed-1: course {CID} ended in alarm (link_lost)"
    assert "reached 1 of 3 planned steps (never reached: 300 mg/24h, 500 mg/24h)" in reasons[1]


def test_a_resumed_alarm_is_not_an_ending_in_alarm() -> None:
    records = _clean_course()
    records[4:4] = [_rec("alarm", code="pump_alarm:occlusion"),
                    _rec("transition", to="alarm", **{"from": "titrating"}),
                    _rec("transition", to="titrating", **{"from": "alarm"})]
    assert judge(records) == []


def test_stopped_without_the_end_of_course_record_fails() -> None:
    assert judge(_clean_course()[:-1]) == [f"bed-1: course {CID} stopped but its end-of-course record is missing"]


@pytest.mark.parametrize("cause", ["course_cap", "clinician_stop"])
def test_a_course_stopped_early_fails(cause: str) -> None:
    records = [*_clean_course()[:-1], _summary("1896", "1896", cause=cause)]
    assert judge(records) == [f"bed-1: course {CID} stopped early ({cause})"]


def test_a_missing_step_fails_and_names_it() -> None:
    records = [r for r in _clean_course() if r.get("requested_mg_per_24h") != "300"]
    assert judge(records) == ["bed-1: reached 2 of 3 planned steps (never reached: 300 mg/24h)"]


def test_delivery_within_one_counter_step_per_syringe_passes() -> None:
    # 3 syringes of 8 mL, counter 0.001 mL at that reading, 100 mg/mL: 0.3 mg allowed
    records = [*_clean_course()[:-1], _summary("1895.700", "1896", syringes=3, delivered_ml="7.5")]
    assert judge(records) == []


def test_delivery_beyond_the_resolution_fails_with_the_numbers() -> None:
    records = [*_clean_course()[:-1], _summary("1895.600", "1896", syringes=3, delivered_ml="7.5")]
    assert judge(records) == ["bed-1: pump-reported delivery 1895.600 mg differs from commanded 1896.000 mg by "
                              "0.400 mg (allowed 0.300 mg)"]


def test_a_counter_above_ten_ml_has_a_coarser_step() -> None:
    assert counter_step_ml(NEW_ERA, Decimal("7.9")) == Decimal("0.001")
    assert counter_step_ml(NEW_ERA, Decimal("18.42")) == Decimal("0.01")
    assert counter_step_ml({"decimals": 3}, Decimal("18.42")) == Decimal("0.001")
    assert counter_step_ml(None, Decimal("5")) == Decimal("0.001")
    records = [*_clean_course()[:-1], _summary("1895.000", "1896", syringes=1, delivered_ml="18.950")]
    assert judge(records) == []  # one step of 0.01 mL at 18.95 mL = 1 mg


def test_each_alarm_allows_what_the_pump_may_deliver_unobserved() -> None:
    # At 500 mg/24h: a lost link allows the gap without pump reports (here 10 minutes = 3.4722 mg), a pump alarm
    # one poll (60 s = 0.3472 mg); plus 0.1 mg for the counter.
    def report(at: str) -> dict[str, Any]:
        return {"event": "pump_report", "pump_id": "bed-1", "course_id": None, "at": at, "state": "infusing"}

    records = _clean_course()[:-1]
    records[6:6] = [report("2026-12-03T20:54:00Z"), _rec("alarm", code="link_lost"),
                    _rec("transition", to="alarm", **{"from": "holding"}), report("2026-12-03T21:04:00Z"),
                    _rec("transition", to="holding", **{"from": "alarm"})]
    assert judge([*records, _summary("1899.500", "1896")]) == []
    failing = judge([*records, _summary("1899.600", "1896")])
    assert len(failing) == 1 and "allowed 3.572 mg" in failing[0]
    records.insert(8, _rec("alarm", code="pump_alarm:occlusion"))
    assert judge([*records, _summary("1899.900", "1896")]) == []
    assert "allowed 3.919 mg" in judge([*records, _summary("1900.000", "1896")])[0]


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """A real demo course's audit records (sim://, virtual time)."""
    import asyncio

    from driverd.audit.reader import iter_records
    from driverd.runtime.demo import DemoOptions, run_demo

    work = tmp_path_factory.mktemp("demo")
    result = asyncio.run(run_demo(DemoOptions(work_dir=work)))
    return list(iter_records(result.audit_dir))


def test_a_real_demo_log_passes_on_the_auditors_accounting(demo_log: list[dict[str, Any]]) -> None:
    j = DemoJudge(["bed-1"], poll_period_s=60, deadman_s=180)
    for r in demo_log:
        j.add(r)
    assert j.reasons() == []
    (course,) = j.summary()
    assert course["commanded_mg"] == "1896.000"
    # Each of the 3 syringes starts on a cleared counter, and its last reading is truncated to the counter's
    # 0.001 mL step: up to one step per syringe at 100 mg/mL is not reported, never more is.
    assert Decimal("1896") - 3 * Decimal("0.001") * 100 <= Decimal(course["delivered_mg"]) <= Decimal("1896")


def test_a_pump_that_under_delivers_fails_the_demo(demo_log: list[dict[str, Any]]) -> None:
    """The same log with the pump's counter 1 % short (a slipping plunger): the accounting catches it."""
    j = DemoJudge(["bed-1"], poll_period_s=60, deadman_s=180)
    for r in demo_log:
        for key in ("delivered_ml", "before_ml"):  # the counter as reports, syringe loads and clears read it
            if r["event"] in ("pump_report", "syringe_loaded", "counter_cleared") and r.get(key):
                r = r | {key: str((Decimal(r[key]) * Decimal("0.99")).quantize(Decimal("0.001")))}
        j.add(r)
    (reason,) = j.reasons()
    assert reason.startswith("bed-1: pump-reported delivery 187") and "differs from commanded 1896.000 mg" in reason


def test_a_malformed_record_changes_nothing() -> None:
    records = _clean_course()
    records.insert(0, {"event": "schedule_accepted", "pump_id": "bed-1", "document": "{not json"})
    records.insert(1, {"event": "setpoint", "pump_id": 7})
    records.insert(2, _rec("setpoint", reason="step_due", requested_mg_per_24h="NaN"))
    assert judge(records) == []
    broken = [*_clean_course()[:-1], _rec("course_summary", cause="hold_complete", delivered_mg=None)]
    assert judge(broken) == ["bed-1: end-of-course record lacks delivered_mg or commanded_mg"]
