"""Commands: what the core asks the shell to do or record. Pure data."""

from __future__ import annotations

from dataclasses import dataclass

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


Command = ApplySetpoint | Refused | Transitioned | RaiseAlarm | Notice
