"""The driver contract suite for NewEraDriver, against the New Era simulator over a real PTY and loopback TCP.

New Era protocol limits (documented in simulators/newera.py and drivers/newera/driver.py) mean four contract
expectations cannot hold on this wire, and are replaced here by what the protocol does say, with assertions:
- End of syringe: the pump's plunger stalls, and the only report the protocol has is the stall alarm ``A?S``,
  the same as an occlusion. The driver reports it as a stopping alarm (OCCLUSION), never as END_OF_SYRINGE,
  because it cannot know which it was; the daemon tracks syringe volume itself (safety requirement 11).
- Near-end and low battery: no report exists in the protocol; the pump keeps infusing and nothing blocks.
A driver guessing these from a simulator-only query would pass the contract and fail on a real pump.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from driverd.core.errors import DriverdError
from drivers.base import AlarmKind, PumpAlarm, PumpState
from drivers.newera.codec import Frame, parse_command
from drivers.newera.driver import NewEraDriver
from drivers.registry import open_driver
from drivers.testing.contract import DriverContract, Harness, ProbeContract, RequestLog, WireFaultContract
from simulators.clock import ManualClock
from simulators.newera import serve_newera
from simulators.world import World

# The protocol's queries: these commands with no argument only read. Anything else (an argument, RUN, STP, CLD,
# an unknown or unparseable command) acts on the pump.
QUERIES = frozenset({"", "VER", "DIS", "SAF", "RAT", "DIA", "DIR", "VOL"})


def record_frame(log: RequestLog) -> Callable[[Frame], None]:
    def tap(frame: Frame) -> None:
        try:
            cmd = parse_command(frame.payload)
        except DriverdError:
            log.record(repr(frame.payload), query=False)
            return
        log.record(f"{cmd.name or '(status)'}{cmd.data}", query=cmd.name in QUERIES and not cmd.data)

    return tap


class _NewEraContract(WireFaultContract, ProbeContract, DriverContract):
    use_pty: bool = True
    probe_acknowledges_alarms = True  # the A?x reply to the probe's first query acknowledges the alarm

    @contextlib.asynccontextmanager
    async def harness(self) -> AsyncIterator[Harness]:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        model = world.pump("p1")
        faults = world.faults("p1")
        kwargs: dict[str, object] = {"pty": True} if self.use_pty else {"tcp_port": 0}
        async with serve_newera(model, faults, **kwargs) as endpoint:  # type: ignore[arg-type]
            log = RequestLog()
            endpoint.protocol.tap = record_frame(log)
            driver = open_driver(endpoint.url, self.driver_options())
            assert isinstance(driver, NewEraDriver)
            await driver.connect()
            try:
                yield Harness(
                    driver, model, world.clock, faults, reopen=lambda o: open_driver(endpoint.url, o), requests=log
                )
            finally:
                await driver.close()

    # ---- New Era protocol limits (see the module docstring) -----

    @pytest.mark.parametrize("kind", [AlarmKind.OCCLUSION, AlarmKind.END_OF_SYRINGE, AlarmKind.POWER_INTERRUPTED])
    def test_stopping_alarm_shows_in_status_and_stops_the_pump(self, kind: AlarmKind) -> None:
        wire_kind = AlarmKind.OCCLUSION if kind is AlarmKind.END_OF_SYRINGE else kind  # A?S: a stall

        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            if kind is AlarmKind.POWER_INTERRUPTED:
                h.model.power_cycle()
            else:
                h.model.inject_alarm(kind)
            status = await h.driver.read_status()
            assert status.alarms == frozenset({wire_kind}), status
            assert status.state is PumpState.ALARM and not status.running

        self.run_with_harness(body)

    @pytest.mark.parametrize("kind", [AlarmKind.NEAR_END, AlarmKind.LOW_BATTERY])
    def test_warning_shows_in_status_and_infusion_continues(self, kind: AlarmKind) -> None:
        """No New Era report for warnings: invisible on the wire, the pump keeps infusing, nothing blocks."""

        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            if kind is AlarmKind.LOW_BATTERY:
                h.model.set_battery(15)
            else:
                h.model.inject_alarm(kind)
            assert kind in h.model.status().alarms
            status = await h.driver.read_status()
            assert status.alarms == frozenset() and status.state is PumpState.INFUSING
            assert await h.driver.set_rate(Decimal(2)) == 2

        self.run_with_harness(body)

    def test_syringe_running_empty_ends_in_end_of_syringe(self) -> None:
        """On a New Era an empty syringe is a stall (A?S): a stopping alarm that blocks run until cleared."""

        async def body(h: Harness) -> None:
            h.model.load_syringe(Decimal("0.02"))
            await self.ready_to_infuse(h, Decimal(36))  # 0.02 mL at 0.01 mL/s: empty after 2 s
            await self.pass_time(h, 3)
            status = await h.driver.read_status()
            assert status.alarms == frozenset({AlarmKind.OCCLUSION}) and status.state is PumpState.ALARM
            assert status.delivered_ml == Decimal("0.02")  # exactly the fill, stopped at the exact time
            assert h.model.status().remaining_ml == 0
            with pytest.raises(PumpAlarm):
                await h.driver.run()

        self.run_with_harness(body)


class TestNewEraOverPty(_NewEraContract):
    use_pty = True


class TestNewEraOverTcp(_NewEraContract):
    use_pty = False
