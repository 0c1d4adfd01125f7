"""The pump physics model: one syringe driver, driven by an injectable clock.

Lazy physics: nothing ticks. Every public call first advances the model to ``clock.now()``, firing the events
that fell in between (near-end crossing, end of syringe, dead-man expiry) at their exact times and in order.
So a 5-day course in virtual time costs the same as a 5-second one.

Exactness: time is kept in whole microseconds since the model was built (a datetime's resolution), and the
infused volume as the exact integral ``sum(rate_ml_per_h * elapsed_us)`` ("rate-microseconds"). Rates have at
most a handful of digits, so every product and sum is exact in a wide Decimal context; dividing by 3.6e9 to
get mL happens only when a volume is reported. End of syringe may fall between two microseconds: its time is
kept as an exact Decimal and the volume is pinned to exactly the fill, so remaining is exactly 0 there.

Alarm model: alarms are latched flags. A stopping alarm stops the pump and, until acknowledged with
``clear_alarm()``, puts the state in ALARM and makes data-changing calls fail with ``ModelError("ALARM")``.
Acknowledging removes every flag whose condition no longer holds; a condition that still holds (empty
syringe, battery still low, remaining still under the near-end mark) stays visible, acknowledged, and no
longer blocks. Warnings (near-end, low battery) never stop the pump and never block.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Context, Decimal, localcontext
from typing import Final, Literal

from driverd.core.errors import DriverdError, QuantityError
from driverd.core.quantities import NEW_ERA_RESOLUTION, Resolution, quantize_down
from driverd.core.syringe_limits import NE1000_PLUNGER, PlungerLimits
from drivers.base import WARNING_ALARMS, AlarmKind, PumpState
from simulators.clock import Clock

__all__ = [
    "DEFAULT_FILL_ML",
    "LOW_BATTERY_PCT",
    "MAX_DIAMETER_MM",
    "MIN_DIAMETER_MM",
    "ModelError",
    "ModelEvent",
    "ModelStatus",
    "PumpModel",
]

ModelErrorCode = Literal["NA", "OOR", "ALARM"]

MIN_DIAMETER_MM: Final = Decimal("0.1")
MAX_DIAMETER_MM: Final = Decimal("50.0")
MAX_FILL_ML: Final = Decimal(1000)
DEFAULT_FILL_ML: Final = Decimal(17)
LOW_BATTERY_PCT: Final = 20
MAX_DEADMAN_S: Final = 255  # New Era SAF takes 0..255 s

_US_PER_H: Final = Decimal(3_600_000_000)  # rate [mL/h] * t [µs] / this = mL
# Wide enough that products/sums of rates (<= 12 digits) and microsecond counts (a century fits in 16 digits)
# never round: the integral is exact. Only the final division to mL rounds, at 34 significant digits.
_EXACT: Final = Context(prec=80)
_REPORT: Final = Context(prec=34)
# pi to 34 digits: plunger travel is informational geometry, never a setpoint, so a rounded pi is fine.
_PI: Final = Decimal("3.141592653589793238462643383279503")
_ONE_US: Final = timedelta(microseconds=1)


class ModelError(DriverdError):
    """The simulated pump refused a command, the way a real pump would.

    ``code``: "NA" (not applicable now), "OOR" (out of range / not representable), "ALARM" (an
    unacknowledged alarm blocks this). Front-ends map these to their wire errors (?NA, ?OOR, alarm reply).
    """

    def __init__(self, code: ModelErrorCode, message: str) -> None:
        self.code: ModelErrorCode = code
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True, slots=True)
class ModelStatus:
    state: PumpState
    rate_ml_per_h: Decimal
    delivered_ml: Decimal
    remaining_ml: Decimal
    diameter_mm: Decimal
    alarms: frozenset[AlarmKind]
    battery_pct: int
    deadman_s: int
    # additions beyond the shared contract (defaults keep positional construction compatible)
    fill_volume_ml: Decimal = DEFAULT_FILL_ML
    deadman_armed: bool = False
    unacknowledged: frozenset[AlarmKind] = frozenset()
    plunger_travel_mm: Decimal = Decimal(0)  # how far the plunger moved since the syringe was loaded


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """Something the model did on its own or was told to do, for tests and simulator logs.

    ``at_us`` is the exact time in microseconds since the model was built (fractional for end of syringe);
    ``at`` is that time as a datetime (truncated to the microsecond).
    """

    at: datetime
    at_us: Decimal
    kind: str  # an AlarmKind value, or "run"/"stop"/"power_cycle"/"load_syringe"
    delivered_ml: Decimal


def _require_decimal(value: object, name: str) -> Decimal:
    # Binary floats never carry a setpoint: a float here is a caller bug, reported like any bad value.
    if isinstance(value, bool) or not isinstance(value, (Decimal, int)):
        raise ModelError("OOR", f"{name}: expected a Decimal, got {type(value).__name__} {value!r}")
    d = Decimal(value)
    if not d.is_finite():
        raise ModelError("OOR", f"{name}: must be finite, got {value}")
    return d


def _representable(value: Decimal, resolution: Resolution) -> bool:
    try:
        return quantize_down(value, resolution) == value
    except QuantityError:
        return False


class PumpModel:
    """One simulated syringe driver. Thread-safe (one lock); every public method is atomic."""

    def __init__(
        self,
        clock: Clock,
        *,
        model: str = "NE-1000",
        firmware: str = "V3.928",
        diameter_mm: Decimal = Decimal("19.13"),
        fill_volume_ml: Decimal = DEFAULT_FILL_ML,
        near_end_ml: Decimal = Decimal("1"),
        max_rate_ml_per_h: Decimal = Decimal("1000"),
        rate_resolution: Resolution = NEW_ERA_RESOLUTION,
        plunger: PlungerLimits | None = NE1000_PLUNGER,
        diameter_resolution: Resolution = NEW_ERA_RESOLUTION,
    ) -> None:
        self.clock = clock
        # The diameters the pump holds (New Era: 4 digits, 3 decimals; Harvard Elite: 4 decimals).
        self.diameter_resolution = diameter_resolution
        self.model = model
        self.firmware = firmware
        self.rate_resolution = rate_resolution
        # The mechanism's plunger speed range: with the syringe's bore it bounds the rate (None: no such bound).
        self.plunger = plunger
        self.max_rate_ml_per_h = _require_decimal(max_rate_ml_per_h, "max_rate_ml_per_h")
        if self.max_rate_ml_per_h <= 0:
            raise ModelError("OOR", f"max_rate_ml_per_h: must be > 0, got {max_rate_ml_per_h}")
        self.near_end_ml = _require_decimal(near_end_ml, "near_end_ml")
        if self.near_end_ml < 0:
            raise ModelError("OOR", f"near_end_ml: must be >= 0, got {near_end_ml}")
        self._lock = threading.RLock()
        self._origin = self._read_clock()
        self._t = Decimal(0)  # µs since origin up to which the model is advanced
        # The last clock reading and its µs: a poll reads the model twice at one instant (contact, then status).
        self._read_at: datetime | None = None
        self._read_us = Decimal(0)
        # No event (near end, end of syringe, dead-man) can fall before this µs; None: not known. A lower bound
        # computed by the full check and forgotten by every command, so a poll between events only integrates.
        self._quiet_until: int | float | None = None
        self._area_for: Decimal | None = None  # the diameter `_area` was computed for (the same object)
        self._area = Decimal(0)
        self._diameter = self._check_diameter(diameter_mm)
        self._fill = self._check_fill(fill_volume_ml)
        self._rate = Decimal(0)
        self._state_running = False
        # Infused volume in rate-microseconds: total since build, and marks at the last load / clear.
        self._total = Decimal(0)
        self._load_mark = Decimal(0)
        self._clear_mark = Decimal(0)
        self._alarms: set[AlarmKind] = set()
        self._unacked: set[AlarmKind] = set()
        self._battery = 100
        self._deadman_s = 0
        self._deadman_armed = False
        self._last_contact = Decimal(0)
        self._events: list[ModelEvent] = []
        # Every rate the pump accepted, in order: what really reached it (end-to-end tests check it against
        # the safety kernel's setpoints, whatever the transport).
        self._rates: list[tuple[datetime, Decimal]] = []

    # ---- identity -----

    @property
    def identity(self) -> tuple[str, str]:
        return (self.model, self.firmware)

    # ---- time -----

    def _read_clock(self) -> datetime:
        t = self.clock.now()
        if t.tzinfo is None:
            raise ValueError("clock.now() returned a naive datetime; clocks must be timezone-aware UTC")
        return t

    def _now_us(self) -> Decimal:
        t = self.clock.now()
        if t is self._read_at:
            us = self._read_us
        else:
            if t.tzinfo is None:
                raise ValueError("clock.now() returned a naive datetime; clocks must be timezone-aware UTC")
            us = Decimal((t - self._origin) // _ONE_US)
            self._read_at, self._read_us = t, us
        # A wall clock stepped backwards must not un-infuse anything: time only moves forward here.
        return us if us >= self._t else self._t

    def _at(self, us: Decimal) -> datetime:
        return self._origin + timedelta(microseconds=int(us))

    # The one-operation helpers below round in their context directly (Context methods), exactly as under
    # localcontext: they run several times per poll, and entering a local context costs more than the operation.
    def _ml(self, rate_us: Decimal) -> Decimal:
        v = _REPORT.divide(rate_us, _US_PER_H)
        return v if v != 0 else Decimal(0)

    def _fill_rate_us(self) -> Decimal:
        return _EXACT.multiply(self._fill, _US_PER_H)

    def _used(self) -> Decimal:
        return _EXACT.subtract(self._total, self._load_mark)

    def _record(self, at_us: Decimal, kind: str) -> None:
        with localcontext(_EXACT):
            delivered = self._total - self._clear_mark
            if self._state_running and at_us > self._t:
                delivered += self._rate * (at_us - self._t)
        self._events.append(ModelEvent(self._at(at_us), at_us, kind, self._ml(delivered)))

    def _integrate_to(self, until_us: Decimal) -> None:
        if self._state_running and until_us > self._t:
            self._total = _EXACT.add(self._total, _EXACT.multiply(self._rate, _EXACT.subtract(until_us, self._t)))
        self._t = max(self._t, until_us)

    def _advance(self) -> None:
        """Bring the model to clock.now(), firing due events at their exact times, earliest first."""
        now = self._now_us()
        quiet = self._quiet_until
        if quiet is not None and now < quiet:
            self._integrate_to(now)  # no event before `quiet`: what the loop below would do
            return
        while True:
            due: list[tuple[Decimal, int, str]] = []
            if self._state_running and self._rate > 0:
                with localcontext(_EXACT):
                    left = self._fill_rate_us() - self._used()
                    if AlarmKind.NEAR_END not in self._alarms:
                        to_near = left - self.near_end_ml * _US_PER_H
                        due.append((self._t + max(to_near, Decimal(0)) / self._rate, 0, "near_end"))
                    due.append((self._t + max(left, Decimal(0)) / self._rate, 1, "end"))
            elif self._state_running and AlarmKind.NEAR_END not in self._alarms and self._near_end_holds():
                due.append((self._t, 0, "near_end"))
            if self._deadman_armed and self._deadman_s > 0:
                due.append((self._last_contact + self._deadman_s * 1_000_000, 2, "deadman"))
            upcoming = due
            due = [d for d in due if d[0] <= now]
            if not due:
                # A µs below the earliest event's time (computed at 80 digits): nothing can fire before it. The
                # dead-man's time only moves later with host contact; every command forgets the bound.
                self._quiet_until = int(min(upcoming)[0]) - 1 if upcoming else math.inf
                break
            at, _, what = min(due)
            if what == "near_end":
                # A warning: the pump keeps infusing, so the integral is not split here (keeps it exact).
                self._alarms.add(AlarmKind.NEAR_END)
                self._unacked.add(AlarmKind.NEAR_END)
                self._record(at, AlarmKind.NEAR_END.value)
            elif what == "end":
                self._total = self._load_mark + self._fill_rate_us()  # exactly the fill, never beyond
                self._t = max(self._t, at)
                self._latch_stop(AlarmKind.END_OF_SYRINGE, at)
            else:
                self._integrate_to(at)
                self._deadman_armed = False  # the next valid packet re-arms it
                self._latch_stop(AlarmKind.SAFE_MODE_TIMEOUT, at)
        self._integrate_to(now)

    def _latch_stop(self, kind: AlarmKind, at_us: Decimal) -> None:
        self._state_running = False
        self._alarms.add(kind)
        self._unacked.add(kind)
        self._record(at_us, kind.value)

    # ---- conditions -----

    def _remaining_rate_us(self) -> Decimal:
        return _EXACT.subtract(self._fill_rate_us(), self._used())

    def _near_end_holds(self) -> bool:
        return self._remaining_rate_us() <= _EXACT.multiply(self.near_end_ml, _US_PER_H)

    def _holds(self, kind: AlarmKind) -> bool:
        """Whether a latched alarm's physical condition still holds (then acknowledging cannot remove it)."""
        if kind is AlarmKind.NEAR_END:
            return self._near_end_holds()
        if kind is AlarmKind.END_OF_SYRINGE:
            return self._remaining_rate_us() <= 0
        if kind is AlarmKind.LOW_BATTERY:
            return self._battery <= LOW_BATTERY_PCT
        return False  # occlusion, power, safe-mode, program errors: cleared once acknowledged

    def _blocking(self) -> frozenset[AlarmKind]:
        return frozenset(a for a in self._unacked if a not in WARNING_ALARMS)

    def _require_no_alarm(self, what: str) -> None:
        blocking = self._blocking()
        if blocking:
            names = ", ".join(sorted(a.value for a in blocking))
            raise ModelError("ALARM", f"{what}: unacknowledged alarm ({names}) blocks this; clear it first")

    def _require_stopped(self, what: str) -> None:
        if self._state_running:
            raise ModelError("NA", f"{what}: not applicable while infusing; stop first")

    def _check_diameter(self, mm: object) -> Decimal:
        d = _require_decimal(mm, "diameter_mm")
        if not MIN_DIAMETER_MM <= d <= MAX_DIAMETER_MM:
            raise ModelError("OOR", f"diameter_mm: must be {MIN_DIAMETER_MM}..{MAX_DIAMETER_MM} mm, got {d}")
        res = self.diameter_resolution
        if not _representable(d, res):
            digits = f"{res.significant} digits or " if res.significant is not None else ""
            raise ModelError("OOR", f"diameter_mm: {d} has more than {digits}{res.decimals} decimals")
        return d

    @staticmethod
    def _check_fill(ml: object) -> Decimal:
        d = _require_decimal(ml, "fill_volume_ml")
        if not Decimal(0) < d <= MAX_FILL_ML:
            raise ModelError("OOR", f"fill_volume_ml: must be > 0 and <= {MAX_FILL_ML} mL, got {d}")
        return d

    # ---- queries -----

    def status(self) -> ModelStatus:
        with self._lock:
            self._advance()
            return self._snapshot()

    def reading(self) -> tuple[PumpState, Decimal, Decimal, Decimal, frozenset[AlarmKind]]:
        """What a status read carries: (state, rate mL/h, delivered mL, diameter mm, alarms), the same values as
        `status()` without the model's extras (remaining, plunger travel, ...): the sim:// driver's poll."""
        with self._lock:
            self._advance()
            return self._reading()

    def contact_reading(self) -> tuple[PumpState, Decimal, Decimal, Decimal, frozenset[AlarmKind]]:
        """`host_contact()` then `reading()`, as one operation (the sim:// driver's poll: a packet that reads).
        When the clock still gives the very reading the contact advanced to (a virtual clock between its jumps),
        the reading's own advance is left out: at the same instant it could only integrate nothing and compute the
        next event's bound, which the next advance computes instead, from the same state (no command came in
        between: every command forgets the bound)."""
        with self._lock:
            self.host_contact()
            if self.clock.now() is not self._read_at or self._t != self._read_us:
                self._advance()
            return self._reading()

    def _reading(self) -> tuple[PumpState, Decimal, Decimal, Decimal, frozenset[AlarmKind]]:
        return (self._state(), self._rate, self._ml(_EXACT.subtract(self._total, self._clear_mark)),
                self._diameter, frozenset(self._alarms))

    def _state(self) -> PumpState:
        if self._state_running:
            return PumpState.INFUSING
        if self._blocking():
            return PumpState.ALARM
        return PumpState.STOPPED

    def _snapshot(self) -> ModelStatus:
        delivered = _EXACT.subtract(self._total, self._clear_mark)
        return ModelStatus(
            state=self._state(),
            rate_ml_per_h=self._rate,
            delivered_ml=self._ml(delivered),
            remaining_ml=self._ml(self._remaining_rate_us()),
            diameter_mm=self._diameter,
            alarms=frozenset(self._alarms),
            battery_pct=self._battery,
            deadman_s=self._deadman_s,
            fill_volume_ml=self._fill,
            deadman_armed=self._deadman_armed,
            unacknowledged=frozenset(self._unacked),
            plunger_travel_mm=self._travel_mm(),
        )

    def _travel_mm(self) -> Decimal:
        # volume [mm^3] / cross-section [mm^2]; 1 mL = 1000 mm^3. The operations of `_PI * d * d / 4` and
        # `ml * 1000 / area` under localcontext(_REPORT), as Context methods; the area once per diameter.
        d = self._diameter
        if d is not self._area_for:
            self._area = _REPORT.divide(_REPORT.multiply(_REPORT.multiply(_PI, d), d), 4)
            self._area_for = d
        return _REPORT.divide(_REPORT.multiply(self._ml(self._used()), 1000), self._area)

    @property
    def deadman_setting_s(self) -> int:
        """The dead-man timeout (0 = off) without advancing the model: cheap enough to poll."""
        with self._lock:
            return self._deadman_s

    def events(self) -> tuple[ModelEvent, ...]:
        """Everything that happened so far (after advancing to now), oldest first."""
        with self._lock:
            self._advance()
            return tuple(self._events)

    def rate_history(self) -> tuple[tuple[datetime, Decimal], ...]:
        """Every rate the pump accepted (``set_rate``), with the time it was accepted, oldest first."""
        with self._lock:
            return tuple(self._rates)

    # ---- commands -----

    def set_diameter(self, mm: Decimal) -> None:
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            self._require_no_alarm("set_diameter")
            self._require_stopped("set_diameter")
            self._diameter = self._check_diameter(mm)

    def rate_range(self) -> tuple[Decimal, Decimal]:
        """(min, max) non-zero rate in mL/h with the loaded syringe, exact (the pump refuses anything outside)."""
        with self._lock:
            hi = self.max_rate_ml_per_h
            if self.plunger is None:
                return Decimal(0), hi
            lo, phys_hi = self.plunger.exact_range_ml_per_h(self._diameter)
            return lo, min(hi, phys_hi)

    def set_rate(self, ml_per_h: Decimal, *, checked_as_sent: bool = False) -> None:
        """Program the rate (may change while infusing). A value the pump cannot represent is refused.

        ``checked_as_sent``: the front-end already applied the pump's number rule to the value in the units it
        was sent in (``RAT 416.6 UH`` is 0.4166 mL/h: valid, though not representable in mL/h).
        """
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            self._require_no_alarm("set_rate")
            r = _require_decimal(ml_per_h, "rate_ml_per_h")
            if r < 0:
                raise ModelError("OOR", f"rate_ml_per_h: must not be negative, got {r}")
            if r > self.max_rate_ml_per_h:
                raise ModelError("OOR", f"rate_ml_per_h: {r} exceeds max {self.max_rate_ml_per_h}")
            if not checked_as_sent and not _representable(r, self.rate_resolution):
                res = self.rate_resolution
                raise ModelError(
                    "OOR",
                    f"rate_ml_per_h: {r} is not representable (at most {res.decimals} decimals"
                    + (f", {res.significant} digits" if res.significant is not None else "")
                    + "); the pump does not round",
                )
            if self.plunger is not None and not self.plunger.allows(r, self._diameter):
                lo, hi = self.plunger.exact_range_ml_per_h(self._diameter)
                raise ModelError(
                    "OOR",
                    f"rate_ml_per_h: {r} is outside what the plunger can run with a {self._diameter} mm syringe "
                    f"({lo:.4f}..{hi:.1f} mL/h)",
                )
            self._rate = r + Decimal(0) if r != 0 else Decimal(0)
            self._rates.append((self._at(self._t), self._rate))

    def run(self) -> None:
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            self._require_no_alarm("run")
            if self._state_running:
                return  # idempotent
            if self._rate <= 0:
                raise ModelError("NA", "run: rate is 0; set a rate first")
            if self._remaining_rate_us() <= 0:
                raise ModelError("NA", "run: syringe is empty; load a syringe first")
            self._state_running = True
            self._record(self._t, "run")

    def stop(self) -> None:
        """Always allowed, idempotent (also in alarm)."""
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            if self._state_running:
                self._state_running = False
                self._record(self._t, "stop")

    def clear_alarm(self) -> None:
        """Acknowledge: latched flags whose condition no longer holds go; the rest stay, acknowledged."""
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            self._unacked.clear()
            self._alarms = {a for a in self._alarms if self._holds(a)}

    def host_contact(self) -> None:
        """A valid packet arrived from the host: (re-)arms the dead-man timer if one is set."""
        with self._lock:
            self._advance()
            if self._deadman_s > 0:
                if not self._deadman_armed:
                    self._quiet_until = None  # a dead-man time appears (moving it later keeps the bound valid)
                self._deadman_armed = True
                self._last_contact = self._t

    def set_deadman(self, seconds: int) -> None:
        """0 disables. >0 sets the timeout; it is armed by the next host_contact (like New Era safe mode)."""
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            if isinstance(seconds, bool) or not isinstance(seconds, int):
                raise ModelError("OOR", f"deadman_s: expected an int, got {type(seconds).__name__}")
            if not 0 <= seconds <= MAX_DEADMAN_S:
                raise ModelError("OOR", f"deadman_s: must be 0..{MAX_DEADMAN_S} s, got {seconds}")
            self._deadman_s = seconds
            self._deadman_armed = False

    def clear_delivered(self) -> None:
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            self._clear_mark = self._total

    def preset_delivered(self, ml: Decimal) -> None:
        """Scenario set-up: the counter reads `ml` as left by earlier use (a pump whose volume dispensed nobody
        cleared), exactly; nothing is infused and the syringe is untouched."""
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            v = _require_decimal(ml, "delivered_ml")
            if v < 0:
                raise ModelError("OOR", f"delivered_ml: must be >= 0, got {v}")
            self._clear_mark = _EXACT.subtract(self._total, _EXACT.multiply(v, _US_PER_H))

    def load_syringe(self, fill_volume_ml: Decimal, diameter_mm: Decimal | None = None) -> None:
        """A new, full syringe (the delivered counter is not reset: use clear_delivered)."""
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            self._require_no_alarm("load_syringe")
            self._require_stopped("load_syringe")
            fill = self._check_fill(fill_volume_ml)
            dia = self._diameter if diameter_mm is None else self._check_diameter(diameter_mm)
            self._fill, self._diameter, self._load_mark = fill, dia, self._total
            # Acknowledged syringe conditions that no longer hold with the new syringe go away.
            self._alarms = {a for a in self._alarms if a in self._unacked or self._holds(a)}
            self._record(self._t, "load_syringe")

    # ---- physical fault injection -----

    def inject_alarm(self, kind: AlarmKind) -> None:
        """Raise an alarm as the hardware would: stopping kinds stop the pump; warnings keep it infusing."""
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            if not isinstance(kind, AlarmKind):
                raise ModelError("OOR", f"kind: expected an AlarmKind, got {kind!r}")
            if kind in WARNING_ALARMS:
                self._alarms.add(kind)
                self._unacked.add(kind)
                self._record(self._t, kind.value)
            else:
                self._latch_stop(kind, self._t)

    def power_cycle(self) -> None:
        """Power lost and back: stopped, settings kept, POWER_INTERRUPTED latched, dead-man disarmed."""
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            self._state_running = False
            self._deadman_armed = False
            self._record(self._t, "power_cycle")
            self._latch_stop(AlarmKind.POWER_INTERRUPTED, self._t)

    def set_battery(self, pct: int) -> None:
        """0..100; at or below 20 % the LOW_BATTERY warning is raised (the pump keeps infusing)."""
        with self._lock:
            self._advance()
            self._quiet_until = None  # a command: the next read checks for events in full
            if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
                raise ModelError("OOR", f"battery_pct: must be an int 0..100, got {pct!r}")
            self._battery = pct
            if pct <= LOW_BATTERY_PCT and AlarmKind.LOW_BATTERY not in self._alarms:
                self._alarms.add(AlarmKind.LOW_BATTERY)
                self._unacked.add(AlarmKind.LOW_BATTERY)
                self._record(self._t, AlarmKind.LOW_BATTERY.value)
