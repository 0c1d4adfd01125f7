"""The safety kernel: the single gate every setpoint passes before it can reach a driver.

(Interface first; the checks are filled in below.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

_KERNEL_TOKEN = object()


@dataclass(frozen=True, slots=True)
class Setpoint:
    """A rate the kernel approved. Only the kernel can construct one (checked in __post_init__)."""

    id: int
    rate_ml_per_h: Decimal  # quantized toward less drug: exactly what goes on the wire (0 = stop)
    dose_mg_per_24h: Decimal  # what that quantized rate delivers
    requested_mg_per_24h: Decimal
    source: str
    reason: str
    token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.token is not _KERNEL_TOKEN:
            raise TypeError("only the safety kernel creates setpoints")

    @property
    def is_stop(self) -> bool:
        return self.rate_ml_per_h == 0
