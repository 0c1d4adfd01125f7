"""PCD-03 orders as an infusion order programmer (an EMR via its engine) would send them, for tests.

Written out field by field here, independently of driverd's own parser, and checked against the v2.6 RGV^O15
structure with hl7apy in test_orders_e2e.
"""

from __future__ import annotations

from typing import Any


def rgv_o15(
    control_id: str,
    pump_id: str = "bed-1",
    *,
    order_control: str = "XO",
    rate: str | None = "300",
    rate_units: str = "mg/(24.h)^mg/(24.h)^UCUM",
    drug: str = "ketamine^Ketamine^99DRUG",
    strength: str = "100",
    strength_units: str = "mg/mL^mg/mL^UCUM",
    patient: str | None = "DEMO-PATIENT-0001",
    by: str = "dr-hl7^Who^Jo",
    accept_ack: str = "AL",
    application_ack: str = "AL",
    **_: Any,
) -> str:
    segs = [
        f"MSH|^~\\&|EMR|WARD|DRIVERD|DRIVERD|20261201100000+0000||RGV^O15^RGV_O15|{control_id}|P|2.6|||"
        f"{accept_ack}|{application_ack}||||||IHE_PCD_PIV_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.3.1^ISO",
    ]
    if patient is not None:
        segs.append(f"PID|||{patient}^^^HOSP^MR||Doe^Pat")
    segs.append(f"ORC|{order_control}|ORD-{control_id}|||||||20261201100000+0000|||{by}")
    rxg = ["RXG", "1", "", "", drug, "0", "", "mL^mL^UCUM", "", "", "", "", "", "", "",
           rate or "", rate_units if rate is not None else "", strength, strength_units]
    segs.append("|".join(rxg))
    segs.append("RXR|SC^Subcutaneous^HL70162")
    segs.append(f"OBX|1||69986^MDC_DEV_PUMP_INFUS_VMD^MDC|1.1.1||||||||||||||{pump_id}^^DRIVERD")
    return "\r".join(segs) + "\r"
