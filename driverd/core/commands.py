"""Commands: what the core asks the shell to do or record. Pure data."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from driverd.core.kernel import Setpoint


@dataclass(frozen=True, slots=True)
class ApplySetpoint:
    """Send this kernel-approved setpoint to the pump (rate 0 = stop). Write-ahead logged first."""

    setpoint: Setpoint
    attempt: int = 1  # 2 = the single retry after a read-back mismatch


@dataclass(frozen=True, slots=True)
class Refused:
    """A proposed change the kernel or the machine refused, with a stable reason code."""

    source: str  # "schedule" | "clinician" | "recovery" | "push" | "machine"
    reason: str  # stable code, e.g. "ceiling", "interval", "taper_lock"
    detail: str


@dataclass(frozen=True, slots=True)
class Transitioned:
    frm: str
    to: str
    cause: str


@dataclass(frozen=True, slots=True)
class RaiseAlarm:
    code: str  # e.g. "link_lost", "readback_mismatch", "pump_alarm:occlusion", "over_infusion"
    detail: str


@dataclass(frozen=True, slots=True)
class Notice:
    """Something worth recording that needs no action (e.g. near-end warning, schedule superseded)."""

    code: str
    detail: str


@dataclass(frozen=True, slots=True)
class CourseEnded:
    """The end-of-course handover record, when a course stops (audit record `course_summary`)."""

    delivered_mg: Decimal  # from the pump's read-backs, each syringe at its concentration (up to the last report)
    delivered_ml: Decimal
    commanded_mg: Decimal  # the commanded rates integrated over the time the course ran them
    syringes: int  # syringes used (1 + changes)
    alarms: tuple[str, ...]  # every alarm cause raised during the course, in order
    handover_note: str | None  # from the schedule
    cause: str  # why it stopped


Command = ApplySetpoint | Refused | Transitioned | RaiseAlarm | Notice | CourseEnded
