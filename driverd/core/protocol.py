"""The drug-library entry (protocol spec): hard limits loaded from TOML text and validated.

Parsing takes text, not a path: the shell reads the file, the core judges it. Unknown keys are errors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from driverd.core.errors import ConfigError, Problem, QuantityError
from driverd.core.exposure import MAX_GAP_DAYS, ExposureLimits
from driverd.core.quantities import (
    MAX_CONCENTRATION_MG_PER_ML,
    MAX_DIAMETER_MM,
    MAX_DOSE_MG_PER_24H,
    MAX_RATE_ML_PER_H,
    MAX_VOLUME_ML,
    parse_decimal,
)
from driverd.core.toml_text import load_toml

#: The coarsest counter step any drug library may allow (docs/safety.md, SUP-20).
MAX_COUNTER_STEP_ML = Decimal("0.1")


@dataclass(frozen=True, slots=True)
class SyringeSpec:
    model: str
    inner_diameter_mm: Decimal
    max_fill_ml: Decimal
    # What the pump can run with this syringe (its plunger speed range times the bore; issue 16). None: only
    # the [device] limits apply. The kernel checks the narrower of the two, so the pump never has to refuse.
    min_rate_ml_per_h: Decimal | None = None
    max_rate_ml_per_h: Decimal | None = None


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    id: str
    version: str
    content_sha256: str
    drug: str
    route: str
    diluent: str
    bolus_allowed: bool
    ceiling_mg_per_24h: Decimal
    start_max_mg_per_24h: Decimal
    allowed_mg_per_24h: tuple[Decimal, ...]
    max_step_mg_per_24h: Decimal
    step_interval_hours: Decimal
    max_titration_steps: int
    hold_days_max: Decimal
    max_course_days: Decimal
    taper_max_hours: Decimal
    concentrations_mg_per_ml: tuple[Decimal, ...]
    syringes: tuple[SyringeSpec, ...]
    min_rate_ml_per_h: Decimal
    max_rate_ml_per_h: Decimal
    # [supervision] (optional): how what the pump really delivers is watched (GIP 1.2.2-1.2.3 accuracy).
    deviation_window_minutes: Decimal = Decimal(15)  # over/under-infusion must persist this long
    deviation_limit: Decimal = Decimal("0.10")  # relative error that counts as over/under-infusion
    counter_resolution_ml: Decimal = Decimal("0.01")  # the pump's delivered-volume display step (noise allowance)
    # The coarsest counter step a reading may have and still be judged: a coarser one (or one that is no positive
    # number) widens no allowance; it is the alarm `counter_step` (machine.counter_step_problem, SUP-20).
    max_counter_step_ml: Decimal = MAX_COUNTER_STEP_ML
    syringe_warning_minutes: Decimal = Decimal(60)  # warn this long before the syringe is predicted to run empty
    # [exposure] (optional): limits across the courses of one patient (driverd.core.exposure). None: not enforced.
    exposure: ExposureLimits | None = None

    @property
    def library_version(self) -> str:
        """What is logged as the drug-library version in force: declared version + content hash."""
        return f"{self.id}@{self.version}+sha256:{self.content_sha256}"

    def syringe(self, model: str) -> SyringeSpec | None:
        return next((s for s in self.syringes if s.model == model), None)

    def rate_limits(self, syringe: SyringeSpec) -> tuple[Decimal, Decimal]:
        """(min, max) mL/h for a non-zero rate with this syringe: the narrower of [device] and the syringe's."""
        lo, hi = self.min_rate_ml_per_h, self.max_rate_ml_per_h
        if syringe.min_rate_ml_per_h is not None:
            lo = max(lo, syringe.min_rate_ml_per_h)
        if syringe.max_rate_ml_per_h is not None:
            hi = min(hi, syringe.max_rate_ml_per_h)
        return lo, hi


_SCHEMA: dict[str, dict[str, str]] = {
    "library": {
        "id": "str", "version": "str", "drug": "str", "route": "str", "diluent": "str", "bolus_allowed": "bool",
    },
    "dose": {
        "ceiling_mg_per_24h": "dose",
        "start_max_mg_per_24h": "dose",
        "allowed_mg_per_24h": "doses",
        "max_step_mg_per_24h": "dose",
        "step_interval_hours": "hours",
        "max_titration_steps": "int",
    },
    "course": {"hold_days_max": "days", "max_course_days": "days", "taper_max_hours": "hours"},
    "concentrations": {"allowed_mg_per_ml": "concs"},
    "device": {"min_rate_ml_per_h": "rate", "max_rate_ml_per_h": "rate"},
}
_SYRINGE_KEYS = {"inner_diameter_mm": MAX_DIAMETER_MM, "max_fill_ml": MAX_VOLUME_ML}
_SYRINGE_OPTIONAL = {"min_rate_ml_per_h": MAX_RATE_ML_PER_H, "max_rate_ml_per_h": MAX_RATE_ML_PER_H}
_MAX = {
    "dose": MAX_DOSE_MG_PER_24H,
    "hours": Decimal(24 * 60),
    "days": Decimal(60),
    "rate": MAX_RATE_ML_PER_H,
}


def _field(value: Any, kind: str, path: str, problems: list[Problem]) -> Any:
    try:
        if kind == "str":
            if not isinstance(value, str) or not value.strip():
                raise QuantityError(path, "type", "expected a non-empty string")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise QuantityError(path, "type", "expected true or false")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
                raise QuantityError(path, "type", "expected an integer 1..100")
            return value
        if kind in ("doses", "concs"):
            if not isinstance(value, list) or not value:
                raise QuantityError(path, "type", "expected a non-empty list of numbers")
            mx = MAX_DOSE_MG_PER_24H if kind == "doses" else MAX_CONCENTRATION_MG_PER_ML
            items = [parse_decimal(v, f"{path}[{i}]", maximum=mx, allow_zero=False) for i, v in enumerate(value)]
            if items != sorted(set(items)):
                raise QuantityError(path, "ascending", "values must be strictly increasing")
            return tuple(items)
        return parse_decimal(value, path, maximum=_MAX[kind], allow_zero=False)
    except QuantityError as exc:
        problems.extend(exc.problems)
        return None


def parse_protocol(text: str) -> ProtocolSpec:
    """Parse and validate a drug-library TOML document. Raises ConfigError listing every problem."""
    problems: list[Problem] = []
    doc = load_toml(text)
    values: dict[str, Any] = {}
    for key in doc:
        if key not in _SCHEMA and key not in ("syringes", "supervision", "exposure"):
            problems.append(Problem(key, "unknown-key", f"unknown section {key!r}"))
    for section, fields in _SCHEMA.items():
        table = doc.get(section)
        if not isinstance(table, dict):
            problems.append(Problem(section, "required", f"missing section [{section}]"))
            continue
        for key in table:
            if key not in fields:
                problems.append(Problem(f"{section}.{key}", "unknown-key", f"unknown key {key!r}"))
        for key, kind in fields.items():
            if key not in table:
                problems.append(Problem(f"{section}.{key}", "required", "missing"))
            else:
                values[key] = _field(table[key], kind, f"{section}.{key}", problems)
    supervision = _parse_supervision(doc.get("supervision"), problems)
    exposure = _parse_exposure(doc.get("exposure"), problems)
    syringes: list[SyringeSpec] = []
    raw_syringes = doc.get("syringes")
    if not isinstance(raw_syringes, dict) or not raw_syringes:
        problems.append(Problem("syringes", "required", "at least one [syringes.\"model\"] table"))
    else:
        for model, table in raw_syringes.items():
            base = f"syringes.{model}"
            if not isinstance(table, dict):
                problems.append(Problem(base, "type", "expected a table"))
                continue
            for key in table:
                if key not in _SYRINGE_KEYS and key not in _SYRINGE_OPTIONAL:
                    problems.append(Problem(f"{base}.{key}", "unknown-key", f"unknown key {key!r}"))
            got = {}
            for key, mx in _SYRINGE_KEYS.items():
                if key not in table:
                    problems.append(Problem(f"{base}.{key}", "required", "missing"))
                    continue
                try:
                    got[key] = parse_decimal(table[key], f"{base}.{key}", maximum=mx, allow_zero=False)
                except QuantityError as exc:
                    problems.extend(exc.problems)
            limits: dict[str, Decimal] = {}
            for key, mx in _SYRINGE_OPTIONAL.items():
                if key in table:
                    try:
                        limits[key] = parse_decimal(table[key], f"{base}.{key}", maximum=mx, allow_zero=False)
                    except QuantityError as exc:
                        problems.extend(exc.problems)
            lo, hi = limits.get("min_rate_ml_per_h"), limits.get("max_rate_ml_per_h")
            if lo is not None and hi is not None and lo >= hi:
                problems.append(
                    Problem(f"{base}.min_rate_ml_per_h", "range", f"must be below {base}.max_rate_ml_per_h")
                )
            if len(got) == 2:
                syringes.append(SyringeSpec(model, got["inner_diameter_mm"], got["max_fill_ml"], lo, hi))
    if not problems:
        _check_coherence(values, problems)
    if problems:
        raise ConfigError(problems)
    return ProtocolSpec(
        id=values["id"],
        version=values["version"],
        content_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        drug=values["drug"],
        route=values["route"],
        diluent=values["diluent"],
        bolus_allowed=values["bolus_allowed"],
        ceiling_mg_per_24h=values["ceiling_mg_per_24h"],
        start_max_mg_per_24h=values["start_max_mg_per_24h"],
        allowed_mg_per_24h=values["allowed_mg_per_24h"],
        max_step_mg_per_24h=values["max_step_mg_per_24h"],
        step_interval_hours=values["step_interval_hours"],
        max_titration_steps=values["max_titration_steps"],
        hold_days_max=values["hold_days_max"],
        max_course_days=values["max_course_days"],
        taper_max_hours=values["taper_max_hours"],
        concentrations_mg_per_ml=values["allowed_mg_per_ml"],
        syringes=tuple(syringes),
        min_rate_ml_per_h=values["min_rate_ml_per_h"],
        max_rate_ml_per_h=values["max_rate_ml_per_h"],
        **supervision,
        exposure=exposure,
    )


def _parse_exposure(table: Any, problems: list[Problem]) -> ExposureLimits | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        problems.append(Problem("exposure", "type", "expected a table"))
        return None
    keys = {"min_gap_days": MAX_GAP_DAYS, "cumulative_mg_per_30_days": MAX_DOSE_MG_PER_24H * 30,
            "max_bursts_per_90_days": None}
    for key in table:
        if key not in keys:
            problems.append(Problem(f"exposure.{key}", "unknown-key", f"unknown key {key!r}"))
    got: dict[str, Any] = {}
    for key, mx in keys.items():
        if key not in table:
            problems.append(Problem(f"exposure.{key}", "required", "missing"))
        elif mx is None:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
                problems.append(Problem(f"exposure.{key}", "type", "expected an integer 1..100"))
            else:
                got[key] = value
        else:
            try:
                got[key] = parse_decimal(table[key], f"exposure.{key}", maximum=mx, allow_zero=False)
            except QuantityError as exc:
                problems.extend(exc.problems)
    if len(got) < len(keys):
        return None
    return ExposureLimits(got["min_gap_days"], got["cumulative_mg_per_30_days"], got["max_bursts_per_90_days"])


_SUPERVISION: dict[str, tuple[Decimal, Decimal]] = {  # key -> (maximum, default)
    "deviation_window_minutes": (Decimal(240), Decimal(15)),
    "deviation_limit": (Decimal("0.5"), Decimal("0.10")),
    "counter_resolution_ml": (Decimal(1), Decimal("0.01")),
    # At most 0.1 mL (a New Era display's step from 100 mL; Modbus maps are held to 0.01): a library may lower it,
    # never widen the ceiling's allowance beyond two such steps. counter_resolution_ml is held to it too.
    "max_counter_step_ml": (MAX_COUNTER_STEP_ML, MAX_COUNTER_STEP_ML),
    "syringe_warning_minutes": (Decimal(1440), Decimal(60)),
}


def _parse_supervision(table: Any, problems: list[Problem]) -> dict[str, Decimal]:
    out = {key: default for key, (_, default) in _SUPERVISION.items()}
    if table is None:
        return out
    if not isinstance(table, dict):
        problems.append(Problem("supervision", "type", "expected a table"))
        return out
    for key, value in table.items():
        if key not in _SUPERVISION:
            problems.append(Problem(f"supervision.{key}", "unknown-key", f"unknown key {key!r}"))
            continue
        try:
            out[key] = parse_decimal(value, f"supervision.{key}", maximum=_SUPERVISION[key][0], allow_zero=False)
        except QuantityError as exc:
            problems.extend(exc.problems)
    if out["counter_resolution_ml"] > out["max_counter_step_ml"]:
        problems.append(Problem("supervision.counter_resolution_ml", "range",
                                f"must be at most supervision.max_counter_step_ml ({out['max_counter_step_ml']} mL)"))
    return out


def _check_coherence(v: dict[str, Any], problems: list[Problem]) -> None:
    if v["bolus_allowed"]:
        problems.append(Problem("library.bolus_allowed", "no-bolus", "this daemon has no bolus path; must be false"))
    if max(v["allowed_mg_per_24h"]) > v["ceiling_mg_per_24h"]:
        problems.append(Problem("dose.allowed_mg_per_24h", "ceiling", "an allowed dose exceeds the ceiling"))
    if v["start_max_mg_per_24h"] > v["ceiling_mg_per_24h"]:
        problems.append(Problem("dose.start_max_mg_per_24h", "ceiling", "start maximum exceeds the ceiling"))
    if v["min_rate_ml_per_h"] >= v["max_rate_ml_per_h"]:
        problems.append(Problem("device.min_rate_ml_per_h", "range", "must be below device.max_rate_ml_per_h"))
