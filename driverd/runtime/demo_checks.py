"""Did a demo run show what it claims? Judged from the audit log alone (what an auditor would see), never from
the daemon's memory: records in, reasons out. Pure (no I/O, no clock).

A demo passes only if, for every pump:
- its course ended the planned way (`course_summary` cause `hold_complete` or `taper_complete`), not in alarm,
  not cut short (`course_cap`, `clinician_stop`), and the end-of-course record is in the log;
- every planned step was reached (a `step_due` setpoint for each step dose of the schedule in force);
- the pump-reported delivery matches the commanded one within the allowance below. Both come from the auditors'
  accounting (`driverd.audit.report`, fed the same records): commanded = the commanded rates integrated, left
  out while the course is in alarm or paused and the pump reports it is not infusing, counted while it kept
  infusing (a pump without a dead-man runs on through a lost link); pump-reported = what its counter added. A
  log without pump reports for the course falls back to the core's end-of-course record
  (`course_summary.delivered_mg` against `commanded_mg`).

The allowance, in mg, is what exact bookkeeping cannot see, and nothing more:
- the pump's volume counter: each syringe's last reading is truncated to the counter's resolution (the
  `pump_verified` record's digits at the largest reading: the syringe's fill, or the course's whole volume for a
  counter that a syringe change does not reset), so up to one counter step per syringe, times the concentration;
- around each alarm, what nobody could see: after a pump alarm the pump stopped on its own up to one poll period
  before the core saw it; during a lost link there are no pump reports at all (from the last one before the loss
  to the first one after it), so when a pump with a dead-man stopped inside that gap is unknown. Each alarm
  allows the dose in force at that moment over that window.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, TypeVar

from driverd.audit.report import ReportBuilder

PLANNED_ENDS = frozenset({"hold_complete", "taper_complete"})
LINK_ALARMS = frozenset({"link_lost"})
_DAY_S = Decimal(86_400)


def _dec(value: object) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        d = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def counter_step_ml(resolution: dict[str, Any] | None, reading_ml: Decimal) -> Decimal:
    """The smallest step of a volume counter with this resolution at `reading_ml` (3 decimals and 4 significant
    digits: 0.001 mL below 10 mL, 0.01 mL from 10 mL). No resolution known: 0.001 mL."""
    decimals = 3
    significant = None
    if isinstance(resolution, dict):
        decimals = int(resolution.get("decimals", 3))
        sig = resolution.get("significant")
        significant = int(sig) if isinstance(sig, int) else None
    places = decimals
    if significant is not None and reading_ml > 0:
        int_digits = max(reading_ml.adjusted() + 1, 0)
        places = min(places, significant - int_digits)
    return Decimal(1).scaleb(-places)


@dataclass
class CourseFacts:
    """What the log says about one course."""

    pump_id: str
    course_id: str
    planned_steps: tuple[Decimal, ...] = ()
    reached_steps: set[Decimal] = field(default_factory=set)
    concentration: Decimal | None = None
    fill_ml: Decimal = Decimal(0)  # the largest syringe fill of the schedule
    phase: str = "idle"
    active_alarms: list[str] = field(default_factory=list)
    dose: Decimal = Decimal(0)  # the dose in force (last setpoint), mg/24h
    unobserved_mg: Decimal = Decimal(0)  # the alarm windows' allowance, summed
    summary: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        s = self.summary or {}
        return {"pump_id": self.pump_id, "course_id": self.course_id, "phase": self.phase,
                "planned_steps": [str(d) for d in self.planned_steps],
                "reached_steps": [str(d) for d in sorted(self.reached_steps)],
                "end_cause": s.get("cause"), "delivered_mg": s.get("delivered_mg"),
                "commanded_mg": None if s.get("commanded_mg") is None else str(_q(_dec(s.get("commanded_mg")))),
                "active_alarms": list(self.active_alarms)}


def _q(d: Decimal | None) -> Decimal | None:
    return None if d is None else d.quantize(Decimal("0.001"))


class _HasRecord(Protocol):
    @property
    def record(self) -> dict[str, Any]: ...


_L = TypeVar("_L", bound=_HasRecord)


class DemoJudge:
    """Feed it every audit record in order (`add`), then ask for `reasons()`: empty means the run is honest."""

    def __init__(self, pumps: Iterable[str], *, poll_period_s: Decimal | int, deadman_s: Decimal | int) -> None:
        self.pumps = list(pumps)
        self.poll_period_s = Decimal(poll_period_s)
        self.deadman_s = Decimal(deadman_s)
        self.courses: dict[str, CourseFacts] = {}  # course id -> facts
        self.last_course: dict[str, str] = {}  # pump -> its latest course id
        self.resolution: dict[str, dict[str, Any]] = {}  # pump -> the verified pump's resolution
        self.accounting = ReportBuilder()  # the auditors' commanded and pump-reported volumes
        self._last_report: dict[str, datetime] = {}  # pump -> time of its latest pump report
        self._outage: dict[str, tuple[datetime, CourseFacts, Decimal]] = {}  # pump -> (last report, course, dose)

    def watch(self, lines: Iterable[_L]) -> Iterator[_L]:
        """Pass audit lines through (to replay, say) while judging each one."""
        for line in lines:
            self.add(line.record)
            yield line

    def add(self, rec: dict[str, Any]) -> None:
        self.accounting.add(rec)
        event = rec.get("event")
        pump = rec.get("pump_id")
        if not isinstance(pump, str):
            return
        if event == "pump_report":
            self._report(pump, rec)
            return
        if event == "schedule_accepted":
            self._schedule(pump, rec)
            return
        if event == "pump_verified" and isinstance(rec.get("resolution"), dict):
            self.resolution[pump] = rec["resolution"]
        course = self.courses.get(str(rec.get("course_id")))
        if course is None:
            return
        if event == "setpoint":
            dose = _dec(rec.get("dose_mg_per_24h"))
            if dose is not None:
                course.dose = dose
            requested = _dec(rec.get("requested_mg_per_24h"))
            if rec.get("reason") == "step_due" and requested is not None:
                course.reached_steps.add(requested)
        elif event == "transition":
            to = str(rec.get("to"))
            if rec.get("from") == "alarm" and to != "alarm":
                course.active_alarms.clear()  # a resume acknowledges every cause
            course.phase = to
        elif event == "alarm":
            code = str(rec.get("code"))
            if course.phase not in ("stopped", "idle"):
                course.active_alarms.append(code)
            if code in LINK_ALARMS:
                since = self._last_report.get(pump)
                if since is not None and pump not in self._outage:
                    self._outage[pump] = (since, course, course.dose)  # closed by the next pump report
            else:
                course.unobserved_mg += course.dose * self.poll_period_s / _DAY_S
        elif event == "course_summary":
            course.summary = rec

    def _report(self, pump: str, rec: dict[str, Any]) -> None:
        try:
            at = datetime.fromisoformat(str(rec.get("at")).replace("Z", "+00:00"))
        except ValueError:
            return
        outage = self._outage.pop(pump, None)
        if outage is not None:
            since, course, dose = outage
            seconds = Decimal(max((at - since).total_seconds(), 0))
            course.unobserved_mg += dose * seconds / _DAY_S
        self._last_report[pump] = at

    def delivery(self, course: CourseFacts) -> tuple[Decimal | None, Decimal | None]:
        """(pump-reported mg, commanded mg): the auditors' accounting when it saw pump reports for the course
        and knows every concentration, else the core's end-of-course record."""
        acc = self.accounting.report.courses.get((course.pump_id, course.course_id))
        if acc is not None and acc.reported_series:
            totals = acc.totals()
            if totals["mg_complete"]:
                return totals["reported_mg"], totals["commanded_mg"]
        s = course.summary or {}
        return _dec(s.get("delivered_mg")), _dec(s.get("commanded_mg"))

    def _schedule(self, pump: str, rec: dict[str, Any]) -> None:
        try:
            doc = json.loads(rec["document"]) if isinstance(rec.get("document"), str) else rec.get("document")
        except ValueError:
            return
        if not isinstance(doc, dict) or not isinstance(doc.get("schedule_id"), str):
            return
        cid = doc["schedule_id"]
        course = self.courses.setdefault(cid, CourseFacts(pump, cid))
        self.last_course[pump] = cid
        raw_steps = doc.get("steps")
        steps: list[Any] = raw_steps if isinstance(raw_steps, list) else []
        course.planned_steps = tuple(d for s in steps if isinstance(s, dict)
                                     and (d := _dec(s.get("dose_mg_per_24h"))) is not None)
        raw_drug = doc.get("drug")
        drug: dict[str, Any] = raw_drug if isinstance(raw_drug, dict) else {}
        course.concentration = _dec(drug.get("concentration_mg_per_ml"))
        fills = [doc.get("syringe", {}).get("fill_volume_ml")] if isinstance(doc.get("syringe"), dict) else []
        extra = doc.get("syringes")
        if isinstance(extra, list):
            fills += [s.get("fill_volume_ml") for s in extra if isinstance(s, dict)]
        course.fill_ml = max([d for f in fills if (d := _dec(f)) is not None], default=Decimal(0))

    def allowance_mg(self, course: CourseFacts) -> Decimal:
        summary = course.summary or {}
        syringes = _dec(summary.get("syringes")) or Decimal(1)
        # A counter that is not reset at a syringe change reads the course's whole volume: its step is coarser.
        reading = max(course.fill_ml, _dec(summary.get("delivered_ml")) or Decimal(0))
        step = counter_step_ml(self.resolution.get(course.pump_id), reading)
        return syringes * step * (course.concentration or Decimal(0)) + course.unobserved_mg

    def reasons(self) -> list[str]:
        out: list[str] = []
        for pump in self.pumps:
            cid = self.last_course.get(pump)
            if cid is None:
                out.append(f"{pump}: no course was started")
                continue
            out += [f"{pump}: {r}" for r in self.course_reasons(self.courses[cid])]
        return out

    def course_reasons(self, c: CourseFacts) -> list[str]:
        out: list[str] = []
        if c.phase == "alarm":
            out.append(f"course {c.course_id} ended in alarm ({', '.join(c.active_alarms) or 'cause unknown'})")
        elif c.phase != "stopped":
            out.append(f"course {c.course_id} did not end (phase {c.phase})")
        elif c.summary is None:
            out.append(f"course {c.course_id} stopped but its end-of-course record is missing")
        elif c.summary.get("cause") not in PLANNED_ENDS:
            out.append(f"course {c.course_id} stopped early ({c.summary.get('cause')})")
        missing = [d for d in c.planned_steps if d not in c.reached_steps]
        if missing:
            out.append(f"reached {len(c.planned_steps) - len(missing)} of {len(c.planned_steps)} planned steps "
                       f"(never reached: {', '.join(f'{d} mg/24h' for d in missing)})")
        if c.summary is not None:
            delivered, commanded = self.delivery(c)
            if delivered is None or commanded is None:
                out.append("end-of-course record lacks delivered_mg or commanded_mg")
            else:
                allowed = self.allowance_mg(c)
                if abs(delivered - commanded) > allowed:
                    out.append(f"pump-reported delivery {delivered} mg differs from commanded {_q(commanded)} mg by "
                               f"{_q(abs(delivered - commanded))} mg (allowed {_q(allowed)} mg)")
        return out

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for p in self.pumps:
            cid = self.last_course.get(p)
            if cid is None:
                continue
            c = self.courses[cid]
            delivered, commanded = self.delivery(c)
            out.append(c.as_dict() | {"delivered_mg": None if delivered is None else str(_q(delivered)),
                                      "commanded_mg": None if commanded is None else str(_q(commanded)),
                                      "allowed_mg": str(_q(self.allowance_mg(c)))})
        return out
