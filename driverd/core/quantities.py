"""Exact quantities: doses, concentrations, rates and volumes as Decimal.

Binary floats never carry a limit or a setpoint. Every rounding here rounds toward less drug.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_DOWN, Context, Decimal, InvalidOperation, localcontext
from typing import Final

from driverd.core.errors import QuantityError

HOURS_PER_DAY: Final = Decimal(24)
SECONDS_PER_HOUR: Final = Decimal(3600)

# Enough precision that no intermediate of dose/24/concentration loses a digit that matters
# before the single, deliberate quantization step.
_CTX: Final = Context(prec=34)

# Absurd-magnitude guards (per unit). Anything beyond is a typo or an attack, never a dose.
MAX_DOSE_MG_PER_24H: Final = Decimal(100_000)
MAX_CONCENTRATION_MG_PER_ML: Final = Decimal(1_000)
MAX_RATE_ML_PER_H: Final = Decimal(10_000)
MAX_VOLUME_ML: Final = Decimal(10_000)
MAX_DIAMETER_MM: Final = Decimal(100)


def parse_decimal(value: object, path: str, *, maximum: Decimal, allow_zero: bool = True) -> Decimal:
    """Parse a JSON/TOML number or numeric string into a finite, non-negative Decimal within bounds.

    Floats are accepted only through their shortest repr (what a JSON document literally said), never
    through their binary expansion. Booleans are rejected (they are ints in Python).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise QuantityError(path, "type", f"expected a number or numeric string, got {type(value).__name__}")
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise QuantityError(path, "number", f"not a number: {value!r}") from None
    if not d.is_finite():
        raise QuantityError(path, "finite", f"must be finite, got {value!r}")
    if d < 0:
        raise QuantityError(path, "non-negative", f"must not be negative, got {value!r}")
    if not allow_zero and d == 0:
        raise QuantityError(path, "positive", "must be greater than zero")
    if d > maximum:
        raise QuantityError(path, "magnitude", f"{d} exceeds the plausible maximum {maximum}")
    # Normalise -0 and exponent forms so equal values compare and serialise equally.
    return d + Decimal(0) if d != 0 else Decimal(0)


@dataclass(frozen=True, slots=True)
class Resolution:
    """What rate values a pump accepts: at most `decimals` places and `significant` significant digits.

    New Era pumps: at most 4 digits and at most 3 decimals (`significant=4, decimals=3`).
    """

    decimals: int
    significant: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.decimals <= 9:
            raise QuantityError("resolution.decimals", "range", "decimals must be 0..9")
        if self.significant is not None and not 1 <= self.significant <= 12:
            raise QuantityError("resolution.significant", "range", "significant digits must be 1..12")


NEW_ERA_RESOLUTION: Final = Resolution(decimals=3, significant=4)


def quantize_down(value: Decimal, resolution: Resolution) -> Decimal:
    """The largest value representable by the pump that is <= value (toward less drug).

    Raises if the value cannot be represented at all (too many integer digits), rather than clip upward
    or silently send a different magnitude.
    """
    if not value.is_finite() or value < 0:
        raise QuantityError("rate", "non-negative", f"cannot quantize {value}")
    if value == 0:
        return Decimal(0)
    with localcontext(_CTX):
        places = resolution.decimals
        if resolution.significant is not None:
            # digits before the decimal point = adjusted() + 1 for values >= 1; for < 1 it is 0
            int_digits = max(value.adjusted() + 1, 0)
            if int_digits > resolution.significant:
                raise QuantityError(
                    "rate", "resolution", f"{value} needs more than {resolution.significant} digits"
                )
            places = min(places, resolution.significant - int_digits)
        q = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN)
        if resolution.significant is not None and q != 0:
            # Below 1 the leading zeros don't count: also cap significant digits there.
            sig = len(q.as_tuple().digits)
            if sig > resolution.significant:
                q = q.quantize(Decimal(1).scaleb(q.adjusted() - resolution.significant + 1), rounding=ROUND_DOWN)
        return q


def dose_to_rate(dose_mg_per_24h: Decimal, concentration_mg_per_ml: Decimal) -> Decimal:
    """Exact (unquantized) rate in mL/h: dose / 24 / concentration."""
    if concentration_mg_per_ml <= 0:
        raise QuantityError("concentration_mg_per_ml", "positive", "concentration must be > 0")
    if dose_mg_per_24h < 0:
        raise QuantityError("dose_mg_per_24h", "non-negative", "dose must be >= 0")
    with localcontext(_CTX):
        return dose_mg_per_24h / HOURS_PER_DAY / concentration_mg_per_ml


def rate_to_dose(rate_ml_per_h: Decimal, concentration_mg_per_ml: Decimal) -> Decimal:
    """Dose in mg/24h delivered by a rate in mL/h at a concentration."""
    with localcontext(_CTX):
        return rate_ml_per_h * HOURS_PER_DAY * concentration_mg_per_ml


def volume_at_rate(rate_ml_per_h: Decimal, seconds: Decimal) -> Decimal:
    """mL delivered by a constant rate over a number of seconds."""
    with localcontext(_CTX):
        return rate_ml_per_h * seconds / SECONDS_PER_HOUR


def fmt(d: Decimal) -> str:
    """Plain (never exponent) decimal string, trailing zeros kept as the value has them."""
    return format(d, "f")
