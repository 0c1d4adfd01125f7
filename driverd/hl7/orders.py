"""PCD-03 (IHE PCD PIV, RGV^O15^RGV_O15) orders in: parse the text into an `Order`, and map an Order onto the
clinician command it asks for. docs/hl7.md has the field table and the mapping.

Pure. `parse_order` raises `OrderRejected(field, rule)` for anything that is not a valid order, and nothing else;
`rule` is one of `RULES`. `plan_order` only maps: the course state machine and the safety kernel still decide
whether the command runs (an escalation to a dose that is not the next step is refused there, not here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Final, Literal

import hl7

from driverd.core.errors import QuantityError
from driverd.core.kernel import pump_rate
from driverd.core.protocol import ProtocolSpec
from driverd.core.quantities import (
    _CTX,
    HOURS_PER_DAY,
    MAX_CONCENTRATION_MG_PER_ML,
    MAX_DOSE_MG_PER_24H,
    MAX_RATE_ML_PER_H,
    MAX_VOLUME_ML,
)
from driverd.core.state import ACTIVE, CourseState
from driverd.hl7.messages import MessageHeader, raw_value
from driverd.hl7.model import Order, OrderAction, OrderRejected

MAX_MESSAGE_CHARS: Final = 65_536
MAX_ID_CHARS: Final = 199  # MSH-10 and the EI/CX/XCN identifiers (HL7 v2.6 ST length of MSH-10)
MAX_NUMBER_CHARS: Final = 20

#: ORC-1 order control codes driverd acts on (HL7 table 0119), and the clinician command each one becomes.
ORDER_CONTROLS: Final[dict[str, OrderAction | None]] = {
    "NW": None,  # new order: a rate, mapped below
    "XO": None,  # change order: a rate, mapped below
    "HD": None,  # refused: see NOT_BY_ORDER
    "RL": None,  # refused: see NOT_BY_ORDER
    "DC": "stop",
    "CA": "stop",
    "OC": "stop",
}
#: Valid order controls that driverd answers AE `unsupported`, because what they mean is not what a driverd
#: command would do. HL7's HD suspends the order (the infusion would stop), while driverd's `hold` keeps the pump
#: infusing and only stops the titration: mapping one onto the other would answer "programmed" while the pump runs
#: on. RL releases a hold, and driverd's `resume` also acknowledges a pump alarm and restarts the pump: that needs a
#: clinician at the bedside, never a remote order.
NOT_BY_ORDER: Final[dict[str, str]] = {
    "HD": "HD (hold/suspend the order) is not done by order: send DC to stop the infusion, or XO with a lower rate; "
          "a clinician holds the titration with `driverd course hold`",
    "RL": "RL (release a hold) is not done by order: resuming a pump needs a clinician at the bedside "
          "(`driverd course resume`)",
}

#: rule -> (HL7 table 0357 condition for ERR-3, what it means). OrderRejected.rule is always a key of this table.
RULES: Final[dict[str, tuple[str, str]]] = {
    "not_hl7": ("100", "not an HL7 v2 message starting with an MSH segment"),
    "encoding": ("102", "encoding characters are not the standard ^~\\&"),
    "message_type": ("200", "not an RGV^O15 order"),
    "processing_id": ("202", "not a production message (MSH-11 must be P)"),
    "missing_segment": ("100", "a required segment is missing"),
    "repeated_segment": ("100", "segment repeated: one order with one give per message"),
    "segment_order": ("100", "segment out of order"),
    "required": ("101", "required field missing"),
    "code": ("103", "value not in the supported table"),
    "unit": ("103", "unit not supported"),
    "number": ("102", "not a decimal number"),
    "negative": ("102", "must not be negative"),
    "zero": ("102", "must be greater than zero"),
    "magnitude": ("102", "implausibly large"),
    "length": ("102", "too long"),
    "control_chars": ("102", "control or non-printable characters"),
    "escape": ("102", "unsupported escape sequence"),
    "ambiguous": ("207", "conflicting values"),
}

_CONTROL = re.compile(r"[\x00-\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPES = re.compile(r"(?:[^\\]|\\[FSTRE]\\)*")  # only the delimiter escapes: nothing decodes to a control
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_PREFIX: Final = "MSH|^~\\&|"


def _reject(field: str, rule: str) -> OrderRejected:
    assert rule in RULES
    return OrderRejected(field, rule)


def rejection_condition(rejected: OrderRejected) -> str:
    """The HL7 table 0357 code for ERR-3 of the AR reply to this rejection."""
    return RULES.get(rejected.rule, ("207", ""))[0]


def rejection_text(rejected: OrderRejected) -> str:
    """A user message for ERR-8, e.g. "RXG-15: not a decimal number"."""
    return f"{rejected.field}: {RULES.get(rejected.rule, ('', rejected.rule))[1]}"


# ---------------------------------------------------------------------------------------------- reading


def _normalise(text: str) -> str:
    # Some senders end segments with LF or CRLF instead of CR; everything else stays as sent.
    return text.replace("\r\n", "\r").replace("\n", "\r").strip(" \r")


def _parse(text: object, whole: bool) -> hl7.Message:
    """python-hl7's parse after the checks that make it unable to fail: length, control characters, MSH with the
    standard encoding characters. `whole=False` reads the MSH line only."""
    if not isinstance(text, str):
        raise _reject("message", "not_hl7")
    if not whole:  # only the MSH line: a reject can be addressed whatever follows it
        text = _normalise(text[:MAX_MESSAGE_CHARS + 1]).split("\r", 1)[0]
    if len(text) > MAX_MESSAGE_CHARS:
        raise _reject("message", "length")
    text = _normalise(text)
    if _CONTROL.search(text):
        raise _reject("message", "control_chars")
    if not text.startswith(_PREFIX):
        raise _reject("MSH-2", "encoding") if text.startswith("MSH") else _reject("message", "not_hl7")
    try:
        return hl7.parse(text)
    except (hl7.ParseException, ValueError, IndexError):
        raise _reject("message", "not_hl7") from None


class _Reader:
    """Field values of one parsed message, unescaped and checked (printable, bounded) as they are read."""

    def __init__(self, msg: hl7.Message) -> None:
        self.msg = msg
        self.names = [raw_value(seg, 0, 1, 1, 1) for seg in msg]

    def segments(self, name: str) -> list[hl7.Segment]:
        return [seg for seg, n in zip(self.msg, self.names, strict=True) if n == name]

    def one(self, name: str, required: bool = True) -> hl7.Segment | None:
        found = self.segments(name)
        if len(found) > 1:
            raise _reject(name, "repeated_segment")
        if not found and required:
            raise _reject(name, "missing_segment")
        return found[0] if found else None

    def value(self, seg: hl7.Segment, name: str, field: int, comp: int = 1, sub: int = 1, rep: int = 1,
              limit: int = MAX_ID_CHARS) -> str:
        raw = raw_value(seg, field, rep, comp, sub)
        if not _ESCAPES.fullmatch(raw):
            raise _reject(name, "escape")
        value: str = self.msg.unescape(raw)
        if not value.isprintable():
            raise _reject(name, "control_chars")
        if len(value) > limit:
            raise _reject(name, "length")
        return value

    def single(self, seg: hl7.Segment, name: str, field: int, *, components: bool) -> None:
        """Refuse a field that holds more than one value where the order needs one (`ambiguous`): a repetition
        (`300~2.083`), and with `components=False` a component or sub-component too (`300^2.083`). Which one the
        sender meant is not for driverd to guess (only the first used to be read)."""
        if field >= len(seg) or isinstance(seg[field], str):
            return
        node = seg[field]
        if len(node) > 1 or (not components and any(sep in str(node) for sep in "^&")):
            raise _reject(name, "ambiguous")

    def components(self, seg: hl7.Segment, name: str, field: int, count: int) -> tuple[str, ...]:
        return tuple(self.value(seg, name, field, comp=i) for i in range(1, count + 1))


def _header(reader: _Reader) -> MessageHeader:
    msh = reader.msg[0]
    control_id = reader.value(msh, "MSH-10", 10)
    if not control_id:
        raise _reject("MSH-10", "required")
    return MessageHeader(
        control_id=control_id,
        sending_application=_hd(reader.components(msh, "MSH-3", 3, 3)),
        sending_facility=_hd(reader.components(msh, "MSH-4", 4, 3)),
        receiving_application=_hd(reader.components(msh, "MSH-5", 5, 3)),
        receiving_facility=_hd(reader.components(msh, "MSH-6", 6, 3)),
        message_code=reader.value(msh, "MSH-9", 9, 1),
        trigger_event=reader.value(msh, "MSH-9", 9, 2),
        structure=reader.value(msh, "MSH-9", 9, 3),
        processing_id=reader.value(msh, "MSH-11", 11, 1),
        version=reader.value(msh, "MSH-12", 12, 1),
        accept_ack_type=reader.value(msh, "MSH-15", 15),
        application_ack_type=reader.value(msh, "MSH-16", 16),
    )


def _hd(parts: tuple[str, ...]) -> tuple[str, ...]:
    out = list(parts)
    while out and not out[-1]:
        out.pop()
    return tuple(out)


def read_header(text: str) -> MessageHeader | None:
    """The MSH fields of anything whose first segment is a readable MSH with a control id (MSH-10), so that even
    garbage behind it can be answered with a reject. None when there is no such MSH."""
    try:
        return _header(_Reader(_parse(text, whole=False)))
    except OrderRejected:
        return None


# ---------------------------------------------------------------------------------------------- numbers, units


def _number(reader: _Reader, seg: hl7.Segment, name: str, field: int, maximum: Decimal) -> Decimal | None:
    reader.single(seg, name, field, components=False)
    text = reader.value(seg, name, field, limit=MAX_NUMBER_CHARS)
    if not text:
        return None
    if not _NUMBER.fullmatch(text):
        raise _reject(name, "number")
    value = Decimal(text)  # exact: the pattern admits no exponent, NaN or infinity
    if value < 0:
        raise _reject(name, "negative")
    if value > maximum:
        raise _reject(name, "magnitude")
    return value + Decimal(0) if value.is_zero() else value  # "-0" is 0


@dataclass(frozen=True, slots=True)
class _Unit:
    key: str  # the normalised unit
    mdc: str  # MDC code
    refid: str  # MDC reference id
    spellings: frozenset[str]  # UCUM and common spellings, compared exactly: UCUM is case-sensitive


# Exact spellings only: in UCUM `Mg` is megagram and `ML` is not litre, so `Mg/d` must not read as mg/24h. `l` and
# `L` are both litre in UCUM, hence `ml/h` and `mL/h`.
RATE_UNITS: Final = (
    _Unit("mL/h", "265266", "MDC_DIM_MILLI_L_PER_HR", frozenset({"mL/h", "ml/h", "mL/hr", "ml/hr"})),
    _Unit("mg/24h", "265554", "MDC_DIM_MILLI_G_PER_DAY", frozenset({"mg/(24.h)", "mg/24h", "mg/d", "mg/day"})),
)
STRENGTH_UNITS: Final = (
    _Unit("mg/mL", "264306", "MDC_DIM_MILLI_G_PER_ML", frozenset({"mg/mL", "mg/ml"})),
    _Unit("mg", "263890", "MDC_DIM_MILLI_G", frozenset({"mg"})),
)
VOLUME_UNITS: Final = (_Unit("mL", "263762", "MDC_DIM_MILLI_L", frozenset({"mL", "ml"})),)


def _triplet_unit(code: str, text: str, system: str, units: tuple[_Unit, ...]) -> str | None:
    """The unit one CWE triplet names, None when it is empty; raises ValueError when any of its parts names
    something else (a code and a text that disagree are not a unit)."""
    found: set[str] = set()
    for token in (code, text):
        if not token:
            continue
        if system == "MDC":
            match = [u.key for u in units if token in (u.mdc, u.refid)]
        elif system in ("", "UCUM"):
            match = [u.key for u in units if token in u.spellings]
        else:
            match = []
        if not match:
            raise ValueError(token)
        found.update(match)
    if len(found) > 1:
        raise ValueError(code)
    return found.pop() if found else None


def _unit(reader: _Reader, seg: hl7.Segment, name: str, field: int, units: tuple[_Unit, ...]) -> str | None:
    """The unit a CWE field names: every non-empty triplet (primary, alternate) must name the same known unit."""
    reader.single(seg, name, field, components=True)
    parts = reader.components(seg, name, field, 6)
    try:
        named = {u for u in (_triplet_unit(parts[0], parts[1], parts[2], units),
                             _triplet_unit(parts[3], parts[4], parts[5], units)) if u}
    except ValueError:
        raise _reject(name, "unit") from None
    if len(named) > 1:
        raise _reject(name, "unit")
    return named.pop() if named else None


def _concentration(reader: _Reader, rxg: hl7.Segment) -> Decimal | None:
    """mg/mL from RXG-17/18 (mg/mL), or RXG-17 (mg) over RXG-23/24 (mL); None when RXG-17 is empty."""
    strength = _number(reader, rxg, "RXG-17", 17, MAX_DOSE_MG_PER_24H)
    if strength is None:
        return None
    if strength == 0:
        raise _reject("RXG-17", "zero")
    unit = _unit(reader, rxg, "RXG-18", 18, STRENGTH_UNITS)
    if unit is None:
        raise _reject("RXG-18", "required")
    if unit == "mg/mL":
        if strength > MAX_CONCENTRATION_MG_PER_ML:
            raise _reject("RXG-17", "magnitude")
        return strength
    volume = _number(reader, rxg, "RXG-23", 23, MAX_VOLUME_ML)
    if volume is None:
        raise _reject("RXG-23", "required")
    if volume == 0:
        raise _reject("RXG-23", "zero")
    if _unit(reader, rxg, "RXG-24", 24, VOLUME_UNITS) is None:
        raise _reject("RXG-24", "required")
    with localcontext(_CTX):
        concentration = strength / volume
    if concentration > MAX_CONCENTRATION_MG_PER_ML:
        raise _reject("RXG-17", "magnitude")
    return concentration


# ---------------------------------------------------------------------------------------------- the order

#: OBX-3 identifiers (MDC code or reference id) of a device-level OBX that names the pump in OBX-18.
PUMP_DEVICES: Final = frozenset({"69985", "69986", "MDC_DEV_PUMP_INFUS_MDS", "MDC_DEV_PUMP_INFUS_VMD"})


def _pump_id(reader: _Reader) -> str:
    ids: set[str] = set()
    device = False
    for obx in reader.segments("OBX"):
        code, refid = reader.components(obx, "OBX-3", 3, 2)
        if code in PUMP_DEVICES or refid in PUMP_DEVICES or refid.startswith("MDC_DEV_PUMP"):
            device = True
            reader.single(obx, "OBX-18", 18, components=True)
            pump = reader.value(obx, "OBX-18", 18)
            if pump:
                ids.add(pump)
    if len(ids) > 1:
        raise _reject("OBX-18", "ambiguous")
    if not ids:
        raise _reject("OBX-18", "required") if device else _reject("OBX", "missing_segment")
    return ids.pop()


def parse_order(text: str) -> Order:
    """A PCD-03 order as an `Order`, or OrderRejected(field, rule) naming the first field found wrong."""
    reader = _Reader(_parse(text, whole=True))
    header = _header(reader)
    if reader.names.count("MSH") > 1:
        raise _reject("MSH", "repeated_segment")
    if (header.message_code, header.trigger_event) != ("RGV", "O15") or header.structure not in ("", "RGV_O15"):
        raise _reject("MSH-9", "message_type")
    if header.processing_id != "P":
        raise _reject("MSH-11", "processing_id")
    orc, rxg = reader.one("ORC"), reader.one("RXG")
    assert orc is not None and rxg is not None
    if reader.names.index("ORC") > reader.names.index("RXG"):
        raise _reject("RXG", "segment_order")
    pid = reader.one("PID", required=False)

    control = reader.value(orc, "ORC-1", 1)
    if not control:
        raise _reject("ORC-1", "required")
    if control not in ORDER_CONTROLS:
        raise _reject("ORC-1", "code")
    by = reader.value(orc, "ORC-12", 12)
    if not by:
        raise _reject("ORC-12", "required")
    drug_id, drug_text = reader.components(rxg, "RXG-4", 4, 2)
    if not (drug_id or drug_text):
        raise _reject("RXG-4", "required")
    pump_id = _pump_id(reader)

    rate: Decimal | None = None
    rate_unit: Literal["mL/h", "mg/24h"] | None = None
    concentration: Decimal | None = None
    if control in ("NW", "XO"):  # a hold, resume or stop needs no rate: those fields are not read
        unit = _unit(reader, rxg, "RXG-16", 16, RATE_UNITS)
        limit = MAX_RATE_ML_PER_H if unit == "mL/h" else MAX_DOSE_MG_PER_24H
        rate = _number(reader, rxg, "RXG-15", 15, limit)
        if rate is None:
            raise _reject("RXG-15", "required")
        if unit is None:
            raise _reject("RXG-16", "required")
        rate_unit = "mL/h" if unit == "mL/h" else "mg/24h"
        concentration = _concentration(reader, rxg)

    patient = reader.value(pid, "PID-3", 3) if pid is not None else ""
    code, label, *_, original = reader.components(orc, "ORC-16", 16, 9)
    reason = label or original or code
    return Order(
        control_id=header.control_id,
        sender=header.sender,
        accept_ack=header.accept_ack_type != "NE",
        application_ack=header.application_ack_type != "NE",
        pump_id=pump_id,
        patient_ref=patient or None,
        order_control=control,
        placer_order=reader.value(orc, "ORC-2", 2),
        drug=drug_text or drug_id,
        concentration_mg_per_ml=concentration,
        rate=rate,
        rate_unit=rate_unit,
        by=by,
        reason=reason or f"HL7 order {header.control_id}",
        drug_identifier=drug_id,
    )


# ---------------------------------------------------------------------------------------------- the mapping


@dataclass(frozen=True, slots=True)
class Plan:
    """The clinician command an order becomes; dose only for escalate and reduce."""

    action: OrderAction
    dose_mg_per_24h: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an order maps to no command. `code` is one of REFUSALS."""

    code: str
    detail: str


REFUSALS: Final = (
    "no_course", "pump_mismatch", "patient_mismatch", "drug_mismatch", "concentration_mismatch", "no_rate",
    "unsupported", "no_change",
)


def _same_drug(order: Order, drug_name: str) -> bool:
    wanted = drug_name.casefold()
    return any(name and name.casefold() == wanted for name in (order.drug, order.drug_identifier))


def target_dose(order: Order, state: CourseState) -> Decimal:
    """The dose (mg/24h) an NW/XO order asks for. In mg/24h that is the rate itself. In mL/h it is the dose whose
    rate at this pump's resolution is exactly the ordered rate, among the schedule's steps, its taper doses and the
    current level (the current level first, then the lowest); failing that rate x concentration x 24, exactly
    (the concentration of the syringe in the pump now)."""
    assert order.rate is not None and state.schedule is not None
    if order.rate_unit == "mg/24h":
        return order.rate
    schedule = state.schedule
    if state.resolution is not None:
        doses = {s.dose_mg_per_24h for s in schedule.steps} | {t.dose_mg_per_24h for t in schedule.taper}
        doses = {d for d in doses | {state.level_mg_per_24h} if d > 0}
        matches = sorted(d for d in doses if _rate_of(state, d) == order.rate)
        if matches:
            return state.level_mg_per_24h if state.level_mg_per_24h in matches else matches[0]
    with localcontext(_CTX):
        return order.rate * state.concentration * HOURS_PER_DAY


def _rate_of(state: CourseState, dose: Decimal) -> Decimal | None:
    try:
        return pump_rate(state, dose)
    except QuantityError:  # a dose this pump cannot represent matches no ordered rate
        return None


def plan_order(order: Order, state: CourseState, protocol: ProtocolSpec) -> Plan | Refusal:
    """Map an order onto a clinician command, or say why it maps to none. Only a mapping: an order never creates
    a course, and whatever it maps to still goes through the course state machine and the safety kernel.
    (`protocol` is accepted for the gateway's uniform call; the limits in it are the kernel's to apply.)"""
    del protocol
    schedule = state.schedule
    if state.phase not in ACTIVE or schedule is None:
        return Refusal("no_course", f"no active course on {state.pump_id} ({state.phase.value}); "
                                    "an order never starts one")
    if order.pump_id != state.pump_id:
        return Refusal("pump_mismatch", f"order is for pump {order.pump_id!r}, not {state.pump_id!r}")
    if order.patient_ref is not None and order.patient_ref != schedule.patient_ref:
        return Refusal("patient_mismatch", "PID-3 is not the course's patient")
    if not _same_drug(order, schedule.drug_name):
        return Refusal("drug_mismatch", f"RXG-4 {order.drug!r} is not the course's drug {schedule.drug_name!r}")
    if order.order_control not in ORDER_CONTROLS:
        return Refusal("unsupported", f"ORC-1 {order.order_control!r} is not supported")
    if order.order_control in NOT_BY_ORDER:
        return Refusal("unsupported", NOT_BY_ORDER[order.order_control])
    action = ORDER_CONTROLS[order.order_control]
    if action is not None:
        return Plan(action)
    # The syringe in the pump now (a syringe change may have brought another approved concentration).
    if order.concentration_mg_per_ml != state.concentration:
        given = "none" if order.concentration_mg_per_ml is None else f"{order.concentration_mg_per_ml} mg/mL"
        return Refusal("concentration_mismatch",
                       f"ordered concentration {given}, the syringe is {state.concentration} mg/mL")
    if order.rate is None or order.rate_unit is None:
        return Refusal("no_rate", "a new or changed order needs a rate (RXG-15/16)")
    target = target_dose(order, state)
    level = state.level_mg_per_24h
    if target == 0:
        return Plan("stop")
    if target > level:
        return Plan("escalate", target)
    if target < level:
        return Plan("reduce", target)
    return Refusal("no_change", f"{target} mg/24h is the course's current level")
