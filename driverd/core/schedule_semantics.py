"""The semantic pass over a schedule document: the drug library's limits, ordering, intervals, course length,
approvals and expiry. Pure; `now` is passed in."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from driverd.core.errors import Problem, QuantityError
from driverd.core.protocol import ProtocolSpec
from driverd.core.quantities import NEW_ERA_RESOLUTION, dose_to_rate, quantize_down
from driverd.core.schedule import Schedule
from driverd.core.schedule_limits import ROLES, SECONDS_PER_DAY
from driverd.core.schedule_structure import RawSchedule
from driverd.core.schedule_values import fmt, seconds_of

# --- semantics ----------------------------------------------------------------------------------------------


def step_rate_ml_per_h(dose_mg_per_24h: Decimal, concentration_mg_per_ml: Decimal) -> Decimal:
    """The rate a New Era pump is sent for a dose: dose/24/concentration quantized toward less drug."""
    return quantize_down(dose_to_rate(dose_mg_per_24h, concentration_mg_per_ml), NEW_ERA_RESOLUTION)


def course_length_days(schedule: Schedule) -> Decimal:
    """(last step time − first step time) + hold + the taper's last after_hours, in days."""
    span_s = seconds_of(schedule.steps[-1].not_before - schedule.steps[0].not_before)
    taper_h = schedule.taper[-1].after_hours if schedule.taper else Decimal(0)
    return (span_s + schedule.hold_days * SECONDS_PER_DAY + taper_h * 3600) / SECONDS_PER_DAY


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
            Problem(path, "rate", f"{fmt(rate)} mL/h is below the device minimum {spec.min_rate_ml_per_h} mL/h")
        )
    elif rate > spec.max_rate_ml_per_h:
        problems.append(
            Problem(path, "rate", f"{fmt(rate)} mL/h is above the device maximum {spec.max_rate_ml_per_h} mL/h")
        )


def check_semantics(raw: RawSchedule, spec: ProtocolSpec, now: datetime | None, problems: list[Problem]) -> None:
    if raw.protocol is not None and raw.protocol != spec.id:
        problems.append(Problem("/protocol", "protocol", f"must be {spec.id!r} (the loaded drug library)"))
    if raw.drug_name is not None and raw.drug_name.casefold() != spec.drug.casefold():
        problems.append(Problem("/drug/name", "drug", f"must be {spec.drug!r} for protocol {spec.id!r}"))
    conc = raw.concentration
    if conc is not None and conc not in spec.concentrations_mg_per_ml:
        allowed = ", ".join(fmt(c) for c in spec.concentrations_mg_per_ml)
        problems.append(
            Problem("/drug/concentration_mg_per_ml", "concentration", f"{fmt(conc)} mg/mL not in {{{allowed}}}")
        )
        conc = None  # no rate checks against a concentration that is refused anyway
    _check_syringe(raw, spec, problems)
    top = _check_steps(raw, spec, conc, problems)
    if raw.hold_days is not None and not 0 < raw.hold_days <= spec.hold_days_max:
        problems.append(
            Problem("/hold_days", "hold-days", f"must be > 0 and <= {fmt(spec.hold_days_max)} days")
        )
    _check_taper(raw, spec, conc, top, problems)
    _check_course_length(raw, spec, problems)
    _check_approvals(raw, now, problems)
    _check_supply(raw, spec, problems)
    _check_override(raw, problems)


def _check_override(raw: RawSchedule, problems: list[Problem]) -> None:
    """Two different people, one of them a prescriber (the other a second prescriber or a pharmacist)."""
    approvals = raw.override_approvals
    if approvals is None or any(r is None or i is None for r, i in approvals):
        return
    ids = {i for _, i in approvals}
    if len(ids) < 2 or len(ids) < len(approvals) or "prescriber" not in {r for r, _ in approvals}:
        problems.append(Problem("/exposure_override/approved_by", "approvals",
                                "needs two different people: a prescriber and a second prescriber or a pharmacist"))


def _check_supply(raw: RawSchedule, spec: ProtocolSpec, problems: list[Problem]) -> None:
    sup = raw.syringes
    if sup is None:
        return
    if sup.change_every_hours is not None:
        most = spec.max_course_days * 24
        if not 1 <= sup.change_every_hours <= most:
            problems.append(Problem("/syringes/change_every_hours", "syringes",
                                    f"must be >= 1 and <= {fmt(most)} h (the longest course)"))
        return
    syr = spec.syringe(raw.syringe_model) if raw.syringe_model is not None else None
    for i, (fill, conc) in enumerate(sup.fills or ()):
        path = f"/syringes/{i}"
        if fill is not None and syr is not None and not 0 < fill <= syr.max_fill_ml:
            problems.append(Problem(f"{path}/fill_volume_ml", "fill-volume",
                                    f"must be > 0 and <= {fmt(syr.max_fill_ml)} mL"))
        if conc is None:
            continue
        cpath = f"{path}/concentration_mg_per_ml"
        if conc not in spec.concentrations_mg_per_ml:
            allowed = ", ".join(fmt(c) for c in spec.concentrations_mg_per_ml)
            problems.append(Problem(cpath, "concentration", f"{fmt(conc)} mg/mL not in {{{allowed}}}"))
            continue
        doses = [s.dose for s in raw.steps or () if s.dose is not None]
        doses += [t.dose for t in raw.taper or () if t.dose is not None]
        for dose in doses:
            before = len(problems)
            _check_rate(dose, conc, spec, cpath, problems)
            if len(problems) > before:
                break  # one rate problem per syringe is enough to name it


def _check_syringe(raw: RawSchedule, spec: ProtocolSpec, problems: list[Problem]) -> None:
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
                f"{syr.model} has inner diameter {fmt(syr.inner_diameter_mm)} mm",
            )
        )
    if raw.fill_volume is not None and not 0 < raw.fill_volume <= syr.max_fill_ml:
        problems.append(
            Problem("/syringe/fill_volume_ml", "fill-volume", f"must be > 0 and <= {fmt(syr.max_fill_ml)} mL")
        )


def _check_steps(
    raw: RawSchedule, spec: ProtocolSpec, conc: Decimal | None, problems: list[Problem]
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
                        f"{fmt(step.dose)} mg/24h exceeds the ceiling {fmt(spec.ceiling_mg_per_24h)} mg/24h",
                    )
                )
            elif step.dose not in spec.allowed_mg_per_24h:
                allowed = ", ".join(fmt(d) for d in spec.allowed_mg_per_24h)
                problems.append(Problem(dpath, "allowed-dose", f"{fmt(step.dose)} mg/24h not in {{{allowed}}}"))
            elif i == 0 and step.dose > spec.start_max_mg_per_24h:
                problems.append(
                    Problem(dpath, "start-dose", f"first step must be <= {fmt(spec.start_max_mg_per_24h)} mg/24h")
                )
            if prev is not None and prev.dose is not None:
                if step.dose <= prev.dose:
                    problems.append(Problem(dpath, "order", "doses must strictly increase from step to step"))
                elif step.dose - prev.dose > spec.max_step_mg_per_24h:
                    problems.append(
                        Problem(
                            dpath,
                            "max-step",
                            f"increase above the maximum step {fmt(spec.max_step_mg_per_24h)} mg/24h",
                        )
                    )
            _check_rate(step.dose, conc, spec, dpath, problems)
        if step.not_before is not None and prev is not None and prev.not_before is not None:
            tpath = f"{path}/not_before"
            gap = seconds_of(step.not_before - prev.not_before)
            if gap <= 0:
                problems.append(Problem(tpath, "order", "not_before must strictly increase from step to step"))
            elif gap < interval_s:
                problems.append(
                    Problem(tpath, "interval", f"must be >= {fmt(spec.step_interval_hours)} h after the previous step")
                )
    doses = [s.dose for s in steps if s.dose is not None]
    return max(doses) if doses and len(doses) == len(steps) else None


def _check_taper(
    raw: RawSchedule, spec: ProtocolSpec, conc: Decimal | None, top: Decimal | None, problems: list[Problem]
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
                problems.append(Problem(dpath, "taper", f"taper doses must be below the top step dose {fmt(top)}"))
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
            Problem(f"{lpath}/after_hours", "taper", f"taper must end within {fmt(spec.taper_max_hours)} h")
        )


def _check_course_length(raw: RawSchedule, spec: ProtocolSpec, problems: list[Problem]) -> None:
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
    total_s = seconds_of(last - first) + raw.hold_days * SECONDS_PER_DAY + taper_h * 3600
    if total_s > spec.max_course_days * SECONDS_PER_DAY:
        days = (total_s / SECONDS_PER_DAY).quantize(Decimal("0.01"))
        problems.append(
            Problem(
                "",
                "course-length",
                f"titration span + hold + taper = {fmt(days)} days "
                f"exceeds the maximum course of {fmt(spec.max_course_days)} days",
            )
        )


def _check_approvals(raw: RawSchedule, now: datetime | None, problems: list[Problem]) -> None:
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

