"""The driver contract test suite: what every ``PumpDriver`` must do, run against a simulated pump.

How to use it (pytest collects the subclass; this module defines no ``Test*`` class itself)::

    import contextlib
    from collections.abc import AsyncIterator
    from datetime import UTC, datetime

    from drivers.registry import open_driver
    from drivers.testing.contract import DriverContract, Harness, WireFaultContract
    from simulators.clock import ManualClock
    from simulators.world import World

    class TestMyDriver(WireFaultContract, DriverContract):      # the mixin only for drivers with a real wire
        @contextlib.asynccontextmanager
        async def harness(self) -> AsyncIterator[Harness]:
            world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
            model = world.pump("p1")
            async with start_my_simulator(model, world.faults("p1")) as port:   # real PTY / loopback TCP
                driver = open_driver(f"mydriver+tcp://127.0.0.1:{port}", self.driver_options())
                await driver.connect()
                try:
                    yield Harness(driver, model, world.clock, world.faults("p1"))
                finally:
                    await driver.close()

Rules for a harness:

- Yield the driver already CONNECTED, over its real transport, to a simulator front-end built on ``model``
  (a ``simulators.pump.PumpModel``) whose wire faults come from ``faults`` (a ``FaultPlan``).
- Build the driver with ``self.driver_options()`` (short timeouts, one retry, the dead-man at
  ``self.deadman_s``): the dead-man test reads ``driver.options.deadman_s``.
- Prefer a ``ManualClock``: time then only moves when a test advances it, so results are exact and tests are
  fast. With any other clock the time-based tests wait in real time instead (bounded, still never a hang).
- Clean up everything in the context manager's exit, even when the test failed.

Class attributes a subclass may override: ``deadman_s`` (default 5), ``timeout_s`` (driver reply timeout,
default 0.5), ``test_timeout_s`` (bound on each whole test, default 30). Each test is a plain sync method that
runs one ``asyncio.run(asyncio.wait_for(...))``, so no async pytest plugin is needed and no test can hang.

Wire faults (dropped, garbled, delayed replies, disconnects) live in the ``WireFaultContract`` mixin: include it
only when the driver has a wire (sim:// has none, so it does not include it).

``ProbeContract`` (every driver) checks that ``probe()`` is read-only. Its harness also fills in
``Harness.reopen`` (build another, unconnected driver for the same pump) and ``Harness.requests`` (a
``RequestLog`` the pump side appends every request it receives to, classified query or not by the protocol's
own definition: record at the simulator or transport, never by mocking the driver, and classify by an
allow-list of queries so anything unknown counts as a write).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

import pytest

from driverd.core.errors import DriverdError
from driverd.core.protocol import MAX_COUNTER_STEP_ML
from driverd.core.quantities import quantize_down
from drivers.base import (
    AlarmKind,
    DriverIOError,
    DriverOptions,
    DriverTimeout,
    ProbeReport,
    ProtocolError,
    PumpAlarm,
    PumpDriver,
    PumpRejected,
    PumpState,
    PumpStatus,
)
from simulators.clock import Clock, ManualClock
from simulators.faults import FaultPlan
from simulators.pump import PumpModel

__all__ = ["DriverContract", "Harness", "ProbeContract", "RequestLog", "WireFaultContract", "WireRequest"]


@dataclass(frozen=True, slots=True)
class WireRequest:
    """One request as the pump side received it. ``query`` only if the protocol defines it as a pure read."""

    text: str
    query: bool


class RequestLog:
    """Requests as the pump side received them, oldest first (the harness's simulator hook appends)."""

    def __init__(self) -> None:
        self.entries: list[WireRequest] = []

    def record(self, text: str, *, query: bool) -> None:
        self.entries.append(WireRequest(text, query))

    def since(self, mark: int) -> list[WireRequest]:
        return self.entries[mark:]


@dataclass(frozen=True, slots=True)
class Harness:
    """A connected driver and the simulated pump behind its wire."""

    driver: PumpDriver
    model: PumpModel
    clock: ManualClock | Clock
    faults: FaultPlan
    # For ProbeContract: another, unconnected driver for the same pump, and what the pump side received.
    reopen: Callable[[DriverOptions], PumpDriver] | None = None
    requests: RequestLog | None = None


def _norm(text: str) -> str:
    # "NE-1000" and "NE1000" name the same model; compare letters and digits only.
    return "".join(ch for ch in text.upper() if ch.isalnum())


class _ContractBase(abc.ABC):
    deadman_s: ClassVar[int] = 5
    timeout_s: ClassVar[float] = 0.5
    test_timeout_s: ClassVar[float] = 30.0

    @abc.abstractmethod
    def harness(self) -> contextlib.AbstractAsyncContextManager[Harness]:
        """An async context manager yielding a Harness with a connected driver (see the module docstring)."""

    def driver_options(self, **overrides: Any) -> DriverOptions:
        """The options harnesses should build their driver with."""
        values: dict[str, Any] = {"timeout_s": self.timeout_s, "retries": 1, "deadman_s": self.deadman_s}
        values.update(overrides)
        return DriverOptions(**values)

    def run_with_harness(self, body: Callable[[Harness], Awaitable[None]]) -> None:
        """Run `body` inside a fresh harness, bounded by test_timeout_s (a hang fails the test)."""

        async def main() -> None:
            async with self.harness() as h:
                await body(h)

        asyncio.run(asyncio.wait_for(main(), self.test_timeout_s))

    @staticmethod
    async def pass_time(h: Harness, seconds: int) -> None:
        """Let `seconds` pass on the pump's clock: advance a ManualClock, or really wait for any other."""
        if isinstance(h.clock, ManualClock):
            h.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    @staticmethod
    async def ready_to_infuse(h: Harness, rate: Decimal) -> Decimal:
        readback = await h.driver.set_rate(rate)
        await h.driver.run()
        return readback


class DriverContract(_ContractBase):
    """Behaviour every driver must show, over its real transport, against the simulated pump."""

    # ---- identity and configuration -----

    def test_identify_reports_model_and_firmware(self) -> None:
        async def body(h: Harness) -> None:
            ident = await h.driver.identify()
            model, firmware = h.model.identity
            assert _norm(ident.model) == _norm(model), (ident, h.model.identity)
            assert _norm(firmware) in _norm(ident.firmware), (ident, h.model.identity)

        self.run_with_harness(body)

    def test_configure_syringe_reads_back_the_pump_value(self) -> None:
        async def body(h: Harness) -> None:
            got = await h.driver.configure_syringe(Decimal("26.7"))
            assert got == Decimal("26.7") and isinstance(got, Decimal)
            assert h.model.status().diameter_mm == Decimal("26.7")
            status = await h.driver.read_status()
            assert status.diameter_mm in (None, Decimal("26.7"))

        self.run_with_harness(body)

    def test_configure_syringe_while_infusing_is_rejected_and_changes_nothing(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            before = h.model.status().diameter_mm
            with pytest.raises(PumpRejected):
                await h.driver.configure_syringe(Decimal("12.45"))
            assert h.model.status().diameter_mm == before

        self.run_with_harness(body)

    # ---- rates -----

    @pytest.mark.parametrize("wanted", ["2.083", "0.521", "10", "123.4", "0.05", "1000"])
    def test_set_rate_returns_the_quantized_value_read_back(self, wanted: str) -> None:
        async def body(h: Harness) -> None:
            # A 60 mL bore (26.59 mm): every rate here is inside what the plunger can run with it (issue 16.6),
            # so this checks the number format, not the syringe's rate range.
            await h.driver.configure_syringe(Decimal("26.59"))
            rate = quantize_down(Decimal(wanted), h.driver.resolution)
            got = await h.driver.set_rate(rate)
            assert isinstance(got, Decimal) and got == rate
            assert h.model.status().rate_ml_per_h == rate
            assert (await h.driver.read_status()).rate_ml_per_h == rate

        self.run_with_harness(body)

    @pytest.mark.parametrize("rate", ["0.010", "900"])
    def test_rate_outside_the_syringes_range_is_refused_by_the_pump(self, rate: str) -> None:
        """Issue 16.6: the plunger's speed range times the bore bounds the rate (19.13 mm: 0.01208..879.59 mL/h)."""

        async def body(h: Harness) -> None:
            await h.driver.configure_syringe(Decimal("19.13"))
            await h.driver.set_rate(Decimal(2))
            with pytest.raises(PumpRejected):
                await h.driver.set_rate(Decimal(rate))
            assert h.model.status().rate_ml_per_h == 2
            assert (await h.driver.read_status()).rate_ml_per_h == 2

        self.run_with_harness(body)

    def test_set_rate_the_pump_cannot_represent_is_rejected_not_rounded(self) -> None:
        async def body(h: Harness) -> None:
            await h.driver.set_rate(Decimal(2))
            # one more decimal than the pump holds: must be refused, never silently rounded
            finer = Decimal(1) + Decimal(1).scaleb(-(h.driver.resolution.decimals + 1))
            with pytest.raises(PumpRejected):
                await h.driver.set_rate(finer)
            assert h.model.status().rate_ml_per_h == 2
            assert (await h.driver.read_status()).rate_ml_per_h == 2

        self.run_with_harness(body)

    @pytest.mark.parametrize("bad", ["-1", "1000.5", "100000"])
    def test_out_of_range_rate_is_refused_and_changes_nothing(self, bad: str) -> None:
        async def body(h: Harness) -> None:
            await h.driver.set_rate(Decimal(3))
            with pytest.raises(DriverdError):
                await h.driver.set_rate(Decimal(bad))
            assert h.model.status().rate_ml_per_h == 3

        self.run_with_harness(body)

    def test_rate_can_change_while_infusing(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            assert await h.driver.set_rate(Decimal("1.5")) == Decimal("1.5")
            status = await h.driver.read_status()
            assert status.state is PumpState.INFUSING and status.rate_ml_per_h == Decimal("1.5")

        self.run_with_harness(body)

    # ---- run / stop -----

    def test_run_and_stop_are_idempotent(self) -> None:
        async def body(h: Harness) -> None:
            await h.driver.stop()  # stopping a stopped pump is fine
            await h.driver.set_rate(Decimal(2))
            await h.driver.run()
            await h.driver.run()
            status = await h.driver.read_status()
            assert status.state is PumpState.INFUSING and status.running
            assert h.model.status().state is PumpState.INFUSING
            await h.driver.stop()
            await h.driver.stop()
            assert (await h.driver.read_status()).state is PumpState.STOPPED
            assert h.model.status().state is PumpState.STOPPED

        self.run_with_harness(body)

    def test_run_without_a_rate_is_rejected(self) -> None:
        async def body(h: Harness) -> None:
            await h.driver.set_rate(Decimal(0))
            with pytest.raises(PumpRejected):
                await h.driver.run()
            assert h.model.status().state is PumpState.STOPPED

        self.run_with_harness(body)

    def test_read_status_tracks_state_rate_and_delivered_volume(self) -> None:
        async def body(h: Harness) -> None:
            start = await h.driver.read_status()
            assert start.state is PumpState.STOPPED and start.alarms == frozenset()
            await self.ready_to_infuse(h, Decimal(36))  # 0.01 mL per second: exact in every format
            seconds = min(4, max(self.deadman_s - 1, 1))
            await self.pass_time(h, seconds)
            status = await h.driver.read_status()
            assert status.state is PumpState.INFUSING and status.rate_ml_per_h == 36
            infused = status.delivered_ml - start.delivered_ml
            if isinstance(h.clock, ManualClock):
                assert infused == Decimal(36) * seconds / 3600  # exactly rate * t
            else:
                assert infused > 0
            await h.driver.stop()
            stopped = await h.driver.read_status()
            await self.pass_time(h, 1)
            assert (await h.driver.read_status()).delivered_ml == stopped.delivered_ml  # stopped: no flow

        self.run_with_harness(body)

    # ---- the delivered-volume counter -----

    def test_each_counter_reading_states_its_step_within_the_cores_bound(self) -> None:
        """`PumpStatus.delivered_step_ml` is None (not known) or the exact step of that reading: a positive, finite
        Decimal of which the reading is a whole number, and (below 1000 mL) at most the core's bound, 0.1 mL.
        The core alarms `counter_step` and stops the pump on any other step (docs/safety.md, SUP-20), so a driver
        that gets this wrong stops every course it runs."""
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(36))
            await self.pass_time(h, min(4, max(self.deadman_s - 1, 1)))
            await h.driver.stop()
            readings = [await h.driver.read_status()]
            for preset in ("9.9999", "99.999", "150.05", "999.99"):  # each display range of a 4-digit counter
                h.model.preset_delivered(Decimal(preset))
                readings.append(await h.driver.read_status())
            for status in readings:
                got = status.delivered_step_ml
                if got is None:
                    continue
                assert isinstance(got, Decimal) and got.is_finite() and 0 < got <= MAX_COUNTER_STEP_ML, got
                assert status.delivered_ml % got == 0, (status.delivered_ml, got)

        self.run_with_harness(body)

    def test_clear_delivered_zeroes_the_counter_and_returns_the_read_back(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(36))
            await self.pass_time(h, min(4, max(self.deadman_s - 1, 1)))
            await h.driver.stop()
            assert h.model.status().delivered_ml > 0
            got = await h.driver.clear_delivered()
            assert isinstance(got, Decimal) and got == 0
            assert h.model.status().delivered_ml == 0  # the pump itself, not only what the driver says
            assert (await h.driver.read_status()).delivered_ml == 0
            assert await h.driver.clear_delivered() == 0  # clearing twice is clearing once
            # The counter counts again from 0 afterwards.
            await h.driver.run()
            await self.pass_time(h, 1)
            status = await h.driver.read_status()
            if isinstance(h.clock, ManualClock):
                assert status.delivered_ml == Decimal("0.01")  # 36 mL/h for 1 s, from 0: exact in every format
            else:
                assert status.delivered_ml > 0

        self.run_with_harness(body)

    def test_clear_delivered_on_a_running_pump_is_refused_and_changes_nothing(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(36))
            await self.pass_time(h, 1)
            before = h.model.status().delivered_ml
            with pytest.raises(PumpRejected) as info:
                await h.driver.clear_delivered()
            assert info.value.code == "NA"
            after = h.model.status()
            assert after.state is PumpState.INFUSING and after.delivered_ml >= before > 0

        self.run_with_harness(body)

    def test_clear_delivered_is_refused_while_an_alarm_is_latched(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(36))
            await self.pass_time(h, 1)
            h.model.inject_alarm(AlarmKind.OCCLUSION)
            before = h.model.status().delivered_ml
            with pytest.raises(PumpAlarm):
                await h.driver.clear_delivered()
            assert h.model.status().delivered_ml == before > 0

        self.run_with_harness(body)

    # ---- alarms -----

    def test_stop_is_allowed_in_alarm(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            h.model.inject_alarm(AlarmKind.OCCLUSION)
            await h.driver.stop()
            await h.driver.stop()
            status = await h.driver.read_status()
            assert status.state is PumpState.ALARM and AlarmKind.OCCLUSION in status.alarms

        self.run_with_harness(body)

    def test_alarm_blocks_set_rate_and_run_until_cleared(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            h.model.inject_alarm(AlarmKind.OCCLUSION)
            with pytest.raises(PumpAlarm):
                await h.driver.set_rate(Decimal(2))
            with pytest.raises(PumpAlarm):
                await h.driver.run()
            assert h.model.status().rate_ml_per_h == 1 and h.model.status().state is PumpState.ALARM
            await h.driver.clear_alarm()
            status = await h.driver.read_status()
            assert status.state is PumpState.STOPPED and AlarmKind.OCCLUSION not in status.alarms
            assert await h.driver.set_rate(Decimal(2)) == 2
            await h.driver.run()
            assert (await h.driver.read_status()).state is PumpState.INFUSING

        self.run_with_harness(body)

    def test_clear_alarm_without_an_alarm_is_harmless(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            await h.driver.clear_alarm()
            status = await h.driver.read_status()
            assert status.state is PumpState.INFUSING and status.alarms == frozenset()

        self.run_with_harness(body)

    @pytest.mark.parametrize("kind", [AlarmKind.OCCLUSION, AlarmKind.END_OF_SYRINGE, AlarmKind.POWER_INTERRUPTED])
    def test_stopping_alarm_shows_in_status_and_stops_the_pump(self, kind: AlarmKind) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            if kind is AlarmKind.POWER_INTERRUPTED:
                h.model.power_cycle()
            else:
                h.model.inject_alarm(kind)
            status = await h.driver.read_status()
            assert kind in status.alarms, status
            assert status.state is PumpState.ALARM and not status.running

        self.run_with_harness(body)

    @pytest.mark.parametrize("kind", [AlarmKind.NEAR_END, AlarmKind.LOW_BATTERY])
    def test_warning_shows_in_status_and_infusion_continues(self, kind: AlarmKind) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            if kind is AlarmKind.LOW_BATTERY:
                h.model.set_battery(15)
            else:
                h.model.inject_alarm(kind)
            status = await h.driver.read_status()
            assert kind in status.alarms, status
            assert status.state is PumpState.INFUSING
            assert await h.driver.set_rate(Decimal(2)) == 2  # warnings never block

        self.run_with_harness(body)

    def test_syringe_running_empty_ends_in_end_of_syringe(self) -> None:
        async def body(h: Harness) -> None:
            h.model.load_syringe(Decimal("0.02"))
            await self.ready_to_infuse(h, Decimal(36))  # 0.02 mL at 0.01 mL/s: empty after 2 s
            await self.pass_time(h, 3)
            status = await h.driver.read_status()
            assert AlarmKind.END_OF_SYRINGE in status.alarms and status.state is PumpState.ALARM
            assert h.model.status().remaining_ml == 0
            with pytest.raises(PumpAlarm):
                await h.driver.run()

        self.run_with_harness(body)

    def test_power_cycle_keeps_the_rate_and_needs_acknowledging(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal("2.5"))
            h.model.power_cycle()
            with pytest.raises(PumpAlarm):
                await h.driver.run()
            await h.driver.clear_alarm()
            status = await h.driver.read_status()
            assert status.state is PumpState.STOPPED and status.rate_ml_per_h == Decimal("2.5")

        self.run_with_harness(body)

    # ---- dead-man -----

    def test_deadman_stops_the_pump_when_the_host_goes_silent(self) -> None:
        async def body(h: Harness) -> None:
            deadman = h.driver.options.deadman_s
            assert deadman > 0, "build the harness driver with self.driver_options() (a dead-man is required)"
            await self.ready_to_infuse(h, Decimal(1))
            await self.pass_time(h, deadman - 1)
            status = await h.driver.read_status()  # contact in time: re-armed
            assert status.state is PumpState.INFUSING
            await self.pass_time(h, deadman + 1)
            status = await h.driver.read_status()
            assert AlarmKind.SAFE_MODE_TIMEOUT in status.alarms
            assert status.state is PumpState.ALARM and not status.running
            assert h.model.status().state is PumpState.ALARM

        self.run_with_harness(body)

    def test_heartbeat_keeps_the_deadman_from_firing(self) -> None:
        async def body(h: Harness) -> None:
            deadman = h.driver.options.deadman_s
            assert deadman > 0, "build the harness driver with self.driver_options() (a dead-man is required)"
            await self.ready_to_infuse(h, Decimal(1))
            for _ in range(3):
                await self.pass_time(h, deadman - 1)
                status = await h.driver.heartbeat()
                assert status.state is PumpState.INFUSING and AlarmKind.SAFE_MODE_TIMEOUT not in status.alarms

        self.run_with_harness(body)


class WireFaultContract(_ContractBase):
    """Wire faults for drivers with a real transport: each ends in the documented error, never a hang.

    The harness's ``faults`` plan must be the one the simulator front-end consults before every reply.
    """

    def test_one_dropped_reply_to_a_query_is_retried(self) -> None:
        async def body(h: Harness) -> None:
            assert h.driver.options.retries >= 1, "build the harness driver with self.driver_options()"
            await h.driver.set_rate(Decimal(3))
            h.faults.drop_next(1)
            status = await h.driver.read_status()
            assert status.rate_ml_per_h == 3

        self.run_with_harness(body)

    def test_dropped_replies_end_in_driver_timeout(self) -> None:
        async def body(h: Harness) -> None:
            h.faults.drop_next(h.driver.options.retries + 5)
            with pytest.raises(DriverTimeout):
                await h.driver.read_status()
            h.faults.clear()
            await self.recovers(h)

        self.run_with_harness(body)

    def test_garbled_reply_is_a_protocol_error_or_a_clean_retry(self) -> None:
        async def body(h: Harness) -> None:
            await h.driver.set_rate(Decimal(4))
            h.faults.garble_next(1)
            try:
                status: PumpStatus | None = await h.driver.read_status()
            except ProtocolError:
                status = None
            if status is not None:
                assert status.rate_ml_per_h == 4  # a retry, never a misread value
            await self.recovers(h)

        self.run_with_harness(body)

    def test_persistently_garbled_replies_end_in_an_error(self) -> None:
        async def body(h: Harness) -> None:
            h.faults.garble_next(h.driver.options.retries + 5)
            # a framer that discards corrupt frames (Modbus) only ever sees silence: a timeout
            with pytest.raises((ProtocolError, DriverTimeout)):
                await h.driver.read_status()
            h.faults.clear()
            await self.recovers(h)

        self.run_with_harness(body)

    def test_short_delay_is_tolerated(self) -> None:
        async def body(h: Harness) -> None:
            await h.driver.set_rate(Decimal(5))
            h.faults.delay_next(1, h.driver.options.timeout_s / 5)
            assert (await h.driver.read_status()).rate_ml_per_h == 5

        self.run_with_harness(body)

    def test_reply_later_than_the_timeout_is_a_timeout_or_a_clean_retry(self) -> None:
        async def body(h: Harness) -> None:
            await h.driver.set_rate(Decimal(6))
            h.faults.delay_next(h.driver.options.retries + 1, h.driver.options.timeout_s * 2)
            try:
                status: PumpStatus | None = await h.driver.read_status()
            except DriverTimeout:
                status = None
            if status is not None:
                assert status.rate_ml_per_h == 6
            await asyncio.sleep(h.driver.options.timeout_s * 2)  # let the late replies land
            await self.recovers(h, rate=Decimal(6))

        self.run_with_harness(body)

    def test_disconnect_is_an_io_error_or_timeout(self) -> None:
        async def body(h: Harness) -> None:
            h.faults.disconnect_next()
            with pytest.raises((DriverIOError, DriverTimeout)):
                await h.driver.read_status()

        self.run_with_harness(body)

    def test_setpoint_reply_dropped_never_leaves_an_unknown_rate_unreported(self) -> None:
        async def body(h: Harness) -> None:
            await h.driver.set_rate(Decimal(1))
            h.faults.drop_next(50)
            with pytest.raises((DriverTimeout, DriverIOError)):
                await h.driver.set_rate(Decimal(2))
            h.faults.clear()
            # whatever the pump holds now is what a read says: either the old or the new value
            status = await h.driver.read_status()
            assert status.rate_ml_per_h == h.model.status().rate_ml_per_h
            assert status.rate_ml_per_h in (Decimal(1), Decimal(2))

        self.run_with_harness(body)

    def test_clear_delivered_reply_dropped_or_garbled_is_an_error_or_a_clean_clear(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(36))
            await self.pass_time(h, 1)
            await h.driver.stop()
            for fault in (h.faults.drop_next, h.faults.garble_next):
                fault(1)
                try:
                    got: Decimal | None = await h.driver.clear_delivered()
                except (DriverTimeout, ProtocolError):
                    got = None
                if got is not None:
                    assert got == 0 and h.model.status().delivered_ml == 0  # a clean retry, never a misread
            h.faults.clear()
            assert await h.driver.clear_delivered() == 0

        self.run_with_harness(body)

    def test_persistently_malformed_replies_to_clear_delivered_end_in_an_error(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(36))
            await self.pass_time(h, 1)
            await h.driver.stop()
            h.faults.garble_next(h.driver.options.retries + 20)
            with pytest.raises((ProtocolError, DriverTimeout)):
                await h.driver.clear_delivered()  # never a value read from a malformed reply
            h.faults.clear()
            assert await h.driver.clear_delivered() == 0

        self.run_with_harness(body)

    async def recovers(self, h: Harness, *, rate: Decimal | None = None) -> None:
        """After the fault is gone the same driver works again and reads true values."""
        status = await h.driver.read_status()
        assert status.rate_ml_per_h == (h.model.status().rate_ml_per_h if rate is None else rate)


class ProbeContract(_ContractBase):
    """``probe()`` is read-only: it sends queries only, so a pump in service keeps its dead-man, its rate and its
    state. The harness must fill in ``Harness.reopen`` and ``Harness.requests`` (see the module docstring).

    ``probe_acknowledges_alarms``: True for a protocol whose reply to the first packet after an alarm
    acknowledges it (New Era): the probe must then report the alarm in ``ProbeReport.acknowledged``.
    """

    probe_acknowledges_alarms: ClassVar[bool] = False

    async def probe_recorded(self, h: Harness, probe_deadman_s: int = 0) -> tuple[ProbeReport, list[WireRequest]]:
        """Close the harness driver (the pump keeps going), probe with a fresh driver; return what the pump got."""
        assert h.reopen is not None and h.requests is not None, "ProbeContract needs Harness.reopen and .requests"
        await h.driver.close()  # an idle master on the same serial line would read the probe's replies
        mark = len(h.requests.entries)
        report = await h.reopen(self.driver_options(deadman_s=probe_deadman_s)).probe()
        sent = h.requests.since(mark)
        assert sent, "the pump side recorded no request from the probe: the harness's recording hook is not wired"
        writes = [r.text for r in sent if not r.query]
        assert not writes, f"probe sent writes: {writes} (all requests: {[r.text for r in sent]})"
        return report, sent

    def test_probe_reports_the_pump_and_sends_only_queries(self) -> None:
        async def body(h: Harness) -> None:
            await h.driver.configure_syringe(Decimal("26.7"))
            await h.driver.set_rate(Decimal("2.5"))
            report, _ = await self.probe_recorded(h)
            model, firmware = h.model.identity
            assert _norm(report.identity.model) == _norm(model) and _norm(firmware) in _norm(report.identity.firmware)
            assert report.status.state is PumpState.STOPPED and report.status.rate_ml_per_h == Decimal("2.5")
            assert report.status.diameter_mm in (None, Decimal("26.7"))
            assert report.deadman_s == h.model.status().deadman_s == self.deadman_s
            assert report.acknowledged == frozenset()

        self.run_with_harness(body)

    @pytest.mark.parametrize("probe_deadman_s", [0, 9])  # options.deadman_s must not reach the pump either way
    def test_probe_of_a_running_pump_in_safe_mode_changes_nothing(self, probe_deadman_s: int) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal("1.5"))
            before = h.model.status()
            assert before.state is PumpState.INFUSING and before.deadman_s == self.deadman_s and before.deadman_armed
            report, _ = await self.probe_recorded(h, probe_deadman_s)
            assert report.status.state is PumpState.INFUSING and report.status.rate_ml_per_h == Decimal("1.5")
            assert report.deadman_s == self.deadman_s
            after = h.model.status()
            assert after.state is PumpState.INFUSING and after.rate_ml_per_h == Decimal("1.5")
            assert after.deadman_s == self.deadman_s and after.deadman_armed
            assert after.diameter_mm == before.diameter_mm and after.alarms == frozenset()
            # ...and the dead-man still works: with the host silent, the pump stops itself.
            await self.pass_time(h, self.deadman_s + 1)
            fired = h.model.status()
            assert fired.state is PumpState.ALARM and AlarmKind.SAFE_MODE_TIMEOUT in fired.alarms

        self.run_with_harness(body)

    def test_probe_reports_a_latched_alarm_and_changes_nothing(self) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            h.model.inject_alarm(AlarmKind.OCCLUSION)
            report, _ = await self.probe_recorded(h)
            assert report.status.state is PumpState.ALARM and AlarmKind.OCCLUSION in report.status.alarms
            wanted = frozenset({AlarmKind.OCCLUSION}) if self.probe_acknowledges_alarms else frozenset()
            assert report.acknowledged == wanted
            after = h.model.status()
            assert after.state is PumpState.ALARM and AlarmKind.OCCLUSION in after.unacknowledged  # not cleared
            assert after.rate_ml_per_h == 1 and after.deadman_s == self.deadman_s

        self.run_with_harness(body)
