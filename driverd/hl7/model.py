"""What the HL7 layer is told, as plain frozen values: a pump observation, an alert, a parsed order.

The gateway fills these from the daemon's course states; `messages` turns them into HL7 text; `orders` turns an
inbound order into an `Order`. Nothing here knows HL7 syntax.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

from driverd.core.errors import DriverdError

#: PCD-04 alarm priorities (IEC 60601-1-8 high / medium / low).
Priority = Literal["PH", "PM", "PL"]
AlertPhase = Literal["start", "end"]
#: What an order asks for, once mapped: the clinician command it becomes.
OrderAction = Literal["escalate", "reduce", "hold", "resume", "stop"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An HL7 application and facility (MSH-3/4 for us, MSH-5/6 for the peer)."""

    application: str
    facility: str


@dataclass(frozen=True, slots=True)
class Observation:
    """One pump at one time: what a PCD-01 (DEC) message reports."""

    at: datetime  # timezone-aware
    pump_id: str
    pump_model: str  # "" when not yet identified
    course_id: str | None  # the schedule id of the course (None: no course)
    patient_ref: str | None  # the schedule's patient_ref (PID-3)
    drug_name: str | None
    concentration_mg_per_ml: Decimal | None
    phase: str  # course phase: idle, primed, titrating, holding, tapering, stopped, paused, alarm
    pump_state: str | None  # what the pump last reported: stopped, infusing, paused, alarm (None: unknown)
    rate_ml_per_h: Decimal | None  # the rate the pump reports delivering (None: unknown)
    commanded_ml_per_h: Decimal  # the rate last commanded by the course
    dose_mg_per_24h: Decimal  # the course's dose level
    delivered_ml: Decimal | None  # course-cumulative volume delivered, from the pump's read-backs
    link: str  # "up" | "down" | "lost"
    alarms: tuple[str, ...] = ()  # active alarm causes


@dataclass(frozen=True, slots=True)
class Alert:
    """One alarm raised or cleared: what a PCD-04 (ACM) message reports. The same alert_id is used for the
    raise and the clear, so a receiver can pair them."""

    at: datetime
    alert_id: str
    phase: AlertPhase  # "start" (raised) | "end" (cleared)
    pump_id: str
    course_id: str | None
    patient_ref: str | None
    cause: str  # the core's alarm cause, e.g. "pump_alarm:occlusion", "link_lost", "over_infusion"
    detail: str
    priority: Priority


@dataclass(frozen=True, slots=True)
class Order:
    """A parsed PCD-03 (RGV^O15) programming order. The rate is as ordered: the kernel decides what runs."""

    control_id: str  # MSH-10
    sender: Endpoint  # MSH-3/4
    accept_ack: bool  # MSH-15 asks for an accept acknowledgement (not "NE")
    application_ack: bool  # MSH-16 asks for the application reply (not "NE")
    pump_id: str  # OBX-18 of the order's device OBX
    patient_ref: str | None  # PID-3 (checked against the course when present)
    order_control: str  # ORC-1: NW, XO, HD, RL, DC, CA, OC
    placer_order: str  # ORC-2 (may be "")
    drug: str  # RXG-4 text (CWE-2), or the identifier (CWE-1) when there is no text
    concentration_mg_per_ml: Decimal | None  # from RXG-17/18 (mg/mL) or RXG-17/18 (mg) over RXG-23/24 (mL)
    rate: Decimal | None  # RXG-15
    rate_unit: Literal["mL/h", "mg/24h"] | None  # RXG-16, normalised
    by: str  # ORC-12 ordering provider id
    reason: str  # a text for the audit log: ORC-16 if given, else "HL7 order <control id>"
    # RXG-4 identifier (CWE-1), "" when not sent: the drug check compares the course's drug with either component.
    drug_identifier: str = ""


class OrderRejected(DriverdError):
    """Not a valid PIV order (the reply is AR): names the field (e.g. "RXG-15") and the rule broken."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")
