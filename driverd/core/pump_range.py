"""Can this pump run what the drug library and the approved course ask of it? Pure.

A syringe pump runs only rates between its plunger's slowest and fastest speed times the syringe's bore
(`driverd.core.syringe_limits`); outside them it refuses the rate (New Era ``?OOR``). The kernel keeps every
non-zero rate inside the drug library's limits for the syringe (`ProtocolSpec.rate_limits`), so a pump that can
run that whole range never has to refuse a rate the kernel approved. Two checks, made by the core when the
channel reports the pump's range for the loaded bore (`PumpVerified` when priming a course, `SyringeLoaded` at a
syringe load; docs/safety.md, SUP-19):

- `range_problem`: the library's range for the syringe lies inside the pump's range (and the pump states one);
- `plan_problem`: every non-zero rate the approved schedule will command (each step and taper dose at each
  concentration the schedule approves, quantized to the pump's resolution toward less drug) is one the kernel
  will send: not 0 and inside the library's range, so (given the first) inside the pump's.

Before, the commissioning engineer checked the first by hand (docs/simulators.md), and a course whose taper
step fell below the minimum found out mid-course (`device_min`, or the pump's ``?OOR``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from driverd.core.errors import QuantityError
from driverd.core.protocol import ProtocolSpec, SyringeSpec
from driverd.core.quantities import Resolution, dose_to_rate, quantize_down
from driverd.core.quantities import fmt as _t
from driverd.core.schedule import Schedule

#: Alarm and refusal code: the library's range for the syringe is not inside the pump's, or the pump states none.
PUMP_RANGE = "pump_range"
#: Alarm and refusal code: a rate of the approved course is one the kernel would refuse or the pump cannot run.
PLANNED_RATE = "planned_rate"


@dataclass(frozen=True, slots=True)
class PumpRange:
    """What the pump's driver reports it can run with the loaded bore, in mL/h at the pump's resolution (minimum
    rounded up, maximum down): both None when the driver cannot tell (a Modbus map without a plunger range)."""

    url: str
    min_ml_per_h: Decimal | None
    max_ml_per_h: Decimal | None

    @property
    def known(self) -> bool:
        return self.min_ml_per_h is not None and self.max_ml_per_h is not None

    def text(self) -> str:
        if self.min_ml_per_h is None or self.max_ml_per_h is None:
            return "no rate range (the driver cannot tell)"
        return f"{_t(self.min_ml_per_h)}..{_t(self.max_ml_per_h)} mL/h"


def range_problem(protocol: ProtocolSpec, spec: SyringeSpec, pump: PumpRange, diameter_mm: Decimal) -> str | None:
    """None if the library's rate limits for `spec` lie inside the pump's range; otherwise what is wrong, naming
    the syringe, the pump and both ranges. An unknown range is a problem: nothing could show the pump runs them."""
    lo, hi = protocol.rate_limits(spec)
    where = f"syringe {spec.model!r} ({_t(diameter_mm)} mm) on {pump.url}: drug library {_t(lo)}..{_t(hi)} mL/h"
    if pump.min_ml_per_h is None or pump.max_ml_per_h is None:
        return (f"{where}; the pump's driver states no rate range for this bore, so nothing shows the pump can run "
                "the library's rates (state its plunger speed range, e.g. the Modbus map's plunger_min_mm_per_h and "
                "plunger_max_mm_per_h)")
    if pump.min_ml_per_h <= lo and hi <= pump.max_ml_per_h:
        return None
    side = "minimum" if lo < pump.min_ml_per_h else "maximum"
    return f"{where} is not inside the pump's {pump.text()} (the library's {side} is outside)"


def planned_rates(schedule: Schedule, resolution: Resolution) -> Iterator[tuple[str, Decimal, Decimal, Decimal]]:
    """(where, dose, concentration, rate) of every non-zero dose of the schedule at every approved concentration,
    the rate as the kernel computes it (quantized toward less drug). Raises QuantityError for a rate the pump's
    number format cannot hold."""
    doses = [(f"/steps/{i}", s.dose_mg_per_24h) for i, s in enumerate(schedule.steps)]
    doses += [(f"/taper/{i}", t.dose_mg_per_24h) for i, t in enumerate(schedule.taper)]
    for conc in sorted(schedule.approved_concentrations):
        for where, dose in doses:
            if dose > 0:
                yield where, dose, conc, quantize_down(dose_to_rate(dose, conc), resolution)


def plan_problem(protocol: ProtocolSpec, spec: SyringeSpec, schedule: Schedule, resolution: Resolution) -> str | None:
    """None if every planned rate (`planned_rates`) will be sent; otherwise the first that will not, naming the
    step, its dose and concentration, the rate and the rule the kernel would refuse it by mid-course
    (`below_resolution`, `device_min`, `device_max`). Checked after `range_problem` passed: a rate inside the
    library's range is then inside the pump's too."""
    lo, hi = protocol.rate_limits(spec)
    try:
        for where, dose, conc, rate in planned_rates(schedule, resolution):
            what = f"{where}/dose_mg_per_24h {_t(dose)} mg/24h at {_t(conc)} mg/mL is {_t(rate)} mL/h"
            if rate == 0:
                return f"{what} at this pump's resolution (rule below_resolution: the kernel sends no 0 for a dose)"
            if rate < lo:
                return f"{what}, below the drug library's minimum {_t(lo)} mL/h for {spec.model!r} (rule device_min)"
            if rate > hi:
                return f"{what}, above the drug library's maximum {_t(hi)} mL/h for {spec.model!r} (rule device_max)"
    except QuantityError as exc:
        return f"a planned rate cannot be represented at this pump's resolution: {exc}"
    return None
