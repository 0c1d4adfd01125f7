"""Events: everything that can happen to a course. Each carries its own time (`at`, timezone-aware UTC).

The core never reads a clock; time only enters through these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

from driverd.core.quantities import Resolution
from driverd.core.schedule import Schedule

# Pump states and alarm kinds as plain strings so the core does not depend on the drivers package.
PumpStateName = Literal["stopped", "infusing", "paused", "alarm"]
ClinicianAction = Literal["hold", "resume", "escalate", "reduce", "taper", "stop"]
CLINICIAN_ACTIONS: tuple[ClinicianAction, ...] = ("hold", "resume", "escalate", "reduce", "taper", "stop")

# Alarm kinds that are warnings (the pump keeps infusing); every other alarm stops the pump.
WARNING_ALARMS = frozenset({"near_end", "low_battery"})


@dataclass(frozen=True, slots=True)
class ScheduleAccepted:
    """A schedule that passed signature, trust, expiry, replay and validation checks in the shell."""

    at: datetime
    schedule: Schedule
    # The signed document as pushed, in canonical JSON (driverd.core.canonical). The core never reads it; it is
    # logged so crash recovery can re-verify the signature (the parsed fields cannot: they are normalised).
    document: str | None = None


@dataclass(frozen=True, slots=True)
class PumpVerified:
    """Read-back from the pump before a start: what is really loaded and how it quantizes rates."""

    at: datetime
    diameter_mm: Decimal
    resolution: Resolution
    model: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. The machine checks due steps, hold end, taper steps and the course cap."""

    at: datetime


@dataclass(frozen=True, slots=True)
class PumpReport:
    """One status read from the pump."""

    at: datetime
    state: PumpStateName
    rate_ml_per_h: Decimal
    delivered_ml: Decimal
    alarms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SetpointResult:
    """Outcome of applying a setpoint: the pump's read-back, or None when unacknowledged (uncertain)."""

    at: datetime
    setpoint_id: int
    readback_ml_per_h: Decimal | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class ClinicianCommand:
    at: datetime
    action: ClinicianAction
    by: str
    reason: str
    dose_mg_per_24h: Decimal | None = None  # for reduce: target dose (default: the step below)


@dataclass(frozen=True, slots=True)
class LinkLost:
    at: datetime
    detail: str


@dataclass(frozen=True, slots=True)
class LinkRestored:
    at: datetime


Event = (
    ScheduleAccepted | PumpVerified | Tick | PumpReport | SetpointResult | ClinicianCommand | LinkLost | LinkRestored
)
