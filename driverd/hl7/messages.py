"""The HL7 v2.6 messages driverd sends (IHE PCD): PCD-01 observations (DEC), PCD-04 alerts (ACM), and the accept
ACK and RRG^O16 replies to PCD-03 orders (PIV); and the parser of the ACKs that come back for what we sent.

docs/hl7.md has the field-by-field mapping, every code used and the public source each one was taken from.

Pure: no I/O and no clock; every time comes in as an argument. Messages are built with python-hl7 containers and
every text value goes through python-hl7's `Message.escape`. Values are first reduced to printable ASCII: MSH-18 is
left empty, which means 7-bit ASCII (IHE PCD TF-2 B.1), and python-hl7's hex escape is not usable for control
characters or anything beyond Latin-1.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Final, Literal, TypeAlias

import hl7

from driverd.core.errors import DriverdError
from driverd.core.records import fmt_dec
from driverd.hl7.model import Alert, Endpoint, Observation

VERSION: Final = "2.6"
#: Coding system of driverd's own codes (HL7 table 0396: "99zzz" is a locally defined system).
LOCAL: Final = "99DRVD"
#: MSH-21 message profile identifiers (IHE PCD TF-2 B.1, table of assigned OIDs). Receivers key on the OID.
PCD01_PROFILE: Final = ("IHE_PCD_001", "IHE PCD", "1.3.6.1.4.1.19376.1.6.1.1.1", "ISO")
PCD04_PROFILE: Final = ("IHE_PCD_ACM_001", "IHE PCD", "1.3.6.1.4.1.19376.1.6.1.4.1", "ISO")
RRG_PROFILE: Final = ("IHE_PCD_PIV_RRG", "IHE PCD", "1.3.6.1.4.1.19376.1.6.1.3.2", "ISO")

_SEPARATORS: Final = "\r|~^&"  # segment, field, repetition, component, sub-component (python-hl7's order)
_ENCODING: Final = "^~\\&"  # MSH-2 as IHE PCD requires it
_REP, _COMP, _SUB = _SEPARATORS[2], _SEPARATORS[3], _SEPARATORS[4]


class MessageError(DriverdError):
    """A value that cannot become an HL7 message (a naive time, an empty control id, a number that is not finite)."""


class AckError(DriverdError):
    """An acknowledgement that is not one: names the field (e.g. "MSA-1") and the rule broken."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value: identifier, text and coding system (the first CWE triplet)."""

    code: str
    text: str
    system: str = "MDC"

    def cwe(self, *alternate: str) -> tuple[str, ...]:
        return (self.code, self.text, self.system, *alternate)


# ISO/IEEE 11073-10101 terms (docs/hl7.md, "Codes", says where each one was confirmed).
MDS_PUMP: Final = Code("69985", "MDC_DEV_PUMP_INFUS_MDS")
VMD_PUMP: Final = Code("69986", "MDC_DEV_PUMP_INFUS_VMD")
CHAN_DELIVERY: Final = Code("70067", "MDC_DEV_PUMP_DELIVERY_INFO")
CHAN_SOURCE: Final = Code("70071", "MDC_DEV_PUMP_INFUSATE_SOURCE_PRIMARY")
INFUSING_STATUS: Final = Code("184519", "MDC_PUMP_INFUSING_STATUS")
NOT_INFUSING_REASON: Final = Code("184513", "MDC_PUMP_NOT_INFUSING_REASON")
FLOW_FLUID_PUMP: Final = Code("157784", "MDC_FLOW_FLUID_PUMP")
RATE_DOSE: Final = Code("157924", "MDC_RATE_DOSE")
VOL_DELIVERED: Final = Code("157993", "MDC_VOL_FLUID_DELIV_TOTAL")
DRUG_NAME: Final = Code("184514", "MDC_DRUG_NAME_LABEL")
CONC_DRUG: Final = Code("157760", "MDC_CONC_DRUG")
EVT_ALARM: Final = Code("196616", "MDC_EVT_ALARM")
ALERT_SOURCE: Final = Code("68480", "MDC_ATTR_ALERT_SOURCE")
EVENT_PHASE: Final = Code("68481", "MDC_ATTR_EVENT_PHASE")
ALARM_STATE: Final = Code("68482", "MDC_ATTR_ALARM_STATE")
INACTIVATION_STATE: Final = Code("68483", "MDC_ATTR_ALARM_INACTIVATION_STATE")
ALARM_PRIORITY: Final = Code("68484", "MDC_ATTR_ALARM_PRIORITY")
ALERT_TYPE: Final = Code("68485", "MDC_ATTR_ALERT_TYPE")

# Units: the MDC code with its UCUM spelling as the alternate triplet (IHE PCD TF-2 B.8, OBX-6).
UNIT_ML_PER_H: Final = Code("265266", "MDC_DIM_MILLI_L_PER_HR").cwe("mL/h", "mL/h", "UCUM")
UNIT_ML: Final = Code("263762", "MDC_DIM_MILLI_L").cwe("mL", "mL", "UCUM")
UNIT_MG_PER_ML: Final = Code("264306", "MDC_DIM_MILLI_G_PER_ML").cwe("mg/mL", "mg/mL", "UCUM")
UNIT_MG_PER_DAY: Final = Code("265554", "MDC_DIM_MILLI_G_PER_DAY").cwe("mg/d", "mg/d", "UCUM")

# driverd's own observations (no 11073 term says "rate commanded by a course" or "course phase").
LOCAL_COMMANDED: Final = Code("commanded_rate", "rate commanded by the course", LOCAL)
LOCAL_PHASE: Final = Code("course_phase", "course phase", LOCAL)
LOCAL_COURSE: Final = Code("course_id", "course (schedule id)", LOCAL)
LOCAL_LINK: Final = Code("pump_link", "link to the pump", LOCAL)
LOCAL_ALARMS: Final = Code("alarm_causes", "active alarm causes", LOCAL)

#: Alarm causes with an 11073 event code (IHE PCD TF-2 E.3.2 and the NIST RTMMS infusion pump alarm group).
MDC_EVENTS: Final[dict[str, Code]] = {
    "pump_alarm:occlusion": Code("196940", "MDC_EVT_FLUID_LINE_OCCL"),
    "pump_alarm:end_of_syringe": Code("197226", "MDC_EVT_SYRINGE_EMPTY"),
    "syringe_empty": Code("197226", "MDC_EVT_SYRINGE_EMPTY"),  # driverd's own end-of-syringe finding (issue 13)
    "pump_alarm:low_battery": Code("196802", "MDC_EVT_BATT_LO"),
    "pump_alarm:power_interrupted": Code("197342", "MDC_EVT_PWR_LOSS"),
    "pump_alarm:program_error": Code("203276", "MDC_EVT_ADVIS_SETTINGS_CHK"),
    "pump_alarm:other": Code("197348", "MDC_EVT_UNKNOWN"),
}
#: What each known alarm cause means; sent as the cause's text (local triplet) with every alert.
CAUSE_TEXT: Final[dict[str, str]] = {
    "pump_alarm:occlusion": "pump reports an occlusion",
    "pump_alarm:end_of_syringe": "pump reports the end of the syringe",
    "pump_alarm:near_end": "pump reports the syringe nearly empty",
    "pump_alarm:low_battery": "pump reports a low battery",
    "pump_alarm:power_interrupted": "pump power was interrupted",
    "pump_alarm:safe_mode_timeout": "pump stopped itself: the host went silent (safe-mode timeout)",
    "pump_alarm:program_error": "pump reports a programming error",
    "pump_alarm:other": "pump reports an alarm",
    "link_lost": "communication with the pump lost",
    "syringe_empty": "the syringe is empty (read-backs reached the fill volume or the pump stalled)",
    "over_infusion": "pump delivered more than commanded",
    "under_infusion": "pump delivered less than commanded",
    "dose_ceiling": "24-h delivery reached the drug-library ceiling",
    "rate_mismatch": "pump runs at a rate that was not commanded",
    "readback_mismatch": "pump read back a rate other than the one sent",
    "unexpected_infusion": "pump infuses without a command",
    "clock_step": "the wall clock stepped",
    "counter_not_cleared": "the pump's delivered-volume counter did not read back 0 after a clear",
    "counter_drop": "the pump's delivered-volume counter went back without a clear driverd ordered",
    "counter_step": "the pump's delivered-volume reading is too coarse (or not a number) to be judged",
    "report_unreadable": "the pump's rate or delivered-volume reading is not a number",
    "pump_range": "the pump cannot run the drug library's rates with this syringe (or states no rate range)",
    "planned_rate": "a rate of the approved course is outside the drug library's limits for the syringe",
}

#: HL7 table 0357 (message error condition codes) used in ERR-3.
HL7_ERRORS: Final[dict[str, str]] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

# A field value: a text, or the components of one repetition (a component is a text or its sub-components), or a
# list of repetitions. Every text in it is escaped when the message is rendered.
Component: TypeAlias = str | tuple[str, ...]
Repetition: TypeAlias = str | tuple[Component, ...]
FieldValue: TypeAlias = Repetition | list[Repetition]
Segment: TypeAlias = tuple[str, dict[int, FieldValue]]


@dataclass(frozen=True, slots=True)
class MessageHeader:
    """The MSH fields of a received message that a reply needs; HD fields keep all their components."""

    control_id: str  # MSH-10
    sending_application: tuple[str, ...]  # MSH-3
    sending_facility: tuple[str, ...]  # MSH-4
    receiving_application: tuple[str, ...]  # MSH-5
    receiving_facility: tuple[str, ...]  # MSH-6
    message_code: str  # MSH-9.1
    trigger_event: str  # MSH-9.2
    structure: str  # MSH-9.3
    processing_id: str  # MSH-11.1
    version: str  # MSH-12.1
    accept_ack_type: str  # MSH-15
    application_ack_type: str  # MSH-16

    @property
    def sender(self) -> Endpoint:
        return Endpoint(_first(self.sending_application), _first(self.sending_facility))


@dataclass(frozen=True, slots=True)
class AckInfo:
    """What an acknowledgement of one of our messages says."""

    acked_control_id: str  # MSA-2: the MSH-10 of the message acknowledged
    code: str  # MSA-1: AA, AE, AR, CA, CE or CR
    text: str  # MSA-3, else ERR-8, else the ERR-3 text ("" when none)


# ---------------------------------------------------------------------------------------------- values


def dtm(at: datetime) -> str:
    """HL7 DTM with milliseconds and the UTC offset IHE PCD requires (TF-2 C.4), e.g. 20261202162435.123+0000.
    Milliseconds are truncated, never rounded up into the next second."""
    offset = at.utcoffset()
    if offset is None:
        raise MessageError(f"naive datetime {at.isoformat()}: an HL7 DTM needs a UTC offset")
    if offset % timedelta(minutes=1):
        raise MessageError(f"UTC offset {offset} is not whole minutes: not expressible as +HHMM")
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return (
        f"{at.year:04d}{at.month:02d}{at.day:02d}{at.hour:02d}{at.minute:02d}{at.second:02d}"
        f".{at.microsecond // 1000:03d}{sign}{hours:02d}{mins:02d}"
    )


def nm(value: Decimal) -> str:
    """An HL7 NM from a Decimal: plain digits, never an exponent, trailing zeros kept (they carry precision)."""
    if not isinstance(value, Decimal) or not value.is_finite():
        raise MessageError(f"{value!r} is not a finite decimal")
    return fmt_dec(value + Decimal(0) if value.is_zero() else value)  # no "-0"


def ascii_text(text: str) -> str:
    """Printable ASCII only: line breaks and tabs become spaces, anything else outside 0x20-0x7E becomes "?"."""
    return "".join(c if " " <= c <= "~" else (" " if c in "\r\n\t" else "?") for c in text)


# ---------------------------------------------------------------------------------------------- rendering


def _new_message() -> hl7.Message:
    return hl7.Message(separator="\r", sequence=[], esc="\\", separators=_SEPARATORS)


_ESCAPER: Final = _new_message()  # only its escape() is used: python-hl7's escaping with our separators


@functools.lru_cache(maxsize=4096)
def _escape(text: str) -> str:
    """python-hl7's escaping of one leaf value (after reducing it to printable ASCII). Cached: the same names,
    codes and units recur in every message, and this is the per-message cost that matters at 256 pumps."""
    escaped: str = _ESCAPER.escape(ascii_text(text))
    return escaped


def _trim(items: Sequence[Component]) -> list[Component]:
    out = list(items)
    while out and not any(out[-1]):  # trailing empty components (or sub-components) are left out
        out.pop()
    return out


def _field(value: FieldValue) -> str:
    """One field as ER7 text: repetitions, components and sub-components joined by their separators (the
    containers' own str() does exactly this join; built directly, it costs a tenth as much)."""
    if isinstance(value, str):  # the common case: one plain value (or none)
        return _escape(value) if value else ""
    reps = value if isinstance(value, list) else [value]
    out = []
    for rep in reps:
        comps = _trim((rep,) if isinstance(rep, str) else rep)
        built = []
        for comp in comps:
            subs = [comp] if isinstance(comp, str) else list(_trim(comp))
            built.append(_SUB.join(_escape(str(s)) for s in subs))
        out.append(_COMP.join(built))
    return _REP.join(out)


def render(segments: Sequence[Segment]) -> str:
    """The ER7 text of a message: segments separated (and ended) by CR, every text value escaped."""
    lines = []
    for name, fields in segments:
        parts = [name]
        first = 1
        if name == "MSH":  # MSH-1 and MSH-2 are the separators themselves, never escaped
            parts.append(_ENCODING)
            first = 3
        last = max((i for i, v in fields.items() if _nonempty(v)), default=first - 1)
        parts.extend(_field(fields.get(i, "")) for i in range(first, last + 1))
        lines.append("|".join(parts))
    return "\r".join(lines) + "\r"


def _nonempty(value: FieldValue) -> bool:
    if isinstance(value, str):
        return value != ""
    if isinstance(value, tuple):
        return any(_nonempty(c) if isinstance(c, str) else any(c) for c in value)
    return any(_nonempty(r) for r in value)


# ---------------------------------------------------------------------------------------------- segments


def _first(parts: tuple[str, ...]) -> str:
    return parts[0] if parts else ""


def _need(value: str, what: str) -> str:
    if not value:
        raise MessageError(f"{what} must not be empty")
    return value


def _msh(
    sender: Endpoint,
    receiver_app: FieldValue,
    receiver_fac: FieldValue,
    at: str,
    message_type: tuple[str, str, str],
    control_id: str,
    ack_types: tuple[str, str],
    profile: tuple[str, ...] | None,
) -> Segment:
    fields: dict[int, FieldValue] = {
        3: sender.application,
        4: sender.facility,
        5: receiver_app,
        6: receiver_fac,
        7: at,
        9: message_type,
        10: _need(control_id, "control id"),
        11: "P",
        12: VERSION,
        15: ack_types[0],
        16: ack_types[1],
    }
    if profile is not None:
        fields[21] = profile
    return ("MSH", fields)


def _pid(patient_ref: str | None) -> Segment:
    # IHE PCD TF-2 B.5: no name is known to driverd, so PID-5 carries only name type "U" (unspecified). With no
    # patient associated, PID-3 stays empty and PID-31 (identity unknown) is "Y".
    if not patient_ref:
        return ("PID", {5: ("", "", "", "", "", "", "U"), 31: "Y"})
    return ("PID", {3: patient_ref, 5: ("", "", "", "", "", "", "U"), 31: "N"})


class _Observations:
    """OBX segments numbered in order (OBX-1), each with its containment sub-id (OBX-4)."""

    def __init__(self, at: str, equipment: tuple[str, ...]) -> None:
        self.at = at
        self.equipment = equipment
        self.segments: list[Segment] = []

    def add(self, fields: dict[int, FieldValue]) -> None:
        self.segments.append(("OBX", {1: str(len(self.segments) + 1), **fields}))

    def device(self, code: Code, sub_id: str) -> None:
        self.add({3: code.cwe(), 4: sub_id, 11: "X", 14: self.at, 18: self.equipment})

    def metric(self, value_type: str, code: Code, sub_id: str, value: FieldValue, units: FieldValue = "") -> None:
        self.add({2: value_type, 3: code.cwe(), 4: sub_id, 5: value, 6: units, 11: "R", 14: self.at})


# ---------------------------------------------------------------------------------------------- PCD-01


def observation_message(obs: Observation, control_id: str, sender: Endpoint, receiver: Endpoint) -> str:
    """PCD-01 Communicate PCD Data (ORU^R01^ORU_R01) for one pump. A value that is unknown (None) is left out,
    never sent empty. The containment is MDS 1.0.0.0 > VMD 1.1.0.0 > delivery channel 1.1.1.0 and primary source
    channel 1.1.2.0 (as in IHE PCD TF-2 M.1.2.2); metric sub-ids are fixed, so a left-out metric leaves a gap."""
    at = dtm(obs.at)
    pump = _need(obs.pump_id, "pump id")
    equipment = (pump, obs.pump_model) if obs.pump_model else (pump,)
    obx = _Observations(at, equipment)
    obx.device(MDS_PUMP, "1.0.0.0")
    obx.device(VMD_PUMP, "1.1.0.0")
    obx.device(CHAN_DELIVERY, "1.1.1.0")
    if obs.pump_state:
        infusing = obs.pump_state == "infusing"
        status = "pump-status-infusing" if infusing else "pump-status-not-infusing"
        obx.metric("CWE", INFUSING_STATUS, "1.1.1.1", ("", status, "", obs.pump_state, obs.pump_state, LOCAL))
        if not infusing:
            reason = "pump-stopped-alarm" if obs.pump_state == "alarm" else "pump-stopped-nos"
            obx.metric("CWE", NOT_INFUSING_REASON, "1.1.1.2", ("", reason))
    if obs.link:
        obx.metric("ST", LOCAL_LINK, "1.1.1.3", obs.link)
    if obs.alarms:
        obx.metric("ST", LOCAL_ALARMS, "1.1.1.4", list(obs.alarms))  # one repetition per cause
    obx.device(CHAN_SOURCE, "1.1.2.0")
    if obs.rate_ml_per_h is not None:
        obx.metric("NM", FLOW_FLUID_PUMP, "1.1.2.1", nm(obs.rate_ml_per_h), UNIT_ML_PER_H)
    obx.metric("NM", LOCAL_COMMANDED, "1.1.2.2", nm(obs.commanded_ml_per_h), UNIT_ML_PER_H)
    obx.metric("NM", RATE_DOSE, "1.1.2.3", nm(obs.dose_mg_per_24h), UNIT_MG_PER_DAY)
    if obs.delivered_ml is not None:
        obx.metric("NM", VOL_DELIVERED, "1.1.2.4", nm(obs.delivered_ml), UNIT_ML)
    if obs.drug_name:
        obx.metric("ST", DRUG_NAME, "1.1.2.5", obs.drug_name)
    if obs.concentration_mg_per_ml is not None:
        obx.metric("NM", CONC_DRUG, "1.1.2.6", nm(obs.concentration_mg_per_ml), UNIT_MG_PER_ML)
    if obs.phase:
        obx.metric("ST", LOCAL_PHASE, "1.1.2.7", obs.phase)
    if obs.course_id:
        obx.metric("ST", LOCAL_COURSE, "1.1.2.8", obs.course_id)
    # OBR-4 names the medication (TF-2 B.7: "the service ... is the substance"), or TF's "Medication Unknown".
    service = (obs.drug_name, obs.drug_name, LOCAL) if obs.drug_name else ("999999", "Medication Unknown")
    segments: list[Segment] = [
        _msh(sender, receiver.application, receiver.facility, at, ("ORU", "R01", "ORU_R01"), control_id,
             ("AL", "NE"), PCD01_PROFILE),
        _pid(obs.patient_ref),
        ("PV1", {2: "U"}),
        ("OBR", {1: "1", 3: (control_id, sender.application), 4: service, 7: at}),
        *obx.segments,
    ]
    return render(segments)


# ---------------------------------------------------------------------------------------------- PCD-04


def event_code(cause: str) -> tuple[str, ...]:
    """OBX-5 of the event identification facet: the 11073 event when there is one, with driverd's cause as the
    alternate (local) triplet; a local code alone otherwise."""
    local = (cause, CAUSE_TEXT.get(cause, cause), LOCAL)
    mdc = MDC_EVENTS.get(cause)
    return mdc.cwe(*local) if mdc is not None else local


def alert_message(alert: Alert, control_id: str, sender: Endpoint, receiver: Endpoint) -> str:
    """PCD-04 Report Alert (ORU^R40^ORU_R40) for one alarm raised (phase "start") or cleared ("end").

    Alert identity follows IHE PCD TF-2 B.7 and CP-PCD-151: the raise carries alert_id in OBR-3 and an empty
    OBR-29; the clear carries `<alert_id>.end` in OBR-3 and alert_id in OBR-29.2 (the parent), which pairs them."""
    if alert.phase not in ("start", "end"):
        raise MessageError(f"alert phase {alert.phase!r} is neither start nor end")
    if alert.priority not in ("PH", "PM", "PL"):
        raise MessageError(f"alert priority {alert.priority!r} is not PH, PM or PL")
    at = dtm(alert.at)
    alert_id = _need(alert.alert_id, "alert id")
    start = alert.phase == "start"
    obr: dict[int, FieldValue] = {1: "1", 3: (alert_id, sender.application), 4: EVT_ALARM.cwe(), 7: at}
    if not start:
        obr[3] = (f"{alert_id}.end", sender.application)
        obr[29] = ("", (alert_id, sender.application))
    facet = "1.0.0.0."
    obx = _Observations(at, (_need(alert.pump_id, "pump id"),))
    obx.add({2: "CWE", 3: EVT_ALARM.cwe(), 4: facet + "1", 5: event_code(alert.cause), 11: "F", 14: at,
             18: obx.equipment})
    note: list[Segment] = [("NTE", {1: "1", 3: alert.detail})] if alert.detail else []
    obx.add({2: "CWE", 3: ALERT_SOURCE.cwe(), 4: facet + "2", 5: MDS_PUMP.cwe(), 11: "F", 14: at,
             18: obx.equipment})
    obx.add({2: "ST", 3: EVENT_PHASE.cwe(), 4: facet + "3", 5: alert.phase, 11: "F"})
    obx.add({2: "ST", 3: ALARM_STATE.cwe(), 4: facet + "4", 5: "active" if start else "inactive", 11: "F"})
    # driverd has no alarm signal of its own to inactivate, so the inactivation state is left empty (TF-2 B.8.5).
    obx.add({2: "ST", 3: INACTIVATION_STATE.cwe(), 4: facet + "5", 11: "F"})
    obx.add({2: "ST", 3: ALARM_PRIORITY.cwe(), 4: facet + "6", 5: alert.priority, 11: "F"})
    # Every driverd alarm is about the pump or the infusion, not a physiological measurement: technical (ST).
    obx.add({2: "ST", 3: ALERT_TYPE.cwe(), 4: facet + "7", 5: "ST", 11: "F"})
    segments: list[Segment] = [
        _msh(sender, receiver.application, receiver.facility, at, ("ORU", "R40", "ORU_R40"), control_id,
             ("AL", "NE"), PCD04_PROFILE),
        _pid(alert.patient_ref),
        ("OBR", obr),
        obx.segments[0],
        *note,
        *obx.segments[1:],
    ]
    return render(segments)


# ---------------------------------------------------------------------------------------------- PCD-03 replies


def _condition(code: str | None, default: str) -> tuple[str, str, str]:
    chosen = default if code is None else code
    if chosen not in HL7_ERRORS:
        raise MessageError(f"{chosen!r} is not an HL7 table 0357 error condition")
    return (chosen, HL7_ERRORS[chosen], "HL70357")


_LOCATION = re.compile(r"([A-Z][A-Z0-9]{2})(?:-([1-9][0-9]{0,2})(?:\.([1-9][0-9]{0,2}))?)?")


def error_location(field: str) -> tuple[str, ...]:
    """ERR-2 (ERL) for a field name such as "RXG-15" or "OBX-18.1": segment, first occurrence, field, first
    repetition, component. () when the name is not a segment field."""
    m = _LOCATION.fullmatch(field)
    if m is None:
        return ()
    seg, fld, comp = m.groups()
    if fld is None:
        return (seg, "1")
    return (seg, "1", fld, "1", comp) if comp else (seg, "1", fld)


def _reply_msh(header: MessageHeader, sender: Endpoint, at: datetime, message_type: tuple[str, str, str],
               control_id: str, ack_types: tuple[str, str], profile: tuple[str, ...] | None) -> Segment:
    return _msh(sender, header.sending_application, header.sending_facility, dtm(at), message_type, control_id,
                ack_types, profile)


def _ack_trigger(header: MessageHeader) -> str:
    # An ACK echoes the trigger event it acknowledges; a garbled one is answered as the order it should have been.
    return header.trigger_event if re.fullmatch(r"[A-Z0-9]{3}", header.trigger_event) else "O15"


def accept_ack(order_header: MessageHeader, control_id: str, code: Literal["CA", "CR"], sender: Endpoint,
               text: str = "", *, at: datetime, condition: str | None = None) -> str:
    """The accept acknowledgement (ACK^O15^ACK, enhanced mode) of a received message. A CR carries an ERR with
    `condition` (HL7 table 0357, default 207) and `text` as the user message (ERR-8); a CA carries no ERR."""
    if code not in ("CA", "CR"):
        raise MessageError(f"accept acknowledgement code {code!r} is not CA or CR")
    segments: list[Segment] = [
        _reply_msh(order_header, sender, at, ("ACK", _ack_trigger(order_header), "ACK"), control_id, ("NE", "NE"),
                   None),
        ("MSA", {1: code, 2: order_header.control_id}),
    ]
    if code == "CR":
        segments.append(("ERR", {3: _condition(condition, "207"), 4: "E", 8: text}))
    return render(segments)


def order_reply(order_header: MessageHeader, control_id: str, code: Literal["AA", "AE", "AR"], sender: Endpoint,
                *, at: datetime, error_code: str = "", error_text: str = "", error_field: str = "",
                condition: str | None = None) -> str:
    """The application acknowledgement (RRG^O16^RRG_O16) of a PCD-03 order. AE and AR carry one ERR: ERR-2 the
    location of `error_field` when it names a field, ERR-3 `condition` (HL7 table 0357, default 207), ERR-4 "E",
    ERR-5 `error_code^error_text^99DRVD`, ERR-8 `error_text`. AA takes no error arguments."""
    if code not in ("AA", "AE", "AR"):
        raise MessageError(f"application acknowledgement code {code!r} is not AA, AE or AR")
    segments: list[Segment] = [
        _reply_msh(order_header, sender, at, ("RRG", "O16", "RRG_O16"), control_id, ("AL", "NE"), RRG_PROFILE),
        ("MSA", {1: code, 2: order_header.control_id}),
    ]
    if code == "AA":
        if error_code or error_text or error_field or condition is not None:
            raise MessageError("an AA reply carries no error")
    else:
        err: dict[int, FieldValue] = {3: _condition(condition, "207"), 4: "E", 8: error_text}
        if error_field:
            err[2] = error_location(error_field)
        if error_code:
            err[5] = (error_code, error_text, LOCAL)
        segments.append(("ERR", err))
    return render(segments)


# ---------------------------------------------------------------------------------------------- ACK in

ACK_CODES: Final = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
MAX_ACK_CHARS: Final = 65_536
_ESCAPES = re.compile(r"(?:[^\\]|\\[FSTRE]\\)*")  # only the delimiter escapes; nothing that decodes to a control


def parse_ack(text: str) -> AckInfo:
    """Read the acknowledgement of one of our messages. Raises AckError naming the field for anything else."""
    if not isinstance(text, str):
        raise AckError("message", "not text")
    if len(text) > MAX_ACK_CHARS:
        raise AckError("message", f"longer than {MAX_ACK_CHARS} characters")
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip()
    if re.search(r"[\x00-\x0c\x0e-\x1f\x7f-\x9f]", text):
        raise AckError("message", "control characters")
    if not text.startswith("MSH|" + _ENCODING + "|"):
        raise AckError("MSH", "not an HL7 v2 message with standard encoding characters ^~\\&")
    try:
        msg = hl7.parse(text)
    except (hl7.ParseException, ValueError, IndexError) as exc:
        raise AckError("message", f"not parseable: {exc}") from None
    names = [raw_value(seg, 0, 1, 1, 1) for seg in msg]
    if names.count("MSH") != 1:
        raise AckError("MSH", "exactly one MSH segment expected")
    if names.count("MSA") != 1:
        raise AckError("MSA", "exactly one MSA segment expected")
    msh, msa = msg.segment("MSH"), msg.segment("MSA")
    if _ack_value(msg, msh, "MSH-9", 9, 1) != "ACK":
        raise AckError("MSH-9", "not an ACK message")
    code = _ack_value(msg, msa, "MSA-1", 1, 1)
    if code not in ACK_CODES:
        raise AckError("MSA-1", f"acknowledgement code {code!r} is not one of {sorted(ACK_CODES)}")
    acked = _ack_value(msg, msa, "MSA-2", 2, 1)
    if not acked:
        raise AckError("MSA-2", "the acknowledged message control id is missing")
    reason = _ack_value(msg, msa, "MSA-3", 3, 1)
    if not reason and "ERR" in names:
        err = msg.segment("ERR")
        reason = _ack_value(msg, err, "ERR-8", 8, 1) or _ack_value(msg, err, "ERR-3", 3, 2)
    return AckInfo(acked, code, reason)


def _ack_value(msg: hl7.Message, seg: hl7.Segment, name: str, field: int, comp: int) -> str:
    raw = raw_value(seg, field, 1, comp, 1)
    if not _ESCAPES.fullmatch(raw):
        raise AckError(name, "unsupported escape sequence")
    value: str = msg.unescape(raw)
    if len(value) > 1000:
        raise AckError(name, "longer than 1000 characters")
    if not value.isprintable():
        raise AckError(name, "control characters")
    return value


def raw_value(seg: hl7.Segment, field: int, rep: int, comp: int, sub: int) -> str:
    """The raw (still escaped) text at field/repetition/component/sub-component, "" when absent. python-hl7 keeps a
    text that has no separators as a bare string at whatever level it stopped, so each level is checked."""
    if field >= len(seg):
        return ""
    node: object = seg[field]
    for index in (rep, comp, sub):
        if isinstance(node, str):
            return node if index == 1 else ""
        assert isinstance(node, list)
        if index > len(node):
            return ""
        node = node[index - 1]
    return node if isinstance(node, str) else str(node)
