"""Events and commands <-> audit record fields (JSON-safe dicts). Pure.

Inputs are logged with their exact event time in `at` (the record's `ts` is when it was written), so a replay
folds exactly what the daemon folded. Decimals are plain strings, times RFC 3339 UTC with "Z".
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from driverd.core.commands import ApplySetpoint, Command, CourseEnded, RaiseAlarm, Refused, Transitioned
from driverd.core.errors import Problem, ValidationError
from driverd.core.events import (
    CLINICIAN_ACTIONS,
    ClinicianCommand,
    ClockStepped,
    CounterCleared,
    Event,
    LinkLost,
    LinkRestored,
    PumpReport,
    PumpVerified,
    ScheduleAccepted,
    SetpointResult,
    SyringeLoaded,
    Tick,
)
from driverd.core.pump_range import PumpRange
from driverd.core.quantities import Resolution
from driverd.core.schedule import (
    Approval,
    ExposureOverride,
    Schedule,
    Signature,
    Step,
    SyringeFill,
    SyringeSupply,
    TaperStep,
)

INPUT_EVENTS = frozenset(
    {"schedule_accepted", "pump_verified", "tick", "pump_report", "setpoint_result", "clinician_command",
     "link_lost", "link_restored", "clock_stepped", "syringe_loaded", "counter_cleared"}
)
OUTPUT_EVENTS = frozenset({"setpoint", "refused", "transition", "alarm", "notice", "course_summary"})
PUMP_STATES = ("stopped", "infusing", "paused", "alarm")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = _EPOCH.replace(tzinfo=None)


def fmt_time(t: datetime) -> str:
    if t.tzinfo is None:
        raise ValueError("naive datetime in an audit record")
    if t.tzinfo is UTC:
        # The common case (every time parsed from the log or made from one): the same wall time without its
        # offset, whose isoformat() is the aware one's less "+00:00" (and an aware isoformat() costs twice as
        # much). Proved equal to the general form below in tests/core/test_time.py.
        return (_NAIVE_EPOCH + (t - _EPOCH)).isoformat() + "Z"
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def fmt_dec(d: Decimal) -> str:
    return format(d, "f")


# Parsed once per distinct string among the last few hundred (the pumps of a ward report at the same instant, most of
# them the same rate): a Decimal and a datetime are immutable, so sharing one is the same as parsing again. Only a
# well-formed value is taken from here; anything else is parsed below, which words the error.
@lru_cache(maxsize=512)
def finite_dec(raw: str) -> Decimal | None:
    """The finite Decimal `raw` spells, else None (shared by the audit report's parse: one cache for both)."""
    try:
        d = Decimal(raw)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


@lru_cache(maxsize=512)
def _aware_time(raw: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _dec(fields: dict[str, Any], key: str) -> Decimal:
    """A finite decimal (`_reported_dec`, the same type and number errors, and NaN or an infinity refused)."""
    d = _reported_dec(fields, key)
    if not d.is_finite():
        raise ValidationError([Problem(key, "finite", f"not finite: {fields.get(key)!r}")])
    return d


def exact_dec(d: Decimal) -> str:
    """A Decimal as a string that `Decimal()` parses back with the same sign, digits and exponent (and a NaN's
    kind, sign and payload): plain notation (`fmt_dec`) when the exponent is <= 0, as everywhere in the log, else
    scientific ("1E+1"; plain notation would read back as 10, "0E+2" as 0). For what a pump read back and for
    state snapshots: the core words its outputs with the value it got (a bore of 1E+1 mm), so a replay folding
    "10" would word them otherwise and diverge."""
    text = str(d)
    if "E" not in text:
        return text  # plain notation: str gives it only for exponents <= 0, where it is format(d, "f")
    exp = d.as_tuple().exponent
    return format(d, "f") if isinstance(exp, int) and exp <= 0 else text


def _reported_dec(fields: dict[str, Any], key: str) -> Decimal:
    """A value the pump read back (a report, a setpoint's or a clear's read-back, the bore at prime or a load), as
    read: any decimal, NaN and the infinities included. The core judges such a reading (a counter step of NaN or 0
    is the alarm `counter_step`, a NaN bore `syringe_mismatch`, a NaN rate `report_unreadable`), and the channel logs
    it as it was folded: a replay must fold it too, or the log no longer replays and the daemon refuses to start on
    it (review, 2026-12-03). Written by `exact_dec`."""
    raw = fields.get(key)
    if isinstance(raw, str):
        d = finite_dec(raw)
        if d is not None:
            return d
    if not isinstance(raw, str):
        raise ValidationError([Problem(key, "type", f"expected a decimal string, got {raw!r}")])
    try:
        return Decimal(raw)
    except InvalidOperation:
        raise ValidationError([Problem(key, "number", f"not a decimal: {raw!r}")]) from None


def _reported_or_none(fields: dict[str, Any], key: str) -> Decimal | None:
    """An optional reported value (absent or null: None, not read); else as `_reported_dec`."""
    return None if fields.get(key) is None else _reported_dec(fields, key)


def _time(fields: dict[str, Any], key: str) -> datetime:
    raw = fields.get(key)
    if isinstance(raw, str):
        t = _aware_time(raw)
        if t is not None:
            return t
    try:
        t = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        t = None
    if t is None or t.tzinfo is None:
        raise ValidationError([Problem(key, "format", f"expected an RFC 3339 time with offset, got {raw!r}")])
    return t


def _str(fields: dict[str, Any], key: str) -> str:
    raw = fields.get(key)
    if not isinstance(raw, str):
        raise ValidationError([Problem(key, "type", f"expected a string, got {raw!r}")])
    return raw


# ------------------------------------------------------------------------------------------------ schedule


def schedule_to_fields(s: Schedule) -> dict[str, Any]:
    return {
        "schedule_id": s.schedule_id,
        "version": s.version,
        "pump_id": s.pump_id,
        "protocol": s.protocol,
        "patient_ref": s.patient_ref,
        "drug_name": s.drug_name,
        "concentration_mg_per_ml": fmt_dec(s.concentration_mg_per_ml),
        "syringe_model": s.syringe_model,
        "inner_diameter_mm": fmt_dec(s.inner_diameter_mm),
        "fill_volume_ml": fmt_dec(s.fill_volume_ml),
        "steps": [
            {"dose_mg_per_24h": fmt_dec(x.dose_mg_per_24h), "not_before": fmt_time(x.not_before), "auto": x.auto}
            for x in s.steps
        ],
        "hold_days": fmt_dec(s.hold_days),
        "taper": [{"dose_mg_per_24h": fmt_dec(x.dose_mg_per_24h), "after_hours": fmt_dec(x.after_hours)}
                  for x in s.taper],
        "approved_by": [{"role": a.role, "id": a.id} for a in s.approved_by],
        "approved_at": fmt_time(s.approved_at),
        "expires_at": fmt_time(s.expires_at),
        "signature": None if s.signature is None else {"key_id": s.signature.key_id, "value": s.signature.value},
        "digest": s.digest,
        **({} if s.syringes is None else {"syringes": _supply_to_fields(s.syringes)}),
        **({} if s.handover_note is None else {"handover_note": s.handover_note}),
        **({} if s.exposure_override is None else {"exposure_override": {
            "reason": s.exposure_override.reason,
            "approved_by": [{"role": a.role, "id": a.id} for a in s.exposure_override.approved_by]}}),
    }


def _supply_to_fields(sup: SyringeSupply) -> dict[str, Any]:
    if sup.change_every_hours is not None:
        return {"change_every_hours": fmt_dec(sup.change_every_hours)}
    return {"fills": [{"fill_volume_ml": fmt_dec(f.fill_volume_ml),
                       "concentration_mg_per_ml": fmt_dec(f.concentration_mg_per_ml)} for f in sup.fills]}


def _supply_from_fields(f: Any) -> SyringeSupply | None:
    if f is None:
        return None
    if not isinstance(f, dict):
        raise ValidationError([Problem("syringes", "type", "expected an object")])
    if f.get("change_every_hours") is not None:
        return SyringeSupply(change_every_hours=_dec(f, "change_every_hours"))
    fills = f.get("fills")
    if not isinstance(fills, list) or not all(isinstance(x, dict) for x in fills):
        raise ValidationError([Problem("syringes.fills", "type", "expected a list of objects")])
    return SyringeSupply(fills=tuple(SyringeFill(_dec(x, "fill_volume_ml"), _dec(x, "concentration_mg_per_ml"))
                                     for x in fills))


def schedule_from_fields(f: dict[str, Any]) -> Schedule:
    sig = f.get("signature")
    version = f.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValidationError([Problem("version", "type", "expected an integer")])
    return Schedule(
        schedule_id=_str(f, "schedule_id"),
        version=version,
        pump_id=_str(f, "pump_id"),
        protocol=_str(f, "protocol"),
        patient_ref=_str(f, "patient_ref"),
        drug_name=_str(f, "drug_name"),
        concentration_mg_per_ml=_dec(f, "concentration_mg_per_ml"),
        syringe_model=_str(f, "syringe_model"),
        inner_diameter_mm=_dec(f, "inner_diameter_mm"),
        fill_volume_ml=_dec(f, "fill_volume_ml"),
        steps=tuple(Step(_dec(x, "dose_mg_per_24h"), _time(x, "not_before"), bool(x["auto"])) for x in f["steps"]),
        hold_days=_dec(f, "hold_days"),
        taper=tuple(TaperStep(_dec(x, "dose_mg_per_24h"), _dec(x, "after_hours")) for x in f["taper"]),
        approved_by=tuple(Approval(_str(x, "role"), _str(x, "id")) for x in f["approved_by"]),
        approved_at=_time(f, "approved_at"),
        expires_at=_time(f, "expires_at"),
        signature=None if sig is None else Signature(_str(sig, "key_id"), _str(sig, "value")),
        digest=_str(f, "digest"),
        syringes=_supply_from_fields(f.get("syringes")),
        handover_note=None if f.get("handover_note") is None else _str(f, "handover_note"),
        exposure_override=_override_from_fields(f.get("exposure_override")),
    )


def _override_from_fields(f: Any) -> ExposureOverride | None:
    if f is None:
        return None
    if not isinstance(f, dict) or not isinstance(f.get("approved_by"), list):
        raise ValidationError([Problem("exposure_override", "type", "expected an object with approved_by")])
    approvals = tuple(Approval(_str(x, "role"), _str(x, "id")) for x in f["approved_by"])
    return ExposureOverride(_str(f, "reason"), approvals)


# ------------------------------------------------------------------------------------------------ events


def event_to_record(ev: Event) -> tuple[str, dict[str, Any]]:
    at = {"at": fmt_time(ev.at)}
    if isinstance(ev, ScheduleAccepted):
        doc = {} if ev.document is None else {"document": ev.document}
        return "schedule_accepted", {**at, "schedule": schedule_to_fields(ev.schedule), **doc}
    if isinstance(ev, PumpVerified):
        return "pump_verified", {**at, "diameter_mm": exact_dec(ev.diameter_mm), "model": ev.model,
                                 "resolution": {"decimals": ev.resolution.decimals,
                                                "significant": ev.resolution.significant},
                                 **_range_fields(ev.pump_range)}
    if isinstance(ev, Tick):
        return "tick", at
    if isinstance(ev, PumpReport):
        # Every value as the pump reported it, exactly (`exact_dec`): the core judges it, the replay folds it.
        step = {} if ev.delivered_step_ml is None else {"delivered_step_ml": exact_dec(ev.delivered_step_ml)}
        if ev.diameter_mm is not None:  # absent in logs written before 2026-12-03: no diameter was read then
            step["diameter_mm"] = exact_dec(ev.diameter_mm)
        return "pump_report", {**at, "state": ev.state, "rate_ml_per_h": exact_dec(ev.rate_ml_per_h),
                               "delivered_ml": exact_dec(ev.delivered_ml), "alarms": list(ev.alarms), **step}
    if isinstance(ev, SetpointResult):
        rb = None if ev.readback_ml_per_h is None else exact_dec(ev.readback_ml_per_h)
        return "setpoint_result", {**at, "setpoint_id": ev.setpoint_id, "readback_ml_per_h": rb, "error": ev.error}
    if isinstance(ev, ClinicianCommand):
        dose = None if ev.dose_mg_per_24h is None else fmt_dec(ev.dose_mg_per_24h)
        syringe = {} if ev.action != "change_syringe" else {
            "fill_volume_ml": None if ev.fill_volume_ml is None else fmt_dec(ev.fill_volume_ml),
            "concentration_mg_per_ml": None if ev.concentration_mg_per_ml is None
            else fmt_dec(ev.concentration_mg_per_ml)}
        return "clinician_command", {**at, "action": ev.action, "by": ev.by, "reason": ev.reason,
                                     "dose_mg_per_24h": dose, **syringe}
    if isinstance(ev, SyringeLoaded):
        return "syringe_loaded", {**at, "diameter_mm": exact_dec(ev.diameter_mm),
                                  "delivered_ml": exact_dec(ev.delivered_ml), **_range_fields(ev.pump_range)}
    if isinstance(ev, CounterCleared):
        return "counter_cleared", {**at, "before_ml": None if ev.before_ml is None else exact_dec(ev.before_ml),
                                   "after_ml": None if ev.after_ml is None else exact_dec(ev.after_ml),
                                   "verified": ev.verified, "error": ev.error}
    if isinstance(ev, LinkLost):
        return "link_lost", {**at, "detail": ev.detail}
    if isinstance(ev, ClockStepped):
        return "clock_stepped", {**at, "delta_s": fmt_dec(ev.delta_s), "wall_at": fmt_time(ev.wall_at),
                                 "direction": "forward" if ev.delta_s > 0 else "backward"}
    assert isinstance(ev, LinkRestored)
    bore = {} if ev.diameter_mm is None else {"diameter_mm": exact_dec(ev.diameter_mm)}  # as read back
    return "link_restored", {**at, **bore, **_range_fields(ev.pump_range)}  # older logs: `at` only


def event_from_record(record: dict[str, Any]) -> Event:
    """Rebuild the core event from an input record (as parsed from the log). Raises ValidationError."""
    name = record.get("event")
    at = _time(record, "at")
    if name == "schedule_accepted":
        sched = record.get("schedule")
        if not isinstance(sched, dict):
            raise ValidationError([Problem("schedule", "type", "expected an object")])
        document = record.get("document")
        return ScheduleAccepted(at, schedule_from_fields(sched), document if isinstance(document, str) else None)
    if name == "pump_verified":
        res = record.get("resolution")
        if not isinstance(res, dict):
            raise ValidationError([Problem("resolution", "type", "expected an object")])
        return PumpVerified(at, _reported_dec(record, "diameter_mm"),
                            Resolution(int(res["decimals"]), res.get("significant")), _str(record, "model"),
                            _range_from(record))
    if name == "tick":
        return Tick(at)
    if name == "pump_report":
        state = _str(record, "state")
        if state not in PUMP_STATES:
            raise ValidationError([Problem("state", "enum", f"unknown pump state {state!r}")])
        alarms = record.get("alarms", [])
        if not isinstance(alarms, list) or not all(isinstance(a, str) for a in alarms):
            raise ValidationError([Problem("alarms", "type", "expected a list of strings")])
        return PumpReport(at, state, _reported_dec(record, "rate_ml_per_h"),  # type: ignore[arg-type]
                          _reported_dec(record, "delivered_ml"), tuple(alarms),
                          _reported_or_none(record, "delivered_step_ml"), _reported_or_none(record, "diameter_mm"))
    if name == "setpoint_result":
        sid = record.get("setpoint_id")
        if isinstance(sid, bool) or not isinstance(sid, int):
            raise ValidationError([Problem("setpoint_id", "type", "expected an integer")])
        rb = _reported_or_none(record, "readback_ml_per_h")
        return SetpointResult(at, sid, rb, str(record.get("error", "")))
    if name == "clinician_command":
        action = _str(record, "action")
        if action not in CLINICIAN_ACTIONS:
            raise ValidationError([Problem("action", "enum", f"unknown action {action!r}")])
        dose = None if record.get("dose_mg_per_24h") is None else _dec(record, "dose_mg_per_24h")
        fill = None if record.get("fill_volume_ml") is None else _dec(record, "fill_volume_ml")
        conc = None if record.get("concentration_mg_per_ml") is None else _dec(record, "concentration_mg_per_ml")
        return ClinicianCommand(at, action, _str(record, "by"), _str(record, "reason"), dose, fill, conc)
    if name == "syringe_loaded":
        return SyringeLoaded(at, _reported_dec(record, "diameter_mm"), _reported_dec(record, "delivered_ml"),
                             _range_from(record))
    if name == "counter_cleared":
        before = _reported_or_none(record, "before_ml")
        after = _reported_or_none(record, "after_ml")
        return CounterCleared(at, before, after, _str(record, "error"))
    if name == "link_lost":
        return LinkLost(at, _str(record, "detail"))
    if name == "link_restored":
        bore = _reported_or_none(record, "diameter_mm")  # the channel sends only a finite bore above 0
        if bore is not None and not (bore.is_finite() and bore > 0):
            raise ValidationError([Problem("diameter_mm", "range", f"must be a finite decimal > 0, got {bore}")])
        return LinkRestored(at, bore, _range_from(record))
    if name == "clock_stepped":
        return ClockStepped(at, _dec(record, "delta_s"), _time(record, "wall_at"))
    raise ValidationError([Problem("event", "enum", f"{name!r} is not a core input")])


def _range_fields(r: PumpRange | None) -> dict[str, Any]:
    """`pump_range` of a pump_verified / syringe_loaded / link_restored record: written only when reported (older
    logs lack it)."""
    if r is None:
        return {}
    return {"pump_range": {"url": r.url,
                           "min_ml_per_h": None if r.min_ml_per_h is None else fmt_dec(r.min_ml_per_h),
                           "max_ml_per_h": None if r.max_ml_per_h is None else fmt_dec(r.max_ml_per_h)}}


def _range_from(record: dict[str, Any]) -> PumpRange | None:
    raw = record.get("pump_range")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"url", "min_ml_per_h", "max_ml_per_h"}:
        raise ValidationError([Problem("pump_range", "type", "expected an object of url, min_ml_per_h, max_ml_per_h")])
    url = raw["url"]
    if not isinstance(url, str) or not url:
        raise ValidationError([Problem("pump_range.url", "type", f"expected a non-empty string, got {url!r}")])
    try:
        lo = None if raw["min_ml_per_h"] is None else _dec(raw, "min_ml_per_h")
        hi = None if raw["max_ml_per_h"] is None else _dec(raw, "max_ml_per_h")
    except ValidationError as exc:  # named as the record's field
        raise ValidationError([Problem(f"pump_range.{p.path}", p.rule, p.detail) for p in exc.problems]) from None
    if (lo is None) != (hi is None):
        raise ValidationError([Problem("pump_range", "both", "min_ml_per_h and max_ml_per_h are both set or both "
                                                             "null (unknown)")])
    if lo is not None and hi is not None and not 0 <= lo <= hi:
        raise ValidationError([Problem("pump_range.min_ml_per_h", "range",
                                       f"must be >= 0 and <= max_ml_per_h, got {lo}..{hi}")])
    return PumpRange(url, lo, hi)


# ------------------------------------------------------------------------------------------------ commands


def command_to_record(cmd: Command) -> tuple[str, dict[str, Any]]:
    if isinstance(cmd, ApplySetpoint):
        sp = cmd.setpoint
        return "setpoint", {
            "setpoint_id": sp.id,
            "rate_ml_per_h": fmt_dec(sp.rate_ml_per_h),
            "dose_mg_per_24h": fmt_dec(sp.dose_mg_per_24h),
            "requested_mg_per_24h": fmt_dec(sp.requested_mg_per_24h),
            "intent": sp.intent,
            "source": sp.source,
            "reason": sp.reason,
            "attempt": cmd.attempt,
        }
    if isinstance(cmd, Refused):
        return "refused", {"source": cmd.source, "reason": cmd.reason, "detail": cmd.detail}
    if isinstance(cmd, Transitioned):
        return "transition", {"from": cmd.frm, "to": cmd.to, "cause": cmd.cause}
    if isinstance(cmd, RaiseAlarm):
        return "alarm", {"code": cmd.code, "detail": cmd.detail}
    if isinstance(cmd, CourseEnded):
        return "course_summary", {"delivered_mg": fmt_dec(cmd.delivered_mg), "delivered_ml": fmt_dec(cmd.delivered_ml),
                                  "commanded_mg": fmt_dec(cmd.commanded_mg), "syringes": cmd.syringes,
                                  "alarms": list(cmd.alarms), "handover_note": cmd.handover_note,
                                  "cause": cmd.cause}
    return "notice", {"code": cmd.code, "detail": cmd.detail}


__all__ = [
    "INPUT_EVENTS",
    "OUTPUT_EVENTS",
    "command_to_record",
    "event_from_record",
    "event_to_record",
    "fmt_dec",
    "fmt_time",
    "schedule_from_fields",
    "schedule_to_fields",
]
