"""NewEraDriver behaviour beyond the shared contract: URLs, what goes on the wire, alarms, units, dead-man."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from driverd.core.errors import ValidationError
from drivers.base import AlarmKind, DriverIOError, DriverOptions, DriverTimeout, PumpAlarm, PumpRejected, PumpState
from drivers.newera.codec import RateUnit
from drivers.newera.driver import NewEraDriver
from drivers.registry import open_driver
from drivers.url import parse_url
from simulators.clock import ManualClock
from simulators.faults import FaultPlan
from simulators.newera import Endpoint, serve_newera
from simulators.pump import PumpModel


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("newera+usb:///dev/ttyUSB0", "url.transport"),
        ("newera+serial://", "url.path"),
        ("newera+socket:///dev/x", "url.host"),
        ("newera+serial:///dev/ttyUSB0?address=100", "url.address"),
        ("newera+serial:///dev/ttyUSB0?baud=4800", "url.baud"),
        ("newera+serial:///dev/ttyUSB0?speed=1", "url.speed"),
    ],
)
def test_bad_urls_name_the_field(url: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        NewEraDriver(parse_url(url))
    assert field in {p.path for p in info.value.problems}


def test_deadman_out_of_safe_mode_range_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        NewEraDriver(parse_url("newera+serial:///dev/ttyUSB0"), DriverOptions(deadman_s=256))
    assert info.value.problems[0].path == "options.deadman_s"


def test_registry_builds_the_driver() -> None:
    d = open_driver("newera+socket://127.0.0.1:7001?address=3")
    assert isinstance(d, NewEraDriver) and d.address == 3


@contextlib.asynccontextmanager
async def rig(
    *, deadman_s: int = 5, pty: bool = True, power_up: bool = False, faults: FaultPlan | None = None
) -> AsyncIterator[tuple[NewEraDriver, PumpModel, ManualClock, Endpoint]]:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    model = PumpModel(clock)
    kwargs: dict[str, object] = {"pty": True} if pty else {"tcp_port": 0}
    async with serve_newera(model, faults, power_up=power_up, **kwargs) as ep:  # type: ignore[arg-type]
        driver = open_driver(ep.url, DriverOptions(timeout_s=0.5, retries=1, deadman_s=deadman_s))
        assert isinstance(driver, NewEraDriver)
        await driver.connect()
        try:
            yield driver, model, clock, ep
        finally:
            await driver.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


def test_connect_sets_safe_mode_continuous_infuse_and_never_withdraws() -> None:
    async def body() -> None:
        async with rig(deadman_s=7) as (driver, model, _clock, ep):
            await driver.set_rate(Decimal("2.083"))
            await driver.run()
            await driver.stop()
            sent = [(c.name, c.data) for c in ep.protocol.requests]
        assert sent[0] == ("SAF", "7") and model.status().deadman_s == 7
        assert ("DIR", "INF") in sent and ("VOL", "ML") in sent and ("VOL", "0") in sent
        assert not any(name == "DIR" and data in ("WDR", "REV") for name, data in sent)
        assert ("RAT", "2.083MH") in sent  # rates always in mL/h, exactly as given
        assert all(frame.startswith(b"\x02") for frame in driver.transport.sent)  # safe framing throughout

    run(body)


def test_basic_mode_when_the_deadman_is_disabled() -> None:
    async def body() -> None:
        async with rig(deadman_s=0) as (driver, model, _clock, _ep):
            assert await driver.set_rate(Decimal(5)) == 5
            assert model.status().deadman_s == 0
            # SAF0 goes safe-framed (accepted in any mode); everything after it is basic mode
            assert driver.transport.sent[0].startswith(b"\x02")
            assert all(frame.endswith(b"\r") for frame in list(driver.transport.sent)[1:])

    run(body)


def test_power_up_reset_alarm_is_reported_until_cleared() -> None:
    async def body() -> None:
        async with rig(power_up=True) as (driver, _model, _clock, _ep):
            status = await driver.read_status()
            assert status.state is PumpState.ALARM and status.alarms == {AlarmKind.POWER_INTERRUPTED}
            with pytest.raises(PumpAlarm):
                await driver.set_rate(Decimal(1))
            await driver.clear_alarm()
            assert (await driver.read_status()).state is PumpState.STOPPED
            assert await driver.set_rate(Decimal(1)) == 1

    run(body)


def test_dead_daemon_leaves_the_pump_to_stop_itself() -> None:
    """The driver closes without stopping (a crash); the pump's safe-mode timeout stops the infusion."""

    async def body() -> None:
        async with rig(deadman_s=5) as (driver, model, clock, _ep):
            await driver.set_rate(Decimal(36))
            await driver.run()
        clock.advance(30)
        st = model.status()
        assert st.state is PumpState.ALARM and AlarmKind.SAFE_MODE_TIMEOUT in st.alarms
        assert st.delivered_ml == Decimal("0.05")  # 36 mL/h for exactly the 5 s timeout

    run(body)


def test_lost_set_reply_is_read_back_not_blindly_resent() -> None:
    async def body() -> None:
        plan = FaultPlan()
        async with rig(faults=plan) as (driver, model, _clock, ep):
            plan.drop_next(1)  # the RAT set's reply is lost, but the pump applied it
            assert await driver.set_rate(Decimal("1.25")) == Decimal("1.25")
            sets = [c for c in ep.protocol.requests if c.name == "RAT" and c.data]
            assert len(sets) == 1  # read back showed the pump holds it: not sent twice
            assert model.status().rate_ml_per_h == Decimal("1.25")

    run(body)


def test_lost_run_reply_checks_status_before_resending() -> None:
    async def body() -> None:
        plan = FaultPlan()
        async with rig(faults=plan) as (driver, model, _clock, ep):
            await driver.set_rate(Decimal(1))
            plan.drop_next(1)
            await driver.run()
            assert [c.name for c in ep.protocol.requests].count("RUN") == 1
            assert model.status().state is PumpState.INFUSING

    run(body)


def test_foreign_rate_units_are_read_exactly_and_replaced_while_stopped() -> None:
    async def body() -> None:
        async with rig() as (driver, model, _clock, ep):
            ep.protocol.rate_unit = RateUnit.ML_PER_MIN
            model.set_rate(Decimal(90))  # shown by the pump as 1.500 MM
            assert (await driver.read_status()).rate_ml_per_h == Decimal(90)
            assert await driver.set_rate(Decimal("2.5")) == Decimal("2.5")
            assert ep.protocol.rate_unit is RateUnit.ML_PER_H
            await driver.run()
            ep.protocol.rate_unit = RateUnit.UL_PER_H  # someone changed units at the keypad
            with pytest.raises(PumpRejected) as info:
                await driver.set_rate(Decimal(3))  # units may not change while infusing
            assert info.value.code == "NA"
            assert model.status().rate_ml_per_h == Decimal("2.5")

    run(body)


@pytest.mark.parametrize("bad", ["2.0833", "0.0001", "10000"])
def test_unrepresentable_rate_is_refused_before_the_wire(bad: str) -> None:
    async def body() -> None:
        async with rig() as (driver, _model, _clock, ep):
            n = len(ep.protocol.requests)
            with pytest.raises(PumpRejected) as info:
                await driver.set_rate(Decimal(bad))
            assert info.value.code == "OOR" and "rate_ml_per_h" in str(info.value)
            assert len(ep.protocol.requests) == n  # nothing was sent

    run(body)


def test_scenario_alarm_over_tcp_ends_in_pump_alarm() -> None:
    async def body() -> None:
        clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
        model = PumpModel(clock)
        # the driver's connect() takes 5 replies; the occlusion hits right after the 7th
        plan = FaultPlan.from_scenario(
            '[[fault]]\nafter_requests = 7\nkind = "alarm"\nalarm = "occlusion"\n', alarm_hook=model.inject_alarm
        )
        async with serve_newera(model, plan, tcp_port=0) as ep:
            driver = open_driver(ep.url, DriverOptions(timeout_s=0.5, deadman_s=5))
            await driver.connect()
            try:
                await driver.set_rate(Decimal(1))  # replies 6 (set) and 7 (read-back)
                with pytest.raises(PumpAlarm) as info:
                    await driver.run()
                assert info.value.alarms == {AlarmKind.OCCLUSION}
                assert (await driver.read_status()).state is PumpState.ALARM
            finally:
                await driver.close()

    run(body)


def test_reconnects_after_a_tcp_disconnect() -> None:
    async def body() -> None:
        plan = FaultPlan()
        async with rig(pty=False, faults=plan) as (driver, _model, _clock, _ep):
            await driver.set_rate(Decimal(4))
            plan.disconnect_next()
            with contextlib.suppress(DriverIOError, DriverTimeout):
                await driver.read_status()
            assert (await driver.read_status()).rate_ml_per_h == 4  # the transport reopened the socket

    run(body)


def test_clear_delivered_sends_cld_inf_to_a_stopped_pump_and_reads_dis_back() -> None:
    """Manual, "Volume Dispensed": ``CLD INF`` clears the infused volume (``CLD WDR`` the withdrawn one: never
    needed, this driver never withdraws). Over 100 mL the 4-digit display reads in 0.1 mL steps; cleared, the
    counter reads 0 and counts in 0.001 mL steps again."""

    async def body() -> None:
        async with rig(deadman_s=0, pty=False) as (driver, model, clock, ep):
            model.load_syringe(Decimal(1000))  # a reservoir that does not run empty at 100 mL
            await driver.configure_syringe(Decimal("26.59"))
            await driver.set_rate(Decimal(500))
            await driver.run()
            clock.advance(720)  # 100 mL at 500 mL/h
            await driver.stop()
            assert (await driver.read_status()).delivered_ml == Decimal("100.0")
            mark = len(ep.protocol.requests)
            assert await driver.clear_delivered() == 0
            sent = [(c.name, c.data) for c in list(ep.protocol.requests)[mark:]]
            assert ("CLD", "INF") in sent and ("CLD", "WDR") not in sent
            assert sent.index(("CLD", "INF")) < sent.index(("DIS", ""))  # read back after the clear
            assert model.status().delivered_ml == 0

    run(body)
