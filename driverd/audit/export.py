"""Export records as CSV (one column per field, nested objects as dotted columns) or JSONL (the exact lines),
optionally filtered by pump, course and time.

CSV needs every column before its first row, so an export reads the records twice: once to check them and
collect the columns (nothing is written if a line does not parse), once to write. Lists stay one cell, as
canonical JSON (`alarms`, `schedule.steps`): a column per list item would make the columns depend on the data.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TextIO

from driverd.audit.canonical import dumps
from driverd.audit.reader import Line
from driverd.core.errors import DriverdError

FORMATS: Final = ("csv", "jsonl")
FIRST_COLUMNS: Final = ("seq", "ts", "event", "pump_id", "course_id", "at")
LAST_COLUMNS: Final = ("prev", "hash")


class NoMatch(DriverdError):
    """A filter names a pump or course the log does not have."""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return dumps(value).decode("utf-8")  # a list, or an empty object: canonical JSON in one cell


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"schedule": {"pump_id": "bed-1"}} -> {"schedule.pump_id": "bed-1"}; every value as its CSV cell."""
    out: dict[str, str] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = _cell(value)
    return out


def columns(names: Iterable[str]) -> list[str]:
    """The envelope first (and `at`), the event's fields sorted, `prev` and `hash` last."""
    seen = set(names)
    middle = sorted(seen - set(FIRST_COLUMNS) - set(LAST_COLUMNS))
    return list(FIRST_COLUMNS) + middle + list(LAST_COLUMNS)


def _ts(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Filter:
    pump: str | None = None
    course: str | None = None
    since: datetime | None = None  # compared with each record's `ts` (when it was written)

    def __call__(self, rec: dict[str, Any]) -> bool:
        if self.pump is not None and rec.get("pump_id") != self.pump:
            return False
        if self.course is not None and rec.get("course_id") != self.course:
            sched = rec.get("schedule") if rec.get("event") == "schedule_accepted" else None
            # A course's push is logged under the pump's previous course: it belongs to the course it pushes.
            if not (isinstance(sched, dict) and sched.get("schedule_id") == self.course):
                return False
        if self.since is not None:
            ts = _ts(rec.get("ts"))
            if ts is None or ts < self.since:
                return False
        return True


@dataclass(slots=True)
class Plan:
    """What pass one found: the records that pass the filter and the CSV columns they need."""

    records: int
    columns: list[str]


def plan(lines: Iterable[Line], keep: Filter) -> Plan:
    """Pass one: parse every line (raises on a damaged one before anything is written), check the filters name
    a pump and a course the log has, collect the columns."""
    names: set[str] = set()
    pumps: set[str] = set()
    courses: set[str] = set()
    n = 0
    for line in lines:
        rec = line.record
        if isinstance(rec.get("pump_id"), str):
            pumps.add(rec["pump_id"])
        if isinstance(rec.get("course_id"), str):
            courses.add(rec["course_id"])
        sched = rec.get("schedule") if rec.get("event") == "schedule_accepted" else None
        if isinstance(sched, dict) and isinstance(sched.get("schedule_id"), str):
            courses.add(sched["schedule_id"])  # a pushed course, even one the core refused
        if keep(rec):
            n += 1
            names.update(flatten(rec))
    if keep.pump is not None and keep.pump not in pumps:
        known = ", ".join(sorted(pumps)) or "none"
        raise NoMatch(f"--pump: no pump {keep.pump!r} in the records read (pumps: {known})")
    if keep.course is not None and keep.course not in courses:
        raise NoMatch(f"--course: no course {keep.course!r} in the records read (courses: "
                      f"{', '.join(sorted(courses)) or 'none'})")
    return Plan(n, columns(names))


def write(lines: Iterable[Line], fmt: str, out: TextIO, keep: Filter, cols: list[str] | None = None) -> int:
    """Pass two: write the records that pass the filter. Returns the number written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    n = 0
    if fmt == "jsonl":
        for line in lines:
            if keep(line.record):
                out.write(line.raw.decode("utf-8") + "\n")  # the exact bytes: an unfiltered export still verifies
                n += 1
        return n
    assert cols is not None
    writer = csv.DictWriter(out, fieldnames=cols, lineterminator="\n", restval="")
    writer.writeheader()
    for line in lines:
        if keep(line.record):
            writer.writerow(flatten(line.record))
            n += 1
    return n


def export(source: Callable[[], Iterator[Line]], fmt: str, out: TextIO, keep: Filter | None = None) -> int:
    """Both passes over `source()` (called twice). Nothing is written if pass one raises."""
    keep = keep or Filter()
    p = plan(source(), keep)
    return write(source(), fmt, out, keep, p.columns)
