"""PCD-03 orders: parse_order on orders built with hl7apy (an independent HL7 v2.6 builder) and on malformed text of
every kind, read_header, and plan_order's mapping of an order onto a clinician command."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import replace
from datetime import timedelta
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message as ApyMessage
from hl7apy.exceptions import ValidationError
from hl7apy.parser import parse_message
from hypothesis import given
from hypothesis import strategies as st

from driverd.core.commands import Refused
from driverd.core.errors import DriverdError
from driverd.core.events import ClinicianCommand
from driverd.core.kernel import pump_rate
from driverd.core.machine import reduce
from driverd.core.quantities import NEW_ERA_RESOLUTION, Resolution
from driverd.core.state import ACTIVE, CourseState, Phase
from driverd.hl7.model import Endpoint, Order, OrderRejected
from driverd.hl7.orders import (
    RATE_UNITS,
    REFUSALS,
    RULES,
    Plan,
    Refusal,
    parse_order,
    plan_order,
    read_header,
    rejection_condition,
    rejection_text,
    target_dose,
)
from tests.core.factories import PROTOCOL, T0, primed, schedule

D = Decimal
ML_H = "265266^MDC_DIM_MILLI_L_PER_HR^MDC"
MG_ML = "264306^MDC_DIM_MILLI_G_PER_ML^MDC"


def build(
    control: str = "XO",
    rate: str = "2.083",
    unit: str = ML_H,
    strength: str = "10",
    strength_unit: str = MG_ML,
    volume: str = "",
    volume_unit: str = "",
    pump: str = "pump-1",
    patient: str | None = "P-1",
    drug: str = "ketamine^Ketamine^99LOCAL",
    provider: str = "dr-a^Doe^Jane",
    reason: str = "",
    msh: dict[str, str] | None = None,
) -> str:
    """A PCD-03 order built and checked by hl7apy (STRICT). RXG-5/7 (volume to infuse) are set except for XO, where
    IHE PCD TF-2 3.3.4.4.10.1 requires them empty although base HL7 v2.6 requires them."""
    msg = ApyMessage("RGV_O15", version="2.6", validation_level=VALIDATION_LEVEL.STRICT)
    fields = {"msh_3": "BCMA^1234560000000001^EUI-64", "msh_4": "HOSP", "msh_5": "DRIVERD", "msh_6": "WARD7",
              "msh_7": "20261202162435+0000", "msh_9": "RGV^O15^RGV_O15", "msh_10": "ord-1", "msh_11": "P",
              "msh_12": "2.6", "msh_15": "AL", "msh_16": "AL"}
    fields.update(msh or {})
    for name, value in fields.items():
        if value:
            setattr(msg.msh, name, value)
    if patient is not None:
        group = msg.add_group("RGV_O15_PATIENT")
        group.pid.pid_3 = patient
        group.pid.pid_5 = "^^^^^^U"
    order = msg.add_group("RGV_O15_ORDER")
    order.orc.orc_1 = control
    order.orc.orc_2 = "PL-9^BCMA"
    if provider:
        order.orc.orc_12 = provider
    if reason:
        order.orc.orc_16 = reason
    give = order.add_group("RGV_O15_GIVE")
    rxg = give.rxg
    rxg.rxg_1 = "1"
    if drug:
        rxg.rxg_4 = drug
    if control != "XO":
        rxg.rxg_5 = "17"
        rxg.rxg_7 = "263762^MDC_DIM_MILLI_L^MDC"
    for name, value in (("rxg_15", rate), ("rxg_16", unit), ("rxg_17", strength), ("rxg_18", strength_unit),
                        ("rxg_23", volume), ("rxg_24", volume_unit)):
        if value:
            setattr(rxg, name, value)
    give.add_group("RGV_O15_TIMING_GIVE").tq1.tq1_1 = "1"
    give.rxr.rxr_1 = "^SC^HL70162"
    obx = give.add_group("RGV_O15_OBSERVATION").obx
    obx.obx_1 = "1"
    obx.obx_3 = "69986^MDC_DEV_PUMP_INFUS_VMD^MDC"
    obx.obx_11 = "X"
    if pump:
        obx.obx_18 = pump
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.txt"
        with contextlib.suppress(ValidationError):  # every problem is in the report
            msg.validate(report_file=str(report))
        problems = set(report.read_text().splitlines()) if report.exists() else set()
    xo = {"Error: Missing required child RXG.RXG_5", "Error: Missing required child RXG.RXG_7"}
    assert problems <= (xo if control == "XO" else set()), problems
    text: str = msg.to_er7()
    return text


def swap(text: str, old: str, new: str) -> str:
    """Put a value hl7apy would refuse to build (e.g. a malformed NM) in place of a marker value."""
    assert text.count(old) == 1, (old, text)
    return text.replace(old, new)


# A complete order typed out (IHE PCD TF-2 E.2 example 2, adapted: syringe, subcutaneous, ketamine 10 mg/mL).
TYPED = "\r".join([
    "MSH|^~\\&|IOPVENDOR^1234560000000001^EUI-64|IOPVENDOR|IOCVENDOR^6543210000000001^EUI-64|IOCVENDOR|"
    "20080101123456-0600||RGV^O15^RGV_O15|2|P|2.6|||AL|ER||ASCII|EN^English^ISO659||"
    "IHE_PCD_PIV_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.3.1^ISO",
    "PID|||P-1^^^IHE^PI||Doe^John^^^^^L||19660101000000-0600|M",
    "ORC|NW|12345||||||||||N0001",
    "RXG|1|||5678^Ketamine|17||263762^MDC_DIM_MILLI_L^MDC^mL^mL^UCUM||||||||100|mg/d^mg/d^UCUM|"
    "170|263890^MDC_DIM_MILLI_G^MDC|||||17|mL^mL^UCUM",
    "RXR|^SC^HL70162||^SYR^HL70164",
    "OBX|1||69986^MDC_DEV_PUMP_INFUS_VMD^MDC||||||||X|||||||A0001^PUMPVENDOR",
]) + "\r"


# ---------------------------------------------------------------------------------------------- parsing


def test_change_order_round_trips() -> None:
    order = parse_order(build())
    assert order == Order(
        control_id="ord-1", sender=Endpoint("BCMA", "HOSP"), accept_ack=True, application_ack=True,
        pump_id="pump-1", patient_ref="P-1", order_control="XO", placer_order="PL-9", drug="Ketamine",
        concentration_mg_per_ml=D("10"), rate=D("2.083"), rate_unit="mL/h", by="dr-a", reason="HL7 order ord-1",
        drug_identifier="ketamine",
    )


def test_typed_tf_example() -> None:
    order = parse_order(TYPED)
    assert (order.control_id, order.order_control, order.pump_id, order.patient_ref) == ("2", "NW", "A0001", "P-1")
    assert (order.rate, order.rate_unit, order.concentration_mg_per_ml) == (D("100"), "mg/24h", D("10"))
    assert (order.drug, order.drug_identifier, order.by, order.placer_order) == ("Ketamine", "5678", "N0001", "12345")
    assert order.sender == Endpoint("IOPVENDOR", "IOPVENDOR")
    assert order.accept_ack and order.application_ack  # MSH-16 "ER" still asks for a reply (on error)
    assert parse_order(TYPED.replace("\r", "\n")) == order
    assert parse_order(TYPED.replace("\r", "\r\n")) == order


@pytest.mark.parametrize("control", ["NW", "XO"])
def test_rate_orders(control: str) -> None:
    order = parse_order(build(control=control, rate="500", unit="mg/(24.h)"))
    assert (order.order_control, order.rate, order.rate_unit) == (control, D("500"), "mg/24h")


@pytest.mark.parametrize("control", ["HD", "RL", "DC", "CA", "OC"])
def test_orders_without_rate_do_not_read_it(control: str) -> None:
    text = swap(build(control=control, rate="not a number", unit="furlongs", strength="7777"), "|7777|", "|x|")
    order = parse_order(text)
    assert (order.order_control, order.rate, order.rate_unit, order.concentration_mg_per_ml) == (
        control, None, None, None)


@pytest.mark.parametrize("unit", [
    "ml/h", "mL/h", "mL/hr", "mL/h^mL/h^UCUM", "ml/hr^ml/hr^UCUM", ML_H, "^MDC_DIM_MILLI_L_PER_HR^MDC",
    "265266^^MDC", "mL/h^mL/h^UCUM^265266^MDC_DIM_MILLI_L_PER_HR^MDC", "^^^265266^MDC_DIM_MILLI_L_PER_HR^MDC",
])
def test_rate_unit_spellings_ml_per_h(unit: str) -> None:
    assert parse_order(build(unit=unit)).rate_unit == "mL/h"


@pytest.mark.parametrize("unit", [
    "mg/(24.h)", "mg/d", "mg/24h", "mg/day", "mg/d^mg/d^UCUM", "mg/(24.h)^mg/(24.h)^UCUM",
    "265554^MDC_DIM_MILLI_G_PER_DAY^MDC", "mg/d^mg/d^UCUM^265554^MDC_DIM_MILLI_G_PER_DAY^MDC",
])
def test_rate_unit_spellings_mg_per_24h(unit: str) -> None:
    assert parse_order(build(rate="300", unit=unit)).rate_unit == "mg/24h"


@pytest.mark.parametrize("unit", [
    "mcg/kg/min", "mL/min", "mg/h", "265266^MDC_DIM_MILLI_G_PER_DAY^MDC", "mL/h^mL/h^UCUM^265554^^MDC",
    "3122^mL/h^UCUM", "265266^mL/h^L", "mg/d^mL/h", "265619^MDC_DIM_MICRO_G_PER_KG_PER_MIN^MDC",
])
def test_other_and_inconsistent_units_are_refused(unit: str) -> None:
    with pytest.raises(OrderRejected) as caught:
        parse_order(build(unit=unit))
    assert (caught.value.field, caught.value.rule) == ("RXG-16", "unit")


@pytest.mark.parametrize(("strength", "strength_unit", "volume", "volume_unit", "expected"), [
    ("10", MG_ML, "", "", D("10")),
    ("50", "mg/mL^mg/mL^UCUM", "", "", D("50")),
    ("170", "263890^MDC_DIM_MILLI_G^MDC", "17", "263762^MDC_DIM_MILLI_L^MDC", D("10")),
    ("500", "mg", "10", "mL", D("50")),
    ("100", "mg^mg^UCUM", "3", "mL^mL^UCUM", Context(prec=34).divide(D(100), D(3))),
    ("", "", "", "", None),
])
def test_concentration(strength: str, strength_unit: str, volume: str, volume_unit: str,
                       expected: Decimal | None) -> None:
    order = parse_order(build(strength=strength, strength_unit=strength_unit, volume=volume,
                              volume_unit=volume_unit))
    assert order.concentration_mg_per_ml == expected


def test_numbers_are_exact_decimals() -> None:
    assert parse_order(build(rate="2.0830")).rate == D("2.0830")
    assert str(parse_order(build(rate="2.0830")).rate) == "2.0830"
    assert parse_order(build(rate=".5")).rate == D("0.5")
    assert parse_order(build(rate="0")).rate == 0
    assert str(parse_order(build(rate="-0")).rate) == "0"


def test_optional_parts() -> None:
    order = parse_order(build(patient=None, drug="^ketamine", reason="ward round^titration per protocol"))
    assert order.patient_ref is None
    assert (order.drug, order.drug_identifier) == ("ketamine", "")
    assert order.reason == "titration per protocol"
    assert parse_order(build(drug="ketamine")).drug == "ketamine"
    ne = parse_order(build(msh={"msh_15": "NE", "msh_16": "NE"}))
    assert (ne.accept_ack, ne.application_ack) == (False, False)


def test_escaped_values_are_unescaped() -> None:
    order = parse_order(build(pump="pump\\F\\1", patient="P\\S\\1", drug="ket\\T\\amine^Ket\\E\\amine"))
    assert (order.pump_id, order.patient_ref, order.drug_identifier, order.drug) == (
        "pump|1", "P^1", "ket&amine", "Ket\\amine")


# Mutations of a valid order, each breaking one rule: (description, text, field, rule).
def _malformed() -> list[tuple[str, str, str, str]]:
    ok = build()
    msh, *rest = ok.rstrip("\r").split("\r")
    body = "\r".join(rest)

    def without(segment: str) -> str:
        return "\r".join(s for s in ok.split("\r") if not s.startswith(segment + "|"))

    return [
        ("empty", "", "message", "not_hl7"),
        ("not hl7", "hello world", "message", "not_hl7"),
        ("pid first", "PID|||1\r" + ok, "message", "not_hl7"),
        ("other encoding", ok.replace("MSH|^~\\&|", "MSH|^~\\&#|", 1), "MSH-2", "encoding"),
        ("too long", ok + "NTE|1||" + "x" * 70_000, "message", "length"),
        ("nul", ok.replace("ketamine", "keta\x00mine"), "message", "control_chars"),
        ("tab", ok.replace("ketamine", "keta\tmine"), "message", "control_chars"),
        ("c1", ok.replace("ketamine", "keta\x85mine"), "message", "control_chars"),
        ("line separator", ok.replace("ketamine", "keta\u2028mine"), "message", "control_chars"),
        ("no control id", ok.replace("|ord-1|", "||"), "MSH-10", "required"),
        ("adt", ok.replace("RGV^O15^RGV_O15", "ADT^A01^ADT_A01"), "MSH-9", "message_type"),
        ("wrong trigger", ok.replace("RGV^O15^RGV_O15", "RGV^O16^RGV_O15"), "MSH-9", "message_type"),
        ("wrong structure", ok.replace("RGV^O15^RGV_O15", "RGV^O15^ORU_R01"), "MSH-9", "message_type"),
        ("test message", ok.replace("|ord-1|P|", "|ord-1|T|"), "MSH-11", "processing_id"),
        ("two messages", ok + "\r" + ok, "MSH", "repeated_segment"),
        ("no orc", without("ORC"), "ORC", "missing_segment"),
        ("no rxg", without("RXG"), "RXG", "missing_segment"),
        ("no obx", without("OBX"), "OBX", "missing_segment"),
        ("two orc", ok.replace("ORC|", "ORC|XO|x\rORC|", 1), "ORC", "repeated_segment"),
        ("multistep", ok.replace("RXG|", "RXG|2|||ketamine\rRXG|", 1), "RXG", "repeated_segment"),
        ("two pid", ok.replace("PID|", "PID|||2\rPID|", 1), "PID", "repeated_segment"),
        ("rxg before orc", msh + "\r" + body.replace("ORC|", "ORCX|").replace("OBX|", "ORC|XO|1||||||||||dr\rOBX|"),
         "RXG", "segment_order"),
        ("no orc-1", ok.replace("ORC|XO|", "ORC||"), "ORC-1", "required"),
        ("bolus", ok.replace("ORC|XO|", "ORC|CH|"), "ORC-1", "code"),
        ("lower case", ok.replace("ORC|XO|", "ORC|xo|"), "ORC-1", "code"),
        ("no provider", build(provider=""), "ORC-12", "required"),
        ("no drug", swap(ok, "ketamine^Ketamine^99LOCAL", ""), "RXG-4", "required"),
        ("device without pump id", build(pump=""), "OBX-18", "required"),
        ("two pumps", ok.replace("OBX|1|", "OBX|2||69985^MDC_DEV_PUMP_INFUS_MDS^MDC||||||||X|||||||pump-2\rOBX|1|"),
         "OBX-18", "ambiguous"),
        ("no rate", build(rate=""), "RXG-15", "required"),
        ("rate words", build(rate="two"), "RXG-15", "number"),
        ("rate exponent", build(rate="1e2"), "RXG-15", "number"),
        ("rate nan", build(rate="NaN"), "RXG-15", "number"),
        ("rate with space", build(rate="2 .0"), "RXG-15", "number"),
        ("rate negative", build(rate="-1"), "RXG-15", "negative"),
        ("rate huge", build(rate="99999"), "RXG-15", "magnitude"),
        ("dose huge", build(rate="100001", unit="mg/d"), "RXG-15", "magnitude"),
        ("rate too long", build(rate="1." + "0" * 30), "RXG-15", "length"),
        ("no rate unit", build(unit=""), "RXG-16", "required"),
        ("rate unit unknown", build(unit="mcg/kg/min"), "RXG-16", "unit"),
        ("strength words", swap(build(strength="7777"), "|7777|", "|ten|"), "RXG-17", "number"),
        ("strength zero", build(strength="0"), "RXG-17", "zero"),
        ("strength huge", build(strength="5000"), "RXG-17", "magnitude"),
        ("strength without unit", build(strength_unit=""), "RXG-18", "required"),
        ("strength in grams", build(strength_unit="g^g^UCUM"), "RXG-18", "unit"),
        ("mg without volume", build(strength="100", strength_unit="mg"), "RXG-23", "required"),
        ("volume zero", build(strength="100", strength_unit="mg", volume="0", volume_unit="mL"), "RXG-23", "zero"),
        ("volume words", swap(build(strength="100", strength_unit="mg", volume="7777", volume_unit="mL"), "|7777|",
                              "|x|"), "RXG-23", "number"),
        ("volume without unit", build(strength="100", strength_unit="mg", volume="10"), "RXG-24", "required"),
        ("volume in litres", build(strength="100", strength_unit="mg", volume="10", volume_unit="L"), "RXG-24",
         "unit"),
        ("concentration huge", build(strength="5000", strength_unit="mg", volume="1", volume_unit="mL"), "RXG-17",
         "magnitude"),
        ("hex escape", swap(ok, "pump-1", "pump\\X0A\\"), "OBX-18", "escape"),
        ("format escape", swap(ok, "pump-1", "pump\\.br\\"), "OBX-18", "escape"),
        ("lone backslash", ok.replace("pump-1", "pump\\1"), "OBX-18", "escape"),
        ("long pump id", build(pump="p" * 200), "OBX-18", "length"),
        ("long control id", ok.replace("|ord-1|", "|" + "c" * 200 + "|"), "MSH-10", "length"),
        ("format char", ok.replace("pump-1", "pump\u200b1"), "OBX-18", "control_chars"),
    ]


MALFORMED = {name: (text, field, rule) for name, text, field, rule in _malformed()}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_order_names_field_and_rule(name: str) -> None:
    text, field, rule = MALFORMED[name]
    with pytest.raises(OrderRejected) as caught:
        parse_order(text)
    assert (caught.value.field, caught.value.rule) == (field, rule)
    assert rule in RULES
    assert str(caught.value) == f"{field}: {rule}"
    assert isinstance(caught.value, DriverdError)
    assert rejection_condition(caught.value) == RULES[rule][0]
    assert rejection_text(caught.value) == f"{field}: {RULES[rule][1]}"


def test_every_rule_is_exercised() -> None:
    assert {rule for _, _, rule in MALFORMED.values()} == set(RULES)


@given(st.text(max_size=400))
def test_arbitrary_text_is_rejected_only_as_order_rejected(text: str) -> None:
    try:
        parse_order(text)
    except OrderRejected as exc:
        assert exc.rule in RULES


VALID = build()


@given(st.data())
def test_mutated_orders_parse_or_are_rejected(data: st.DataObject) -> None:
    text = VALID
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = data.draw(st.text(alphabet=st.sampled_from("|^~\\&\r\nX0.-MSHOBXRXG"), max_size=3))
        if action == "insert":
            text = text[:at] + chunk + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + len(chunk):]
        else:
            text = text[:at] + chunk + text[at + len(chunk):]
    try:
        order = parse_order(text)
    except OrderRejected as exc:
        assert exc.rule in RULES
    else:
        assert order.pump_id and order.by and order.order_control in ("NW", "XO", "HD", "RL", "DC", "CA", "OC")


@given(st.text(max_size=200))
def test_read_header_never_raises(text: str) -> None:
    assert read_header(text) is None or read_header(text) == read_header(text)


def test_read_header() -> None:
    head = read_header(build())
    assert head is not None
    assert (head.control_id, head.sending_application, head.sending_facility) == (
        "ord-1", ("BCMA", "1234560000000001", "EUI-64"), ("HOSP",))
    assert (head.message_code, head.trigger_event, head.structure, head.processing_id, head.version) == (
        "RGV", "O15", "RGV_O15", "P", "2.6")
    assert (head.accept_ack_type, head.application_ack_type) == ("AL", "AL")
    assert head.sender == Endpoint("BCMA", "HOSP")
    garbage = "MSH|^~\\&|A|B|||x||ZZZ|g-7|P\r\x00\x01 garbage \x1c\rOBX|||" + "z" * 100_000
    assert read_header(garbage) is not None and read_header(garbage).control_id == "g-7"  # type: ignore[union-attr]
    for unreadable in ("", "hello", "PID|1", "MSH|^~\\&|A|B|||x||ZZZ||P", "MSH|^~\\&#|A|B|||x||ZZZ|g|P",
                       "MSH|^~\\&|A\x00|B|||x||ZZZ|g|P", "MSH|^~\\&|A|B|||x||ZZZ|" + "g" * 300 + "|P"):
        assert read_header(unreadable) is None, unreadable


# ---------------------------------------------------------------------------------------------- planning

CONC = D("10")


def running(level: int = 100, conc: str = "10", phase: Phase | None = None) -> CourseState:
    """A course at `level` mg/24h on a New Era pump (100 -> 300 -> 500, taper 250 -> 0)."""
    state = primed(schedule(conc=conc, taper=((250, 0), (0, 24))))
    state = replace(state, phase=Phase.TITRATING, level_mg_per_24h=D(level),
                    commanded_rate=pump_rate(state, D(level)) if level else D(0))
    return replace(state, phase=phase) if phase is not None else state


def order(**changes: Any) -> Order:
    base = Order(
        control_id="o-1", sender=Endpoint("BCMA", "HOSP"), accept_ack=True, application_ack=True, pump_id="pump-1",
        patient_ref="P-1", order_control="XO", placer_order="", drug="ketamine", concentration_mg_per_ml=CONC,
        rate=D("300"), rate_unit="mg/24h", by="dr-a", reason="r",
    )
    return replace(base, **changes)


@pytest.mark.parametrize(("control", "action"), [("DC", "stop"), ("CA", "stop"), ("OC", "stop")])
def test_controls_without_rate(control: str, action: str) -> None:
    assert plan_order(order(order_control=control, rate=None, rate_unit=None, concentration_mg_per_ml=None),
                      running(), PROTOCOL) == Plan(action)  # type: ignore[arg-type]


@pytest.mark.parametrize("control", ["HD", "RL"])
def test_hold_and_release_are_not_done_by_order(control: str) -> None:
    """HL7 HD suspends an order (driverd's hold keeps infusing); RL would resume a pump, acknowledging its alarm,
    from a remote system. Both are refused (AE unsupported), never mapped onto a command that means otherwise."""
    refusal = plan_order(order(order_control=control, rate=None, rate_unit=None, concentration_mg_per_ml=None),
                         running(), PROTOCOL)
    assert isinstance(refusal, Refusal) and refusal.code == "unsupported" and control in refusal.detail


@pytest.mark.parametrize(("rate", "unit", "level", "expected"), [
    ("300", "mg/24h", 100, Plan("escalate", D(300))),
    ("100", "mg/24h", 300, Plan("reduce", D(100))),
    ("0", "mg/24h", 300, Plan("stop")),
    ("0", "mL/h", 300, Plan("stop")),
    ("0.416", "mL/h", 100, Refusal("no_change", "100 mg/24h is the course's current level")),  # 100 runs at 0.416
    ("1", "mL/h", 300, Plan("reduce", D(240))),  # 1 mL/h at 10 mg/mL is no scheduled dose: 1 x 10 x 24
    ("1.25", "mL/h", 100, Plan("escalate", D(300))),  # 300 mg/24h at 10 mg/mL is 1.25 mL/h exactly
    ("2.083", "mL/h", 300, Plan("escalate", D(500))),  # 500 mg/24h quantizes down to 2.083 mL/h
    ("2.084", "mL/h", 300, Plan("escalate", D("500.160"))),  # not the quantized rate of any dose: rate x conc x 24
    ("1.041", "mL/h", 500, Plan("reduce", D(250))),  # the taper dose 250 mg/24h runs at 1.041 mL/h
    ("9", "mg/24h", 100, Plan("reduce", D(9))),  # the machine and the kernel decide what runs
    ("700", "mg/24h", 100, Plan("escalate", D(700))),
])
def test_rate_orders_map_to_a_dose(rate: str, unit: str, level: int, expected: Plan | Refusal) -> None:
    assert plan_order(order(rate=D(rate), rate_unit=unit), running(level), PROTOCOL) == expected


def test_ordering_the_current_rate_is_no_change() -> None:
    state = running(500)
    for rate, unit in (("500", "mg/24h"), ("2.083", "mL/h")):  # 2.083 mL/h is 499.92 mg/24h, but it is the level
        refusal = plan_order(order(rate=D(rate), rate_unit=unit), state, PROTOCOL)
        assert isinstance(refusal, Refusal) and refusal.code == "no_change"


def test_mL_per_h_without_resolution_uses_the_arithmetic() -> None:
    state = replace(running(100), resolution=None)
    assert target_dose(order(rate=D("2.083"), rate_unit="mL/h"), state) == D("499.920")


def test_coarse_resolution_prefers_level_then_lowest_dose() -> None:
    state = replace(running(100), resolution=Resolution(decimals=0))  # 100, 250 and 300 mg/24h all run at 0 or 1 mL/h
    assert pump_rate(state, D(300)) == pump_rate(state, D(250)) == D(1)
    assert plan_order(order(rate=D(1), rate_unit="mL/h"), replace(state, level_mg_per_24h=D(300)),
                      PROTOCOL) == Refusal("no_change", "300 mg/24h is the course's current level")
    assert target_dose(order(rate=D(1), rate_unit="mL/h"), replace(state, level_mg_per_24h=D(500))) == D(250)


@pytest.mark.parametrize(("changes", "code"), [
    ({"patient_ref": "P-2"}, "patient_mismatch"),
    ({"drug": "morphine", "drug_identifier": "M1"}, "drug_mismatch"),
    ({"pump_id": "pump-2"}, "pump_mismatch"),
    ({"concentration_mg_per_ml": None}, "concentration_mismatch"),
    ({"concentration_mg_per_ml": D("50")}, "concentration_mismatch"),
    ({"rate": None}, "no_rate"),
    ({"order_control": "CH"}, "unsupported"),
])
def test_refusals(changes: dict[str, Any], code: str) -> None:
    result = plan_order(order(**changes), running(), PROTOCOL)
    assert isinstance(result, Refusal) and result.code == code and result.detail
    assert code in REFUSALS


def test_checks_that_pass() -> None:
    state = running()
    assert isinstance(plan_order(order(patient_ref=None), state, PROTOCOL), Plan)
    assert isinstance(plan_order(order(drug="KETAMINE"), state, PROTOCOL), Plan)  # case-insensitive
    assert isinstance(plan_order(order(drug="Ketalar", drug_identifier="Ketamine"), state, PROTOCOL), Plan)
    assert isinstance(plan_order(order(concentration_mg_per_ml=D("10.000")), state, PROTOCOL), Plan)
    # a stop needs neither rate nor concentration
    assert plan_order(order(order_control="DC", concentration_mg_per_ml=D(50), rate=None), state, PROTOCOL) == (
        Plan("stop"))


@pytest.mark.parametrize("phase", [Phase.IDLE, Phase.STOPPED])
def test_no_course_no_command(phase: Phase) -> None:
    for control in ("NW", "XO", "HD", "RL", "DC"):
        result = plan_order(order(order_control=control), running(phase=phase), PROTOCOL)
        assert isinstance(result, Refusal) and result.code == "no_course"
    fresh = CourseState(pump_id="pump-1")
    assert plan_order(order(), fresh, PROTOCOL) == Refusal(
        "no_course", "no active course on pump-1 (idle); an order never starts one")


def test_a_planned_escalation_still_meets_the_machine() -> None:
    # plan_order only maps: an escalation that is not the next step is refused by the machine, not by the plan.
    state = running(100)
    plan = plan_order(order(rate=D(500)), state, PROTOCOL)
    assert plan == Plan("escalate", D(500))
    _, commands = reduce(state, ClinicianCommand(T0 + timedelta(days=2), "escalate", "dr-a", "HL7 order o-1", D(500)),
                         PROTOCOL)
    assert [(c.reason, c.source) for c in commands if isinstance(c, Refused)] == [("not_next_step", "clinician")]


LEVELS = st.sampled_from([0, 100, 250, 300, 500])
RATES = st.one_of(
    st.decimals(min_value=0, max_value=10, places=3).map(lambda d: (d, "mL/h")),
    st.decimals(min_value=0, max_value=800, places=2).map(lambda d: (d, "mg/24h")),
)


@given(level=LEVELS, phase=st.sampled_from(list(Phase)), rate=RATES,
       control=st.sampled_from(["NW", "XO", "HD", "RL", "DC", "CA", "OC", "CH"]),
       conc=st.sampled_from([None, D(10), D(50)]), patient=st.sampled_from([None, "P-1", "P-2"]),
       resolution=st.sampled_from([NEW_ERA_RESOLUTION, Resolution(decimals=1), Resolution(decimals=0)]))
def test_plan_never_escalates_at_or_below_level_nor_moves_an_inactive_course(
    level: int, phase: Phase, rate: tuple[Decimal, str], control: str, conc: Decimal | None, patient: str | None,
    resolution: Resolution,
) -> None:
    state = replace(running(level, phase=phase), resolution=resolution)
    the_order = order(order_control=control, rate=rate[0], rate_unit=rate[1], concentration_mg_per_ml=conc,
                      patient_ref=patient)
    result = plan_order(the_order, state, PROTOCOL)
    assert isinstance(result, (Plan, Refusal))
    if isinstance(result, Refusal):
        assert result.code in REFUSALS
        return
    if result.action == "escalate":
        assert result.dose_mg_per_24h is not None and result.dose_mg_per_24h > state.level_mg_per_24h
    if result.action == "reduce":
        assert result.dose_mg_per_24h is not None and 0 < result.dose_mg_per_24h < state.level_mg_per_24h
    if result.action in ("escalate", "reduce"):
        assert state.phase in ACTIVE and control in ("NW", "XO")
    assert state.phase in ACTIVE  # no command at all for an inactive course
    assert (result.dose_mg_per_24h is None) == (result.action not in ("escalate", "reduce"))


def test_rate_units_table() -> None:
    assert {u.key for u in RATE_UNITS} == {"mL/h", "mg/24h"}


# ---- review 2026-12-03 item 2: repeated values and UCUM case -------------------------------------------------


@pytest.mark.parametrize(("rate", "unit", "field"), [
    ("300~2.083", "mg/d^mg/d^UCUM~mL/h^mL/h^UCUM", "RXG-16"),  # two rates, two units: which one?
    ("300", "mg/d^mg/d^UCUM~mL/h^mL/h^UCUM", "RXG-16"),
    ("300", "mg/d^mg/d^UCUM~", "RXG-16"),  # an empty second repetition is still a repetition
    ("300~2.083", "mg/d^mg/d^UCUM", "RXG-15"),
    ("300~300", "mg/d^mg/d^UCUM", "RXG-15"),  # even the same value twice: one field, one value
    ("300^2.083", "mg/d^mg/d^UCUM", "RXG-15"),
    ("300&2", "mg/d^mg/d^UCUM", "RXG-15"),
])
def test_a_repeated_rate_or_unit_is_ambiguous(rate: str, unit: str, field: str) -> None:
    text = swap(swap(build(rate="4321", unit="mg/d"), "|4321|", f"|{rate}|"), "|mg/d|", f"|{unit}|")
    with pytest.raises(OrderRejected) as caught:
        parse_order(text)
    assert (caught.value.field, caught.value.rule) == (field, "ambiguous")
    assert rejection_text(caught.value) == f"{field}: conflicting values"


@pytest.mark.parametrize(("strength", "unit", "field"), [
    ("10~100", MG_ML, "RXG-17"),
    ("10^100", MG_ML, "RXG-17"),
    ("10", f"{MG_ML}~mg^mg^UCUM", "RXG-18"),
])
def test_a_repeated_strength_or_its_unit_is_ambiguous(strength: str, unit: str, field: str) -> None:
    text = swap(swap(build(strength="4321"), "|4321|", f"|{strength}|"), f"|{MG_ML}", f"|{unit}")
    with pytest.raises(OrderRejected) as caught:
        parse_order(text)
    assert (caught.value.field, caught.value.rule) == (field, "ambiguous")


def test_a_repeated_volume_and_pump_id_are_ambiguous() -> None:
    text = swap(build(strength="500", strength_unit="mg", volume="4321", volume_unit="mL"), "|4321|", "|10~50|")
    with pytest.raises(OrderRejected) as caught:
        parse_order(text)
    assert (caught.value.field, caught.value.rule) == ("RXG-23", "ambiguous")
    text = swap(build(pump="pump-9"), "|pump-9", "|pump-1~pump-2")
    with pytest.raises(OrderRejected) as caught:
        parse_order(text)
    assert (caught.value.field, caught.value.rule) == ("OBX-18", "ambiguous")


def test_hl7apy_reads_the_repeated_rate_as_two_values() -> None:
    """Independent check: hl7apy parses the same RXG-15/16 as two repetitions each, so the message really carries
    two rates in two units (the first alone used to be read as 300 mg/24h)."""
    text = swap(swap(build(rate="4321", unit="mg/d"), "|4321|", "|300~2.083|"),
                "|mg/d|", "|mg/(24.h)^mg/(24.h)^UCUM~mL/h^mL/h^UCUM|")
    msg = parse_message(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.TOLERANT)
    rxg = msg.children.get("RGV_O15_ORDER")[0].children.get("RGV_O15_GIVE")[0].rxg
    assert [r.value for r in rxg.children.get("RXG_15")] == ["300", "2.083"]
    assert [r.children[0].value for r in rxg.children.get("RXG_16")] == ["mg/(24.h)", "mL/h"]
    with pytest.raises(OrderRejected):
        parse_order(text)


@pytest.mark.parametrize(("field", "unit"), [
    ("RXG-16", "Mg/d^Mg/d^UCUM"),  # megagram per day in UCUM
    ("RXG-16", "MG/D"),
    ("RXG-16", "ML/H"),
    ("RXG-16", "Ml/h"),
    ("RXG-16", "mL/H"),
    ("RXG-16", "MG/(24.H)^MG/(24.H)^UCUM"),
])
def test_ucum_spellings_are_case_sensitive(field: str, unit: str) -> None:
    with pytest.raises(OrderRejected) as caught:
        parse_order(build(rate="300", unit=unit))
    assert (caught.value.field, caught.value.rule) == (field, "unit")


@pytest.mark.parametrize(("unit", "field"), [("MG/ML^MG/ML^UCUM", "RXG-18"), ("Mg", "RXG-18")])
def test_strength_units_are_case_sensitive(unit: str, field: str) -> None:
    with pytest.raises(OrderRejected) as caught:
        parse_order(build(strength="500", strength_unit=unit, volume="10", volume_unit="mL"))
    assert (caught.value.field, caught.value.rule) == (field, "unit")


def test_volume_units_are_case_sensitive_and_mdc_codes_still_count() -> None:
    with pytest.raises(OrderRejected) as caught:
        parse_order(build(strength="500", strength_unit="mg", volume="10", volume_unit="ML"))
    assert (caught.value.field, caught.value.rule) == ("RXG-24", "unit")
    order = parse_order(build(strength="500", strength_unit="263890^MDC_DIM_MILLI_G^MDC", volume="10",
                              volume_unit="263762^MDC_DIM_MILLI_L^MDC"))
    assert order.concentration_mg_per_ml == D(50)
    assert parse_order(build(rate="300", unit="265554^MDC_DIM_MILLI_G_PER_DAY^MDC")).rate_unit == "mg/24h"
