"""The PumpDriver contract every driver implements, and the driver error hierarchy.

Drivers are dumb transports for setpoints that the safety kernel already approved and quantized: a driver
never invents, rounds up or clamps a rate. It reports what the pump says, verbatim, as exact Decimals.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

from driverd.core.errors import DriverdError
from driverd.core.quantities import Resolution
from driverd.core.quick_init import quick_init

if TYPE_CHECKING:
    from drivers.url import DriverURL


class DriverError(DriverdError):
    """Root of driver errors."""


class DriverIOError(DriverError):
    """The transport failed (port gone, connection reset, write failed)."""


class DriverTimeout(DriverError):
    """No (valid) reply within the driver's timeout, after any permitted retries."""


class ProtocolError(DriverError):
    """Bytes that are not a valid frame/reply of the protocol (bad CRC, wrong length, garbage)."""


class PumpRejected(DriverError):
    """The pump understood the command and refused it (New Era ?OOR/?NA/?COM, Modbus exception 02/03/04)."""

    def __init__(self, message: str, *, code: str) -> None:
        self.code = code
        super().__init__(message)


class PumpAlarm(DriverError):
    """The pump is in an alarm condition that blocks the requested operation."""

    def __init__(self, message: str, *, alarms: frozenset[AlarmKind]) -> None:
        self.alarms = alarms
        super().__init__(message)


class PumpState(enum.Enum):
    STOPPED = "stopped"
    INFUSING = "infusing"
    PAUSED = "paused"
    ALARM = "alarm"


class AlarmKind(enum.Enum):
    OCCLUSION = "occlusion"  # motor stalled
    NEAR_END = "near_end"  # warning: syringe nearly empty (infusion continues)
    END_OF_SYRINGE = "end_of_syringe"
    LOW_BATTERY = "low_battery"  # warning
    POWER_INTERRUPTED = "power_interrupted"
    SAFE_MODE_TIMEOUT = "safe_mode_timeout"  # the pump's dead-man fired: host went silent
    PROGRAM_ERROR = "program_error"
    OTHER = "other"


# Alarms that are warnings: the pump keeps infusing. All others stop the pump.
WARNING_ALARMS: frozenset[AlarmKind] = frozenset({AlarmKind.NEAR_END, AlarmKind.LOW_BATTERY})


@dataclass(frozen=True, slots=True)
class Identity:
    model: str
    firmware: str
    address: str = ""


@quick_init  # made once per poll: driverd.core.quick_init
@dataclass(frozen=True, slots=True)
class PumpStatus:
    """One read of the pump. `rate_ml_per_h` is the programmed rate; `delivered_ml` the infused volume.

    `delivered_step_ml`: the step of this counter reading, exact (one unit of the last digit the pump shows: a
    New Era display of 4 significant digits reads 99.99 mL in 0.01 mL steps and 100.0 mL in 0.1 mL steps). None
    if the driver cannot tell; the core then assumes the drug library's `counter_resolution_ml`.
    """

    state: PumpState
    rate_ml_per_h: Decimal
    delivered_ml: Decimal
    diameter_mm: Decimal | None = None
    alarms: frozenset[AlarmKind] = frozenset()
    delivered_step_ml: Decimal | None = None

    @property
    def running(self) -> bool:
        return self.state is PumpState.INFUSING

    @property
    def delivering_ml_per_h(self) -> Decimal:
        """The rate the pump delivers now: a stopped pump delivers nothing, whatever rate it has programmed."""
        return self.rate_ml_per_h if self.running else Decimal(0)


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """What a read-only probe saw. Everything in it was read from the pump; the probe set nothing.

    ``deadman_s``: the pump's dead-man timeout as read (New Era ``SAF``, Modbus watchdog register; 0 = off).
    ``acknowledged``: alarms the pump answered one of the probe's queries with (New Era ``A?x``). On such a
    pump that reply acknowledges the alarm: whoever talks to the pump next no longer gets it, so the probe
    must say so. Empty on pumps whose alarms stay latched until an explicit acknowledge command.
    """

    identity: Identity
    status: PumpStatus
    deadman_s: int
    acknowledged: frozenset[AlarmKind] = frozenset()


@dataclass(frozen=True, slots=True)
class DriverOptions:
    """Knobs the runtime passes to every driver. Timeouts are real (wall-clock) seconds."""

    timeout_s: float = 1.0
    retries: int = 1  # retries for idempotent queries only
    deadman_s: int = 10  # pump stops itself if the host is silent this long (0 disables; never in production)
    world: Any = field(default=None, compare=False)  # simulators.world.World for sim:// (in-process)


def reading_step(value: Decimal, resolution: Resolution) -> Decimal:
    """One unit of the last digit a display of `resolution` shows for `value` (New Era, 4 digits and at most 3
    decimals: 0.001 below 10, 0.01 below 100, 0.1 below 1000, then 1)."""
    places = resolution.decimals
    if resolution.significant is not None:
        places = min(places, resolution.significant - max(value.adjusted() + 1, 0))
    return Decimal(1).scaleb(-places)


def last_digit_step(shown: Decimal) -> Decimal:
    """One unit of the last digit of a number as the pump sent it (``100.0`` -> 0.1, ``99.90`` -> 0.01)."""
    exponent = shown.as_tuple().exponent
    assert isinstance(exponent, int)  # a finite number
    return Decimal(1).scaleb(exponent)


class PumpDriver(abc.ABC):
    """Async driver for one pump. Methods are idempotent where the hardware allows it.

    Every setter reads back what the pump now holds and returns or checks it; callers log that read-back.
    """

    #: URL scheme prefix this driver serves (``newera`` for ``newera+serial://``).
    scheme: ClassVar[str]
    #: Rate values the pump accepts; the safety kernel quantizes to this (toward less drug).
    resolution: ClassVar[Resolution]

    def __init__(self, url: DriverURL, options: DriverOptions | None = None) -> None:
        self.url = url
        self.options = options or DriverOptions()

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the transport and arm the pump's dead-man (safe mode / watchdog) if configured."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the transport. Does not stop the pump (its dead-man does, if the host stays away)."""

    @abc.abstractmethod
    async def identify(self) -> Identity: ...

    @abc.abstractmethod
    async def configure_syringe(self, diameter_mm: Decimal) -> Decimal:
        """Set the syringe inner diameter; return the diameter read back from the pump."""

    @abc.abstractmethod
    async def set_rate(self, rate_ml_per_h: Decimal) -> Decimal:
        """Program an already-quantized rate (mL/h, infuse direction); return the rate read back."""

    @abc.abstractmethod
    async def run(self) -> None:
        """Start infusing at the programmed rate (continuous: no target volume)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop infusing. Always allowed; idempotent."""

    @abc.abstractmethod
    async def read_status(self) -> PumpStatus: ...

    @abc.abstractmethod
    async def clear_alarm(self) -> None:
        """Acknowledge the pump's alarm so it accepts data again (does not restart it)."""

    @abc.abstractmethod
    async def clear_delivered(self) -> Decimal:
        """Zero the pump's delivered (infused) volume counter and return the counter read back afterwards.

        The caller checks the read-back is 0: a pump that ignored the clear reads back its old count. Only on a
        stopped pump: a driver that reads the pump infusing refuses without sending (``PumpRejected`` code
        "NA"), since a counter cleared while running can never read back a clean 0; a latched alarm refuses it
        like any other write (``PumpAlarm``). Clearing twice is clearing once, so a lost reply may be resent.
        """

    @property
    def transport_opens(self) -> int:
        """How many times this driver has opened its transport (port, connection): at ``connect()``, and again
        whenever it reopened it by itself after an I/O error. The daemon takes a change as a new connection, on
        which the device answering may be another pump (a cable moved, an adapter renumbered, a gateway routing to
        another unit) or the same one reconfigured: it checks the pump again before any rate goes to it
        (docs/drivers.md, "A reopened transport"). A driver that reopens behind ``connect()`` must count it here;
        the default counts nothing (the daemon counts its own ``connect()`` calls)."""
        return 0

    def rate_range(self, diameter_mm: Decimal) -> tuple[Decimal, Decimal] | None:
        """(min, max) mL/h the pump runs with a syringe of this inner diameter, at the driver's resolution (minimum
        rounded up, maximum down: both are rates the pump accepts). None: the driver cannot tell. The daemon
        checks the drug library's limits and the course's planned rates against it before a course primes and at
        every syringe load, and refuses both when the range is unknown (docs/safety.md, SUP-19)."""
        return None

    async def probe(self) -> ProbeReport:
        """Identify the pump and read its status and dead-man setting with queries only, on a driver that is
        not connected: opens its own transport and closes it again, never sends a write (no ``connect()``
        set-up: the dead-man of a pump in service stays as it is). A driver that cannot guarantee that has
        no probe: this default refuses rather than falling back to ``connect()``.
        """
        raise DriverError(f"{type(self).__name__} has no read-only probe")

    async def heartbeat(self) -> PumpStatus:
        """Keep the dead-man armed; the default is a status read (any valid packet re-arms it)."""
        return await self.read_status()

    def definition_files(self) -> dict[str, str]:
        """Data files that define how this driver reads its pump (path -> sha256 of the bytes), recorded in the
        audit log at daemon start. Most drivers have none."""
        return {}

    async def __aenter__(self) -> PumpDriver:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
