"""Schedule documents: strict JSON loading, structural checks, semantic validation, the frozen model.

Two layers, both reporting every problem at once (ValidationError with Problem(path, rule, detail)):

1. Structure (`check_structure`): types, required/unknown fields, string patterns and lengths, numeric
   bounds, list sizes. This is a pure-Python mirror of config/schemas/schedule.schema.json; the tests
   prove the two accept and reject the same documents.
2. Semantics (`parse_schedule`): the drug-library limits of a ProtocolSpec, ordering, intervals, course
   length, approvals and (when `now` is given) expiry.

Pure: no I/O, no clock. The shell reads bytes and passes the time in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Final, TypeVar

from driverd.core.canonical import content_digest, decimal_text
from driverd.core.errors import Problem, QuantityError, ValidationError
from driverd.core.protocol import ProtocolSpec
from driverd.core.quantities import NEW_ERA_RESOLUTION, dose_to_rate, quantize_down
from driverd.core.schedule import (
    Approval,
    ExposureOverride,
    Schedule,
    Signature,
    Step,
    SyringeFill,
    SyringeSupply,
    TaperStep,
)
from driverd.core.volume_plan import plan_course

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

_CONTROL_RE: Final = re.compile(CONTROL_CHARS)
_ID_RE: Final = re.compile(ID_PATTERN)
_QUANTITY_RE: Final = re.compile(QUANTITY_PATTERN)
_TIMESTAMP_RE: Final = re.compile(TIMESTAMP_PATTERN)
_KEY_ID_RE: Final = re.compile(KEY_ID_PATTERN)
_SIG_VALUE_RE: Final = re.compile(SIGNATURE_VALUE_PATTERN)

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

_SECONDS_PER_DAY: Final = Decimal(86400)
_T = TypeVar("_T")


# --- JSON loading ------------------------------------------------------------------------------------------


class _Refused(ValueError):
    """Raised from json hooks; turned into a Problem by load_json."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule
        self.detail = detail


def _no_constants(name: str) -> object:
    raise _Refused("json", f"{name} is not a JSON number")


_MAX_NUMBER_CHARS: Final = 100


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_NUMBER_CHARS:
        raise _Refused("range", f"integer literal with {len(text)} digits")
    return int(text)


def _bounded_decimal(text: str) -> Decimal:
    # A literal like 1e999999999999999999999 is beyond Decimal's exponent range (InvalidOperation), and a
    # 100 kB literal is no quantity: both are refused here, before any arithmetic sees them.
    if len(text) > _MAX_NUMBER_CHARS:
        raise _Refused("range", f"number literal of {len(text)} characters")
    try:
        return Decimal(text)
    except ArithmeticError:
        raise _Refused("range", f"number {text[:40]} is out of range") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            # Duplicate keys are read differently by different parsers: a signature-confusion risk.
            raise _Refused("duplicate-key", f"key {_show(key)} appears more than once in one object")
        out[key] = value
    return out


def load_json(data: bytes | str) -> object:
    """Parse a schedule document strictly: UTF-8, size-limited, numbers as Decimal/int, no NaN/Infinity,
    no duplicate keys. Raises ValidationError (rule `size`, `encoding`, `json`, `duplicate-key`, `range`)."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ValidationError([Problem("", "size", f"document larger than {MAX_DOCUMENT_BYTES} bytes")])
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError([Problem("", "encoding", f"not UTF-8 (byte offset {exc.start})")]) from None
    else:
        text = data
    try:
        return json.loads(
            text,
            parse_float=_bounded_decimal,
            parse_int=_bounded_int,
            parse_constant=_no_constants,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        detail = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise ValidationError([Problem("", "json", detail)]) from None
    except _Refused as exc:
        raise ValidationError([Problem("", exc.rule, exc.detail)]) from None
    except RecursionError:
        raise ValidationError([Problem("", "json", "JSON nested too deeply")]) from None
    except ValueError as exc:  # e.g. Python's own integer-digit limit
        raise ValidationError([Problem("", "json", f"invalid JSON: {exc}")]) from None


# --- paths and small helpers -----------------------------------------------------------------------------


def _show(key: str) -> str:
    """A key or value as safe printable text (control characters escaped, long text cut)."""
    cut = key if len(key) <= 64 else key[:64] + "..."
    return ascii(cut) if (_CONTROL_RE.search(cut) or not cut.isprintable()) else repr(cut)


def _ptr(base: str, key: str | int) -> str:
    """JSON-pointer child path (RFC 6901 escaping); unprintable keys are shown escaped."""
    if isinstance(key, int):
        return f"{base}/{key}"
    text = key if len(key) <= 64 and key.isprintable() and not _CONTROL_RE.search(key) else _show(key)
    return f"{base}/" + text.replace("~", "~0").replace("/", "~1")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, Decimal)):
        return "number"
    if isinstance(value, float):
        return "binary float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, Sequence):
        return "array"
    return type(value).__name__


def parse_timestamp(text: str, path: str = "") -> datetime:
    """RFC 3339 with an explicit offset (`Z` or `±hh:mm`) into an aware datetime; raises ValidationError."""
    problems: list[Problem] = []
    value = _timestamp(text, path, problems, problems)
    if value is None:
        raise ValidationError(problems)
    return value


def _timestamp(value: str, path: str, structural: list[Problem], late: list[Problem]) -> datetime | None:
    m = _TIMESTAMP_RE.fullmatch(value)
    if m is None or _CONTROL_RE.search(value):
        structural.append(
            Problem(path, "format", "expected RFC 3339 date-time with an offset, e.g. 2026-12-01T09:00:00+00:00")
        )
        return None
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    micro = int((m.group(7) or ".")[1:].ljust(6, "0"))
    offset_text = m.group(8)
    if offset_text == "Z":
        tz = UTC
    else:
        sign = -1 if offset_text[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(offset_text[1:3]), minutes=int(offset_text[4:6])))
    if not MIN_YEAR <= year <= MAX_YEAR:
        late.append(Problem(path, "range", f"year {year} outside {MIN_YEAR}..{MAX_YEAR}"))
        return None
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError as exc:
        late.append(Problem(path, "format", f"not a calendar date-time: {exc}"))
        return None


def _seconds(delta: timedelta) -> Decimal:
    return Decimal(delta.days) * _SECONDS_PER_DAY + Decimal(delta.seconds) + Decimal(delta.microseconds) / 10**6


def _fmt(d: Decimal) -> str:
    return decimal_text(d)


# --- structure ----------------------------------------------------------------------------------------------


@dataclass
class _RawStep:
    dose: Decimal | None = None
    not_before: datetime | None = None
    auto: bool | None = None


@dataclass
class _RawTaper:
    dose: Decimal | None = None
    after_hours: Decimal | None = None


@dataclass
class _Raw:
    """What the structural pass could read; None where a field was missing or malformed."""

    schedule_id: str | None = None
    version: int | None = None
    pump_id: str | None = None
    protocol: str | None = None
    patient_ref: str | None = None
    drug_name: str | None = None
    concentration: Decimal | None = None
    syringe_model: str | None = None
    inner_diameter: Decimal | None = None
    fill_volume: Decimal | None = None
    steps: list[_RawStep] | None = None
    hold_days: Decimal | None = None
    taper: list[_RawTaper] | None = None  # [] means "stop"
    approvals: list[tuple[str | None, str | None]] | None = None
    approved_at: datetime | None = None
    expires_at: datetime | None = None
    signature: Signature | None = None
    syringes: _RawSupply | None = None  # None: not stated (or malformed: then a structural problem is reported)
    handover_note: str | None = None
    override_reason: str | None = None
    override_approvals: list[tuple[str | None, str | None]] | None = None
    has_override: bool = False


@dataclass
class _RawSupply:
    change_every_hours: Decimal | None = None
    fills: list[tuple[Decimal | None, Decimal | None]] | None = None  # (fill, concentration or None = the drug's)


@dataclass
class _Reader:
    structural: list[Problem] = field(default_factory=list)
    late: list[Problem] = field(default_factory=list)  # semantic problems found while converting

    def bad(self, path: str, rule: str, detail: str) -> None:
        self.structural.append(Problem(path, rule, detail))

    def obj(
        self, value: object, path: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> Mapping[str, object] | None:
        if not isinstance(value, Mapping):
            self.bad(path, "type", f"expected an object, got {_type_name(value)}")
            return None
        allowed = set(required) | set(optional)
        for key in value:
            if not isinstance(key, str):
                self.bad(path, "type", f"object keys must be strings, got {_type_name(key)}")
            elif key not in allowed:
                self.bad(_ptr(path, key), "unknown-field", f"unknown field {_show(key)}")
        for key in required:
            if key not in value:
                self.bad(_ptr(path, key), "required", "missing required field")
        return value

    def array(self, value: object, path: str, *, min_items: int, max_items: int) -> Sequence[object] | None:
        if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
            self.bad(path, "type", f"expected an array, got {_type_name(value)}")
            return None
        if len(value) < min_items:
            self.bad(path, "size", f"needs at least {min_items} item(s)")
        if len(value) > max_items:
            self.bad(path, "size", f"at most {max_items} items allowed, got {len(value)}")
            return None  # don't walk absurd arrays item by item
        return value

    def string(self, value: object, path: str, max_len: int) -> str | None:
        if not isinstance(value, str):
            self.bad(path, "type", f"expected a string, got {_type_name(value)}")
            return None
        ok = True
        if not 1 <= len(value) <= max_len:
            self.bad(path, "length", f"must be 1..{max_len} characters, got {len(value)}")
            ok = False
        if _CONTROL_RE.search(value):
            self.bad(path, "format", "must not contain control characters or lone surrogates")
            ok = False
        return value if ok else None

    def ident(self, value: object, path: str) -> str | None:
        text = self.string(value, path, MAX_ID)
        if text is not None and not _ID_RE.fullmatch(text):
            self.bad(path, "format", "identifier: letters, digits and . _ : @ + - only, starting alphanumeric")
            return None
        return text

    def text(self, value: object, path: str) -> str | None:
        return self.string(value, path, MAX_TEXT)

    def pattern(self, value: object, path: str, regex: re.Pattern[str], what: str) -> str | None:
        if not isinstance(value, str):
            self.bad(path, "type", f"expected a string, got {_type_name(value)}")
            return None
        if not regex.fullmatch(value) or _CONTROL_RE.search(value):
            self.bad(path, "format", f"expected {what}")
            return None
        return value

    def enum(self, value: object, path: str, allowed: Sequence[str]) -> str | None:
        if not isinstance(value, str):
            self.bad(path, "type", f"expected a string, got {_type_name(value)}")
            return None
        if value not in allowed:
            self.bad(path, "enum", f"must be one of {', '.join(allowed)}")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.bad(path, "type", f"expected true or false, got {_type_name(value)}")
            return None
        return value

    def integer(self, value: object, path: str, lo: int, hi: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(path, "type", f"expected an integer, got {_type_name(value)}")
            return None
        if not lo <= value <= hi:
            self.bad(path, "range", f"must be {lo}..{hi}")
            return None
        return value

    def quantity(self, value: object, path: str) -> Decimal | None:
        """A non-negative number below 1e6 with at most 6 decimal places, as a JSON number or string."""
        if isinstance(value, str):
            if not _QUANTITY_RE.fullmatch(value) or _CONTROL_RE.search(value):
                self.bad(path, "format", "numeric string must be plain decimal like \"12.5\" (< 1000000, <= 6 places)")
                return None
            return Decimal(value)
        if isinstance(value, float):
            self.bad(path, "type", "binary float refused: parse JSON with parse_float=Decimal")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            self.bad(path, "type", f"expected a number or numeric string, got {_type_name(value)}")
            return None
        d = Decimal(value)
        if not d.is_finite() or d < 0 or d >= QUANTITY_LIMIT:
            self.bad(path, "range", f"must be >= 0 and < {QUANTITY_LIMIT}")
            return None
        # Exact check on the digits (no context arithmetic): at most 6 places after trailing zeros go. Zero too:
        # 0E-999999999 is zero, but printing it takes a gigabyte of "0.000...".
        _, digits, exponent = d.as_tuple()
        assert isinstance(exponent, int)
        trailing = len(digits) - len("".join(map(str, digits)).rstrip("0"))
        if exponent + trailing < -QUANTITY_PLACES:
            self.bad(path, "range", f"at most {QUANTITY_PLACES} decimal places")
            return None
        return d

    def time(self, value: object, path: str) -> datetime | None:
        if not isinstance(value, str):
            self.bad(path, "type", f"expected an RFC 3339 string, got {_type_name(value)}")
            return None
        return _timestamp(value, path, self.structural, self.late)

    # -- the document ------------------------------------------------------------------------------------

    def read(self, doc: object) -> _Raw:
        raw = _Raw()
        top = self.obj(doc, "", TOP_REQUIRED, TOP_OPTIONAL)
        if top is None:
            return raw
        if "schedule_id" in top:
            raw.schedule_id = self.ident(top["schedule_id"], "/schedule_id")
        if "version" in top:
            raw.version = self.integer(top["version"], "/version", 1, MAX_VERSION)
        if "pump_id" in top:
            raw.pump_id = self.ident(top["pump_id"], "/pump_id")
        if "protocol" in top:
            raw.protocol = self.ident(top["protocol"], "/protocol")
        if "patient_ref" in top:
            raw.patient_ref = self.ident(top["patient_ref"], "/patient_ref")
        if "drug" in top:
            drug = self.obj(top["drug"], "/drug", ("name", "concentration_mg_per_ml"))
            if drug is not None:
                if "name" in drug:
                    raw.drug_name = self.text(drug["name"], "/drug/name")
                if "concentration_mg_per_ml" in drug:
                    raw.concentration = self.quantity(
                        drug["concentration_mg_per_ml"], "/drug/concentration_mg_per_ml"
                    )
        if "syringe" in top:
            syr = self.obj(top["syringe"], "/syringe", ("model", "inner_diameter_mm", "fill_volume_ml"))
            if syr is not None:
                if "model" in syr:
                    raw.syringe_model = self.text(syr["model"], "/syringe/model")
                if "inner_diameter_mm" in syr:
                    raw.inner_diameter = self.quantity(syr["inner_diameter_mm"], "/syringe/inner_diameter_mm")
                if "fill_volume_ml" in syr:
                    raw.fill_volume = self.quantity(syr["fill_volume_ml"], "/syringe/fill_volume_ml")
        if "steps" in top:
            raw.steps = self._steps(top["steps"])
        if "hold_days" in top:
            raw.hold_days = self.quantity(top["hold_days"], "/hold_days")
        if "taper" in top:
            raw.taper = self._taper(top["taper"])
        if "approved_by" in top:
            raw.approvals = self._approvals(top["approved_by"])
        if "approved_at" in top:
            raw.approved_at = self.time(top["approved_at"], "/approved_at")
        if "expires_at" in top:
            raw.expires_at = self.time(top["expires_at"], "/expires_at")
        if "signature" in top:
            raw.signature = self._signature(top["signature"])
        if "syringes" in top:
            raw.syringes = self._syringes(top["syringes"])
        if "handover_note" in top:
            raw.handover_note = self.text(top["handover_note"], "/handover_note")
        if "exposure_override" in top:
            raw.has_override = True
            obj = self.obj(top["exposure_override"], "/exposure_override", ("reason", "approved_by"))
            if obj is not None:
                if "reason" in obj:
                    raw.override_reason = self.text(obj["reason"], "/exposure_override/reason")
                if "approved_by" in obj:
                    raw.override_approvals = self._approvals(obj["approved_by"], "/exposure_override/approved_by")
        return raw

    def _syringes(self, value: object) -> _RawSupply | None:
        if isinstance(value, Mapping):
            obj = self.obj(value, "/syringes", ("change_every_hours",))
            if obj is None or "change_every_hours" not in obj:
                return None
            hours = self.quantity(obj["change_every_hours"], "/syringes/change_every_hours")
            return None if hours is None else _RawSupply(change_every_hours=hours)
        if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
            self.bad("/syringes", "type",
                     f'expected {{"change_every_hours": H}} or an array of syringe fills, got {_type_name(value)}')
            return None
        items = self.array(value, "/syringes", min_items=1, max_items=MAX_SYRINGE_FILLS)
        if items is None:
            return None
        fills: list[tuple[Decimal | None, Decimal | None]] = []
        for i, item in enumerate(items):
            path = f"/syringes/{i}"
            fill = conc = None
            obj = self.obj(item, path, ("fill_volume_ml",), ("concentration_mg_per_ml",))
            if obj is not None:
                if "fill_volume_ml" in obj:
                    fill = self.quantity(obj["fill_volume_ml"], f"{path}/fill_volume_ml")
                if "concentration_mg_per_ml" in obj:
                    conc = self.quantity(obj["concentration_mg_per_ml"], f"{path}/concentration_mg_per_ml")
            fills.append((fill, conc))
        return _RawSupply(fills=fills)

    def _steps(self, value: object) -> list[_RawStep] | None:
        items = self.array(value, "/steps", min_items=1, max_items=MAX_STEPS)
        if items is None:
            return None
        steps: list[_RawStep] = []
        for i, item in enumerate(items):
            path = f"/steps/{i}"
            step = _RawStep()
            obj = self.obj(item, path, ("dose_mg_per_24h", "not_before", "auto"))
            if obj is not None:
                if "dose_mg_per_24h" in obj:
                    step.dose = self.quantity(obj["dose_mg_per_24h"], f"{path}/dose_mg_per_24h")
                if "not_before" in obj:
                    step.not_before = self.time(obj["not_before"], f"{path}/not_before")
                if "auto" in obj:
                    step.auto = self.boolean(obj["auto"], f"{path}/auto")
            steps.append(step)
        return steps

    def _taper(self, value: object) -> list[_RawTaper] | None:
        if isinstance(value, str):
            if value != "stop":
                self.bad("/taper", "enum", 'must be "stop" or a list of taper steps')
                return None
            return []
        if isinstance(value, Mapping) or not isinstance(value, Sequence):
            self.bad("/taper", "type", f'expected "stop" or an array, got {_type_name(value)}')
            return None
        items = self.array(value, "/taper", min_items=1, max_items=MAX_TAPER_STEPS)
        if items is None:
            return None
        taper: list[_RawTaper] = []
        for i, item in enumerate(items):
            path = f"/taper/{i}"
            t = _RawTaper()
            obj = self.obj(item, path, ("dose_mg_per_24h", "after_hours"))
            if obj is not None:
                if "dose_mg_per_24h" in obj:
                    t.dose = self.quantity(obj["dose_mg_per_24h"], f"{path}/dose_mg_per_24h")
                if "after_hours" in obj:
                    t.after_hours = self.quantity(obj["after_hours"], f"{path}/after_hours")
            taper.append(t)
        return taper

    def _approvals(self, value: object, base: str = "/approved_by") -> list[tuple[str | None, str | None]] | None:
        items = self.array(value, base, min_items=0, max_items=MAX_APPROVALS)
        if items is None:
            return None
        out: list[tuple[str | None, str | None]] = []
        for i, item in enumerate(items):
            path = f"{base}/{i}"
            role = ident = None
            obj = self.obj(item, path, ("role", "id"))
            if obj is not None:
                if "role" in obj:
                    role = self.enum(obj["role"], f"{path}/role", ROLES)
                if "id" in obj:
                    ident = self.ident(obj["id"], f"{path}/id")
            out.append((role, ident))
        return out

    def _signature(self, value: object) -> Signature | None:
        obj = self.obj(value, "/signature", ("key_id", "alg", "value"))
        if obj is None:
            return None
        key_id = alg = sig = None
        if "key_id" in obj:
            key_id = self.pattern(obj["key_id"], "/signature/key_id", _KEY_ID_RE, "16 lowercase hex digits")
        if "alg" in obj:
            alg = self.enum(obj["alg"], "/signature/alg", (SIGNATURE_ALG,))
        if "value" in obj:
            sig = self.pattern(obj["value"], "/signature/value", _SIG_VALUE_RE, "base64 of a 64-byte signature")
        if key_id is None or alg is None or sig is None:
            return None
        return Signature(key_id=key_id, value=sig)


def check_structure(doc: object) -> list[Problem]:
    """Problems the JSON Schema would find (its pure mirror). Empty list = structurally valid."""
    reader = _Reader()
    reader.read(doc)
    return reader.structural


# --- semantics ----------------------------------------------------------------------------------------------


def step_rate_ml_per_h(dose_mg_per_24h: Decimal, concentration_mg_per_ml: Decimal) -> Decimal:
    """The rate a New Era pump is sent for a dose: dose/24/concentration quantized toward less drug."""
    return quantize_down(dose_to_rate(dose_mg_per_24h, concentration_mg_per_ml), NEW_ERA_RESOLUTION)


def course_length_days(schedule: Schedule) -> Decimal:
    """(last step time − first step time) + hold + the taper's last after_hours, in days."""
    span_s = _seconds(schedule.steps[-1].not_before - schedule.steps[0].not_before)
    taper_h = schedule.taper[-1].after_hours if schedule.taper else Decimal(0)
    return (span_s + schedule.hold_days * _SECONDS_PER_DAY + taper_h * 3600) / _SECONDS_PER_DAY


def _check_rate(
    dose: Decimal, conc: Decimal | None, spec: ProtocolSpec, path: str, problems: list[Problem]
) -> None:
    if conc is None or dose == 0:
        return
    try:
        rate = step_rate_ml_per_h(dose, conc)
    except QuantityError:
        problems.append(Problem(path, "rate", "the pump cannot represent the rate for this dose"))
        return
    if rate < spec.min_rate_ml_per_h:
        problems.append(
            Problem(path, "rate", f"{_fmt(rate)} mL/h is below the device minimum {spec.min_rate_ml_per_h} mL/h")
        )
    elif rate > spec.max_rate_ml_per_h:
        problems.append(
            Problem(path, "rate", f"{_fmt(rate)} mL/h is above the device maximum {spec.max_rate_ml_per_h} mL/h")
        )


def _semantic(raw: _Raw, spec: ProtocolSpec, now: datetime | None, problems: list[Problem]) -> None:
    if raw.protocol is not None and raw.protocol != spec.id:
        problems.append(Problem("/protocol", "protocol", f"must be {spec.id!r} (the loaded drug library)"))
    if raw.drug_name is not None and raw.drug_name.casefold() != spec.drug.casefold():
        problems.append(Problem("/drug/name", "drug", f"must be {spec.drug!r} for protocol {spec.id!r}"))
    conc = raw.concentration
    if conc is not None and conc not in spec.concentrations_mg_per_ml:
        allowed = ", ".join(_fmt(c) for c in spec.concentrations_mg_per_ml)
        problems.append(
            Problem("/drug/concentration_mg_per_ml", "concentration", f"{_fmt(conc)} mg/mL not in {{{allowed}}}")
        )
        conc = None  # no rate checks against a concentration that is refused anyway
    _check_syringe(raw, spec, problems)
    top = _check_steps(raw, spec, conc, problems)
    if raw.hold_days is not None and not 0 < raw.hold_days <= spec.hold_days_max:
        problems.append(
            Problem("/hold_days", "hold-days", f"must be > 0 and <= {_fmt(spec.hold_days_max)} days")
        )
    _check_taper(raw, spec, conc, top, problems)
    _check_course_length(raw, spec, problems)
    _check_approvals(raw, now, problems)
    _check_supply(raw, spec, problems)
    _check_override(raw, problems)


def _check_override(raw: _Raw, problems: list[Problem]) -> None:
    """Two different people, one of them a prescriber (the other a second prescriber or a pharmacist)."""
    approvals = raw.override_approvals
    if approvals is None or any(r is None or i is None for r, i in approvals):
        return
    ids = {i for _, i in approvals}
    if len(ids) < 2 or len(ids) < len(approvals) or "prescriber" not in {r for r, _ in approvals}:
        problems.append(Problem("/exposure_override/approved_by", "approvals",
                                "needs two different people: a prescriber and a second prescriber or a pharmacist"))


def _check_supply(raw: _Raw, spec: ProtocolSpec, problems: list[Problem]) -> None:
    sup = raw.syringes
    if sup is None:
        return
    if sup.change_every_hours is not None:
        most = spec.max_course_days * 24
        if not 1 <= sup.change_every_hours <= most:
            problems.append(Problem("/syringes/change_every_hours", "syringes",
                                    f"must be >= 1 and <= {_fmt(most)} h (the longest course)"))
        return
    syr = spec.syringe(raw.syringe_model) if raw.syringe_model is not None else None
    for i, (fill, conc) in enumerate(sup.fills or ()):
        path = f"/syringes/{i}"
        if fill is not None and syr is not None and not 0 < fill <= syr.max_fill_ml:
            problems.append(Problem(f"{path}/fill_volume_ml", "fill-volume",
                                    f"must be > 0 and <= {_fmt(syr.max_fill_ml)} mL"))
        if conc is None:
            continue
        cpath = f"{path}/concentration_mg_per_ml"
        if conc not in spec.concentrations_mg_per_ml:
            allowed = ", ".join(_fmt(c) for c in spec.concentrations_mg_per_ml)
            problems.append(Problem(cpath, "concentration", f"{_fmt(conc)} mg/mL not in {{{allowed}}}"))
            continue
        doses = [s.dose for s in raw.steps or () if s.dose is not None]
        doses += [t.dose for t in raw.taper or () if t.dose is not None]
        for dose in doses:
            before = len(problems)
            _check_rate(dose, conc, spec, cpath, problems)
            if len(problems) > before:
                break  # one rate problem per syringe is enough to name it


def _check_syringe(raw: _Raw, spec: ProtocolSpec, problems: list[Problem]) -> None:
    if raw.syringe_model is None:
        return
    syr = spec.syringe(raw.syringe_model)
    if syr is None:
        known = ", ".join(repr(s.model) for s in spec.syringes)
        problems.append(Problem("/syringe/model", "syringe", f"unknown syringe model; known: {known}"))
        return
    if raw.inner_diameter is not None and raw.inner_diameter != syr.inner_diameter_mm:
        problems.append(
            Problem(
                "/syringe/inner_diameter_mm",
                "syringe",
                f"{syr.model} has inner diameter {_fmt(syr.inner_diameter_mm)} mm",
            )
        )
    if raw.fill_volume is not None and not 0 < raw.fill_volume <= syr.max_fill_ml:
        problems.append(
            Problem("/syringe/fill_volume_ml", "fill-volume", f"must be > 0 and <= {_fmt(syr.max_fill_ml)} mL")
        )


def _check_steps(
    raw: _Raw, spec: ProtocolSpec, conc: Decimal | None, problems: list[Problem]
) -> Decimal | None:
    """Check the titration steps; return the top dose (None if unknown)."""
    steps = raw.steps
    if steps is None:
        return None
    if len(steps) > spec.max_titration_steps:
        problems.append(
            Problem("/steps", "step-count", f"at most {spec.max_titration_steps} titration steps, got {len(steps)}")
        )
    interval_s = spec.step_interval_hours * 3600
    for i, step in enumerate(steps):
        path = f"/steps/{i}"
        prev = steps[i - 1] if i else None
        if step.dose is not None:
            dpath = f"{path}/dose_mg_per_24h"
            if step.dose > spec.ceiling_mg_per_24h:
                problems.append(
                    Problem(
                        dpath,
                        "ceiling",
                        f"{_fmt(step.dose)} mg/24h exceeds the ceiling {_fmt(spec.ceiling_mg_per_24h)} mg/24h",
                    )
                )
            elif step.dose not in spec.allowed_mg_per_24h:
                allowed = ", ".join(_fmt(d) for d in spec.allowed_mg_per_24h)
                problems.append(Problem(dpath, "allowed-dose", f"{_fmt(step.dose)} mg/24h not in {{{allowed}}}"))
            elif i == 0 and step.dose > spec.start_max_mg_per_24h:
                problems.append(
                    Problem(dpath, "start-dose", f"first step must be <= {_fmt(spec.start_max_mg_per_24h)} mg/24h")
                )
            if prev is not None and prev.dose is not None:
                if step.dose <= prev.dose:
                    problems.append(Problem(dpath, "order", "doses must strictly increase from step to step"))
                elif step.dose - prev.dose > spec.max_step_mg_per_24h:
                    problems.append(
                        Problem(
                            dpath,
                            "max-step",
                            f"increase above the maximum step {_fmt(spec.max_step_mg_per_24h)} mg/24h",
                        )
                    )
            _check_rate(step.dose, conc, spec, dpath, problems)
        if step.not_before is not None and prev is not None and prev.not_before is not None:
            tpath = f"{path}/not_before"
            gap = _seconds(step.not_before - prev.not_before)
            if gap <= 0:
                problems.append(Problem(tpath, "order", "not_before must strictly increase from step to step"))
            elif gap < interval_s:
                problems.append(
                    Problem(tpath, "interval", f"must be >= {_fmt(spec.step_interval_hours)} h after the previous step")
                )
    doses = [s.dose for s in steps if s.dose is not None]
    return max(doses) if doses and len(doses) == len(steps) else None


def _check_taper(
    raw: _Raw, spec: ProtocolSpec, conc: Decimal | None, top: Decimal | None, problems: list[Problem]
) -> None:
    taper = raw.taper
    if not taper:  # None (broken) or [] ("stop")
        return
    for i, t in enumerate(taper):
        path = f"/taper/{i}"
        prev = taper[i - 1] if i else None
        if t.dose is not None:
            dpath = f"{path}/dose_mg_per_24h"
            if top is not None and t.dose >= top:
                problems.append(Problem(dpath, "taper", f"taper doses must be below the top step dose {_fmt(top)}"))
            if prev is not None and prev.dose is not None and t.dose >= prev.dose:
                problems.append(Problem(dpath, "order", "taper doses must strictly decrease"))
            _check_rate(t.dose, conc, spec, dpath, problems)
        if t.after_hours is not None and prev is not None and prev.after_hours is not None and (
            t.after_hours <= prev.after_hours
        ):
            problems.append(Problem(f"{path}/after_hours", "order", "after_hours must strictly increase"))
    last = taper[-1]
    lpath = f"/taper/{len(taper) - 1}"
    if last.dose is not None and last.dose != 0:
        problems.append(Problem(f"{lpath}/dose_mg_per_24h", "taper", "the last taper step must be 0 (stop)"))
    if last.after_hours is not None and last.after_hours > spec.taper_max_hours:
        problems.append(
            Problem(f"{lpath}/after_hours", "taper", f"taper must end within {_fmt(spec.taper_max_hours)} h")
        )


def _check_course_length(raw: _Raw, spec: ProtocolSpec, problems: list[Problem]) -> None:
    steps = raw.steps
    if not steps or raw.hold_days is None or raw.taper is None:
        return
    first, last = steps[0].not_before, steps[-1].not_before
    if first is None or last is None:
        return
    taper_h = raw.taper[-1].after_hours if raw.taper else Decimal(0)
    if taper_h is None:
        return
    # Compare in seconds: exact, no division.
    total_s = _seconds(last - first) + raw.hold_days * _SECONDS_PER_DAY + taper_h * 3600
    if total_s > spec.max_course_days * _SECONDS_PER_DAY:
        days = (total_s / _SECONDS_PER_DAY).quantize(Decimal("0.01"))
        problems.append(
            Problem(
                "",
                "course-length",
                f"titration span + hold + taper = {_fmt(days)} days "
                f"exceeds the maximum course of {_fmt(spec.max_course_days)} days",
            )
        )


def _check_approvals(raw: _Raw, now: datetime | None, problems: list[Problem]) -> None:
    if raw.approvals is not None:
        roles = {role for role, _ in raw.approvals}
        for role in ROLES:
            if role not in roles and all(r is not None for r, _ in raw.approvals):
                problems.append(Problem("/approved_by", "approvals", f"needs an approval by a {role}"))
        seen: set[str] = set()
        for i, (_, ident) in enumerate(raw.approvals):
            if ident is None:
                continue
            if ident in seen:
                problems.append(
                    Problem(f"/approved_by/{i}/id", "approvals", "each approval must be by a different person")
                )
            seen.add(ident)
    if raw.approved_at is not None and raw.expires_at is not None and raw.approved_at > raw.expires_at:
        problems.append(Problem("/expires_at", "order", "expires_at must not be before approved_at"))
    if now is not None:
        if raw.expires_at is not None and now >= raw.expires_at:
            problems.append(Problem("/expires_at", "expired", f"expired at {raw.expires_at.isoformat()}"))
        if raw.approved_at is not None and raw.approved_at > now:
            problems.append(
                Problem("/approved_at", "not-yet-valid", f"approved_at {raw.approved_at.isoformat()} is in the future")
            )


# --- entry point -------------------------------------------------------------------------------------------


def parse_schedule(
    doc: Mapping[str, object], protocol: ProtocolSpec, *, now: datetime | None = None, check_volume: bool = True
) -> Schedule:
    """Validate a schedule document against the structure and the protocol's limits; build the Schedule.

    `now` (timezone-aware) enables the expiry / not-yet-valid checks; None skips them (replay).
    Raises ValidationError listing every problem found. The signature is NOT verified here (that needs
    the trust store, in driverd.signing); only its shape is checked. `check_volume=False` skips only the volume
    plan (`volume_plan.plan_course`), for a caller that reports the plan and its problems itself.
    """
    if now is not None and (now.tzinfo is None or now.utcoffset() is None):
        raise ValueError("now must be timezone-aware")
    reader = _Reader()
    raw = reader.read(doc)
    problems = reader.structural + reader.late
    _semantic(raw, protocol, now, problems)
    if problems:
        raise ValidationError(problems)
    schedule = _build(raw, doc)
    # Only a schedule valid in every other respect is planned: the plan needs its whole timeline.
    plan = plan_course(schedule) if check_volume else None
    if plan is not None and plan.problems:
        raise ValidationError(list(plan.problems))
    return schedule


def _need(value: _T | None) -> _T:
    # Only reached when no problem was reported, i.e. every field was read.
    if value is None:
        raise AssertionError("schedule field missing after successful validation")
    return value


def _build(raw: _Raw, doc: Mapping[str, object]) -> Schedule:
    steps = tuple(
        Step(dose_mg_per_24h=_need(s.dose), not_before=_need(s.not_before), auto=_need(s.auto))
        for s in _need(raw.steps)
    )
    taper = tuple(
        TaperStep(dose_mg_per_24h=_need(t.dose), after_hours=_need(t.after_hours)) for t in _need(raw.taper)
    )
    approvals = tuple(Approval(role=_need(r), id=_need(i)) for r, i in _need(raw.approvals))
    return Schedule(
        schedule_id=_need(raw.schedule_id),
        version=_need(raw.version),
        pump_id=_need(raw.pump_id),
        protocol=_need(raw.protocol),
        patient_ref=_need(raw.patient_ref),
        drug_name=_need(raw.drug_name),
        concentration_mg_per_ml=_need(raw.concentration),
        syringe_model=_need(raw.syringe_model),
        inner_diameter_mm=_need(raw.inner_diameter),
        fill_volume_ml=_need(raw.fill_volume),
        steps=steps,
        hold_days=_need(raw.hold_days),
        taper=taper,
        approved_by=approvals,
        approved_at=_need(raw.approved_at),
        expires_at=_need(raw.expires_at),
        signature=raw.signature,
        digest=content_digest(doc),
        syringes=_build_supply(raw),
        handover_note=raw.handover_note,
        exposure_override=None if not raw.has_override else ExposureOverride(
            _need(raw.override_reason),
            tuple(Approval(role=_need(r), id=_need(i)) for r, i in _need(raw.override_approvals))),
    )


def _build_supply(raw: _Raw) -> SyringeSupply | None:
    sup = raw.syringes
    if sup is None:
        return None
    if sup.change_every_hours is not None:
        return SyringeSupply(change_every_hours=sup.change_every_hours)
    conc = _need(raw.concentration)
    return SyringeSupply(fills=tuple(SyringeFill(_need(f), c if c is not None else conc) for f, c in _need(sup.fills)))
