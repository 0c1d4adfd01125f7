"""The rates a syringe pump can run with a given syringe: its plunger speed limits times the syringe's bore.

A syringe driver moves the plunger at a speed between a minimum and a maximum; the volume rate is that speed
times the inner cross-section, so a wider syringe has a higher minimum rate. The NE-1000/NE-500 manual states
the plunger speed range (NE-1000 User Manual §12.5 Specifications: maximum 5.1005 cm/min, minimum 0.004205 cm/h;
the same figures are in labmcp-new-era's simulator and driver), which matches its rate statements with reference
syringes (0.73 µL/h with a B-D 1 mL syringe, 4.699 mm; 1700 mL/h with a B-D 60 mL syringe, 26.59 mm).
Used by the simulator (which refuses a rate outside them, ``?OOR``), the
New Era driver (which reports them) and the drug library check (the library's limits for each syringe must lie
inside what the pump can run, so the kernel refuses a step before the pump would).

Pure and exact up to the 34-digit value of pi: the limits are reported at the pump's resolution, the minimum
rounded up and the maximum rounded down, so a reported limit is always one the pump accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Context, Decimal, localcontext
from typing import Final

from driverd.core.errors import QuantityError
from driverd.core.quantities import Resolution, quantize_down

_CTX: Final = Context(prec=50)
_PI: Final = Decimal("3.141592653589793238462643383279503")
_MM3_PER_ML: Final = Decimal(1000)


def bore_area_mm2(inner_diameter_mm: Decimal) -> Decimal:
    """Inner cross-section of a syringe in mm² (pi d² / 4)."""
    if not isinstance(inner_diameter_mm, Decimal) or not inner_diameter_mm.is_finite() or inner_diameter_mm <= 0:
        raise QuantityError("inner_diameter_mm", "positive", f"must be a positive Decimal, got {inner_diameter_mm!r}")
    with localcontext(_CTX):
        return _PI * inner_diameter_mm * inner_diameter_mm / 4


@dataclass(frozen=True, slots=True)
class PlungerLimits:
    """A pump mechanism's plunger speed range in mm/h."""

    min_mm_per_h: Decimal
    max_mm_per_h: Decimal

    @classmethod
    def from_reference(
        cls, min_ml_per_h: Decimal, min_diameter_mm: Decimal, max_ml_per_h: Decimal, max_diameter_mm: Decimal
    ) -> PlungerLimits:
        """From rates the manufacturer states with reference syringes."""
        with localcontext(_CTX):
            return cls(
                min_ml_per_h * _MM3_PER_ML / bore_area_mm2(min_diameter_mm),
                max_ml_per_h * _MM3_PER_ML / bore_area_mm2(max_diameter_mm),
            )

    def exact_range_ml_per_h(self, inner_diameter_mm: Decimal) -> tuple[Decimal, Decimal]:
        """(min, max) rate in mL/h with this syringe, unrounded (50 digits)."""
        area = bore_area_mm2(inner_diameter_mm)
        with localcontext(_CTX):
            return (self.min_mm_per_h * area / _MM3_PER_ML, self.max_mm_per_h * area / _MM3_PER_ML)

    def range_ml_per_h(self, inner_diameter_mm: Decimal, resolution: Resolution) -> tuple[Decimal, Decimal]:
        """(min, max) rate in mL/h at the pump's resolution: min rounded up, max rounded down (both runnable)."""
        lo, hi = self.exact_range_ml_per_h(inner_diameter_mm)
        step = Decimal(1).scaleb(-resolution.decimals)
        with localcontext(_CTX):
            return (lo.quantize(step, rounding=ROUND_CEILING), quantize_down(hi, resolution))

    def allows(self, rate_ml_per_h: Decimal, inner_diameter_mm: Decimal) -> bool:
        """Whether the mechanism can run this (non-zero) rate with this syringe. Zero (stopped) always can."""
        if rate_ml_per_h == 0:
            return True
        lo, hi = self.exact_range_ml_per_h(inner_diameter_mm)
        return lo <= rate_ml_per_h <= hi


# NE-1000 / NE-500 mechanism (manual §12.5; see module docstring): 0.004205 cm/h and 5.1005 cm/min in mm/h.
NE1000_PLUNGER: Final = PlungerLimits(Decimal("0.04205"), Decimal("3060.3"))


# Harvard Apparatus Pump 11 Elite mechanism (User's Manual, publication 5420-002 Rev C, Specifications, and the
# pump's own `metrics` report as quoted in flowchem's Elite 11 client): a 24 threads-per-inch lead screw turned
# 15,360 microsteps per revolution (0.0689 µm per microstep), one microstep every 27 s at the slowest and every
# 26 µs at the fastest. That is 0.009187 mm/h (0.153 µm/min) to 9540.2 mm/h (159.0 mm/min), min rounded up and
# max down. The manual's Appendix B (nominal min/max rates per syringe) agrees within 0.05 %: with a 60 mL syringe
# (26.59 mm) 85.05 nl/min and 88.32 mL/min. (The manual's Specifications table gives "27.5 sec/µstep" and
# 0.15 µm/min; Appendix B and `metrics` both follow 27 s, the higher and so the safer minimum.)
ELITE11_PLUNGER: Final = PlungerLimits(Decimal("0.009187"), Decimal("9540.2"))
# The Elite holds a syringe diameter to 4 decimals (`diameter` answers "#.#### mm"), 0.1 to 33 mm (`metrics`).
ELITE11_DIAMETER_RESOLUTION: Final = Resolution(decimals=4)
ELITE11_MIN_DIAMETER_MM: Final = Decimal("0.1")
ELITE11_MAX_DIAMETER_MM: Final = Decimal(33)
