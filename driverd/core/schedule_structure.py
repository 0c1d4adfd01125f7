"""The structural pass over a schedule document: types, required and unknown fields, patterns, lengths,
bounds. A pure-Python mirror of config/schemas/schedule.schema.json (the tests prove they agree). It reads what
it can into a RawSchedule for the semantic pass."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from driverd.core.errors import Problem
from driverd.core.schedule import Signature
from driverd.core.schedule_limits import (
    CONTROL_RE,
    ID_RE,
    KEY_ID_RE,
    MAX_APPROVALS,
    MAX_ID,
    MAX_STEPS,
    MAX_SYRINGE_FILLS,
    MAX_TAPER_STEPS,
    MAX_TEXT,
    MAX_VERSION,
    QUANTITY_LIMIT,
    QUANTITY_PLACES,
    QUANTITY_RE,
    ROLES,
    SIG_VALUE_RE,
    SIGNATURE_ALG,
    TOP_OPTIONAL,
    TOP_REQUIRED,
)
from driverd.core.schedule_values import json_pointer, read_timestamp, show_text, type_name

# --- structure ----------------------------------------------------------------------------------------------


@dataclass
class RawStep:
    dose: Decimal | None = None
    not_before: datetime | None = None
    auto: bool | None = None


@dataclass
class RawTaper:
    dose: Decimal | None = None
    after_hours: Decimal | None = None


@dataclass
class RawSchedule:
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
    steps: list[RawStep] | None = None
    hold_days: Decimal | None = None
    taper: list[RawTaper] | None = None  # [] means "stop"
    approvals: list[tuple[str | None, str | None]] | None = None
    approved_at: datetime | None = None
    expires_at: datetime | None = None
    signature: Signature | None = None
    syringes: RawSupply | None = None  # None: not stated (or malformed: then a structural problem is reported)
    handover_note: str | None = None
    override_reason: str | None = None
    override_approvals: list[tuple[str | None, str | None]] | None = None
    has_override: bool = False


@dataclass
class RawSupply:
    change_every_hours: Decimal | None = None
    fills: list[tuple[Decimal | None, Decimal | None]] | None = None  # (fill, concentration or None = the drug's)


@dataclass
class StructureReader:
    structural: list[Problem] = field(default_factory=list)
    late: list[Problem] = field(default_factory=list)  # semantic problems found while converting

    def bad(self, path: str, rule: str, detail: str) -> None:
        self.structural.append(Problem(path, rule, detail))

    def obj(
        self, value: object, path: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> Mapping[str, object] | None:
        if not isinstance(value, Mapping):
            self.bad(path, "type", f"expected an object, got {type_name(value)}")
            return None
        allowed = set(required) | set(optional)
        for key in value:
            if not isinstance(key, str):
                self.bad(path, "type", f"object keys must be strings, got {type_name(key)}")
            elif key not in allowed:
                self.bad(json_pointer(path, key), "unknown-field", f"unknown field {show_text(key)}")
        for key in required:
            if key not in value:
                self.bad(json_pointer(path, key), "required", "missing required field")
        return value

    def array(self, value: object, path: str, *, min_items: int, max_items: int) -> Sequence[object] | None:
        if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
            self.bad(path, "type", f"expected an array, got {type_name(value)}")
            return None
        if len(value) < min_items:
            self.bad(path, "size", f"needs at least {min_items} item(s)")
        if len(value) > max_items:
            self.bad(path, "size", f"at most {max_items} items allowed, got {len(value)}")
            return None  # don't walk absurd arrays item by item
        return value

    def string(self, value: object, path: str, max_len: int) -> str | None:
        if not isinstance(value, str):
            self.bad(path, "type", f"expected a string, got {type_name(value)}")
            return None
        ok = True
        if not 1 <= len(value) <= max_len:
            self.bad(path, "length", f"must be 1..{max_len} characters, got {len(value)}")
            ok = False
        if CONTROL_RE.search(value):
            self.bad(path, "format", "must not contain control characters or lone surrogates")
            ok = False
        return value if ok else None

    def ident(self, value: object, path: str) -> str | None:
        text = self.string(value, path, MAX_ID)
        if text is not None and not ID_RE.fullmatch(text):
            self.bad(path, "format", "identifier: letters, digits and . _ : @ + - only, starting alphanumeric")
            return None
        return text

    def text(self, value: object, path: str) -> str | None:
        return self.string(value, path, MAX_TEXT)

    def pattern(self, value: object, path: str, regex: re.Pattern[str], what: str) -> str | None:
        if not isinstance(value, str):
            self.bad(path, "type", f"expected a string, got {type_name(value)}")
            return None
        if not regex.fullmatch(value) or CONTROL_RE.search(value):
            self.bad(path, "format", f"expected {what}")
            return None
        return value

    def enum(self, value: object, path: str, allowed: Sequence[str]) -> str | None:
        if not isinstance(value, str):
            self.bad(path, "type", f"expected a string, got {type_name(value)}")
            return None
        if value not in allowed:
            self.bad(path, "enum", f"must be one of {', '.join(allowed)}")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.bad(path, "type", f"expected true or false, got {type_name(value)}")
            return None
        return value

    def integer(self, value: object, path: str, lo: int, hi: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(path, "type", f"expected an integer, got {type_name(value)}")
            return None
        if not lo <= value <= hi:
            self.bad(path, "range", f"must be {lo}..{hi}")
            return None
        return value

    def quantity(self, value: object, path: str) -> Decimal | None:
        """A non-negative number below 1e6 with at most 6 decimal places, as a JSON number or string."""
        if isinstance(value, str):
            if not QUANTITY_RE.fullmatch(value) or CONTROL_RE.search(value):
                self.bad(path, "format", "numeric string must be plain decimal like \"12.5\" (< 1000000, <= 6 places)")
                return None
            return Decimal(value)
        if isinstance(value, float):
            self.bad(path, "type", "binary float refused: parse JSON with parse_float=Decimal")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            self.bad(path, "type", f"expected a number or numeric string, got {type_name(value)}")
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
            self.bad(path, "type", f"expected an RFC 3339 string, got {type_name(value)}")
            return None
        return read_timestamp(value, path, self.structural, self.late)

    # -- the document ------------------------------------------------------------------------------------

    def read(self, doc: object) -> RawSchedule:
        raw = RawSchedule()
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

    def _syringes(self, value: object) -> RawSupply | None:
        if isinstance(value, Mapping):
            obj = self.obj(value, "/syringes", ("change_every_hours",))
            if obj is None or "change_every_hours" not in obj:
                return None
            hours = self.quantity(obj["change_every_hours"], "/syringes/change_every_hours")
            return None if hours is None else RawSupply(change_every_hours=hours)
        if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
            self.bad("/syringes", "type",
                     f'expected {{"change_every_hours": H}} or an array of syringe fills, got {type_name(value)}')
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
        return RawSupply(fills=fills)

    def _steps(self, value: object) -> list[RawStep] | None:
        items = self.array(value, "/steps", min_items=1, max_items=MAX_STEPS)
        if items is None:
            return None
        steps: list[RawStep] = []
        for i, item in enumerate(items):
            path = f"/steps/{i}"
            step = RawStep()
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

    def _taper(self, value: object) -> list[RawTaper] | None:
        if isinstance(value, str):
            if value != "stop":
                self.bad("/taper", "enum", 'must be "stop" or a list of taper steps')
                return None
            return []
        if isinstance(value, Mapping) or not isinstance(value, Sequence):
            self.bad("/taper", "type", f'expected "stop" or an array, got {type_name(value)}')
            return None
        items = self.array(value, "/taper", min_items=1, max_items=MAX_TAPER_STEPS)
        if items is None:
            return None
        taper: list[RawTaper] = []
        for i, item in enumerate(items):
            path = f"/taper/{i}"
            t = RawTaper()
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
            key_id = self.pattern(obj["key_id"], "/signature/key_id", KEY_ID_RE, "16 lowercase hex digits")
        if "alg" in obj:
            alg = self.enum(obj["alg"], "/signature/alg", (SIGNATURE_ALG,))
        if "value" in obj:
            sig = self.pattern(obj["value"], "/signature/value", SIG_VALUE_RE, "base64 of a 64-byte signature")
        if key_id is None or alg is None or sig is None:
            return None
        return Signature(key_id=key_id, value=sig)


def check_structure(doc: object) -> list[Problem]:
    """Problems the JSON Schema would find (its pure mirror). Empty list = structurally valid."""
    reader = StructureReader()
    reader.read(doc)
    return reader.structural
