"""``sim://<name>``: the pump physics model in-process, for fast virtual-time runs.

There is no wire, but the pump's wire fault plan (``world.faults(name)``) is honoured as if there were one, so a
lost link can be rehearsed on ``sim://`` too: each operation is one request and one reply; the operation takes
effect, then a dropped reply (or one delayed past ``timeout_s``) is a ``DriverTimeout``, a garbled one a
``ProtocolError`` and a disconnect a ``DriverIOError`` (reconnect to go on). While the plan's cable is cut
(``FaultPlan.cut``) an operation never reaches the model at all: a ``DriverTimeout`` with no effect. Physical
alarms and the dead-man are the model's. Every operation counts as a valid packet from the host
(``model.host_contact()``) before it acts, as on a real pump in safe mode. Like the New Era display, readings
have 4 significant digits (at most 3 decimals).

The model comes from ``options.world`` (a ``simulators.world.World``) or, when none is given, from a
module-level default world on the system clock (shared by every sim:// driver in the process).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from operator import methodcaller
from typing import ClassVar, TypeVar

from driverd.core.errors import Problem, ValidationError
from driverd.core.quantities import NEW_ERA_RESOLUTION, Resolution, quantize_down
from drivers.base import (
    WARNING_ALARMS,
    DriverIOError,
    DriverOptions,
    DriverTimeout,
    Identity,
    ProbeReport,
    ProtocolError,
    PumpAlarm,
    PumpDriver,
    PumpRejected,
    PumpState,
    PumpStatus,
    reading_step,
)
from drivers.url import DriverURL
from simulators.clock import SystemClock
from simulators.faults import FaultPlan
from simulators.pump import ModelError, PumpModel
from simulators.world import World

__all__ = ["SimDriver", "default_world"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_T = TypeVar("_T")
_default_world: World | None = None


# The poll's one model call (host contact, then the status read's values): not a lambda made per call.
_CONTACT_READING = methodcaller("contact_reading")


def default_world() -> World:
    """The process-wide world used when ``options.world`` is None (created on first use, system clock)."""
    global _default_world
    if _default_world is None:
        _default_world = World(SystemClock())
    return _default_world


class SimDriver(PumpDriver):
    scheme: ClassVar[str] = "sim"
    resolution: ClassVar[Resolution] = NEW_ERA_RESOLUTION
    #: No I/O: every operation completes without yielding to the event loop (a fault plan's delay or drop is a
    #: DriverTimeout at once), so the channel arms no backstop timer for it, one that could never fire.
    never_suspends: ClassVar[bool] = True

    def __init__(self, url: DriverURL, options: DriverOptions | None = None) -> None:
        super().__init__(url, options)
        problems: list[Problem] = []
        if url.driver != "sim":
            problems.append(Problem("url.scheme", "driver", f"sim driver cannot serve {url.driver!r} URLs"))
        if url.transport:
            problems.append(Problem("url.scheme", "transport", "sim:// has no transport: use sim://<name>"))
        if not _NAME.match(url.path):
            problems.append(
                Problem("url.name", "format", f"pump name must be 1-64 of [A-Za-z0-9._-], got {url.path!r}")
            )
        problems += [Problem(f"url.{k}", "unknown-parameter", f"sim:// takes no parameter {k!r}") for k in url.params]
        world = self.options.world
        if world is not None and not isinstance(world, World):
            problems.append(Problem("options.world", "type", f"expected a World, got {type(world).__name__}"))
        deadman = self.options.deadman_s
        if isinstance(deadman, bool) or not isinstance(deadman, int) or deadman < 0:
            problems.append(Problem("options.deadman_s", "range", f"must be an int >= 0, got {deadman!r}"))
        if problems:
            raise ValidationError(problems)
        self.name = url.path
        self._model: PumpModel | None = None
        self._faults: FaultPlan | None = None
        # The counter as last shown: (shown, the reading's adjusted exponent, shown + one step of its last digit).
        self._shown: tuple[Decimal, int, Decimal] | None = None
        # The reading step of the last counter shown: (that very Decimal, the resolution, reading_step of them).
        self._step: tuple[Decimal, Resolution, Decimal] | None = None

    @property
    def model(self) -> PumpModel:
        if self._model is None:
            raise DriverIOError(f"sim://{self.name}: not connected")
        return self._model

    def rate_range(self, diameter_mm: Decimal) -> tuple[Decimal, Decimal] | None:
        """(min, max) mL/h the simulated pump runs with this bore: its plunger range (the New Era mechanism unless the
        world's model says otherwise) capped by its maximum rate, at the New Era resolution (minimum rounded up,
        maximum down). None for a model without a plunger range."""
        model = self.model
        if model.plunger is None:
            return None
        lo, hi = model.plunger.range_ml_per_h(diameter_mm, self.resolution)
        return lo, min(hi, quantize_down(model.max_rate_ml_per_h, self.resolution))

    def _call(self, op: Callable[[PumpModel], _T], *, contacts: bool = False) -> _T:
        """One 'packet': contact (re-arms the dead-man), then the operation, with refusals mapped. `contacts`: the
        operation makes the host contact itself, first (`PumpModel.contact_reading`)."""
        model = self.model
        if self._faults is not None and not self._faults.reaches_pump():
            # A cut cable: the request never reaches the pump (no contact, no effect), and nothing answers.
            raise DriverTimeout(f"sim://{self.name}: no reply (link cut)")
        if not contacts:
            model.host_contact()
        try:
            result = op(model)
        except ModelError as exc:
            self._reply()
            if exc.code == "ALARM":
                raise PumpAlarm(str(exc), alarms=model.status().alarms) from None
            raise PumpRejected(str(exc), code=exc.code) from None
        self._reply()
        return result

    def _reply(self) -> None:
        """The reply's fate on the (imagined) wire, from the pump's fault plan."""
        if self._faults is None:
            return
        action = self._faults.on_reply(b"")
        if action.kind == "drop" or (action.kind == "delay" and action.delay_s >= self.options.timeout_s):
            raise DriverTimeout(f"sim://{self.name}: no reply (fault plan: {action.kind})")
        if action.kind == "garble":
            raise ProtocolError(f"sim://{self.name}: garbled reply (fault plan)")
        if action.kind == "disconnect":
            self._model = None
            raise DriverIOError(f"sim://{self.name}: disconnected (fault plan)")

    async def connect(self) -> None:
        world = self.options.world if self.options.world is not None else default_world()
        model = world.pump(self.name)
        if self.options.deadman_s > 0:
            try:
                model.set_deadman(self.options.deadman_s)
            except ModelError as exc:
                raise PumpRejected(f"options.deadman_s: {exc}", code=exc.code) from None
        self._model = model
        self._faults = world.faults(self.name)
        model.host_contact()  # the first valid packet arms the dead-man

    async def close(self) -> None:
        self._model = None  # the pump keeps running; its dead-man stops it if we stay away

    async def probe(self) -> ProbeReport:
        """Reads only (identity, status, the dead-man setting): no ``set_deadman``, nothing else set."""
        world = self.options.world if self.options.world is not None else default_world()
        self._model, self._faults = world.pump(self.name), world.faults(self.name)
        try:
            identity = await self.identify()
            status = await self.read_status()
            deadman_s = self._call(lambda m: m.status().deadman_s)
        finally:
            self._model = None
        return ProbeReport(identity, status, deadman_s)

    async def identify(self) -> Identity:
        model, firmware = self._call(lambda m: m.identity)
        return Identity(model=model, firmware=firmware, address=self.name)

    async def configure_syringe(self, diameter_mm: Decimal) -> Decimal:
        self._call(lambda m: m.set_diameter(diameter_mm))
        return self._call(lambda m: m.status().diameter_mm)

    async def set_rate(self, rate_ml_per_h: Decimal) -> Decimal:
        self._call(lambda m: m.set_rate(rate_ml_per_h))
        return self._call(lambda m: m.status().rate_ml_per_h)

    async def run(self) -> None:
        self._call(lambda m: m.run())

    async def stop(self) -> None:
        self._call(lambda m: m.stop())

    async def clear_alarm(self) -> None:
        self._call(lambda m: m.clear_alarm())

    async def clear_delivered(self) -> Decimal:
        """Refused on a running pump or with an alarm unacknowledged (the driver checks: the model itself
        clears at any time), then cleared and read back like any counter reading."""
        status = self._call(lambda m: m.status())
        if status.state is PumpState.INFUSING:
            raise PumpRejected(f"sim://{self.name}: clear_delivered: the pump is infusing; stop it first", code="NA")
        blocking = status.unacknowledged - WARNING_ALARMS
        if blocking:
            names = ", ".join(sorted(a.value for a in blocking))
            raise PumpAlarm(f"sim://{self.name}: clear_delivered: pump alarm ({names}) not cleared",
                            alarms=status.alarms)
        self._call(lambda m: m.clear_delivered())
        self._shown = None  # the counter went back: the display cache holds the old magnitude
        return (await self.read_status()).delivered_ml

    def _display(self, delivered: Decimal) -> Decimal:
        """`quantize_down(delivered, resolution)`: what the counter shows. The display changes every few polls
        only, so a reading that shows the same is recognised without quantizing: quantize_down depends on the
        magnitude (adjusted exponent) and rounds down at its last kept digit, so a reading of the same magnitude
        in [shown, shown + that digit's step) shows `shown` (tests/drivers/test_sim_display.py)."""
        last = self._shown
        adjusted = delivered.adjusted()
        if last is not None and adjusted == last[1] and last[0] <= delivered < last[2]:
            return last[0]
        shown = quantize_down(delivered, self.resolution)
        if shown != 0:
            self._shown = (shown, adjusted, shown + Decimal((0, (1,), shown.as_tuple().exponent)))
        return shown

    def _reading_step(self, shown: Decimal) -> Decimal:
        """`reading_step(shown, self.resolution)`, once per counter shown: `_display` hands back the very same
        Decimal while the display does not change (most polls), and the step is a function of it and the
        resolution."""
        last, res = self._step, self.resolution
        if last is not None and last[0] is shown and last[1] is res:
            return last[2]
        step = reading_step(shown, res)
        self._step = (shown, res, step)
        return step

    async def read_status(self) -> PumpStatus:
        # reading(): status()'s values that a status read carries, without the model's extras (once per poll).
        state, rate, delivered, diameter, alarms = self._call(_CONTACT_READING, contacts=True)
        shown = self._display(delivered)
        # Positional (once per poll): state, rate_ml_per_h, delivered_ml, diameter_mm, alarms, delivered_step_ml.
        return PumpStatus(state, rate, shown, diameter, alarms, self._reading_step(shown))
