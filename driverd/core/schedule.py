"""The approved schedule a ward system pushes (model only; parsing/validation is in schedule_parse.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class Step:
    dose_mg_per_24h: Decimal
    not_before: datetime  # timezone-aware
    auto: bool  # escalate to this step without a clinician's confirmation


@dataclass(frozen=True, slots=True)
class TaperStep:
    dose_mg_per_24h: Decimal  # 0 means stop
    after_hours: Decimal  # hours after the taper began


@dataclass(frozen=True, slots=True)
class Approval:
    role: str  # "prescriber" | "pharmacist"
    id: str


@dataclass(frozen=True, slots=True)
class Signature:
    key_id: str
    value: str  # base64 Ed25519 signature over the canonical JSON of every other field


@dataclass(frozen=True, slots=True)
class SyringeFill:
    """One replacement syringe as approved: its fill and the concentration it is made up at."""

    fill_volume_ml: Decimal
    concentration_mg_per_ml: Decimal


@dataclass(frozen=True, slots=True)
class SyringeSupply:
    """How syringes are supplied over the course (schedule field `syringes`).

    Either a fresh syringe like the first every `change_every_hours`, or `fills`: the replacement syringes in
    order (the first syringe of the course is `syringe` at the drug's concentration), each changed when the
    one before runs empty.
    """

    change_every_hours: Decimal | None = None
    fills: tuple[SyringeFill, ...] = ()


@dataclass(frozen=True, slots=True)
class ExposureOverride:
    """A course approved despite a patient-level exposure limit (field `exposure_override`): the reason and two
    approvers (a prescriber and a second senior prescriber or a pharmacist), inside the signed schedule."""

    reason: str
    approved_by: tuple[Approval, ...]


@dataclass(frozen=True, slots=True)
class Schedule:
    schedule_id: str
    version: int
    pump_id: str
    protocol: str
    patient_ref: str
    drug_name: str
    concentration_mg_per_ml: Decimal
    syringe_model: str
    inner_diameter_mm: Decimal
    fill_volume_ml: Decimal
    steps: tuple[Step, ...]
    hold_days: Decimal
    taper: tuple[TaperStep, ...]  # empty tuple = "stop" (no taper: stop at the end of the hold)
    approved_by: tuple[Approval, ...]
    approved_at: datetime
    expires_at: datetime
    signature: Signature | None
    digest: str  # hex SHA-256 of the canonical signed content: names this exact schedule in the audit log
    # None: not stated; the course must then fit in the first syringe (docs/schedules.md, "Volume plan").
    syringes: SyringeSupply | None = None
    # Shown in the end-of-course record, e.g. an oral continuation prescribed elsewhere (the daemon never drives it).
    handover_note: str | None = None
    exposure_override: ExposureOverride | None = None

    @property
    def approved_concentrations(self) -> frozenset[Decimal]:
        """Every concentration this signed schedule approves a syringe at (a syringe change may use any)."""
        extra = self.syringes.fills if self.syringes is not None else ()
        return frozenset({self.concentration_mg_per_ml, *(f.concentration_mg_per_ml for f in extra)})

    @property
    def max_dose_mg_per_24h(self) -> Decimal:
        return max(s.dose_mg_per_24h for s in self.steps)

    def next_step_index(self, current_dose: Decimal) -> int | None:
        """Index of the first step above the current dose level, or None at/after the top."""
        for i, step in enumerate(self.steps):
            if step.dose_mg_per_24h > current_dose:
                return i
        return None
