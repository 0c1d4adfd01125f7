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

    @property
    def max_dose_mg_per_24h(self) -> Decimal:
        return max(s.dose_mg_per_24h for s in self.steps)

    def next_step_index(self, current_dose: Decimal) -> int | None:
        """Index of the first step above the current dose level, or None at/after the top."""
        for i, step in enumerate(self.steps):
            if step.dose_mg_per_24h > current_dose:
                return i
        return None
