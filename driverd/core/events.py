"""Events: everything that can happen to a course. Each carries its own time (`at`, timezone-aware UTC).

The core never reads a clock; time only enters through these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

from driverd.core.pump_range import PumpRange
from driverd.core.quantities import Resolution
from driverd.core.quick_init import quick_init
from driverd.core.schedule import Schedule

# Pump states and alarm kinds as plain strings so the core does not depend on the drivers package.
PumpStateName = Literal["stopped", "infusing", "paused", "alarm"]
# "ack_clock": a clinician has checked the daemon's time after a wall-clock step (see ClockStepped).
# "change_syringe": a new syringe is (being) loaded; it carries the new fill and concentration.
ClinicianAction = Literal["hold", "resume", "escalate", "reduce", "taper", "stop", "ack_clock", "change_syringe"]
CLINICIAN_ACTIONS: tuple[ClinicianAction, ...] = (
    "hold", "resume", "escalate", "reduce", "taper", "stop", "ack_clock", "change_syringe",
)

# Alarm kinds that are warnings (the pump keeps infusing); every other alarm stops the pump.
WARNING_ALARMS = frozenset({"near_end", "low_battery"})


@dataclass(frozen=True, slots=True)
class ScheduleAccepted:
    """A schedule that passed signature, trust, expiry, replay and validation checks in the shell."""

    at: datetime
    schedule: Schedule
    # The signed document as pushed, in canonical JSON (driverd.core.canonical). The core never reads it; it is
    # logged so crash recovery can re-verify the signature (the parsed fields cannot: they are normalised).
    document: str | None = None


@dataclass(frozen=True, slots=True)
class PumpVerified:
    """Read-back from the pump before a start: what is really loaded and how it quantizes rates."""

    at: datetime
    diameter_mm: Decimal
    resolution: Resolution
    model: str
    # What the pump's driver reports it runs with this bore (core/pump_range.py): the core refuses to prime if the
    # library's rates or the course's planned rates lie outside it. None: not reported (a log written before the
    # check existed: replayed without it, as it was decided).
    pump_range: PumpRange | None = None


@quick_init  # made once per poll: driverd.core.quick_init
@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. The machine checks due steps, hold end, taper steps and the course cap."""

    at: datetime


@quick_init  # made once per poll: driverd.core.quick_init
@dataclass(frozen=True, slots=True)
class PumpReport:
    """One status read from the pump. `delivered_step_ml`: the step of this counter reading as the driver knows it
    (exact; None: not known, the drug library's `counter_resolution_ml` is assumed)."""

    at: datetime
    state: PumpStateName
    rate_ml_per_h: Decimal
    delivered_ml: Decimal
    alarms: tuple[str, ...] = ()
    delivered_step_ml: Decimal | None = None
    # The syringe bore the pump is set to now (None: not read). A pump turns mL/h into plunger speed with it, and
    # computes its rate and counter read-backs with it too: a bore changed at the panel is seen only here.
    diameter_mm: Decimal | None = None


@dataclass(frozen=True, slots=True)
class SetpointResult:
    """Outcome of applying a setpoint: the pump's read-back, or None when unacknowledged (uncertain)."""

    at: datetime
    setpoint_id: int
    readback_ml_per_h: Decimal | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class ClinicianCommand:
    at: datetime
    action: ClinicianAction
    by: str
    reason: str
    dose_mg_per_24h: Decimal | None = None  # for reduce: target dose (default: the step below)
    fill_volume_ml: Decimal | None = None  # for change_syringe: the new syringe's fill
    concentration_mg_per_ml: Decimal | None = None  # for change_syringe (default: the concentration in use)


@dataclass(frozen=True, slots=True)
class LinkLost:
    at: datetime
    detail: str


@dataclass(frozen=True, slots=True)
class LinkRestored:
    """The pump answers again after a lost link, for the first time since the daemon started (a course recovered
    from the log), or for the first time on a reopened transport (also within the link timeout: it may be another
    pump behind it). For a primed course the channel adds the bore the pump reads back now and the rate range its
    driver reports for that bore: the pump may have been swapped or reconfigured meanwhile, so the core checks the
    range again (SUP-19). Both None: no check (no primed course, or a log written before the check)."""

    at: datetime
    diameter_mm: Decimal | None = None
    pump_range: PumpRange | None = None


@dataclass(frozen=True, slots=True)
class ClockStepped:
    """The host's wall clock stepped against the monotonic clock by more than the runtime's tolerance.

    `at` is course time, which did not follow the step (the runtime's time is step-free); `delta_s` is the
    step (positive: the wall clock jumped forward), `wall_at` the wall reading that revealed it.
    """

    at: datetime
    delta_s: Decimal
    wall_at: datetime


@dataclass(frozen=True, slots=True)
class SyringeLoaded:
    """During a syringe change, after the stop: what the pump reads back for the new syringe (the diameter it
    was loaded with) and its delivered-volume counter then, so accounting carries over a counter reset."""

    at: datetime
    diameter_mm: Decimal
    delivered_ml: Decimal
    pump_range: PumpRange | None = None  # as in PumpVerified: checked again at every load (None: an older log)


@dataclass(frozen=True, slots=True)
class CounterCleared:
    """The daemon cleared the pump's delivered-volume counter (a stopped pump: when priming a course and when
    loading a new syringe) and read it back. ``before_ml``: the counter read just before the clear (None: not
    read); ``after_ml``: the counter read back after it (None: no valid read-back). The clear is verified only if
    the counter reads back 0; ``error`` is what went wrong on the way (a refusal, a timeout, a malformed reply;
    a clear whose reply was lost but whose counter then reads 0 is verified: the count is what matters)."""

    at: datetime
    before_ml: Decimal | None
    after_ml: Decimal | None
    error: str = ""

    @property
    def verified(self) -> bool:
        # is_zero, not == 0: a signalling NaN read back (a plug-in driver's) raises on ==, out of the channel's
        # clear and the record's encoding; it is simply not a verified clear.
        return self.after_ml is not None and self.after_ml.is_zero()


Event = (
    ScheduleAccepted | PumpVerified | Tick | PumpReport | SetpointResult | ClinicianCommand | LinkLost | LinkRestored
    | ClockStepped | SyringeLoaded | CounterCleared
)
