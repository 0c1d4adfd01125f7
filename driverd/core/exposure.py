"""Patient-level exposure limits (drug library `[exposure]`): bursts of the same patient across courses.

Urinary-tract toxicity is seen after as little as 1-2 weeks of use, so a second burst soon after the first, or
a long tail, is itself a hazard. A new course is checked, before it is accepted, against the patient's earlier
bursts (the ledger, derived from the audit log by `driverd.audit.exposure`):

- `exposure_gap`: it starts less than `min_gap_days` after the end of an earlier burst (or while one runs), or
  ends less than that before a later one;
- `exposure_bursts`: with it, more than `max_bursts_per_90_days` bursts start within 90 days;
- `exposure_cumulative`: the drug of the earlier bursts that ended within 30 days before its planned end, plus
  what it plans to deliver (the volume plan's mg, rounded up), exceeds `cumulative_mg_per_30_days`. Counting
  whole earlier bursts is conservative: it never under-states the drug in any 30-day window.

Pure: no I/O, no clock (the shell passes `now`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Final

from driverd.core.canonical import decimal_text

GAP_CODE: Final = "exposure_gap"
CUMULATIVE_CODE: Final = "exposure_cumulative"
BURSTS_CODE: Final = "exposure_bursts"
CUMULATIVE_WINDOW: Final = timedelta(days=30)
BURSTS_WINDOW: Final = timedelta(days=90)
#: The largest `min_gap_days` a drug library may set (protocol.py refuses more).
MAX_GAP_DAYS: Final = Decimal(365)
#: How far back `check_course` can ever look from a course that starts at or after `now`: a burst that ended, and
#: started, at least this long before `now` can never again change its result, whatever library is loaded later
#: (proof: docs/audit.md, "Bounded snapshots"). The state snapshots leave such bursts out (audit/exposure.py).
LOOKBACK: Final = max(timedelta(days=int(MAX_GAP_DAYS)), BURSTS_WINDOW, CUMULATIVE_WINDOW)


@dataclass(frozen=True, slots=True)
class ExposureLimits:
    min_gap_days: Decimal
    cumulative_mg_per_30_days: Decimal
    max_bursts_per_90_days: int


@dataclass(frozen=True, slots=True)
class Burst:
    """One course of a patient that delivered drug (a course that never started is no burst)."""

    patient_ref: str
    course_id: str
    started_at: datetime
    ended_at: datetime | None  # None: still running
    drug_mg: Decimal  # delivered by the pump's read-backs (so far, while running)


@dataclass(frozen=True, slots=True)
class Breach:
    code: str  # GAP_CODE | CUMULATIVE_CODE | BURSTS_CODE
    detail: str  # names the dates


def check_course(patient_ref: str, course_id: str, start: datetime, end: datetime, planned_mg: Decimal,
                 bursts: list[Burst] | tuple[Burst, ...], limits: ExposureLimits, now: datetime) -> list[Breach]:
    """Every limit a new course (planned `start`..`end`, `planned_mg`) would break, given the patient's bursts."""
    # Ties broken by course id: the result is a function of the set of bursts, not of the ledger's dict order
    # (which differs after a restart, and after a snapshot left out bursts that cannot count).
    mine = sorted((b for b in bursts if b.patient_ref == patient_ref and b.course_id != course_id),
                  key=lambda b: (b.started_at, b.course_id))
    out: list[Breach] = []
    gap = timedelta(days=float(limits.min_gap_days))
    for b in mine:
        ended = b.ended_at if b.ended_at is not None else max(now, start)
        # the two bursts must be at least the gap apart, whichever came first
        if b.ended_at is None or (start < ended + gap and b.started_at < end + gap):
            since = "is still running" if b.ended_at is None else f"ended {ended.isoformat()}"
            out.append(Breach(GAP_CODE, f"burst {b.course_id} of {patient_ref} {since}; the next may start at "
                                        f"{(ended + gap).isoformat()} ({decimal_text(limits.min_gap_days)} days "
                                        f"later), this one starts {start.isoformat()}"))
            break
    recent = [b for b in mine if b.started_at > start - BURSTS_WINDOW]
    if len(recent) + 1 > limits.max_bursts_per_90_days:
        dates = ", ".join(f"{b.course_id} {b.started_at.date().isoformat()}" for b in recent)
        out.append(Breach(BURSTS_CODE, f"{len(recent) + 1} bursts starting within 90 days of "
                                       f"{start.date().isoformat()} (at most {limits.max_bursts_per_90_days}): "
                                       f"{dates}, and this one"))
    counted = [b for b in mine if (b.ended_at or now) > end - CUMULATIVE_WINDOW]
    total = sum((b.drug_mg for b in counted), Decimal(0)) + planned_mg
    if total > limits.cumulative_mg_per_30_days:
        parts = ", ".join(f"{b.course_id} {decimal_text(b.drug_mg)} mg (ended "
                          f"{b.ended_at.isoformat() if b.ended_at else 'running'})" for b in counted)
        out.append(Breach(CUMULATIVE_CODE, f"{decimal_text(total)} mg within 30 days of {end.date().isoformat()} "
                                           f"(at most {decimal_text(limits.cumulative_mg_per_30_days)} mg): "
                                           f"{parts or 'no earlier burst'}; this course plans "
                                           f"{decimal_text(planned_mg)} mg"))
    return out
