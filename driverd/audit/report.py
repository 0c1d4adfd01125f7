"""Per pump and course summaries of what the log says happened (used by `audit report` and `audit replay`).

Times are the event times (`at`) of the core inputs, so a virtual-time demo reads in its own time. Outputs
(setpoint, transition, refused, alarm, notice) carry no time of their own: they take the time of the input
that produced them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from driverd.core.errors import AuditError

HOURS = Decimal(3600)


@dataclass(slots=True)
class CourseSummary:
    pump_id: str
    course_id: str | None
    first_at: datetime | None = None
    last_at: datetime | None = None
    records: int = 0
    concentration_mg_per_ml: Decimal | None = None
    states: list[tuple[datetime | None, str]] = field(default_factory=list)  # (at, phase entered)
    setpoints: list[tuple[datetime | None, Decimal, Decimal | None]] = field(default_factory=list)  # at, mL/h, mg/24h
    refusals: list[tuple[datetime | None, str, str, str]] = field(default_factory=list)  # at, source, reason, detail
    alarms: list[tuple[datetime | None, str, str]] = field(default_factory=list)
    reported: list[tuple[datetime, Decimal]] = field(default_factory=list)  # pump-reported delivered mL (raw)
    handover: dict[str, Any] | None = None  # the core's end-of-course record (`course_summary`), when it stopped
    mixed: bool = False  # a syringe change to another concentration: mL no longer convert to mg at one rate

    def commanded_ml(self) -> Decimal:
        """Volume the commanded rates would deliver, each from its time to the next (or the course's end)."""
        total = Decimal(0)
        for i, (at, rate, _) in enumerate(self.setpoints):
            end = self.setpoints[i + 1][0] if i + 1 < len(self.setpoints) else self.last_at
            if at is not None and end is not None and end > at:
                total += rate * Decimal((end - at) // _US) / Decimal(1_000_000) / HOURS
        return total

    def reported_ml(self) -> Decimal:
        """Pump-reported delivered volume; a counter reset (new syringe, power cycle) starts a new run."""
        total, prev = Decimal(0), None
        for _, ml in self.reported:
            if prev is not None:
                total += ml - prev if ml >= prev else ml
            else:
                total += ml
            prev = ml
        return total

    def mg(self, ml: Decimal) -> Decimal | None:
        if self.concentration_mg_per_ml is None or self.mixed:
            return None  # with mixed concentrations the core's handover record has the mg
        return ml * self.concentration_mg_per_ml

    def as_dict(self) -> dict[str, Any]:
        c_ml, r_ml = self.commanded_ml(), self.reported_ml()
        return {
            "pump_id": self.pump_id,
            "course_id": self.course_id,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "records": self.records,
            "concentration_mg_per_ml": self.concentration_mg_per_ml,
            "states": [{"at": at, "state": s} for at, s in self.states],
            "setpoints": [{"at": at, "rate_ml_per_h": r, "dose_mg_per_24h": d} for at, r, d in self.setpoints],
            "refusals": [{"at": at, "source": s, "reason": r, "detail": d} for at, s, r, d in self.refusals],
            "alarms": [{"at": at, "code": c, "detail": d} for at, c, d in self.alarms],
            "commanded_ml": _q(c_ml),
            "commanded_mg": _q(self.mg(c_ml)),
            "reported_ml": _q(r_ml),
            "reported_mg": _q(self.mg(r_ml)),
            "handover": self.handover,
        }


_US = timedelta(microseconds=1)


def _q(d: Decimal | None) -> Decimal | None:
    return None if d is None else d.quantize(Decimal("0.001"))


def _dec(value: object) -> Decimal | None:
    if not isinstance(value, str):
        return None
    try:
        d = Decimal(value)
    except ArithmeticError:
        return None
    return d if d.is_finite() else None


def _at(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


@dataclass(slots=True)
class Report:
    courses: dict[tuple[str, str | None], CourseSummary] = field(default_factory=dict)
    library_versions: list[str] = field(default_factory=list)
    records: int = 0
    torn_tails: int = 0
    reopened: int = 0
    patients: dict[str, str] = field(default_factory=dict)  # course id -> patient_ref (from the accepted schedules)
    # The log began after seq 1 with a state snapshot (the live log after `audit archive`): its seq, and the
    # bursts of its exposure ledger, i.e. the courses before it (archived), carried into the exposure ledger.
    seeded_from: int | None = None
    carried: list[dict[str, Any]] = field(default_factory=list)

    def exposure(self) -> dict[str, list[dict[str, Any]]]:
        """The per-patient exposure ledger (issue 13), rebuilt from the log like the daemon's: every course that
        delivered drug, from its first non-zero setpoint to its end-of-course record."""
        out: dict[str, list[dict[str, Any]]] = {}
        own: set[str] = set()
        for c in self.courses.values():
            if c.course_id is None or c.course_id not in self.patients:
                continue
            started = next((at for at, rate, _ in c.setpoints if rate > 0), None)
            if started is None:
                continue
            h = c.handover or {}
            own.add(c.course_id)
            out.setdefault(self.patients[c.course_id], []).append(
                {"course_id": c.course_id, "pump_id": c.pump_id, "started_at": started, "ended_at": h.get("at"),
                 "delivered_mg": h.get("delivered_mg")})
        for b in self.carried:  # bursts before a snapshot the log starts from (archived courses)
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
            "exposure": self.exposure(),
            "seeded_from": self.seeded_from,
        }


class ReportBuilder:
    """Fold records one at a time (replay feeds the same records it checks)."""

    def __init__(self) -> None:
        self.report = Report()
        self._last_at: dict[str, datetime] = {}
        self._suffix: bool | None = None
        self._course_data = False

    def add(self, rec: dict[str, Any]) -> None:
        r = self.report
        r.records += 1
        event = rec.get("event")
        if self._suffix is None:
            self._suffix = rec.get("seq") != 1
        if event == "state_snapshot" and self._suffix and not self._course_data:
            self._seed(rec)
        if event not in ("segment_start", "checkpoint", "torn_tail_truncated", "log_reopened"):
            self._course_data = True
        if event == "library_loaded":
            r.library_versions.append(str(rec.get("version") or rec.get("library_version") or "?"))
        elif event == "torn_tail_truncated":
            r.torn_tails += 1
        elif event == "log_reopened":
            r.reopened += 1
        if event == "schedule_accepted" and isinstance(rec.get("schedule"), dict):
            sched = rec["schedule"]
            if isinstance(sched.get("schedule_id"), str):
                r.patients[sched["schedule_id"]] = str(sched.get("patient_ref"))
        pump = rec.get("pump_id")
        if not isinstance(pump, str):
            return
        course = rec.get("course_id") if isinstance(rec.get("course_id"), str) else None
        c = r.courses.get((pump, course))
        if c is None:
            c = r.courses[(pump, course)] = CourseSummary(pump, course)
        c.records += 1
        at = _at(rec.get("at"))
        if at is not None:
            self._last_at[pump] = at
            c.first_at = c.first_at or at
            c.last_at = at
        at = at or self._last_at.get(pump)
        if event == "schedule_accepted" and isinstance(rec.get("schedule"), dict):
            c.concentration_mg_per_ml = _dec(rec["schedule"].get("concentration_mg_per_ml"))
        elif event == "transition":
            c.states.append((at, str(rec.get("to"))))
        elif event == "setpoint":
            rate = _dec(rec.get("rate_ml_per_h"))
            if rate is not None:
                c.setpoints.append((at, rate, _dec(rec.get("dose_mg_per_24h"))))
        elif event == "refused":
            c.refusals.append((at, str(rec.get("source")), str(rec.get("reason")), str(rec.get("detail"))))
        elif event == "alarm":
            c.alarms.append((at, str(rec.get("code")), str(rec.get("detail"))))
        elif event == "clinician_command" and rec.get("action") == "change_syringe":
            conc = _dec(rec.get("concentration_mg_per_ml"))
            c.mixed = c.mixed or (conc is not None and conc != c.concentration_mg_per_ml)
        elif event == "course_summary":
            c.handover = {k: rec.get(k) for k in ("cause", "delivered_mg", "delivered_ml", "commanded_mg", "syringes",
                                                  "alarms", "handover_note")} | {"at": at}
        elif event == "pump_report":
            ml = _dec(rec.get("delivered_ml"))
            if ml is not None and at is not None:
                c.reported.append((at, ml))


    def _seed(self, rec: dict[str, Any]) -> None:
        """The live log after `audit archive` starts from a state snapshot: what came before is in the archive.
        Its library version and exposure ledger (the archived courses' bursts) are carried into the report."""
        from driverd.audit.exposure import LedgerBuilder
        from driverd.core.errors import DriverdError
        from driverd.core.protocol import parse_protocol

        r = self.report
        r.seeded_from = rec.get("seq") if isinstance(rec.get("seq"), int) else None
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


def build_report(records: Iterable[dict[str, Any]]) -> Report:
    b = ReportBuilder()
    for rec in records:
        b.add(rec)
    return b.report


def _t(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M") if at else "?"


def report_lines(rep: Report) -> list[str]:
    out = [f"{rep.records} records; drug library: {', '.join(rep.library_versions) or 'none logged'}"]
    if rep.seeded_from is not None:
        out.append(f"starts from the state snapshot at seq {rep.seeded_from}: earlier records are archived (their "
                   "courses are in the archive; their bursts are in the exposure ledger below)")
    if rep.reopened or rep.torn_tails:
        out.append(f"writer restarts: {rep.reopened}; torn tails truncated: {rep.torn_tails}")
    for c in rep.courses.values():
        d = c.as_dict()
        out.append("")
        if c.course_id is None and not (c.states or c.setpoints or c.refusals or c.alarms):
            # Telemetry of a pump before any course: one line, not an empty course.
            out.append(f"pump {c.pump_id}  no course: {c.records} record(s) ({_t(c.first_at)} .. {_t(c.last_at)})")
            continue
        out.append(f"pump {c.pump_id}  course {c.course_id or '-'}  ({_t(c.first_at)} .. {_t(c.last_at)})")
        if c.states:
            out.append("  states: " + " -> ".join(f"{s} @{_t(at)}" for at, s in c.states))
        for at, rate, dose in c.setpoints:
            out.append(f"  setpoint @{_t(at)}: {rate} mL/h" + (f" ({dose} mg/24h)" if dose is not None else ""))
        mg_c, mg_r = d["commanded_mg"], d["reported_mg"]
        out.append(
            f"  delivered: commanded {d['commanded_ml']} mL"
            + (f" = {mg_c} mg" if mg_c is not None else "")
            + f"; pump-reported {d['reported_ml']} mL"
            + (f" = {mg_r} mg" if mg_r is not None else "")
        )
        for at, src, reason, detail in c.refusals:
            out.append(f"  refused @{_t(at)} [{src}] {reason}: {detail}")
        for at, code, detail in c.alarms:
            out.append(f"  alarm @{_t(at)} {code}: {detail}")
        h = c.handover
        if h is not None:
            alarms = h.get("alarms") or []
            out.append(f"  handover @{_t(h.get('at'))} ({h.get('cause')}): {h.get('delivered_mg')} mg delivered by the "
                       f"pump's read-backs, {_mg3(h.get('commanded_mg'))} mg by the commanded rates; "
                       f"{h.get('syringes')} syringe(s); alarms: {', '.join(map(str, alarms)) or 'none'}")
            if h.get("handover_note"):
                out.append(f"  handover note: {h['handover_note']}")
    ledger = rep.exposure()
    if ledger:
        out.append("")
        out.append("exposure ledger (per patient, every course that delivered drug):")
        for patient, bursts in ledger.items():
            for b in bursts:
                end = _t(b["ended_at"]) if b["ended_at"] else "running"
                mg = f"{b['delivered_mg']} mg" if b["delivered_mg"] is not None else "mg: see the course"
                where = "(archived)" if b.get("archived") else f"on {b['pump_id']}"
                out.append(f"  {patient}: {b['course_id']} {where} {_t(b['started_at'])} .. {end}, {mg}")
    return out


def plot_png(rep: Report, out: Path) -> None:
    """Dose timeline per course (step plot of commanded mg/24h). Needs the optional matplotlib extra."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise AuditError("--png needs matplotlib: pip install 'driverd[plot]'") from None
    fig, ax = plt.subplots(figsize=(10, 4))
    for c in rep.courses.values():
        pts = [(at, dose) for at, _, dose in c.setpoints if at is not None and dose is not None]
        if pts:
            # Plotting only: float conversion is fine for pixels, never for limits or setpoints.
            ax.step([p[0] for p in pts], [float(p[1]) for p in pts], where="post", label=f"{c.pump_id} {c.course_id}")
    ax.set_ylabel("mg/24h")
    ax.set_title("commanded dose")
    ax.legend(loc="best")
    try:
        fig.savefig(out)
    except OSError as exc:
        raise AuditError(f"{out}: cannot write PNG: {exc.strerror}") from None
    finally:
        plt.close(fig)


def _mg3(value: object) -> str:
    """A logged mg figure for reading: to the microgram-ish 0.001 mg (the record itself keeps every digit)."""
    try:
        return str(Decimal(str(value)).quantize(Decimal("0.001")))
    except (ArithmeticError, ValueError):
        return str(value)
