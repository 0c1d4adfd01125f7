"""Per pump and course reports of what the log says happened (`audit report`, and the summary of `audit replay`).

For each course: who ordered each change and why (clinician commands with their `by` and `reason`, ward pushes with
the schedule's approvers, automatic schedule steps, the safety core's own stops), the states, the commanded and
pump-reported volumes in mL and mg, the alarm periods with their causes, and every refusal under its course.

Times are the event times (`at`) of the core inputs, so a virtual-time demo reads in its own time. Outputs
(setpoint, transition, refused, alarm, notice, course_summary) carry no time of their own: they take the time of
the input that produced them. Daemon records without `at` (e.g. `request_refused`) take the pump's latest event
time, else their `ts`.

Volumes (docs/audit.md, "Reports for auditors"):
- commanded: each commanded rate from its setpoint to the next, at the concentration of the syringe in the pump
  then; NOT counted while the course is in alarm (or paused) and the pump's latest report says it is not infusing
  (an occlusion stops the pump although the commanded rate stays); counted when the pump kept infusing, by its
  reports (a link loss with the pump still running). What was left out is reported as `not_counted`.
- pump-reported: what the pump's counter added, as the core counts it (a counter reset starts a new run, the first
  report of a course is the baseline; a clear the daemon ordered, `counter_cleared`, counts up to the clear and
  its read-back is the new baseline), each increment at the concentration of the syringe in the pump.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from driverd.audit.timezones import UTC_ZONE, Zone
from driverd.core.errors import AuditError
from driverd.core.records import finite_dec

HOURS: Final = Decimal(3600)
_US: Final = timedelta(microseconds=1)
#: Phases in which the course is interrupted: commanded volume counts only if the pump reports it still infuses.
INTERRUPTED: Final = frozenset({"alarm", "paused"})
_OUTPUTS: Final = frozenset({"setpoint", "refused", "transition", "alarm", "notice", "course_summary"})
_INPUTS: Final = frozenset({"schedule_accepted", "pump_verified", "tick", "pump_report", "setpoint_result",
                            "clinician_command", "link_lost", "link_restored", "clock_stepped", "syringe_loaded",
                            "counter_cleared"})


def _q(d: Decimal) -> Decimal:
    return d.quantize(Decimal("0.001"))


def _dec(value: object) -> Decimal | None:
    return finite_dec(value) if isinstance(value, str) else None


def _at(value: object) -> datetime | None:
    return _parse_at(value) if isinstance(value, str) else None


# Parsed once per distinct string among the last few hundred (the pumps of a ward report at the same instant): the
# value is immutable, so sharing it is the same as parsing again. Decimals share the core's cache (records.finite_dec).
@lru_cache(maxsize=512)
def _parse_at(value: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _hours(a: datetime, b: datetime) -> Decimal:
    return Decimal((b - a) // _US) / Decimal(1_000_000) / HOURS


def _approvers(sched: dict[str, Any]) -> str:
    out = []
    for a in sched.get("approved_by") or []:
        if isinstance(a, dict):
            out.append(f"{a.get('role')} {a.get('id')}")
    return ", ".join(out) or "no approvals logged"


@dataclass(slots=True)
class Order:
    """One decision point: the input that ordered a change (or was refused) and what it produced."""

    seq: int | None
    at: datetime | None
    source: str  # clinician | ward | schedule | machine | recovery | push
    actor: str  # who: the clinician's id, the schedule's approvers, "driverd (safety core)"
    action: str  # what was asked: escalate, push S-1 v2, step, stop ...
    reason: str  # why: the clinician's reason, the schedule step, the safety rule
    trigger: str  # the input record's event
    setpoints: list[dict[str, Any]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    notices: list[dict[str, Any]] = field(default_factory=list)  # what the core said about it (accepted, ...)

    @property
    def outcome(self) -> str:
        if self.refused and not self.setpoints and not self.transitions:
            return "refused"
        if self.setpoints or self.transitions or self.notices:
            return "applied"
        return "no decision logged"

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "source": self.source, "actor": self.actor, "action": self.action,
                "reason": self.reason, "trigger": self.trigger, "outcome": self.outcome,
                "setpoints": self.setpoints, "transitions": self.transitions, "refused": self.refused,
                "notices": self.notices}


@dataclass(slots=True)
class AlarmPeriod:
    code: str
    detail: str
    raised_at: datetime | None
    raised_seq: int | None
    cleared_at: datetime | None = None
    cleared_seq: int | None = None
    cleared_by: str | None = None  # how it ended: a clinician's resume, a syringe change, the course stopped

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "detail": self.detail, "raised_at": self.raised_at, "raised_seq": self.raised_seq,
                "cleared_at": self.cleared_at, "cleared_seq": self.cleared_seq,
                "cleared_by": self.cleared_by or "not cleared by the end of the log"}


@dataclass(slots=True)
class CourseSummary:
    pump_id: str
    course_id: str | None
    first_at: datetime | None = None
    last_at: datetime | None = None
    records: int = 0
    concentration_mg_per_ml: Decimal | None = None  # the schedule's (the first syringe's)
    patient_ref: str | None = None
    schedule_version: int | None = None
    approvers: str = ""
    states: list[tuple[datetime | None, str]] = field(default_factory=list)  # (at, phase entered)
    setpoints: list[tuple[datetime | None, Decimal, Decimal | None]] = field(default_factory=list)  # at, mL/h, mg/24h
    orders: list[Order] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[AlarmPeriod] = field(default_factory=list)
    notices: list[tuple[datetime | None, str, str]] = field(default_factory=list)
    handover: dict[str, Any] | None = None  # the core's end-of-course record (`course_summary`), when it stopped
    # running state for the volume accounting
    conc: Decimal | None = None  # the syringe in the pump now
    phase: str | None = None
    rate: Decimal = Decimal(0)
    pump_state: str | None = None
    raw_prev: Decimal | None = None
    since: datetime | None = None
    commanded_ml: Decimal = Decimal(0)
    commanded_mg: Decimal = Decimal(0)
    excluded_ml: Decimal = Decimal(0)
    excluded_mg: Decimal = Decimal(0)
    reported_ml: Decimal = Decimal(0)
    reported_mg: Decimal = Decimal(0)
    mg_gaps: int = 0  # volume seen while the concentration was unknown
    commanded_series: list[tuple[datetime, Decimal]] = field(default_factory=list)  # cumulative mg
    reported_series: list[tuple[datetime, Decimal]] = field(default_factory=list)  # cumulative mg
    _counting: bool = True

    # ---------------------------------------------------------------------------------------------- accounting

    def counting(self) -> bool:
        return not (self.phase in INTERRUPTED and self.pump_state is not None and self.pump_state != "infusing")

    def _segment(self, at: datetime) -> tuple[Decimal, Decimal, bool]:
        """(mL, mg) the commanded rate gives from the last change to `at`, and whether it is left out for mg."""
        if self.since is None or at <= self.since or not self.rate:
            return Decimal(0), Decimal(0), False
        ml = self.rate * _hours(self.since, at)
        return ml, (ml * self.conc if self.conc is not None else Decimal(0)), self.conc is None

    def change(self, at: datetime | None, *, rate: Decimal | None = None, phase: str | None = None,
               pump_state: str | None = None, conc: Decimal | None = None) -> None:
        """Integrate the commanded rate up to `at` with the state in force, then apply a change of rate, phase,
        pump state or syringe. Only changes cost anything: between them the volume is linear in time."""
        if at is not None:
            ml, mg, unknown = self._segment(at)
            self.mg_gaps += unknown
            if self._counting:
                self.commanded_ml += ml
                self.commanded_mg += mg
            else:
                self.excluded_ml += ml
                self.excluded_mg += mg
            if self.since is None or at > self.since:
                self.since = at
                self.commanded_series.append((at, self.commanded_mg))  # the cumulative curve's corners
        self.rate = self.rate if rate is None else rate
        self.phase = self.phase if phase is None else phase
        self.pump_state = self.pump_state if pump_state is None else pump_state
        self.conc = self.conc if conc is None else conc
        self._counting = self.counting()

    def commanded_now(self) -> tuple[Decimal, Decimal, Decimal, Decimal, int]:
        """(commanded mL, mg, not counted mL, mg, unknown-concentration spans) up to the course's last time."""
        cml, cmg, xml, xmg, gaps = (self.commanded_ml, self.commanded_mg, self.excluded_ml, self.excluded_mg,
                                    self.mg_gaps)
        if self.last_at is not None:
            ml, mg, unknown = self._segment(self.last_at)
            gaps += unknown
            if self._counting:
                cml, cmg = cml + ml, cmg + mg
            else:
                xml, xmg = xml + ml, xmg + mg
        return cml, cmg, xml, xmg, gaps

    def count_reported(self, at: datetime | None, raw: Decimal, reset_is_increment: bool = True) -> None:
        prev = self.raw_prev
        if prev is None:
            inc = Decimal(0)
        elif raw >= prev:
            inc = raw - prev
        else:
            inc = raw if reset_is_increment else Decimal(0)
        self.raw_prev = raw
        if inc and self.conc is None:
            self.mg_gaps += 1
        self.reported_ml += inc
        self.reported_mg += inc * (self.conc or 0)
        if at is not None:
            self.reported_series.append((at, self.reported_mg))

    # ------------------------------------------------------------------------------------------------- views

    def mg_unknown_reason(self) -> str | None:
        if self.commanded_now()[4]:
            return ("the concentration is not known for part of this course (its schedule_accepted is not in the "
                    "records read): mg counts only the volume at a known concentration")
        return None

    def has_course_records(self) -> bool:
        return bool(self.course_id is not None or self.states or self.setpoints or self.refusals or self.alarms
                    or self.orders)

    def totals(self) -> dict[str, Any]:
        unknown = self.mg_unknown_reason()
        cml, cmg, xml, xmg, _ = self.commanded_now()
        return {
            "commanded_ml": _q(cml),
            "commanded_mg": _q(cmg),
            "reported_ml": _q(self.reported_ml),
            "reported_mg": _q(self.reported_mg),
            "not_counted_ml": _q(xml),
            "not_counted_mg": _q(xmg),
            "not_counted_rule": "commanded volume while the course was in alarm or paused and the pump reported "
                                "it was not infusing",
            "mg_complete": unknown is None,
            "mg_note": unknown,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "pump_id": self.pump_id,
            "course_id": self.course_id,
            "patient_ref": self.patient_ref,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "records": self.records,
            "concentration_mg_per_ml": self.concentration_mg_per_ml,
            "schedule_version": self.schedule_version,
            "approved_by": self.approvers or None,
            "states": [{"at": at, "state": s} for at, s in self.states],
            "setpoints": [{"at": at, "rate_ml_per_h": r, "dose_mg_per_24h": d} for at, r, d in self.setpoints],
            "orders": [o.as_dict() for o in self.orders],
            "refusals": self.refusals,
            "alarms": [a.as_dict() for a in self.alarms],
            **self.totals(),
            "handover": self.handover,
        }


@dataclass(slots=True)
class Report:
    courses: dict[tuple[str, str | None], CourseSummary] = field(default_factory=dict)
    library_versions: list[str] = field(default_factory=list)
    records: int = 0
    torn_tails: int = 0
    reopened: int = 0
    patients: dict[str, str] = field(default_factory=dict)  # course id -> patient_ref (from the accepted schedules)
    unattributed_refusals: list[dict[str, Any]] = field(default_factory=list)  # refused before any pump was known
    # The log began after seq 1 with a state snapshot (the live log after `audit archive`): its seq, and the
    # bursts of its exposure ledger (the courses before it, archived), carried into the exposure ledger.
    carried_from: int | None = None
    carried: list[dict[str, Any]] = field(default_factory=list)

    def exposure(self) -> dict[str, list[dict[str, Any]]]:
        """The per-patient exposure ledger (issue 13), rebuilt from the log like the daemon's: every course that
        delivered drug, from its first non-zero setpoint to its end-of-course record."""
        out: dict[str, list[dict[str, Any]]] = {}
        for c in self.courses.values():
            if c.course_id is None or c.course_id not in self.patients:
                continue
            started = next((at for at, rate, _ in c.setpoints if rate > 0), None)
            if started is None:
                continue
            h = c.handover or {}
            out.setdefault(self.patients[c.course_id], []).append(
                {"course_id": c.course_id, "pump_id": c.pump_id, "started_at": started, "ended_at": h.get("at"),
                 "delivered_mg": h.get("delivered_mg")})
        own = {b["course_id"] for bursts in out.values() for b in bursts}
        for b in self.carried:  # bursts before the snapshot the log starts from (archived courses)
            if b["course_id"] not in own:
                out.setdefault(b["patient_ref"], []).insert(0, {k: v for k, v in b.items() if k != "patient_ref"})
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "library_versions": self.library_versions,
            "torn_tails": self.torn_tails,
            "restarts": self.reopened,
            "courses": [c.as_dict() for c in self.courses.values()],
            "unattributed_refusals": self.unattributed_refusals,
            "exposure": self.exposure(),
            "carried_from": self.carried_from,
        }


@dataclass(slots=True)
class _Pump:
    course: CourseSummary | None = None  # the pump's current course (the channel tags records with it)
    last_at: datetime | None = None
    order: Order | None = None  # the order the next outputs belong to
    input_rec: dict[str, Any] | None = None  # the pump's last input record
    input_course: CourseSummary | None = None
    pushed: dict[str, Any] | None = None  # the schedule of the pump's last push
    clinician: str = "a clinician"  # who gave the pump's last clinician command
    change_conc: Decimal | None = None  # concentration of the last change_syringe command
    pending_conc: Decimal | None = None  # the syringe being changed to


class ReportBuilder:
    """Fold records one at a time (replay feeds the same records it checks)."""

    def __init__(self) -> None:
        self.report = Report()
        self._pumps: dict[str, _Pump] = {}
        self._schedules: dict[str, dict[str, Any]] = {}  # schedule_id -> the last accepted schedule's fields
        self._writer_records = 0  # the writer's own records so far (segment_start, checkpoint, ...)

    def _course(self, pump: str, course_id: str | None) -> CourseSummary:
        c = self.report.courses.get((pump, course_id))
        if c is None:
            c = self.report.courses[(pump, course_id)] = CourseSummary(pump, course_id)
        return c

    def add(self, rec: dict[str, Any]) -> None:
        r = self.report
        r.records += 1
        event = rec.get("event")
        if event == "library_loaded":
            r.library_versions.append(str(rec.get("version") or rec.get("library_version") or "?"))
        elif event == "torn_tail_truncated":
            r.torn_tails += 1
        elif event == "log_reopened":
            r.reopened += 1
        sched = rec.get("schedule") if event == "schedule_accepted" else None
        if isinstance(sched, dict) and isinstance(sched.get("schedule_id"), str):
            r.patients[sched["schedule_id"]] = str(sched.get("patient_ref"))
        if event == "state_snapshot":
            if r.records == self._writer_records + 1 and rec.get("seq") != 1 and r.carried_from is None:
                self._carry(rec)
            self._seed(rec)
        elif event in ("segment_start", "checkpoint", "torn_tail_truncated", "log_reopened"):
            self._writer_records += 1
        pump_id = rec.get("pump_id")
        if not isinstance(pump_id, str):
            if event == "request_refused":
                r.unattributed_refusals.append(self._refusal(rec, _at(rec.get("ts")), None, "request"))
            elif event == "request_refused_summary":
                # Refusals over a client's logging budget, counted into one record (no pump, no course).
                r.unattributed_refusals.append(
                    {"seq": rec.get("seq"), "at": _at(rec.get("ts")), "source": f"control ({rec.get('peer')})",
                     "by": None, "request": "requests", "reason": "over_budget",
                     "detail": f"{rec.get('refused')} refusal(s) not logged one by one: {rec.get('reasons')}",
                     "event": event})
            return
        p = self._pumps.get(pump_id)
        if p is None:
            p = self._pumps[pump_id] = _Pump()
        at = _at(rec.get("at"))
        if at is not None:
            p.last_at = at
        when = at or p.last_at or _at(rec.get("ts"))
        course_id = rec.get("course_id") if isinstance(rec.get("course_id"), str) else None
        if isinstance(sched, dict) and isinstance(sched.get("schedule_id"), str):
            c = self._course(pump_id, sched["schedule_id"])  # a push belongs to the course it pushes
        elif course_id is not None:
            c = self._course(pump_id, course_id)
        else:
            # Daemon records (request_refused) carry no course: they belong to the pump's current course.
            c = p.course if p.course is not None else self._course(pump_id, None)
        if course_id is not None and (p.course is None or p.course.course_id != course_id):
            p.course = self._course(pump_id, course_id)
        c.records += 1
        if when is not None:
            c.first_at = c.first_at or when
            c.last_at = when
        if event in _INPUTS:
            self._input(p, c, rec, when)
        elif event in _OUTPUTS:
            self._output(p, c, rec, when)
        elif event == "request_refused":
            c.refusals.append(self._refusal(rec, when, None, "request"))
        elif event == "exposure_override":
            c.notices.append((when, "exposure_override", f"{rec.get('reason')} (approved by "
                                                         f"{_approvers(rec)})"))

    def _carry(self, rec: dict[str, Any]) -> None:
        """The live log after `audit archive` starts (after the writer's own records) from a state snapshot: what
        came before is in the archive. Its library version and the archived courses' bursts (from the snapshot's
        exposure ledger) are carried into the report."""
        from driverd.audit.exposure import LedgerBuilder
        from driverd.core.errors import DriverdError
        from driverd.core.protocol import parse_protocol

        r = self.report
        r.carried_from = rec.get("seq") if isinstance(rec.get("seq"), int) else None
        if isinstance(rec.get("library"), str):
            try:
                r.library_versions.append(f"{parse_protocol(rec['library']).library_version} (from the snapshot)")
            except DriverdError:
                r.library_versions.append("? (from the snapshot)")
        try:
            ledger = LedgerBuilder.from_fields(rec.get("ledger"))
        except DriverdError:
            return
        r.carried = [{"patient_ref": b.patient_ref, "course_id": b.course_id, "pump_id": None,
                      "started_at": b.started_at, "ended_at": b.ended_at,
                      "delivered_mg": b.drug_mg if b.ended_at is not None else None, "archived": True}
                     for b in ledger.ledger().values()]

    def _seed(self, rec: dict[str, Any]) -> None:
        """A segment read on its own starts with a state snapshot (docs/audit.md, "State snapshots"): a course the
        records read so far do not know starts from the snapshot's state (schedule, syringe, rate, phase, pump
        counter), so its mg are known. A course already known is not touched: the log itself says more."""
        states = rec.get("states")
        if not isinstance(states, dict):
            return
        at = _at(rec.get("ts"))
        for pump_id, st in states.items():
            sched = st.get("schedule") if isinstance(st, dict) else None
            if not isinstance(pump_id, str) or not isinstance(sched, dict) or not isinstance(sched.get("schedule_id"),
                                                                                             str):
                continue
            if (pump_id, sched["schedule_id"]) in self.report.courses:
                continue
            c = self._course(pump_id, sched["schedule_id"])
            p = self._pumps.setdefault(pump_id, _Pump())
            p.course, p.last_at = c, p.last_at or at
            self._schedules[sched["schedule_id"]] = sched
            self.report.patients[sched["schedule_id"]] = str(sched.get("patient_ref"))
            c.concentration_mg_per_ml = _dec(sched.get("concentration_mg_per_ml"))
            c.patient_ref = str(sched.get("patient_ref"))
            c.schedule_version = sched.get("version") if isinstance(sched.get("version"), int) else None
            c.approvers = _approvers(sched)
            c.first_at = c.last_at = at
            c.raw_prev = _dec(st.get("raw_delivered_ml"))
            phase = st.get("phase")
            c.change(at, rate=_dec(st.get("commanded_rate")) or Decimal(0),
                     phase=phase if isinstance(phase, str) else None,
                     pump_state="infusing" if st.get("pump_infusing") is True else "stopped",
                     conc=_dec(st.get("syringe_concentration")) or c.concentration_mg_per_ml)
            c.notices.append((at, "seeded", f"course state taken from the state snapshot at seq {rec.get('seq')}"))

    # ------------------------------------------------------------------------------------------------ inputs

    def _input(self, p: _Pump, c: CourseSummary, rec: dict[str, Any], at: datetime | None) -> None:
        event = rec["event"]
        p.input_rec, p.input_course, p.order = rec, c, None
        seq = rec.get("seq") if isinstance(rec.get("seq"), int) else None
        if event == "clinician_command":
            action = str(rec.get("action"))
            dose = rec.get("dose_mg_per_24h")
            p.order = Order(seq, at, "clinician", str(rec.get("by")), action + (f" to {dose} mg/24h" if dose else ""),
                            str(rec.get("reason")), event)
            c.orders.append(p.order)
            p.clinician = str(rec.get("by"))
            if action == "change_syringe":
                p.change_conc = _dec(rec.get("concentration_mg_per_ml")) or c.conc
        elif event == "schedule_accepted":
            sched = rec["schedule"] if isinstance(rec.get("schedule"), dict) else {}
            override = sched.get("exposure_override")
            why = f"signed schedule, expires {sched.get('expires_at')}"
            if isinstance(override, dict):
                why += f"; exposure override: {override.get('reason')} (approved by {_approvers(override)})"
            p.order = Order(seq, at, "ward", f"ward push approved by {_approvers(sched)}",
                            f"push {sched.get('schedule_id')} v{sched.get('version')}", why, event)
            c.orders.append(p.order)
            p.pushed = sched  # in force once the core accepts it (its notice), not if it is refused
        elif event == "pump_report":
            raw = _dec(rec.get("delivered_ml"))
            if raw is not None:
                c.count_reported(at, raw)
            state = str(rec.get("state"))
            if state != c.pump_state:
                c.change(at, pump_state=state)
        elif event == "syringe_loaded":
            raw = _dec(rec.get("delivered_ml"))
            if raw is not None:
                c.count_reported(at, raw, reset_is_increment=False)  # as the core counts it at a change
        elif event == "counter_cleared":
            # An ordered clear, as the core counts it: what the counter added up to the clear, then the read-back is
            # the baseline (the drop is no new run).
            before = _dec(rec.get("before_ml"))
            if before is not None:
                c.count_reported(at, before, reset_is_increment=False)
            after = _dec(rec.get("after_ml"))
            if after is not None:
                c.raw_prev = after

    # ----------------------------------------------------------------------------------------------- outputs

    def _order_for(self, p: _Pump, c: CourseSummary, first: dict[str, Any], at: datetime | None) -> Order:
        """The order the output belongs to: the input's, or one made now for an automatic decision."""
        if p.order is not None:
            return p.order
        inp = p.input_rec or {}
        seq = inp.get("seq") if isinstance(inp.get("seq"), int) else first.get("seq")
        event = first["event"]
        source = str(first.get("source") or "machine") if event in ("setpoint", "refused") else "machine"
        if source == "schedule":
            sched = self._schedules.get(str(c.course_id), {})
            actor = f"schedule {c.course_id} v{sched.get('version', '?')} approved by {_approvers(sched)}"
        elif source == "push":
            sched = self._schedules.get(str(c.course_id), {})
            actor = f"ward push v{sched.get('version', '?')} approved by {_approvers(sched)}"
        elif source == "clinician":
            actor = p.clinician  # a decision a clinician's earlier command led to (a syringe change's resume)
        elif source == "recovery":
            actor = "driverd (recovery)"
        else:
            actor = "driverd (safety core)"
        if event == "setpoint":
            action, reason = str(first.get("intent")), str(first.get("reason"))
        elif event == "transition":
            action, reason = f"to {first.get('to')}", str(first.get("cause"))
        else:
            action, reason = str(event), str(first.get("reason") or first.get("code") or "")
        order = Order(seq, at, source, actor, action, reason, str(inp.get("event", "?")))
        target = p.input_course or c
        target.orders.append(order)
        p.order = order
        return order

    def _output(self, p: _Pump, c: CourseSummary, rec: dict[str, Any], at: datetime | None) -> None:
        event = rec["event"]
        seq = rec.get("seq") if isinstance(rec.get("seq"), int) else None
        if event == "setpoint":
            rate = _dec(rec.get("rate_ml_per_h"))
            if rate is None:
                return
            dose = _dec(rec.get("dose_mg_per_24h"))
            c.setpoints.append((at, rate, dose))
            c.change(at, rate=rate)
            self._order_for(p, c, rec, at).setpoints.append(
                {"seq": seq, "at": at, "rate_ml_per_h": rate, "dose_mg_per_24h": dose, "intent": rec.get("intent"),
                 "source": rec.get("source"), "reason": rec.get("reason")})
        elif event == "transition":
            to = str(rec.get("to"))
            c.states.append((at, to))
            c.change(at, phase=to)
            self._order_for(p, c, rec, at).transitions.append(
                {"seq": seq, "from": rec.get("from"), "to": to, "cause": rec.get("cause")})
            if to == "stopped":
                for a in c.alarms:
                    if a.cleared_at is None and a.cleared_by is None:
                        a.cleared_at, a.cleared_seq = at, seq
                        a.cleared_by = f"course stopped ({rec.get('cause')}); not acknowledged"
        elif event == "refused":
            order = self._order_for(p, c, rec, at)
            # A push refused by the core belongs to the course it pushed; any other refusal to its order's course.
            target = p.input_course or c
            entry = self._refusal(rec, at, order, order.action)
            order.refused.append({"seq": seq, "reason": rec.get("reason"), "detail": rec.get("detail")})
            target.refusals.append(entry)
        elif event == "alarm":
            code = str(rec.get("code"))
            if not any(a.code == code and a.cleared_at is None and a.cleared_by is None for a in c.alarms):
                c.alarms.append(AlarmPeriod(code, str(rec.get("detail")), at, seq))
        elif event == "notice":
            self._notice(p, c, rec, at, seq)
        elif event == "course_summary":
            c.handover = {k: rec.get(k) for k in ("cause", "delivered_mg", "delivered_ml", "commanded_mg", "syringes",
                                                  "alarms", "handover_note")} | {"at": at}

    def _notice(self, p: _Pump, c: CourseSummary, rec: dict[str, Any], at: datetime | None, seq: int | None) -> None:
        code = str(rec.get("code"))
        c.notices.append((at, code, str(rec.get("detail"))))
        order = p.order
        if order is not None:
            order.notices.append({"seq": seq, "code": code, "detail": rec.get("detail")})
        by = f"{order.action} by {order.actor}: {order.reason}" if order is not None else code
        if code == "alarm_cleared":
            for a in c.alarms:
                if a.cleared_at is None and a.cleared_by is None and a.code != "clock_step":
                    a.cleared_at, a.cleared_seq, a.cleared_by = at, seq, by
        elif code == "clock_acknowledged":
            for a in c.alarms:
                if a.cleared_at is None and a.cleared_by is None and a.code == "clock_step":
                    a.cleared_at, a.cleared_seq, a.cleared_by = at, seq, by
        elif code in ("schedule_accepted", "schedule_updated"):
            if p.pushed is not None:
                self._schedules[str(p.pushed.get("schedule_id"))] = p.pushed
            sched = self._schedules.get(str(c.course_id), {})
            c.schedule_version = sched.get("version") if isinstance(sched.get("version"), int) else None
            c.approvers = _approvers(sched)
            if code == "schedule_accepted":
                conc = _dec(sched.get("concentration_mg_per_ml"))
                c.concentration_mg_per_ml = conc
                c.patient_ref = str(sched.get("patient_ref"))
                c.change(at, conc=conc)
        elif code == "syringe_change_started":
            p.pending_conc = p.change_conc
        elif code == "syringe_changed" and p.pending_conc is not None:
            c.change(at, conc=p.pending_conc)

    @staticmethod
    def _refusal(rec: dict[str, Any], at: datetime | None, order: Order | None, request: str) -> dict[str, Any]:
        return {"seq": rec.get("seq"), "at": at, "source": rec.get("source"),
                "by": order.actor if order is not None else None, "request": request,
                "reason": rec.get("reason"), "detail": rec.get("detail"), "event": rec.get("event")}


def build_report(records: Iterable[dict[str, Any]]) -> Report:
    b = ReportBuilder()
    for rec in records:
        b.add(rec)
    return b.report


# ------------------------------------------------------------------------------------------------- text


def _mg3(value: object) -> str:
    """A logged mg figure for reading: to 0.001 mg (the record itself keeps every digit)."""
    try:
        return str(Decimal(str(value)).quantize(Decimal("0.001")))
    except (ArithmeticError, ValueError):
        return str(value)


#: Notices that say what became of an order (the others are in the JSON).
_SHOWN_NOTICES: Final = frozenset({"schedule_accepted", "schedule_updated", "syringe_change_started", "syringe_changed",
                                   "level_lowered", "clock_acknowledged", "syringe_change_abandoned"})


def _order_line(o: Order, t: Any) -> str:
    if o.source == "clinician":
        who = f"clinician {o.actor}: {o.action} \"{o.reason}\""
    elif o.source == "ward":
        who = f"{o.actor}: {o.action} ({o.reason})"
    else:
        who = f"{o.actor}: {o.action} [{o.reason}]"
    results = [f"{s['rate_ml_per_h']} mL/h" + (f" = {s['dose_mg_per_24h']} mg/24h" if s["dose_mg_per_24h"] is not None
                                               else "") + f" ({s['intent']}, seq {s['seq']})" for s in o.setpoints]
    results += [f"{x['from']} -> {x['to']}" for x in o.transitions]
    results += [f"REFUSED {x['reason']}: {x['detail']}" for x in o.refused]
    results += [f"{x['code']}: {x['detail']}" for x in o.notices if x["code"] in _SHOWN_NOTICES]
    return f"    {t(o.at)}  {who} -> " + ("; ".join(results) or "no decision logged")


def report_lines(rep: Report, zone: Zone = UTC_ZONE) -> list[str]:
    t = zone.iso
    out = [f"{rep.records} records; drug library: {', '.join(rep.library_versions) or 'none logged'}; "
           f"times ISO 8601 in {zone.name}"]
    if rep.reopened or rep.torn_tails:
        out.append(f"writer restarts: {rep.reopened}; torn tails truncated: {rep.torn_tails}")
    if rep.carried_from is not None:
        out.append(f"starts from the state snapshot at seq {rep.carried_from}: earlier records are archived (their "
                   "courses are in the archive; their bursts are in the exposure ledger below)")
    for c in rep.courses.values():
        out.append("")
        if not c.has_course_records():
            # Telemetry of a pump before any course: one line, not an empty course.
            out.append(f"pump {c.pump_id}  no course: {c.records} record(s) ({t(c.first_at)} .. {t(c.last_at)})")
            continue
        out.append(f"pump {c.pump_id}  course {c.course_id or '-'}  ({t(c.first_at)} .. {t(c.last_at)})")
        if c.patient_ref is not None:
            out.append(f"  patient {c.patient_ref}; {c.concentration_mg_per_ml} mg/mL; schedule v{c.schedule_version} "
                       f"approved by {c.approvers}")
        if c.states:
            out.append("  states: " + " -> ".join(f"{s} @{t(at)}" for at, s in c.states))
        if c.orders:
            out.append("  orders (who ordered each change, and why):")
            out.extend(_order_line(o, t) for o in c.orders)
        d = c.totals()
        out.append(f"  delivered: commanded {d['commanded_ml']} mL = {d['commanded_mg']} mg; pump-reported "
                   f"{d['reported_ml']} mL = {d['reported_mg']} mg")
        if c.excluded_ml:
            out.append(f"  not counted as commanded: {d['not_counted_ml']} mL = {d['not_counted_mg']} mg (in alarm or "
                       "paused while the pump reported it was not infusing)")
        if d["mg_note"]:
            out.append(f"  note: {d['mg_note']}")
        for a in c.alarms:
            end = (f"cleared {t(a.cleared_at)} by {a.cleared_by}" if a.cleared_at is not None
                   else "NOT cleared by the end of the log")
            out.append(f"  alarm {a.code}: raised {t(a.raised_at)} ({a.detail}); {end}")
        for x in c.refusals:
            by = f" by {x['by']}" if x.get("by") else ""
            out.append(f"  refused @{t(x['at'])} [{x['source']}{by}] {x['request']}: {x['reason']}: {x['detail']}")
        h = c.handover
        if h is not None:
            alarms = h.get("alarms") or []
            out.append(f"  handover @{t(h.get('at'))} ({h.get('cause')}): {h.get('delivered_mg')} mg delivered by the "
                       f"pump's read-backs, {_mg3(h.get('commanded_mg'))} mg by the commanded rates; "
                       f"{h.get('syringes')} syringe(s); alarms: {', '.join(map(str, alarms)) or 'none'}")
            if h.get("handover_note"):
                out.append(f"  handover note: {h['handover_note']}")
    if rep.unattributed_refusals:
        out.append("")
        out.append("refusals not tied to a pump:")
        for x in rep.unattributed_refusals:
            out.append(f"  refused @{t(x['at'])} [{x['source']}] {x['reason']}: {x['detail']}")
    ledger = rep.exposure()
    if ledger:
        out.append("")
        out.append("exposure ledger (per patient, every course that delivered drug):")
        for patient, bursts in ledger.items():
            for b in bursts:
                end = t(b["ended_at"]) if b["ended_at"] else "running"
                mg = f"{b['delivered_mg']} mg" if b["delivered_mg"] is not None else "mg: see the course"
                where = "(archived)" if b.get("archived") else f"on {b['pump_id']}"
                out.append(f"  {patient}: {b['course_id']} {where} {t(b['started_at'])} .. {end}, {mg}")
    return out


# ------------------------------------------------------------------------------------------------- plots


@dataclass(frozen=True, slots=True)
class CoursePlot:
    """What a course's plot shows, computed without matplotlib (so it is tested as data)."""

    label: str
    dose: list[tuple[datetime, Decimal]]  # commanded mg/24h, a step function (value holds until the next point)
    commanded_mg: list[tuple[datetime, Decimal]]  # cumulative, piecewise linear
    reported_mg: list[tuple[datetime, Decimal]]  # cumulative, at each pump report
    alarms: list[tuple[datetime, datetime, str]]  # shaded spans (an alarm still open ends at the course's end)
    steps: list[tuple[datetime, str]]  # vertical marks: every applied setpoint that changed the dose


def plot_data(rep: Report) -> list[CoursePlot]:
    out = []
    for c in rep.courses.values():
        if not c.has_course_records() or not (c.setpoints or c.reported_series):
            continue
        end = c.last_at
        # Setpoints at one instant (a syringe change's stop and resume) last no time: the last one holds.
        dose: list[tuple[datetime, Decimal]] = []
        for at, _, d in c.setpoints:
            if at is None:
                continue
            if dose and dose[-1][0] == at:
                dose.pop()
            dose.append((at, d if d is not None else Decimal(0)))
        if dose and end is not None and end > dose[-1][0]:
            dose.append((end, dose[-1][1]))
        commanded = list(c.commanded_series)
        total_mg = c.commanded_now()[1]
        if end is not None and (not commanded or commanded[-1][0] < end):
            commanded.append((end, total_mg))
        spans = []
        for a in c.alarms:
            if a.raised_at is None:
                continue
            stop = a.cleared_at or end or a.raised_at
            spans.append((a.raised_at, stop, a.code))
        steps, last = [], None
        for at, d in dose:  # the point added at the end repeats the last dose: never a mark
            if d != last:
                steps.append((at, f"{d} mg/24h"))
            last = d
        out.append(CoursePlot(f"{c.pump_id} {c.course_id or '-'}", dose, commanded, list(c.reported_series), spans,
                              steps))
    return out


PLOT_FORMATS: Final = ("png", "svg")


def plot(rep: Report, out: Path, fmt: str, zone: Zone = UTC_ZONE) -> None:
    """One figure per course (stacked): dose over time, commanded vs pump-reported cumulative mg, alarm periods
    shaded, step times marked, the time axis in `zone`. Needs the optional matplotlib extra."""
    if fmt not in PLOT_FORMATS:
        raise AuditError(f"plot format must be one of {', '.join(PLOT_FORMATS)}")
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.dates as mdates  # type: ignore[import-not-found,unused-ignore]
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise AuditError(f"--{fmt} needs matplotlib: pip install 'driverd[plot]'") from None
    data = plot_data(rep)
    if not data:
        raise AuditError("nothing to plot: no course in the records read has a setpoint or a pump report")
    fig, axes = plt.subplots(len(data), 1, figsize=(11, 4.2 * len(data)), squeeze=False)
    try:
        for ax, d in zip(axes[:, 0], data, strict=True):
            _draw(ax, d, zone, mdates)
        fig.tight_layout()
        fig.savefig(out, format=fmt)
    except OSError as exc:
        raise AuditError(f"{out}: cannot write {fmt.upper()}: {exc.strerror}") from None
    finally:
        plt.close(fig)


def _draw(ax: Any, d: CoursePlot, zone: Zone, mdates: Any) -> None:
    # Plotting only: float conversion is fine for pixels, never for limits or setpoints.
    def xs(points: list[tuple[datetime, Decimal]]) -> list[datetime]:
        return [p[0].astimezone(zone.tz) for p in points]

    if d.dose:
        ax.step(xs(d.dose), [float(p[1]) for p in d.dose], where="post", color="tab:blue",
                label="commanded dose (mg/24h)")
    ax.set_ylabel("dose (mg/24h)")
    for start, stop, code in d.alarms:
        ax.axvspan(start.astimezone(zone.tz), stop.astimezone(zone.tz), color="tab:red", alpha=0.18, lw=0)
        ax.annotate(code, (start.astimezone(zone.tz), 1), xycoords=("data", "axes fraction"), fontsize=7,
                    color="tab:red", va="top", rotation=90)
    for at, label in d.steps:
        ax.axvline(at.astimezone(zone.tz), color="grey", ls=":", lw=0.8)
        ax.annotate(label, (at.astimezone(zone.tz), 0), xycoords=("data", "axes fraction"), fontsize=7,
                    color="grey", va="bottom", rotation=90)
    ax2 = ax.twinx()
    if d.commanded_mg:
        ax2.plot(xs(d.commanded_mg), [float(p[1]) for p in d.commanded_mg], color="tab:green",
                 label="commanded (cumulative mg)")
    if d.reported_mg:
        ax2.plot(xs(d.reported_mg), [float(p[1]) for p in d.reported_mg], color="tab:orange", ls="--",
                 label="pump-reported (cumulative mg)")
    ax2.set_ylabel("delivered (mg)")
    locator = mdates.AutoDateLocator(tz=zone.tz)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=zone.tz))
    ax.set_xlabel(f"time ({zone.name})")
    ax.set_title(f"{d.label}: dose, delivery; alarm periods shaded, steps dotted")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    if lines[0] or lines2[0]:
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=3, fontsize=8, frameon=False)
