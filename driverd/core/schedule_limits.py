"""Limits and patterns of a schedule document, shared with config/schemas/schedule.schema.json
(tests/schedule/test_schedule_schema.py keeps the two in step)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Final

# --- limits shared with the JSON Schema (keep in step with config/schemas/schedule.schema.json) ---------
MAX_DOCUMENT_BYTES: Final = 1 << 20
MAX_STEPS: Final = 64
MAX_TAPER_STEPS: Final = 64
MAX_APPROVALS: Final = 16
MAX_TEXT: Final = 256
MAX_ID: Final = 128
MAX_VERSION: Final = 2**53 - 1  # largest integer every JSON implementation holds exactly
QUANTITY_LIMIT: Final = Decimal(1_000_000)  # exclusive
QUANTITY_PLACES: Final = 6
MIN_YEAR: Final = 2000
MAX_YEAR: Final = 2999

ROLES: Final = ("prescriber", "pharmacist")
SIGNATURE_ALG: Final = "ed25519"

# Patterns are matched with fullmatch, and every string is also checked for control characters: that is
# what the schema's `^...$` plus `not: {pattern: CONTROL}` mean (`$` alone would allow a trailing "\n").
CONTROL_CHARS: Final = "[\u0000-\u001f\u007f-\u009f\ud800-\udfff\u2028\u2029]"
ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._:@+-]*"
QUANTITY_PATTERN: Final = r"(0|[1-9][0-9]{0,5})(\.[0-9]{1,6})?"
TIMESTAMP_PATTERN: Final = (
    r"([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9])(\.[0-9]{1,6})?"
    r"(Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
KEY_ID_PATTERN: Final = r"[0-9a-f]{16}"
SIGNATURE_VALUE_PATTERN: Final = r"[A-Za-z0-9+/]{86}=="  # base64 of 64 bytes

CONTROL_RE: Final = re.compile(CONTROL_CHARS)
ID_RE: Final = re.compile(ID_PATTERN)
QUANTITY_RE: Final = re.compile(QUANTITY_PATTERN)
TIMESTAMP_RE: Final = re.compile(TIMESTAMP_PATTERN)
KEY_ID_RE: Final = re.compile(KEY_ID_PATTERN)
SIG_VALUE_RE: Final = re.compile(SIGNATURE_VALUE_PATTERN)

TOP_REQUIRED: Final = (
    "schedule_id",
    "version",
    "pump_id",
    "protocol",
    "patient_ref",
    "drug",
    "syringe",
    "steps",
    "hold_days",
    "taper",
    "approved_by",
    "approved_at",
    "expires_at",
)
TOP_OPTIONAL: Final = ("signature", "syringes", "handover_note", "exposure_override")
MAX_SYRINGE_FILLS: Final = 64

SECONDS_PER_DAY: Final = Decimal(86400)
