"""The bounded exposure ledger (issue 12): a ledger pruned at snapshots gives every exposure check exactly what the
whole ledger gives, for any course checked at or after the newest event time, under any drug library's limits.

The model: two pumps, each holding at most one course at a time (a course reaches a pump only through a
`schedule_accepted`, as in the daemon), a few course ids that are reused (a course id accepted again after its
course ended, even on another pump), two patients. Two builders take the same records; one is pruned at random
points (with the courses the pumps hold, as the daemon's snapshot does) and sometimes restarted from its fields.
At random points both answer `check_course` with the daemon's overlay (live bursts of held courses) and pending
courses, for random courses, times at or after the newest event, and limits up to the largest gap a library may
set: the breaches (codes and texts) must be equal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.audit.exposure import LedgerBuilder
from driverd.core.exposure import LOOKBACK, MAX_GAP_DAYS, Burst, ExposureLimits, check_course
from driverd.core.records import exact_dec, fmt_time

T0 = datetime(2027, 1, 1, tzinfo=UTC)
COURSES = ("c1", "c2", "c3")
PATIENTS = ("P1", "P2")
PUMPS = ("bed-1", "bed-2")

limits_st = st.builds(ExposureLimits,
                      st.one_of(st.sampled_from([Decimal(1), Decimal(28), Decimal(200), Decimal(300), MAX_GAP_DAYS]),
                                st.decimals(Decimal(1), MAX_GAP_DAYS, places=2)),
                      st.sampled_from([Decimal(1000), Decimal(3000), Decimal(20000)]), st.integers(1, 3))
round_st = st.tuples(
    st.sampled_from(PUMPS), st.sampled_from(COURSES), st.sampled_from(PATIENTS),
    st.sampled_from(["none", "start", "start_end", "end"]),  # what the course on that pump does this round
    st.sampled_from([1, 24, 24 * 30, 24 * 80, 24 * 200, 24 * 300, 24 * 370]),  # then time passes (hours)
    st.sampled_from(["none", "snapshot", "restart"]),
    st.tuples(st.sampled_from((*COURSES, "new")), st.sampled_from(PATIENTS),
              st.sampled_from([0, 1, 24 * 10, 24 * 100]), st.integers(0, 24 * 40), limits_st),
)


def _ops(rounds: list[Any]) -> list[Any]:
    out: list[Any] = []
    for pump, course, patient, does, wait, snap, check in rounds:
        out.append(("accept", pump, course, patient))
        if does in ("start", "start_end"):
            out.append(("setpoint", pump, "0.5"))
        if does in ("end", "start_end"):
            out.append(("summary", pump, "1900"))
        out.append(("wait", wait))
        if snap != "none":
            out.append(("snapshot", snap == "restart"))
        out.append(("check", *check))
    return out


def fields_afresh(b: LedgerBuilder) -> dict[str, Any]:
    """LedgerBuilder.to_fields as it was before it kept its encodings: every value encoded from the builder's."""
    out = {"patients": dict(b.patients), "started": {c: fmt_time(t) for c, t in b.started.items()},
           "ended": {c: [fmt_time(t), exact_dec(mg)] for c, (t, mg) in b.ended.items()},
           "last_at": {p: fmt_time(t) for p, t in b.last_at.items()}}
    if b.pruned:
        out["retired"] = {c: fmt_time(t) for c, t in b.retired.items()}
    return out


def overlay(view: dict[str, Burst], pumps: dict[str, str | None], patients: dict[str, str],
            live: dict[str, tuple[datetime, datetime | None]], now: datetime) -> list[Burst]:
    """The daemon's `_exposure` view: held courses that started overlay the ledger with their live state; held
    courses not started yet are pending at their plan."""
    pending = []
    for course in pumps.values():
        if course is None:
            continue
        if course in live:
            start, stop = live[course]
            view[course] = Burst(patients[course], course, start, stop, Decimal("7"))
        else:
            pending.append(Burst(patients[course], course, now, None, Decimal("1900")))
    return [*view.values(), *pending]


@settings(max_examples=500, deadline=None)
@given(st.lists(round_st, min_size=1, max_size=12))
def test_pruned_ledger_answers_every_later_check_as_the_whole_ledger(rounds: list[Any]) -> None:
    ops = _ops(rounds)
    full, pruned = LedgerBuilder(), LedgerBuilder()
    t = T0
    pumps: dict[str, str | None] = {p: None for p in PUMPS}  # pump -> the course its state holds
    patients: dict[str, str] = {}  # course -> patient of its latest acceptance
    live: dict[str, tuple[datetime, datetime | None]] = {}  # held course -> (started, stopped) of this run
    checked = 0

    def add(rec: dict[str, Any]) -> None:
        full.add(rec)
        pruned.add(rec)

    for op in ops:
        t += timedelta(minutes=7)
        at = fmt_time(t)
        kind = op[0]
        if kind == "accept":
            _, pump, course, patient = op
            if course in pumps.values() and pumps[pump] != course:
                continue  # one pump holds a course at a time (the other would refuse it: course_active)
            old = pumps[pump]
            if old is not None and old != course:
                live.pop(old, None)
            pumps[pump], patients[course] = course, patient
            add({"event": "schedule_accepted", "pump_id": pump, "course_id": course, "at": at,
                 "schedule": {"schedule_id": course, "patient_ref": patient}})
        elif kind in ("setpoint", "summary"):
            course = pumps[op[1]]
            if course is None:
                continue
            if kind == "setpoint":
                add({"event": "pump_report", "pump_id": op[1], "course_id": course, "at": at})
                add({"event": "setpoint", "pump_id": op[1], "course_id": course, "rate_ml_per_h": op[2]})
                if Decimal(op[2]) > 0 and course not in live:
                    live[course] = (t, None)
            else:
                add({"event": "clinician_command", "pump_id": op[1], "course_id": course, "at": at})
                add({"event": "course_summary", "pump_id": op[1], "course_id": course, "delivered_mg": op[2]})
                if course in live:
                    live[course] = (live[course][0], t)
        elif kind == "wait":
            t += timedelta(hours=op[1])
            add({"event": "pump_report", "pump_id": "bed-1", "course_id": pumps["bed-1"], "at": fmt_time(t)})
        elif kind == "snapshot":
            pruned.prune(c for c in pumps.values() if c is not None)
            assert pruned.to_fields() == fields_afresh(pruned) and full.to_fields() == fields_afresh(full)
            if op[1]:  # a restart from the snapshot
                pruned = LedgerBuilder.from_fields(pruned.to_fields())
        else:
            _, course, patient, after_h, length_h, limits = op
            now = t
            start = now + timedelta(hours=after_h)
            a = overlay(full.ledger(), pumps, patients, live, now)
            b = overlay(pruned.ledger(), pumps, patients, live, now)
            want = check_course(patient, course, start, start + timedelta(hours=length_h), Decimal(1900), a,
                                limits, now)
            got = check_course(patient, course, start, start + timedelta(hours=length_h), Decimal(1900), b,
                               limits, now)
            assert got == want
            checked += 1
    # What the pruned ledger left out can never count: each such burst is a year old at the newest event.
    newest = max(full.last_at.values(), default=T0)
    for course, burst in full.ledger().items():
        if course not in pruned.ledger():
            assert burst.ended_at is not None and burst.ended_at <= newest - LOOKBACK


def test_old_snapshot_ledger_fields_read_unpruned() -> None:
    """A snapshot written before pruning existed has no `retired`: read as it was, and written back the same."""
    f = {"patients": {"c1": "P1"}, "started": {"c1": "2024-01-01T00:00:00Z"},
         "ended": {"c1": ["2024-01-05T00:00:00Z", "1900"]}, "last_at": {"bed-1": "2026-01-01T00:00:00Z"}}
    b = LedgerBuilder.from_fields(f)
    assert not b.pruned and b.to_fields() == f and set(b.ledger()) == {"c1"}
    b.prune([])
    assert b.to_fields() == {"patients": {}, "started": {}, "ended": {}, "last_at": f["last_at"],
                             "retired": {"c1": "2024-01-01T00:00:00Z"}}
    assert b.ledger() == {}


def test_malformed_retired_is_refused_naming_the_field() -> None:
    base = {"patients": {}, "started": {}, "ended": {}, "last_at": {}}
    for bad, where in (([], "ledger.retired"), ({"c1": "yesterday"}, "ledger.retired.c1"),
                       ({"c1": "2024-01-01T00:00:00"}, "ledger.retired.c1")):
        try:
            LedgerBuilder.from_fields({**base, "retired": bad})
        except Exception as exc:  # ValidationError
            assert where in str(exc), exc
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_a_retired_course_run_again_keeps_its_first_start() -> None:
    """The whole ledger keeps a course id's first start when the id runs again; the pruned one does too, so the
    90-day burst count is the same."""
    rec = [{"event": "schedule_accepted", "course_id": "c1", "pump_id": "bed-1", "at": "2024-01-01T00:00:00Z",
            "schedule": {"schedule_id": "c1", "patient_ref": "P1"}},
           {"event": "setpoint", "course_id": "c1", "pump_id": "bed-1", "rate_ml_per_h": "0.5"},
           {"event": "course_summary", "course_id": "c1", "pump_id": "bed-1", "delivered_mg": "1900"},
           {"event": "pump_report", "course_id": None, "pump_id": "bed-1", "at": "2025-06-01T00:00:00Z"}]
    full, pruned = LedgerBuilder(), LedgerBuilder()
    for r in rec:
        full.add(r)
        pruned.add(r)
    pruned.prune([])
    assert pruned.retired and not pruned.started
    again = [{**rec[0], "at": "2025-06-02T00:00:00Z"}, rec[1],
             {"event": "pump_report", "course_id": "c1", "pump_id": "bed-1", "at": "2025-06-09T00:00:00Z"}, rec[2]]
    for r in again:
        full.add(r)
        pruned.add(r)
    assert pruned.ledger() == full.ledger()
    assert pruned.ledger()["c1"].started_at == datetime(2024, 1, 1, tzinfo=UTC)


def test_fields_read_in_another_time_form_are_written_as_the_builder_encodes_them() -> None:
    """A snapshot's times in another RFC 3339 form than fmt_time's (an offset instead of Z, fewer digits) are
    written back as the builder encodes the values read, as before it kept its encodings."""
    f = {"patients": {"c1": "P1", "c2": "P2"}, "started": {"c1": "2027-01-01T00:00:00+00:00"},
         "ended": {"c1": ["2027-01-05T10:00:00.5+00:00", "1900.0"]}, "last_at": {"bed-1": "2027-01-06T00:00:00Z"},
         "retired": {"c2": "2026-01-01T00:00:00+00:00"}}
    b = LedgerBuilder.from_fields(f)
    assert b.to_fields() == fields_afresh(b)
    b.add({"event": "course_summary", "pump_id": "bed-1", "course_id": "c1", "at": "2027-01-07T00:00:00+01:00",
           "delivered_mg": "1800"})
    assert b.to_fields() == fields_afresh(b)
