"""The driver contract suite for HarvardDriver, against the Pump 11 Elite simulator over a real PTY and loopback TCP.

The Elite was not designed around the PumpDriver contract; where its protocol cannot do what the contract asks,
the expectation is replaced here by what the protocol does say, with assertions (as tests/newera/test_contract.py
does for New Era):
- No dead-man: the harness builds the driver with ``deadman_s = 0`` (the pump has none to arm). The dead-man
  tests become: the pump keeps infusing when the host goes silent (the hazard the daemon's config must accept
  explicitly, tests/harvard/test_driver.py).
- End of syringe is a motor stall (``*``), the same as an occlusion: reported as OCCLUSION.
- Near end and low battery are not on the wire: invisible, infusion continues.
- A power cut leaves no alarm on the wire: the pump comes back idle with its infused-volume counter reset. The
  driver reports POWER_INTERRUPTED when the counter went back, OTHER (stopped on its own) when nothing had been
  infused yet.
- A stall is acknowledged on the pump's touch screen only: ``clear_alarm()`` refuses until then.
- A rate of 0 is out of range on an Elite (below the plunger's minimum speed): the pump always holds a runnable
  rate, so "run without a rate" is a fresh simulated model only.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from drivers.base import AlarmKind, DriverOptions, PumpAlarm, PumpDriver, PumpRejected, PumpState
from drivers.harvard.codec import Command
from drivers.harvard.driver import HarvardDriver
from drivers.registry import open_driver
from drivers.testing.contract import DriverContract, Harness, ProbeContract, RequestLog, WireFaultContract
from simulators.clock import ManualClock
from simulators.harvard import Endpoint, _resolve, elite_model_kwargs, serve_harvard
from simulators.world import World

# The protocol's queries: these commands without an argument only read. Anything else acts on the pump.
QUERIES = frozenset({"", "address", "poll", "echo", "ver", "version", "metrics", "status", "irate", "diameter",
                     "svolume", "force", "tvolume", "ttime", "ivolume", "itime", "crate"})


def record_command(log: RequestLog) -> Callable[[Command], None]:
    def tap(cmd: Command) -> None:
        name = _resolve(cmd.name)
        log.record(f"{cmd.name} {cmd.argument}".strip() or "(prompt)", query=name in QUERIES and not cmd.argument)

    return tap


class _HarvardContract(WireFaultContract, ProbeContract, DriverContract):
    use_pty: bool = True
    address: int = 0
    deadman_s = 0  # the Elite has no dead-man to arm
    endpoint: Endpoint

    @contextlib.asynccontextmanager
    async def harness(self) -> AsyncIterator[Harness]:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        model = world.pump("p1", **elite_model_kwargs())
        faults = world.faults("p1")
        kwargs: dict[str, object] = {"pty": True} if self.use_pty else {"tcp_port": 0}
        async with serve_harvard(model, faults, address=self.address, **kwargs) as endpoint:  # type: ignore[arg-type]
            self.endpoint = endpoint
            log = RequestLog()
            endpoint.protocol.tap = record_command(log)
            driver = open_driver(endpoint.url, self.driver_options())
            assert isinstance(driver, HarvardDriver)
            await driver.connect()
            try:
                # A config that asks for a dead-man must allow its absence to build an Elite driver at all.
                def reopen(o: DriverOptions) -> PumpDriver:
                    return open_driver(endpoint.url + ("&without_deadman=allow" if o.deadman_s else ""), o)

                yield Harness(driver, model, world.clock, faults, reopen=reopen, requests=log)
            finally:
                await driver.close()

    # ---- no dead-man -----

    def test_deadman_stops_the_pump_when_the_host_goes_silent(self) -> None:
        """Replaced: the Elite has no dead-man. With the host silent for 10 hours the pump is still infusing."""

        async def body(h: Harness) -> None:
            assert isinstance(h.driver, HarvardDriver) and not h.driver.has_deadman
            await self.ready_to_infuse(h, Decimal(1))
            await self.pass_time(h, 36000)
            assert h.model.status().state is PumpState.INFUSING
            status = await h.driver.read_status()
            assert status.state is PumpState.INFUSING and status.alarms == frozenset()
            assert status.delivered_ml == Decimal(10)

        self.run_with_harness(body)

    def test_heartbeat_keeps_the_deadman_from_firing(self) -> None:
        """Replaced: heartbeat() is a status read; it changes nothing on a pump without a dead-man."""

        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            for _ in range(3):
                await self.pass_time(h, 10)
                status = await h.driver.heartbeat()
                assert status.state is PumpState.INFUSING and status.alarms == frozenset()

        self.run_with_harness(body)

    @pytest.mark.parametrize("probe_deadman_s", [0, 9])
    def test_probe_of_a_running_pump_in_safe_mode_changes_nothing(self, probe_deadman_s: int) -> None:
        """Replaced (no safe mode): a probe of a running pump changes nothing; it keeps running."""

        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal("1.5"))
            before = h.model.status()
            poll_before = self.endpoint.protocol.poll  # on: the daemon's driver switched it on at connect
            report, _ = await self.probe_recorded(h, probe_deadman_s)
            assert report.deadman_s == 0
            assert report.status.state is PumpState.INFUSING and report.status.rate_ml_per_h == Decimal("1.5")
            after = h.model.status()
            assert after.state is PumpState.INFUSING and after.rate_ml_per_h == Decimal("1.5")
            assert after.diameter_mm == before.diameter_mm and after.alarms == frozenset()
            assert after.deadman_s == 0 and self.endpoint.protocol.poll is poll_before  # left as the probe found it

        self.run_with_harness(body)

    # ---- rates -----

    @pytest.mark.parametrize("rate", ["0.0026", "2743"])
    def test_rate_outside_the_syringes_range_is_refused_by_the_pump(self, rate: str) -> None:
        """The Elite's range with 19.13 mm: 0.00264..2742.0 mL/h (ELITE11_PLUNGER): outside it, Out of range."""

        async def body(h: Harness) -> None:
            await h.driver.configure_syringe(Decimal("19.13"))
            await h.driver.set_rate(Decimal(2))
            with pytest.raises(PumpRejected) as info:
                await h.driver.set_rate(Decimal(rate))
            assert info.value.code == "OOR" and "0.0027..2742" in str(info.value)
            assert h.model.status().rate_ml_per_h == 2
            assert (await h.driver.read_status()).rate_ml_per_h == 2

        self.run_with_harness(body)

    def test_run_without_a_rate_is_rejected(self) -> None:
        """Replaced: 0 is out of range on an Elite (refused, nothing changes); a model with no rate will not run."""

        async def body(h: Harness) -> None:
            with pytest.raises(PumpRejected):
                await h.driver.run()  # the fresh model has rate 0
            assert h.model.status().state is PumpState.STOPPED
            await h.driver.set_rate(Decimal(2))
            with pytest.raises(PumpRejected) as info:
                await h.driver.set_rate(Decimal(0))
            assert info.value.code == "OOR"
            assert h.model.status().rate_ml_per_h == 2 and h.model.status().state is PumpState.STOPPED

        self.run_with_harness(body)

    # ---- alarms: what the Elite's wire shows -----

    @pytest.mark.parametrize("kind", [AlarmKind.OCCLUSION, AlarmKind.END_OF_SYRINGE, AlarmKind.POWER_INTERRUPTED])
    def test_stopping_alarm_shows_in_status_and_stops_the_pump(self, kind: AlarmKind) -> None:
        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            if kind is AlarmKind.POWER_INTERRUPTED:
                h.model.power_cycle()  # nothing infused yet: the counter cannot show the reset
                wire_kind = AlarmKind.OTHER
            else:
                h.model.inject_alarm(kind)
                wire_kind = AlarmKind.OCCLUSION  # a stall, either way
            status = await h.driver.read_status()
            assert status.alarms == frozenset({wire_kind}), status
            assert status.state is PumpState.ALARM and not status.running

        self.run_with_harness(body)

    def test_power_cut_after_infusing_is_reported_as_power_interrupted(self) -> None:
        """Manual p. 27: infused volume and timers reset at power-up: the counter going back shows the cut."""

        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(36))
            await self.pass_time(h, 10)
            assert (await h.driver.read_status()).delivered_ml == Decimal("0.1")
            h.model.power_cycle()
            status = await h.driver.read_status()
            assert status.alarms == frozenset({AlarmKind.POWER_INTERRUPTED}) and status.state is PumpState.ALARM
            assert status.delivered_ml == 0 and status.rate_ml_per_h == 36  # settings kept, counters reset
            with pytest.raises(PumpAlarm):
                await h.driver.run()
            assert h.model.status().state is PumpState.STOPPED

        self.run_with_harness(body)

    @pytest.mark.parametrize("kind", [AlarmKind.NEAR_END, AlarmKind.LOW_BATTERY])
    def test_warning_shows_in_status_and_infusion_continues(self, kind: AlarmKind) -> None:
        """Replaced: no such report on the Elite's wire (near end is an audible alarm only; no battery)."""

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
        """Replaced: on an Elite an empty syringe stalls the motor (``*``): OCCLUSION, blocks run."""

        async def body(h: Harness) -> None:
            h.model.load_syringe(Decimal("0.02"))
            await self.ready_to_infuse(h, Decimal(36))
            await self.pass_time(h, 3)
            status = await h.driver.read_status()
            assert status.alarms == frozenset({AlarmKind.OCCLUSION}) and status.state is PumpState.ALARM
            assert status.delivered_ml == Decimal("0.02")  # femtolitre counter: exactly the fill
            with pytest.raises(PumpAlarm):
                await h.driver.run()

        self.run_with_harness(body)

    def test_alarm_blocks_set_rate_and_run_until_cleared(self) -> None:
        """Replaced: the stall is acknowledged on the pump's screen; clear_alarm() refuses until then."""

        async def body(h: Harness) -> None:
            await self.ready_to_infuse(h, Decimal(1))
            h.model.inject_alarm(AlarmKind.OCCLUSION)
            with pytest.raises(PumpAlarm):
                await h.driver.set_rate(Decimal(2))
            with pytest.raises(PumpAlarm):
                await h.driver.run()
            assert h.model.status().rate_ml_per_h == 1 and h.model.status().state is PumpState.ALARM
            with pytest.raises(PumpAlarm, match="touch screen"):
                await h.driver.clear_alarm()
            assert h.model.status().state is PumpState.ALARM
            self.endpoint.protocol.touch_screen()
            await h.driver.clear_alarm()
            status = await h.driver.read_status()
            assert status.state is PumpState.STOPPED and status.alarms == frozenset()
            assert await h.driver.set_rate(Decimal(2)) == 2
            await h.driver.run()
            assert (await h.driver.read_status()).state is PumpState.INFUSING

        self.run_with_harness(body)


class TestHarvardOverPty(_HarvardContract):
    use_pty = True


class TestHarvardOverTcp(_HarvardContract):
    use_pty = False


class TestHarvardChainAddressOverPty(_HarvardContract):
    """A non-zero chain address: every reply line carries ``NN:`` and the prompt ``NN``."""

    use_pty = True
    address = 6
