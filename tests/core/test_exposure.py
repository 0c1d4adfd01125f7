"""Patient-level exposure limits (issue 13, part 4): the pure check and the ledger derived from the audit log."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.audit.exposure import ledger_from_records
from driverd.core.errors import ConfigError
from driverd.core.exposure import BURSTS_CODE, CUMULATIVE_CODE, GAP_CODE, Burst, ExposureLimits, check_course
from driverd.core.protocol import parse_protocol
from tests.core.factories import PROTOCOL, PROTOCOL_TEXT, T0

LIMITS = ExposureLimits(D(28), D(4500), 2)
DAY = timedelta(days=1)


def burst(course: str, start_day: float, days: float = 6, mg: str = "1900", patient: str = "P-1",
          running: bool = False) -> Burst:
    start = T0 + start_day * DAY
    return Burst(patient, course, start, None if running else start + days * DAY, D(mg))


def codes(start_day: float, bursts: list[Burst], planned: str = "1900", patient: str = "P-1") -> list[str]:
    start = T0 + start_day * DAY
    now = min(start, T0 + 1000 * DAY)
    return [b.code for b in check_course(patient, "NEW", start, start + 6 * DAY, D(planned), bursts, LIMITS, now)]


def test_the_shipped_library_has_limits() -> None:
    assert PROTOCOL.exposure == LIMITS


def test_gap_from_the_end_of_the_last_burst() -> None:
    b = [burst("A", 0)]  # ends day 6
    assert codes(33, b) == [GAP_CODE]  # 27 days after the end
    assert codes(34, b) == []  # 28 days after
    assert codes(100, [burst("A", 0, running=True)]) == [GAP_CODE]  # a burst still running
    assert codes(10, [burst("A", 0, patient="P-2")]) == []  # another patient
    found = check_course("P-1", "NEW", T0 + 20 * DAY, T0 + 26 * DAY, D(1), b, LIMITS, T0)
    assert "ended " + (T0 + 6 * DAY).isoformat() in found[0].detail
    assert "next may start at " + (T0 + 34 * DAY).isoformat() in found[0].detail


def test_bursts_per_90_days() -> None:
    b = [burst("A", 0, mg="100"), burst("B", 40, mg="100")]
    assert codes(80, b, planned="100") == [BURSTS_CODE]  # the third within 90 days of A
    assert codes(91, b, planned="100") == []


def test_cumulative_drug_in_30_days() -> None:
    b = [burst("A", 0, mg="3000")]  # ends day 6
    assert codes(29, b, planned="1600") == [GAP_CODE, CUMULATIVE_CODE]  # planned end day 35: A within 30 days
    assert codes(29, b, planned="1500") == [GAP_CODE]
    assert codes(40, b, planned="1600") == []
    # with no gap rule, the drug alone
    only = check_course("P-1", "NEW", T0 + 10 * DAY, T0 + 16 * DAY, D(1600), b, ExposureLimits(D("0.001"), D(4500), 9),
                        T0 + 10 * DAY)
    assert [x.code for x in only] == [CUMULATIVE_CODE] and "4600 mg within 30 days" in only[0].detail


def test_the_same_course_is_not_its_own_earlier_burst() -> None:
    b = [Burst("P-1", "NEW", T0, None, D(500))]
    assert check_course("P-1", "NEW", T0, T0 + 6 * DAY, D(1900), b, LIMITS, T0) == []


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 9), st.integers(0, 4500)), max_size=6),
       st.integers(0, 300), st.integers(0, 4500))
def test_any_breach_found_by_brute_force_is_reported(history: list[tuple[int, int, int]], start_day: int,
                                                    planned: int) -> None:
    bursts = [burst(f"C{i}", s, d, str(mg)) for i, (s, d, mg) in enumerate(history)]
    start = T0 + start_day * DAY
    found = set(codes(start_day, bursts, planned=str(planned)))
    end = start + 6 * DAY
    gap = any(b.ended_at is not None and start < b.ended_at + 28 * DAY and b.started_at < end + 28 * DAY
              for b in bursts)
    assert (GAP_CODE in found) == gap
    n = sum(1 for b in bursts if start - 90 * DAY < b.started_at) + 1
    assert (BURSTS_CODE in found) == (n > 2)
    # cumulative: the whole of every burst that ended within 30 days before the new course's end counts
    window = sum(b.drug_mg for b in bursts if b.ended_at is not None and b.ended_at > start + 6 * DAY - 30 * DAY)
    assert (CUMULATIVE_CODE in found) == (window + planned > 4500)


def test_library_exposure_section_is_validated() -> None:
    bad = PROTOCOL_TEXT.replace('max_bursts_per_90_days = 2', 'max_bursts_per_90_days = "two"')
    with pytest.raises(ConfigError) as info:
        parse_protocol(bad)
    assert "exposure.max_bursts_per_90_days" in str(info.value)
    bad = PROTOCOL_TEXT.replace('min_gap_days = "28"', 'min_gap_days = "-1"')
    with pytest.raises(ConfigError):
        parse_protocol(bad)
    without = PROTOCOL_TEXT.split("[exposure]")[0]
    assert parse_protocol(without).exposure is None


def test_ledger_from_the_audit_records() -> None:
    def at(h: float) -> str:
        return (T0 + timedelta(hours=h)).isoformat().replace("+00:00", "Z")

    recs = [
        {"event": "schedule_accepted", "pump_id": "bed-1", "course_id": None, "at": at(-1),
         "schedule": {"schedule_id": "A", "patient_ref": "P-1"}},
        {"event": "tick", "pump_id": "bed-1", "course_id": "A", "at": at(0)},
        {"event": "setpoint", "pump_id": "bed-1", "course_id": "A", "rate_ml_per_h": "0.083"},
        {"event": "tick", "pump_id": "bed-1", "course_id": "A", "at": at(120)},
        {"event": "setpoint", "pump_id": "bed-1", "course_id": "A", "rate_ml_per_h": "0"},
        {"event": "pump_report", "pump_id": "bed-1", "course_id": "A", "at": at(121)},
        {"event": "course_summary", "pump_id": "bed-1", "course_id": "A", "delivered_mg": "1897.2"},
        {"event": "schedule_accepted", "pump_id": "bed-2", "course_id": None, "at": at(130),
         "schedule": {"schedule_id": "B", "patient_ref": "P-1"}},  # never started: no burst
    ]
    ledger = ledger_from_records(recs)
    assert list(ledger) == ["A"]
    assert ledger["A"] == Burst("P-1", "A", T0, T0 + 121 * timedelta(hours=1), D("1897.2"))
