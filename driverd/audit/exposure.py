"""The per-patient exposure ledger, derived from the audit log (issue 13, part 4).

A burst is a course that delivered drug: it started at its first non-zero setpoint and ended at its
`course_summary` record (the core's end-of-course record), whose `delivered_mg` is the drug it delivered by the
pump's read-backs. The patient is the accepted schedule's `patient_ref`. Because the ledger is a pure function of
the log, it survives restarts (the daemon rebuilds it at start) and `audit report` rebuilds the same from a copy.
Times are the event times (`at`) of the inputs the records belong to.

Bounded (issue 12): at every state snapshot and delta the daemon calls `prune`, which leaves out what can never
again change an exposure check (`core.exposure.LOOKBACK`; the rule and its proof: docs/audit.md, "Bounded
snapshots"). A pruned builder's fields hold `retired` (course -> first start, kept for a course id that is
pushed again); a snapshot written before pruning existed has no `retired` and is read and checked as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from driverd.core.errors import Problem, ValidationError
from driverd.core.exposure import LOOKBACK, Burst
from driverd.core.records import exact_dec, fmt_time


def _time(value: object) -> datetime | None:
    return _parse_time(value) if isinstance(value, str) else None


@lru_cache(maxsize=512)  # every record's `at` (the pumps of a ward report at the same instant): parsed once
def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


class LedgerBuilder:
    """`ledger_from_records`, streaming: `add` every record in log order. Its whole state goes into a state
    snapshot (`to_fields` / `from_fields`), so start-up can carry on from there instead of reading the log."""

    def __init__(self) -> None:
        self.patients: dict[str, str] = {}  # schedule_id -> patient_ref
        self.started: dict[str, datetime] = {}  # course -> its first non-zero setpoint
        self.ended: dict[str, tuple[datetime, Decimal]] = {}  # course -> course_summary (at, delivered mg)
        self.last_at: dict[str, datetime] = {}  # pump ("" for daemon records) -> newest event time seen
        # Courses whose burst ended before the horizon (prune): course -> its first start. Only a course id that is
        # accepted again needs it: the full ledger would keep that first start for its next run.
        self.retired: dict[str, datetime] = {}
        self.pruned = False  # `prune` has run (or the fields read had `retired`): to_fields writes `retired`
        # `to_fields`' encodings of started, ended and retired, kept beside them as they change (a course at a
        # time), so a snapshot or delta does not encode a year of courses again (replay computes one per delta).
        self._enc_started: dict[str, str] = {}
        self._enc_ended: dict[str, list[str]] = {}
        self._enc_retired: dict[str, str] = {}

    def add(self, rec: dict[str, Any]) -> None:
        pump = rec.get("pump_id")
        pump_key = pump if isinstance(pump, str) else ""
        course = rec.get("course_id")
        at = _time(rec.get("at"))
        if at is not None:
            self.last_at[pump_key] = at
        when = at or self.last_at.get(pump_key)
        event = rec.get("event")
        if event == "schedule_accepted":
            sched = rec.get("schedule")
            if isinstance(sched, dict) and isinstance(sched.get("schedule_id"), str):
                self.patients[sched["schedule_id"]] = str(sched.get("patient_ref"))
        elif not isinstance(course, str) or when is None:
            return
        elif event == "setpoint" and course not in self.started and course not in self.retired:
            try:
                if Decimal(str(rec.get("rate_ml_per_h"))) > 0:
                    self.started[course] = when
                    self._enc_started[course] = fmt_time(when)
            except InvalidOperation:
                return
        elif event == "course_summary":
            try:
                self._set_ended(course, when, Decimal(str(rec.get("delivered_mg"))))
            except InvalidOperation:
                return

    def _set_ended(self, course: str, at: datetime, mg: Decimal) -> None:
        self.ended[course] = (at, mg)
        self._enc_ended[course] = [fmt_time(at), exact_dec(mg)]

    def ledger(self) -> dict[str, Burst]:
        out: dict[str, Burst] = {}
        for course, at in self.started.items():
            if course not in self.patients:
                continue
            end = self.ended.get(course)
            out[course] = Burst(self.patients[course], course, at, end[0] if end else None,
                                end[1] if end else Decimal(0))
        for course, at in self.retired.items():
            # Accepted again and ended again: the burst the full ledger has (its first start, the new end). A
            # retired course not ended again stands for an old end that can no longer count: left out.
            end = self.ended.get(course)
            if course in self.patients and end is not None:
                out[course] = Burst(self.patients[course], course, at, end[0], end[1])
        return out

    def horizon(self) -> datetime | None:
        """The newest event time in the ledger (every logged `at` is a reading of the daemon's step-free course
        clock, which start-up floors at the log's last record: every later check runs at or after it), less
        LOOKBACK. None: nothing logged yet."""
        return max(self.last_at.values()) - LOOKBACK if self.last_at else None

    def prune(self, held: Iterable[str]) -> None:
        """Leave out what can never again change `check_course` for a course checked at or after the newest
        event time: for every course not `held` (the schedule of no pump's state, so it can come back only
        through a new `schedule_accepted`), a burst that started and ended at or before `horizon()` is retired
        (its start kept), the end of a retired course is dropped once it is that old too, and the patient of a
        course that holds no burst is dropped (a new acceptance sets it again). Deterministic: the daemon and
        replay call it on equal builders at each snapshot and delta and get equal fields. Idempotent."""
        self.pruned = True
        cut = self.horizon()
        if cut is None:
            return
        keep = set(held)
        for course in [c for c, at in self.started.items() if c not in keep and at <= cut]:
            end = self.ended.get(course)
            if end is not None and end[0] <= cut:
                self.retired[course] = self.started.pop(course)
                self._enc_retired[course] = self._enc_started.pop(course)
        for course in [c for c in self.retired if c not in keep]:
            end = self.ended.get(course)
            if end is not None and end[0] <= cut:
                del self.ended[course], self._enc_ended[course]
            if course not in self.ended:
                self.patients.pop(course, None)
        for course in [c for c in self.patients if c not in keep and c not in self.started and c not in self.retired]:
            del self.patients[course]

    def to_fields(self) -> dict[str, Any]:
        """The builder's state as a snapshot holds it: new dicts (the caller may keep them), whose `ended` pairs
        are shared (never modify them). `last_at` (a few pumps, changed by nearly every record) is encoded here."""
        out: dict[str, Any] = {"patients": dict(self.patients), "started": dict(self._enc_started),
                               "ended": dict(self._enc_ended),
                               "last_at": {p: fmt_time(t) for p, t in self.last_at.items()}}
        if self.pruned:
            out["retired"] = dict(self._enc_retired)
        return out

    @classmethod
    def from_fields(cls, f: Any) -> LedgerBuilder:
        """Raises ValidationError naming the field."""
        def obj(key: str) -> dict[str, Any]:
            v = f.get(key) if isinstance(f, dict) else None
            if not isinstance(v, dict):
                raise ValidationError([Problem(f"ledger.{key}", "type", "expected an object")])
            return v

        def time(key: str, v: Any) -> datetime:
            t = _time(v)
            if t is None or t.tzinfo is None:
                raise ValidationError([Problem(key, "format", f"expected an RFC 3339 time, got {v!r}")])
            return t

        b = cls()
        for c, p in obj("patients").items():
            if not isinstance(p, str):
                raise ValidationError([Problem(f"ledger.patients.{c}", "type", "expected a string")])
            b.patients[c] = p
        b.started = {c: time(f"ledger.started.{c}", v) for c, v in obj("started").items()}
        for c, v in obj("ended").items():
            if not (isinstance(v, list) and len(v) == 2 and isinstance(v[1], str)):
                raise ValidationError([Problem(f"ledger.ended.{c}", "type", "expected [time, mg]")])
            try:
                mg = Decimal(v[1])
            except InvalidOperation:
                raise ValidationError([Problem(f"ledger.ended.{c}", "number", f"not a decimal: {v[1]!r}")]) from None
            b._set_ended(c, time(f"ledger.ended.{c}", v[0]), mg)
        b.last_at = {p: time(f"ledger.last_at.{p}", v) for p, v in obj("last_at").items()}
        if isinstance(f, dict) and "retired" in f:  # absent in snapshots written before pruning (issue 12)
            b.retired = {c: time(f"ledger.retired.{c}", v) for c, v in obj("retired").items()}
            b.pruned = True
        # Encoded afresh from the values read (as to_fields did before it kept them): exact whatever the text read.
        b._enc_started = {c: fmt_time(t) for c, t in b.started.items()}
        b._enc_retired = {c: fmt_time(t) for c, t in b.retired.items()}
        return b


def ledger_from_records(records: Iterable[dict[str, Any]]) -> dict[str, Burst]:
    """course_id -> Burst for every course in the log that delivered drug (running ones with drug_mg 0: the daemon
    overlays the live courses' own totals)."""
    b = LedgerBuilder()
    for rec in records:
        b.add(rec)
    return b.ledger()
