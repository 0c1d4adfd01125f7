"""FaultPlan.cut(): a pulled cable on every front-end (sim://, New Era over a PTY, Modbus over loopback TCP).
Nothing reaches the pump (no contact, no command), nothing answers, the pump's own dead-man fires; restore() brings
the link back with the pump in alarm. FaultEvents report each fault that fires. Virtual time (ManualClock)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal as D
from typing import Any

import pytest

from drivers.base import AlarmKind, DriverError, DriverOptions, DriverTimeout, PumpDriver, PumpState
from drivers.registry import open_driver
from simulators.clock import ManualClock
from simulators.faults import FaultEvent, FaultPlan
from simulators.pump import PumpModel
from simulators.world import World

T0 = datetime(2026, 12, 1, tzinfo=UTC)
DEADMAN_S = 20
OPTS = DriverOptions(timeout_s=0.3, retries=0, deadman_s=DEADMAN_S)


async def _cut_scenario(driver: PumpDriver, model: PumpModel, plan: FaultPlan, clock: ManualClock) -> None:
    await driver.connect()
    await driver.set_rate(D(2))
    await driver.run()
    assert (await driver.read_status()).state is PumpState.INFUSING
    plan.cut()
    with pytest.raises(DriverError):  # New Era/sim: a timeout; Modbus: no answer, also a timeout
        await driver.set_rate(D(1))
    assert model.status().rate_ml_per_h == 2, "the command never reached the pump"
    clock.advance(DEADMAN_S + 1)  # the host is silent as far as the pump can tell
    status = model.status()
    assert status.state is PumpState.ALARM and AlarmKind.SAFE_MODE_TIMEOUT in status.alarms
    with pytest.raises(DriverError):
        await driver.read_status()
    assert plan.lost_requests >= 2
    plan.restore()
    seen = await _read_after_restore(driver)
    assert seen.state is PumpState.ALARM or AlarmKind.SAFE_MODE_TIMEOUT in seen.alarms


async def _read_after_restore(driver: PumpDriver) -> Any:
    # A driver may have given up its connection during the cut: the next call reopens it (a reconnect is the
    # driver's business, not the test's).
    for _ in range(3):
        try:
            return await driver.read_status()
        except DriverError as exc:
            last = exc
            await driver.close()
            await driver.connect()
    raise last


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 60))


def test_cut_on_sim_driver() -> None:
    async def body() -> None:
        clock = ManualClock(T0)
        world = World(clock)
        driver = open_driver("sim://bed-1", DriverOptions(timeout_s=0.3, retries=0, deadman_s=DEADMAN_S, world=world))
        model = world.pump("bed-1")
        await _cut_scenario(driver, model, world.faults("bed-1"), clock)

    _run(body)


def test_cut_on_newera_over_a_pty() -> None:
    from simulators.newera import serve_newera

    async def body() -> None:
        clock = ManualClock(T0)
        model = PumpModel(clock)
        plan = FaultPlan(alarm_hook=model.inject_alarm)
        async with serve_newera(model, plan, pty=True) as ep:
            driver = open_driver(ep.url, OPTS)
            try:
                await _cut_scenario(driver, model, plan, clock)
            finally:
                await driver.close()

    _run(body)


def test_cut_on_modbus_over_tcp() -> None:
    from simulators.modbus import serve_modbus

    async def body() -> None:
        clock = ManualClock(T0)
        world = World(clock)
        async with serve_modbus(world, {3: "bed-3"}, tcp_port=0) as ep:
            driver = open_driver(ep.url(3), OPTS)
            try:
                await _cut_scenario(driver, world.pump("bed-3"), ep.plans[3], clock)
            finally:
                await driver.close()

    _run(body)


def test_cut_requests_never_reach_the_sim_pump() -> None:
    async def body() -> None:
        clock = ManualClock(T0)
        world = World(clock)
        driver = open_driver("sim://p", DriverOptions(timeout_s=0.3, retries=0, deadman_s=DEADMAN_S, world=world))
        await driver.connect()
        plan = world.faults("p")
        plan.cut()
        with pytest.raises(DriverTimeout, match="link cut"):
            await driver.set_rate(D("1.5"))
        with pytest.raises(DriverTimeout):
            await driver.run()
        assert world.pump("p").status().rate_ml_per_h == 0 and world.pump("p").status().state is PumpState.STOPPED
        assert plan.lost_requests == 2 and plan.history == [], "nothing was asked of the pump, so nothing to drop"

    _run(body)


# ---- FaultEvents ----------------------------------------------------------------------------------------------


def test_every_fault_that_fires_is_reported_once() -> None:
    events: list[FaultEvent] = []
    alarms: list[AlarmKind] = []
    plan = FaultPlan(alarm_hook=alarms.append, on_event=events.append)
    plan.drop_next(2)
    plan.on_reply(b"x")
    plan.on_reply(b"x")
    plan.cut()
    plan.cut()  # already cut: no second report
    for _ in range(5):
        plan.on_reply(b"x")  # dropped by the cut: not reported one by one
    plan.restore()
    plan.restore()  # nothing to restore
    plan.drop_all()
    plan.clear()
    plan.fire_alarm(AlarmKind.OCCLUSION)
    plan.delay_next(1, 0.5)
    plan.on_reply(b"x")
    assert [(e.kind, e.detail) for e in events] == [
        ("drop", "reply 1: drop"), ("drop", "reply 2: drop"),
        ("cut", "link cut: requests no longer reach the pump, nothing is answered"), ("restore", "link restored"),
        ("drop_all", "every reply dropped until restored"), ("restore", "link restored"),
        ("alarm", "occlusion at the pump"), ("delay", "reply 8: delay by 0.5 s")]
    assert alarms == [AlarmKind.OCCLUSION]


def test_a_scenario_alarm_is_reported_when_it_fires() -> None:
    events: list[FaultEvent] = []
    world = World(ManualClock(T0))
    plan = FaultPlan.from_scenario('[[fault]]\nafter_requests = 1\nkind = "alarm"\nalarm = "occlusion"\n')
    plan.on_event = events.append
    world.set_faults("p", plan)
    world.pump("p")
    plan.on_reply(b"x")
    assert [(e.kind, e.detail) for e in events] == [("alarm", "occlusion at the pump")]
    assert AlarmKind.OCCLUSION in world.pump("p").status().alarms


def test_restore_keeps_queued_faults_but_clear_forgets_them() -> None:
    plan = FaultPlan()
    plan.drop_next(1)
    plan.cut()
    assert plan.on_reply(b"x").kind == "drop" and plan.pending == 1, "a reply lost to the cut uses no queued fault"
    plan.restore()
    assert not plan.is_cut and plan.pending == 1 and plan.reaches_pump()
    plan.cut()
    plan.clear()
    assert not plan.is_cut and plan.pending == 0
