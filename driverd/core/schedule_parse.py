"""Schedule documents: strict JSON loading, structural checks, semantic validation, the frozen model.

Two layers, both reporting every problem at once (ValidationError with Problem(path, rule, detail)):

1. Structure (`check_structure`): types, required/unknown fields, string patterns and lengths, numeric
   bounds, list sizes. This is a pure-Python mirror of config/schemas/schedule.schema.json; the tests
   prove the two accept and reject the same documents.
2. Semantics (`parse_schedule`): the drug-library limits of a ProtocolSpec, ordering, intervals, course
   length, approvals and (when `now` is given) expiry.

Pure: no I/O, no clock. The shell reads bytes and passes the time in.

Modules: `schedule_limits` (limits and patterns shared with the JSON Schema), `schedule_json` (strict JSON
loading), `schedule_values` (paths, text, timestamps), `schedule_structure` (the structural pass),
`schedule_semantics` (the semantic pass). This module is the entry point and builds the frozen Schedule; it
re-exports the public names of the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TypeVar

from driverd.core.canonical import content_digest
from driverd.core.errors import ValidationError
from driverd.core.protocol import ProtocolSpec
from driverd.core.schedule import (
    Approval,
    ExposureOverride,
    Schedule,
    Step,
    SyringeFill,
    SyringeSupply,
    TaperStep,
)
from driverd.core.schedule_json import load_json
from driverd.core.schedule_limits import (
    ID_PATTERN,
    KEY_ID_PATTERN,
    MAX_APPROVALS,
    MAX_DOCUMENT_BYTES,
    MAX_ID,
    MAX_STEPS,
    MAX_TAPER_STEPS,
    MAX_TEXT,
    QUANTITY_PATTERN,
    SIGNATURE_VALUE_PATTERN,
    TIMESTAMP_PATTERN,
    TOP_OPTIONAL,
    TOP_REQUIRED,
)
from driverd.core.schedule_semantics import check_semantics, course_length_days, step_rate_ml_per_h
from driverd.core.schedule_structure import RawSchedule, StructureReader, check_structure
from driverd.core.schedule_values import parse_timestamp
from driverd.core.volume_plan import plan_course

__all__ = [
    "ID_PATTERN",
    "KEY_ID_PATTERN",
    "MAX_APPROVALS",
    "MAX_DOCUMENT_BYTES",
    "MAX_ID",
    "MAX_STEPS",
    "MAX_TAPER_STEPS",
    "MAX_TEXT",
    "QUANTITY_PATTERN",
    "SIGNATURE_VALUE_PATTERN",
    "TIMESTAMP_PATTERN",
    "TOP_OPTIONAL",
    "TOP_REQUIRED",
    "check_structure",
    "course_length_days",
    "load_json",
    "parse_schedule",
    "parse_timestamp",
    "step_rate_ml_per_h",
]

_T = TypeVar("_T")




def parse_schedule(
    doc: Mapping[str, object], protocol: ProtocolSpec, *, now: datetime | None = None, check_volume: bool = True
) -> Schedule:
    """Validate a schedule document against the structure and the protocol's limits; build the Schedule.

    `now` (timezone-aware) enables the expiry / not-yet-valid checks; None skips them (replay).
    Raises ValidationError listing every problem found. The signature is NOT verified here (that needs
    the trust store, in driverd.signing); only its shape is checked. `check_volume=False` skips only the volume
    plan (`volume_plan.plan_course`), for a caller that reports the plan and its problems itself.
    """
    if now is not None and (now.tzinfo is None or now.utcoffset() is None):
        raise ValueError("now must be timezone-aware")
    reader = StructureReader()
    raw = reader.read(doc)
    problems = reader.structural + reader.late
    check_semantics(raw, protocol, now, problems)
    if problems:
        raise ValidationError(problems)
    schedule = _build(raw, doc)
    # Only a schedule valid in every other respect is planned: the plan needs its whole timeline.
    plan = plan_course(schedule) if check_volume else None
    if plan is not None and plan.problems:
        raise ValidationError(list(plan.problems))
    return schedule


def _need(value: _T | None) -> _T:
    # Only reached when no problem was reported, i.e. every field was read.
    if value is None:
        raise AssertionError("schedule field missing after successful validation")
    return value


def _build(raw: RawSchedule, doc: Mapping[str, object]) -> Schedule:
    steps = tuple(
        Step(dose_mg_per_24h=_need(s.dose), not_before=_need(s.not_before), auto=_need(s.auto))
        for s in _need(raw.steps)
    )
    taper = tuple(
        TaperStep(dose_mg_per_24h=_need(t.dose), after_hours=_need(t.after_hours)) for t in _need(raw.taper)
    )
    approvals = tuple(Approval(role=_need(r), id=_need(i)) for r, i in _need(raw.approvals))
    return Schedule(
        schedule_id=_need(raw.schedule_id),
        version=_need(raw.version),
        pump_id=_need(raw.pump_id),
        protocol=_need(raw.protocol),
        patient_ref=_need(raw.patient_ref),
        drug_name=_need(raw.drug_name),
        concentration_mg_per_ml=_need(raw.concentration),
        syringe_model=_need(raw.syringe_model),
        inner_diameter_mm=_need(raw.inner_diameter),
        fill_volume_ml=_need(raw.fill_volume),
        steps=steps,
        hold_days=_need(raw.hold_days),
        taper=taper,
        approved_by=approvals,
        approved_at=_need(raw.approved_at),
        expires_at=_need(raw.expires_at),
        signature=raw.signature,
        digest=content_digest(doc),
        syringes=_build_supply(raw),
        handover_note=raw.handover_note,
        exposure_override=None if not raw.has_override else ExposureOverride(
            _need(raw.override_reason),
            tuple(Approval(role=_need(r), id=_need(i)) for r, i in _need(raw.override_approvals))),
    )


def _build_supply(raw: RawSchedule) -> SyringeSupply | None:
    sup = raw.syringes
    if sup is None:
        return None
    if sup.change_every_hours is not None:
        return SyringeSupply(change_every_hours=sup.change_every_hours)
    conc = _need(raw.concentration)
    return SyringeSupply(fills=tuple(SyringeFill(_need(f), c if c is not None else conc) for f, c in _need(sup.fills)))
