"""PCD-01, PCD-04, ACK and RRG^O16 messages as built by driverd.hl7.messages, checked by hl7apy (an independent
HL7 v2.6 parser and validator) and python-hl7; and parse_ack on good and malformed acknowledgements."""

from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message as ApyMessage
from hl7apy.exceptions import ValidationError
from hl7apy.parser import parse_message
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core.errors import DriverdError
from driverd.hl7.messages import (
    CAUSE_TEXT,
    LOCAL,
    MDC_EVENTS,
    AckError,
    AckInfo,
    MessageError,
    MessageHeader,
    accept_ack,
    alert_message,
    ascii_text,
    dtm,
    error_location,
    event_code,
    nm,
    observation_message,
    order_reply,
    parse_ack,
)
from driverd.hl7.model import Alert, Endpoint, Observation
from driverd.hl7.orders import read_header

AT = datetime(2026, 12, 2, 16, 24, 35, 123456, tzinfo=UTC)
SENDER = Endpoint("DRIVERD", "WARD7")
RECEIVER = Endpoint("CIS", "HOSP")
D = Decimal
# hl7apy takes ~50 ms to parse and validate a message: the properties that run it use fewer examples.
HL7APY_EXAMPLES = settings(max_examples=100)

# hl7apy's v2.6 copy of HL7 table 0125 predates CWE (HL7 v2.6 and IHE PCD TF-2 table C-1 both list it).
HL7APY_STALE = "Warning: Value CWE not in table HL70125 in element OBX.OBX_2"
# IHE PCD TF-2 B.5 makes PID-3 conditional; base HL7 v2.6 requires it. driverd leaves it empty when no patient
# is associated with the pump (docs/hl7.md).
NO_PATIENT = "Error: Missing required child PID.PID_3"

# The HL7 delimiter escapes (HL7 v2.6 2.7.4), written out here as the test's own oracle.
_ORACLE = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


def unescape(text: str) -> str:
    return re.sub(r"\\([FSTRE])\\", lambda m: _ORACLE[m.group(1)], text)


def strict(text: str, tmp: Path, allowed: frozenset[str] = frozenset()) -> Any:
    """Parse with hl7apy STRICT and run its full structure/value validation; every reported problem (errors and
    value warnings alike) must be in `allowed`."""
    msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    report = tmp / "hl7apy-report.txt"
    report.unlink(missing_ok=True)
    with contextlib.suppress(ValidationError):  # every problem is in the report, checked below
        msg.validate(report_file=str(report))
    problems = set(report.read_text().splitlines()) if report.exists() else set()
    assert problems <= allowed | {HL7APY_STALE}, problems
    return msg


def observation(**changes: Any) -> Observation:
    base = Observation(
        at=AT, pump_id="pump-1", pump_model="NE-1000", course_id="S-1", patient_ref="P-1", drug_name="ketamine",
        concentration_mg_per_ml=D("10"), phase="titrating", pump_state="infusing", rate_ml_per_h=D("2.083"),
        commanded_ml_per_h=D("2.083"), dose_mg_per_24h=D("500"), delivered_ml=D("12.50"), link="up", alarms=(),
    )
    return replace(base, **changes)


def alert(**changes: Any) -> Alert:
    base = Alert(at=AT, alert_id="A-7", phase="start", pump_id="pump-1", course_id="S-1", patient_ref="P-1",
                 cause="pump_alarm:occlusion", detail="pump reports occlusion", priority="PH")
    return replace(base, **changes)


def observations(msg: Any) -> list[Any]:
    return list(msg.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation)


def by_sub_id(msg: Any) -> dict[str, Any]:
    return {o.obx.obx_4.value: o.obx for o in observations(msg)}


def header(**changes: Any) -> MessageHeader:
    base = MessageHeader(
        control_id="ord-1", sending_application=("BCMA", "1234560000000001", "EUI-64"), sending_facility=("HOSP",),
        receiving_application=("DRIVERD",), receiving_facility=("WARD7",), message_code="RGV", trigger_event="O15",
        structure="RGV_O15", processing_id="P", version="2.6", accept_ack_type="AL", application_ack_type="AL",
    )
    return replace(base, **changes)


# ---------------------------------------------------------------------------------------------- values


def test_dtm_examples() -> None:
    assert dtm(AT) == "20261202162435.123+0000"
    assert dtm(datetime(2026, 1, 5, 3, 4, 5, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30)))) == (
        "20260105030405.999+0530")
    assert dtm(datetime(2026, 1, 5, 3, 4, 5, tzinfo=timezone(timedelta(hours=-8)))) == "20260105030405.000-0800"
    assert dtm(datetime(2026, 1, 5, 3, 4, 5, tzinfo=timezone(timedelta(minutes=-30)))) == "20260105030405.000-0030"


def test_dtm_refuses_naive_and_second_offsets() -> None:
    with pytest.raises(MessageError, match="naive"):
        dtm(datetime(2026, 1, 1))
    with pytest.raises(MessageError, match="whole minutes"):
        dtm(datetime(2026, 1, 1, tzinfo=timezone(timedelta(seconds=30))))
    assert issubclass(MessageError, DriverdError)


@given(
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9999, 12, 30)),
    st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
)
def test_dtm_round_trips_the_instant_and_offset(naive: datetime, offset_min: int) -> None:
    at = naive.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    text = dtm(at)
    assert re.fullmatch(r"\d{14}\.\d{3}[+-]\d{4}", text)
    back = datetime.strptime(text, "%Y%m%d%H%M%S.%f%z")
    assert back == at.replace(microsecond=at.microsecond // 1000 * 1000)  # the same instant, to the millisecond
    assert back.utcoffset() == at.utcoffset()


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_nm_is_plain_exact_decimal_text(value: Decimal) -> None:
    text = nm(value)
    assert re.fullmatch(r"-?\d+(\.\d+)?", text), text
    assert Decimal(text) == value
    assert text != "-0"


def test_nm_refuses_non_finite() -> None:
    for bad in (Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")):
        with pytest.raises(MessageError):
            nm(bad)


def test_ascii_text() -> None:
    assert ascii_text("a|b^c~d\\e&f") == "a|b^c~d\\e&f"
    assert ascii_text("line\r\nnext\tx") == "line  next x"
    assert ascii_text("Zoë\x00€") == "Zo???"


# ---------------------------------------------------------------------------------------------- PCD-01


def test_observation_is_a_valid_pcd01(tmp_path: Path) -> None:
    text = observation_message(observation(), "c-1", SENDER, RECEIVER)
    msg = strict(text, tmp_path)
    msh = msg.msh
    assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert (msh.msh_3.value, msh.msh_4.value, msh.msh_5.value, msh.msh_6.value) == ("DRIVERD", "WARD7", "CIS", "HOSP")
    assert (msh.msh_10.value, msh.msh_11.value, msh.msh_12.value) == ("c-1", "P", "2.6")
    assert (msh.msh_15.value, msh.msh_16.value) == ("AL", "NE")
    assert msh.msh_21.to_er7() == "IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO"
    assert msh.msh_7.to_er7() == "20261202162435.123+0000"
    patient = msg.oru_r01_patient_result.oru_r01_patient
    assert patient.pid.pid_3.cx_1.value == "P-1"
    assert patient.oru_r01_visit.pv1.pv1_2.value == "U"
    obr = msg.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_3.to_er7() == "c-1^DRIVERD"
    assert obr.obr_4.to_er7() == "ketamine^ketamine^99DRVD"
    assert obr.obr_7.to_er7() == "20261202162435.123+0000"

    obx = by_sub_id(msg)
    assert list(obx) == ["1.0.0.0", "1.1.0.0", "1.1.1.0", "1.1.1.1", "1.1.1.3", "1.1.2.0", "1.1.2.1", "1.1.2.2",
                         "1.1.2.3", "1.1.2.4", "1.1.2.5", "1.1.2.6", "1.1.2.7", "1.1.2.8"]
    assert [o.obx.obx_1.value for o in observations(msg)] == [str(i) for i in range(1, 15)]
    devices = {"1.0.0.0": "69985^MDC_DEV_PUMP_INFUS_MDS^MDC", "1.1.0.0": "69986^MDC_DEV_PUMP_INFUS_VMD^MDC",
               "1.1.1.0": "70067^MDC_DEV_PUMP_DELIVERY_INFO^MDC",
               "1.1.2.0": "70071^MDC_DEV_PUMP_INFUSATE_SOURCE_PRIMARY^MDC"}
    for sub_id, code in devices.items():
        assert obx[sub_id].obx_3.to_er7() == code
        assert obx[sub_id].obx_11.value == "X"
        assert obx[sub_id].obx_18.ei_1.value == "pump-1"
        assert obx[sub_id].obx_18.ei_2.value == "NE-1000"
        assert obx[sub_id].obx_5.to_er7() == ""
    expected = {
        "1.1.1.1": ("CWE", "184519^MDC_PUMP_INFUSING_STATUS^MDC", "^pump-status-infusing^^infusing^infusing^99DRVD",
                    ""),
        "1.1.1.3": ("ST", "pump_link^link to the pump^99DRVD", "up", ""),
        "1.1.2.1": ("NM", "157784^MDC_FLOW_FLUID_PUMP^MDC", "2.083",
                    "265266^MDC_DIM_MILLI_L_PER_HR^MDC^mL/h^mL/h^UCUM"),
        "1.1.2.2": ("NM", "commanded_rate^rate commanded by the course^99DRVD", "2.083",
                    "265266^MDC_DIM_MILLI_L_PER_HR^MDC^mL/h^mL/h^UCUM"),
        "1.1.2.3": ("NM", "157924^MDC_RATE_DOSE^MDC", "500", "265554^MDC_DIM_MILLI_G_PER_DAY^MDC^mg/d^mg/d^UCUM"),
        "1.1.2.4": ("NM", "157993^MDC_VOL_FLUID_DELIV_TOTAL^MDC", "12.50", "263762^MDC_DIM_MILLI_L^MDC^mL^mL^UCUM"),
        "1.1.2.5": ("ST", "184514^MDC_DRUG_NAME_LABEL^MDC", "ketamine", ""),
        "1.1.2.6": ("NM", "157760^MDC_CONC_DRUG^MDC", "10", "264306^MDC_DIM_MILLI_G_PER_ML^MDC^mg/mL^mg/mL^UCUM"),
        "1.1.2.7": ("ST", "course_phase^course phase^99DRVD", "titrating", ""),
        "1.1.2.8": ("ST", "course_id^course (schedule id)^99DRVD", "S-1", ""),
    }
    for sub_id, (value_type, code, value, units) in expected.items():
        seg = obx[sub_id]
        assert (seg.obx_2.value, seg.obx_3.to_er7(), seg.obx_5.to_er7(), seg.obx_6.to_er7()) == (
            value_type, code, value, units), sub_id
        assert seg.obx_11.value == "R"
        assert seg.obx_14.to_er7() == "20261202162435.123+0000"


def test_python_hl7_reads_the_same_values() -> None:
    text = observation_message(observation(), "c-1", SENDER, RECEIVER)
    msg = hl7.parse(text)
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "OBR"] + ["OBX"] * 14
    rate = next(s for s in msg.segments("OBX") if str(s(3)(1)(1)) == "157784")
    assert Decimal(str(rate(5))) == Decimal("2.083")
    assert str(msg.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert text.endswith("\r") and "\n" not in text


def test_unknown_values_are_left_out_not_sent_empty(tmp_path: Path) -> None:
    obs = observation(pump_state=None, rate_ml_per_h=None, delivered_ml=None, drug_name=None,
                      concentration_mg_per_ml=None, course_id=None, pump_model="")
    msg = strict(observation_message(obs, "c-2", SENDER, RECEIVER), tmp_path)
    obx = by_sub_id(msg)
    assert set(obx) == {"1.0.0.0", "1.1.0.0", "1.1.1.0", "1.1.1.3", "1.1.2.0", "1.1.2.2", "1.1.2.3", "1.1.2.7"}
    for seg in obx.values():  # only device-level OBXs (result status X) have no value
        assert (seg.obx_5.to_er7() == "") == (seg.obx_11.value == "X")
    assert obx["1.0.0.0"].obx_18.to_er7() == "pump-1"
    obr = msg.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_4.to_er7() == "999999^Medication Unknown"


def test_pump_not_infusing_carries_the_reason(tmp_path: Path) -> None:
    for state, reason in (("alarm", "pump-stopped-alarm"), ("paused", "pump-stopped-nos"),
                          ("stopped", "pump-stopped-nos")):
        obx = by_sub_id(strict(observation_message(observation(pump_state=state), "c", SENDER, RECEIVER), tmp_path))
        assert obx["1.1.1.1"].obx_5.to_er7() == f"^pump-status-not-infusing^^{state}^{state}^99DRVD"
        assert obx["1.1.1.2"].obx_3.to_er7() == "184513^MDC_PUMP_NOT_INFUSING_REASON^MDC"
        assert obx["1.1.1.2"].obx_5.to_er7() == f"^{reason}"


def test_alarm_causes_repeat_in_one_obx(tmp_path: Path) -> None:
    obs = observation(alarms=("link_lost", "pump_alarm:occlusion"), link="lost")
    obx = by_sub_id(strict(observation_message(obs, "c", SENDER, RECEIVER), tmp_path))
    assert [r.to_er7() for r in obx["1.1.1.4"].children.get("OBX_5")] == ["link_lost", "pump_alarm:occlusion"]
    assert obx["1.1.1.3"].obx_5.to_er7() == "lost"


def test_unassociated_pump_sends_identity_unknown(tmp_path: Path) -> None:
    text = observation_message(observation(patient_ref=None), "c-3", SENDER, RECEIVER)
    msg = strict(text, tmp_path, allowed=frozenset({NO_PATIENT}))
    pid = msg.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == ""
    assert pid.pid_5.to_er7() == "^^^^^^U"
    assert pid.pid_31.value == "Y"
    known = strict(observation_message(observation(), "c-4", SENDER, RECEIVER), tmp_path)
    assert known.oru_r01_patient_result.oru_r01_patient.pid.pid_31.value == "N"


@HL7APY_EXAMPLES
@given(st.decimals(allow_nan=False, allow_infinity=False, places=6, min_value=0, max_value=10_000),
       st.decimals(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9))
def test_numbers_round_trip_exactly(rate: Decimal, dose: Decimal) -> None:
    text = observation_message(observation(rate_ml_per_h=rate, dose_mg_per_24h=dose), "c", SENDER, RECEIVER)
    msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    obx = by_sub_id(msg)
    for sub_id, value in (("1.1.2.1", rate), ("1.1.2.3", dose)):
        sent = obx[sub_id].obx_5.to_er7()
        assert "E" not in sent.upper() and Decimal(sent) == value


def test_observation_refuses_bad_input() -> None:
    with pytest.raises(MessageError):
        observation_message(observation(at=datetime(2026, 1, 1)), "c", SENDER, RECEIVER)
    with pytest.raises(MessageError):
        observation_message(observation(), "", SENDER, RECEIVER)
    with pytest.raises(MessageError):
        observation_message(observation(pump_id=""), "c", SENDER, RECEIVER)
    with pytest.raises(MessageError):
        observation_message(observation(rate_ml_per_h=Decimal("NaN")), "c", SENDER, RECEIVER)


# Texts with every HL7 delimiter in them, and arbitrary ones.
DELIMITED = st.text(alphabet=st.sampled_from("|^~\\&") | st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                    min_size=1, max_size=30)


@HL7APY_EXAMPLES
@given(pump=DELIMITED, patient=DELIMITED, drug=DELIMITED, course=DELIMITED, control=DELIMITED)
def test_delimiters_in_values_are_escaped(pump: str, patient: str, drug: str, course: str, control: str) -> None:
    obs = observation(pump_id=pump, patient_ref=patient, drug_name=drug, course_id=course, pump_model="")
    text = observation_message(obs, control, SENDER, RECEIVER)
    msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert unescape(msg.msh.msh_10.value) == control
    assert unescape(msg.oru_r01_patient_result.oru_r01_patient.pid.pid_3.cx_1.value) == patient
    obx = by_sub_id(msg)
    assert unescape(obx["1.0.0.0"].obx_18.ei_1.value) == pump.rstrip(" ")  # hl7apy strips each segment's text
    assert obx["1.0.0.0"].obx_18.ei_2.to_er7() == ""  # nothing spilled into the next component
    assert unescape(obx["1.1.2.5"].obx_5.to_er7()) == drug
    assert unescape(obx["1.1.2.8"].obx_5.to_er7()) == course
    assert len(observations(msg)) == 14  # nothing spilled into another segment either
    # python-hl7, the library the builder uses, reads the same values back
    parsed = hl7.parse(text)
    assert parsed.unescape(str(parsed.segment("PID")(3))) == patient
    assert parsed.unescape(str(parsed.segments("OBX")(1)(18))) == pump


@HL7APY_EXAMPLES
@given(pump=st.text(min_size=1, max_size=30), detail=st.text(max_size=60))
def test_any_text_becomes_printable_ascii(pump: str, detail: str) -> None:
    text = alert_message(alert(pump_id=pump, detail=detail), "c", SENDER, RECEIVER)
    assert all(" " <= c <= "~" for c in text.replace("\r", ""))
    msg = parse_message(text.replace("ORU^R40^ORU_R40", "ORU^R40^ORU_R01"), find_groups=True,
                        validation_level=VALIDATION_LEVEL.STRICT)
    first = observations(msg)[0]
    # hl7apy strips each segment's text, so trailing spaces of a segment's last field are not seen there
    assert unescape(first.obx.obx_18.ei_1.value) == ascii_text(pump).rstrip(" ")
    notes = [n.nte_3.value for n in first.children.get("NTE")]
    assert [unescape(n) for n in notes] == ([ascii_text(detail).rstrip(" ")] if detail else [])
    parsed = hl7.parse(text)  # python-hl7 keeps them
    assert parsed.unescape(str(parsed.segments("OBX")(1)(18))) == ascii_text(pump)
    if detail:
        assert parsed.unescape(str(parsed.segment("NTE")(3))) == ascii_text(detail)


# ---------------------------------------------------------------------------------------------- PCD-04


def acm(text: str, tmp: Path, allowed: frozenset[str] = frozenset()) -> Any:
    # hl7apy has no ORU_R40 structure (IHE PCD uses the HL7 v2.8 trigger ahead of time); its segment pattern is
    # that of ORU_R01, so it is checked as one.
    assert "|ORU^R40^ORU_R40|" in text
    return strict(text.replace("|ORU^R40^ORU_R40|", "|ORU^R40^ORU_R01|"), tmp, allowed)


def test_alert_start_is_a_valid_pcd04(tmp_path: Path) -> None:
    text = alert_message(alert(), "c-9", SENDER, RECEIVER)
    assert parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT).msh.msh_9.to_er7() == "ORU^R40^ORU_R40"
    msg = acm(text, tmp_path)
    assert msg.msh.msh_21.to_er7() == "IHE_PCD_ACM_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.4.1^ISO"
    assert (msg.msh.msh_15.value, msg.msh.msh_16.value) == ("AL", "NE")
    assert msg.oru_r01_patient_result.oru_r01_patient.pid.pid_3.cx_1.value == "P-1"
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_3.to_er7() == "A-7^DRIVERD"
    assert order.obr.obr_4.to_er7() == "196616^MDC_EVT_ALARM^MDC"
    assert order.obr.obr_29.to_er7() == ""
    rows = [(o.obx.obx_2.value, o.obx.obx_3.to_er7(), o.obx.obx_4.value, o.obx.obx_5.to_er7(), o.obx.obx_11.value)
            for o in observations(msg)]
    assert rows == [
        ("CWE", "196616^MDC_EVT_ALARM^MDC", "1.0.0.0.1",
         "196940^MDC_EVT_FLUID_LINE_OCCL^MDC^pump_alarm:occlusion^pump reports an occlusion^99DRVD", "F"),
        ("CWE", "68480^MDC_ATTR_ALERT_SOURCE^MDC", "1.0.0.0.2", "69985^MDC_DEV_PUMP_INFUS_MDS^MDC", "F"),
        ("ST", "68481^MDC_ATTR_EVENT_PHASE^MDC", "1.0.0.0.3", "start", "F"),
        ("ST", "68482^MDC_ATTR_ALARM_STATE^MDC", "1.0.0.0.4", "active", "F"),
        ("ST", "68483^MDC_ATTR_ALARM_INACTIVATION_STATE^MDC", "1.0.0.0.5", "", "F"),
        ("ST", "68484^MDC_ATTR_ALARM_PRIORITY^MDC", "1.0.0.0.6", "PH", "F"),
        ("ST", "68485^MDC_ATTR_ALERT_TYPE^MDC", "1.0.0.0.7", "ST", "F"),
    ]
    first = observations(msg)[0]
    assert first.obx.obx_18.ei_1.value == "pump-1"
    assert first.obx.obx_14.to_er7() == "20261202162435.123+0000"
    assert [n.nte_3.value for n in first.children.get("NTE")] == ["pump reports occlusion"]


def test_alert_end_pairs_with_its_start(tmp_path: Path) -> None:
    start = acm(alert_message(alert(), "c-1", SENDER, RECEIVER), tmp_path)
    end = acm(alert_message(alert(phase="end", at=AT + timedelta(minutes=3)), "c-2", SENDER, RECEIVER), tmp_path)
    start_obr = start.oru_r01_patient_result.oru_r01_order_observation.obr
    end_obr = end.oru_r01_patient_result.oru_r01_order_observation.obr
    assert end_obr.obr_3.to_er7() == "A-7.end^DRIVERD"
    # OBR-29.2 (the parent, filler assigned EI as sub-components) of the clear is OBR-3 of the raise
    assert end_obr.obr_29.to_er7() == "^A-7&DRIVERD"
    assert end_obr.obr_29.to_er7().split("^")[1].split("&") == start_obr.obr_3.to_er7().split("^")
    facets = {o.obx.obx_4.value: o.obx.obx_5.to_er7() for o in observations(end)}
    assert (facets["1.0.0.0.3"], facets["1.0.0.0.4"]) == ("end", "inactive")


@pytest.mark.parametrize("cause", [*sorted(CAUSE_TEXT), "something_new"])
def test_every_cause_has_an_event_code(cause: str, tmp_path: Path) -> None:
    msg = acm(alert_message(alert(cause=cause, priority="PM"), "c", SENDER, RECEIVER), tmp_path)
    event = observations(msg)[0].obx.obx_5.to_er7().split("^")
    if cause in MDC_EVENTS:
        mdc = MDC_EVENTS[cause]
        assert event[:3] == [mdc.code, mdc.text, "MDC"]
        assert event[3:] == [cause, CAUSE_TEXT[cause], LOCAL]
    else:
        assert event == [cause, CAUSE_TEXT.get(cause, cause), LOCAL]
    assert event_code(cause) == tuple(event)


@pytest.mark.parametrize("priority", ["PH", "PM", "PL"])
def test_alert_priority(priority: str, tmp_path: Path) -> None:
    msg = acm(alert_message(alert(priority=priority), "c", SENDER, RECEIVER), tmp_path)
    assert observations(msg)[5].obx.obx_5.value == priority


def test_alert_without_patient_and_detail(tmp_path: Path) -> None:
    text = alert_message(alert(patient_ref=None, detail=""), "c", SENDER, RECEIVER)
    msg = acm(text, tmp_path, allowed=frozenset({NO_PATIENT}))
    assert msg.oru_r01_patient_result.oru_r01_patient.pid.pid_31.value == "Y"
    assert "\rNTE|" not in text


def test_alert_refuses_bad_input() -> None:
    for bad in (alert(phase="middle"), alert(priority="PX"), alert(alert_id=""), alert(pump_id=""),
                alert(at=datetime(2026, 1, 1))):
        with pytest.raises(MessageError):
            alert_message(bad, "c", SENDER, RECEIVER)


# ---------------------------------------------------------------------------------------------- ACK, RRG^O16


def test_accept_ack_ca(tmp_path: Path) -> None:
    text = accept_ack(header(), "a-1", "CA", SENDER, at=AT)
    msg = strict(text, tmp_path)
    assert msg.msh.msh_9.to_er7() == "ACK^O15^ACK"
    assert msg.msh.msh_3.to_er7() == "DRIVERD" and msg.msh.msh_4.to_er7() == "WARD7"
    assert msg.msh.msh_5.to_er7() == "BCMA^1234560000000001^EUI-64" and msg.msh.msh_6.to_er7() == "HOSP"
    assert msg.msh.msh_10.value == "a-1"
    assert (msg.msa.msa_1.value, msg.msa.msa_2.value) == ("CA", "ord-1")
    assert "\rERR|" not in text


def test_accept_ack_cr_carries_an_err(tmp_path: Path) -> None:
    msg = strict(accept_ack(header(), "a-2", "CR", SENDER, "cannot store|order", at=AT, condition="206"), tmp_path)
    assert msg.msa.msa_1.value == "CR"
    assert msg.err.err_3.to_er7() == "206^Application record locked^HL70357"
    assert msg.err.err_4.value == "E"
    assert unescape(msg.err.err_8.value) == "cannot store|order"


def test_ack_echoes_the_trigger_it_acknowledges(tmp_path: Path) -> None:
    msg = strict(accept_ack(header(message_code="ADT", trigger_event="A01"), "a", "CR", SENDER, at=AT), tmp_path)
    assert msg.msh.msh_9.to_er7() == "ACK^A01^ACK"
    garbled = strict(accept_ack(header(trigger_event="x|y"), "a", "CR", SENDER, at=AT), tmp_path)
    assert garbled.msh.msh_9.to_er7() == "ACK^O15^ACK"


def test_order_reply_aa(tmp_path: Path) -> None:
    text = order_reply(header(), "r-1", "AA", SENDER, at=AT)
    msg = strict(text, tmp_path)
    assert msg.msh.msh_9.to_er7() == "RRG^O16^RRG_O16"
    assert (msg.msh.msh_15.value, msg.msh.msh_16.value) == ("AL", "NE")
    assert msg.msh.msh_21.to_er7() == "IHE_PCD_PIV_RRG^IHE PCD^1.3.6.1.4.1.19376.1.6.1.3.2^ISO"
    assert (msg.msa.msa_1.value, msg.msa.msa_2.value) == ("AA", "ord-1")
    assert "\rERR|" not in text
    with pytest.raises(MessageError):
        order_reply(header(), "r-1", "AA", SENDER, at=AT, error_code="x")


def test_order_reply_ae_and_ar(tmp_path: Path) -> None:
    msg = strict(order_reply(header(), "r-2", "AE", SENDER, at=AT, error_code="ceiling",
                             error_text="above the ceiling"), tmp_path)
    assert msg.msa.msa_1.value == "AE"
    assert msg.err.err_2.to_er7() == ""
    assert msg.err.err_3.to_er7() == "207^Application internal error^HL70357"
    assert msg.err.err_5.to_er7() == "ceiling^above the ceiling^99DRVD"
    assert msg.err.err_8.value == "above the ceiling"
    ar = strict(order_reply(header(), "r-3", "AR", SENDER, at=AT, error_code="not_a_number",
                            error_text="RXG-15: not a decimal number", error_field="RXG-15", condition="102"), tmp_path)
    assert ar.err.err_2.to_er7() == "RXG^1^15"
    assert ar.err.err_3.to_er7() == "102^Data type error^HL70357"
    assert ar.err.err_4.value == "E"
    with pytest.raises(MessageError):
        order_reply(header(), "r", "AR", SENDER, at=AT, condition="999")


def test_error_location() -> None:
    assert error_location("RXG-15") == ("RXG", "1", "15")
    assert error_location("OBX-18.1") == ("OBX", "1", "18", "1", "1")
    assert error_location("ORC") == ("ORC", "1")
    assert error_location("message") == ()


def test_replies_to_garbage_with_a_readable_msh(tmp_path: Path) -> None:
    garbage = "MSH|^~\\&|X^^|Y|DRIVERD|WARD7|2026||ZZZ^Q99|g-1|T|9.9\rthis is\x00 not | a segment\r\x1c"
    head = read_header(garbage)
    assert head is not None and head.control_id == "g-1" and head.sender == Endpoint("X", "Y")
    for text in (accept_ack(head, "a", "CR", SENDER, "not an order", at=AT),
                 order_reply(head, "r", "AR", SENDER, at=AT, error_code="message_type", error_field="MSH-9",
                             condition="200")):
        msg = strict(text, tmp_path)
        assert msg.msa.msa_2.value == "g-1"
        assert msg.msh.msh_5.to_er7() == "X"


# ---------------------------------------------------------------------------------------------- ACK in


def apy_ack(code: str, control: str = "c-1", text: str = "", err: str = "") -> str:
    msg = ApyMessage("ACK", version="2.6", validation_level=VALIDATION_LEVEL.STRICT)
    msg.msh.msh_3 = "CIS"
    msg.msh.msh_7 = "20261202162435+0000"
    msg.msh.msh_9 = "ACK^R01^ACK"
    msg.msh.msh_10 = "ack-9"
    msg.msh.msh_11 = "P"
    msg.msh.msh_12 = "2.6"
    msg.msa.msa_1 = code
    msg.msa.msa_2 = control
    if text:
        msg.msa.msa_3 = text
    if err:
        msg.err.err_3 = "207^Application internal error^HL70357"
        msg.err.err_4 = "E"
        msg.err.err_8 = err
    out: str = msg.to_er7()
    return out


@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
def test_parse_ack_of_an_independent_ack(code: str) -> None:
    assert parse_ack(apy_ack(code)) == AckInfo("c-1", code, "")


def test_parse_ack_text() -> None:
    assert parse_ack(apy_ack("AE", text="no room")).text == "no room"
    assert parse_ack(apy_ack("AR", err="bad \\F\\ field")).text == "bad | field"
    own = accept_ack(header(control_id="x^1"), "a", "CR", SENDER, "busy", at=AT)
    assert parse_ack(own) == AckInfo("x^1", "CR", "busy")
    assert parse_ack(own.replace("\r", "\r\n")) == AckInfo("x^1", "CR", "busy")


MALFORMED_ACKS: dict[str, tuple[str, str]] = {
    "not hl7": ("hello", "MSH"),
    "other encoding": ("MSH|^~\\#&|A|B\rMSA|AA|c", "MSH"),
    "no msa": ("MSH|^~\\&|A|B|C|D|2026||ACK^R01^ACK|x|P|2.6", "MSA"),
    "two msa": ("MSH|^~\\&|A|B|C|D|2026||ACK|x|P|2.6\rMSA|AA|c\rMSA|AA|d", "MSA"),
    "two msh": ("MSH|^~\\&|A|B|C|D|2026||ACK|x|P|2.6\rMSA|AA|c\rMSH|^~\\&|A", "MSH"),
    "not an ack": ("MSH|^~\\&|A|B|C|D|2026||ORU^R01|x|P|2.6\rMSA|AA|c", "MSH-9"),
    "bad code": ("MSH|^~\\&|A|B|C|D|2026||ACK|x|P|2.6\rMSA|OK|c", "MSA-1"),
    "no control id": ("MSH|^~\\&|A|B|C|D|2026||ACK|x|P|2.6\rMSA|AA|", "MSA-2"),
    "control char": ("MSH|^~\\&|A|B|C|D|2026||ACK|x|P|2.6\rMSA|AA|c\x00", "message"),
    "hex escape": ("MSH|^~\\&|A|B|C|D|2026||ACK|x|P|2.6\rMSA|AA|c\\X0A\\", "MSA-2"),
    "too long": ("MSH|^~\\&|A|B|C|D|2026||ACK|x|P|2.6\rMSA|AA|c|" + "x" * 70_000, "message"),
    "long text": ("MSH|^~\\&|A|B|C|D|2026||ACK|x|P|2.6\rMSA|AA|c|" + "x" * 2000, "MSA-3"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_ACKS))
def test_parse_ack_names_the_field(name: str) -> None:
    text, field = MALFORMED_ACKS[name]
    with pytest.raises(AckError) as caught:
        parse_ack(text)
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ": ")
    assert isinstance(caught.value, DriverdError)


@given(st.text(max_size=300) | st.builds(lambda s: "MSH|^~\\&|" + s, st.text(max_size=300)))
def test_parse_ack_raises_only_ack_errors(text: str) -> None:
    with contextlib.suppress(AckError):
        parse_ack(text)


def test_parse_ack_refuses_non_text() -> None:
    with pytest.raises(AckError):
        parse_ack(b"MSH|^~\\&|" )  # type: ignore[arg-type]
