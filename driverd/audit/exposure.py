"""The per-patient exposure ledger, derived from the audit log (issue 13, part 4).

A burst is a course that delivered drug: it started at its first non-zero setpoint and ended at its
`course_summary` record (the core's end-of-course record), whose `delivered_mg` is the drug it delivered by the
pump's read-backs. The patient is the accepted schedule's `patient_ref`. Because the ledger is a pure function of
the log, it survives restarts (the daemon rebuilds it at start) and `audit report` rebuilds the same from a copy.
Times are the event times (`at`) of the inputs the records belong to.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from driverd.core.exposure import Burst


def _time(value: object) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def ledger_from_records(records: Iterable[dict[str, Any]]) -> dict[str, Burst]:
    """course_id -> Burst for every course in the log that delivered drug (running ones with drug_mg 0: the daemon
    overlays the live courses' own totals)."""
    patients: dict[str, str] = {}
    started: dict[str, datetime] = {}
    ended: dict[str, tuple[datetime, Decimal]] = {}
    last_at: dict[object, datetime] = {}
    for rec in records:
        pump = rec.get("pump_id")
        course = rec.get("course_id")
        at = _time(rec.get("at"))
        if at is not None:
            last_at[pump] = at
        when = at or last_at.get(pump)
        event = rec.get("event")
        if event == "schedule_accepted":
            sched = rec.get("schedule")
            if isinstance(sched, dict) and isinstance(sched.get("schedule_id"), str):
                patients[sched["schedule_id"]] = str(sched.get("patient_ref"))
        elif not isinstance(course, str) or when is None:
            continue
        elif event == "setpoint" and course not in started:
            try:
                if Decimal(str(rec.get("rate_ml_per_h"))) > 0:
                    started[course] = when
            except InvalidOperation:
                continue
        elif event == "course_summary":
            try:
                ended[course] = (when, Decimal(str(rec.get("delivered_mg"))))
            except InvalidOperation:
                continue
    out: dict[str, Burst] = {}
    for course, at in started.items():
        if course not in patients:
            continue
        end = ended.get(course)
        out[course] = Burst(patients[course], course, at, end[0] if end else None, end[1] if end else Decimal(0))
    return out
