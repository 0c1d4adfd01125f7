"""SimDriver specifics: URL rules, options, error mapping, the default world, connect/close semantics."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from driverd.core.errors import ValidationError
from drivers.base import AlarmKind, DriverIOError, DriverOptions, PumpAlarm, PumpRejected, PumpState
from drivers.registry import open_driver
from drivers.sim import SimDriver, default_world
from simulators.clock import ManualClock
from simulators.world import World


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_registry_builds_a_sim_driver(world: World) -> None:
    d = open_driver("sim://bed-1", DriverOptions(world=world))
    assert isinstance(d, SimDriver) and d.name == "bed-1"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sim://", "url.name"),
        ("sim://-bed", "url.name"),
        ("sim://" + "x" * 65, "url.name"),
        ("sim://bed-1?fill=3", "url.fill"),
        ("sim+tcp://bed-1", "url.scheme"),
    ],
)
def test_bad_sim_urls_name_the_part(url: str, path: str, world: World) -> None:
    with pytest.raises(ValidationError) as exc:
        open_driver(url, DriverOptions(world=world))
    assert path in [p.path for p in exc.value.problems]


def test_bad_options_are_refused(world: World) -> None:
    with pytest.raises(ValidationError) as exc:
        open_driver("sim://a", DriverOptions(world="not a world"))
    assert exc.value.problems[0].path == "options.world"
    with pytest.raises(ValidationError) as exc:
        open_driver("sim://a", DriverOptions(world=world, deadman_s=-1))
    assert exc.value.problems[0].path == "options.deadman_s"
    d = open_driver("sim://a", DriverOptions(world=world, deadman_s=256))
    with pytest.raises(PumpRejected) as rej:
        run(d.connect())
    assert rej.value.code == "OOR" and world.pump("a").status().deadman_s == 0


def test_not_connected_is_an_io_error(world: World) -> None:
    d = open_driver("sim://a", DriverOptions(world=world))
    with pytest.raises(DriverIOError, match="not connected"):
        run(d.read_status())


def test_errors_map_to_driver_errors_with_details(world: World) -> None:
    async def body() -> None:
        async with open_driver("sim://a", DriverOptions(world=world, deadman_s=0)) as d:
            with pytest.raises(PumpRejected) as rej:
                await d.run()
            assert rej.value.code == "NA"
            world.pump("a").inject_alarm(AlarmKind.OCCLUSION)
            with pytest.raises(PumpAlarm) as alarm:
                await d.set_rate(Decimal(1))
            assert AlarmKind.OCCLUSION in alarm.value.alarms

    run(body())


def test_close_leaves_the_pump_running_until_its_deadman_fires(world: World, manual_clock: ManualClock) -> None:
    async def body() -> None:
        async with open_driver("sim://a", DriverOptions(world=world, deadman_s=10)) as d:
            await d.set_rate(Decimal(1))
            await d.run()
        pump = world.pump("a")
        manual_clock.advance(9)
        assert pump.status().state is PumpState.INFUSING
        manual_clock.advance(2)
        s = pump.status()
        assert s.state is PumpState.ALARM and AlarmKind.SAFE_MODE_TIMEOUT in s.alarms

    run(body())


def test_without_a_world_the_default_world_is_used() -> None:
    async def body() -> None:
        async with open_driver("sim://default-world-test", DriverOptions(deadman_s=0)) as d:
            await d.set_rate(Decimal("0.5"))
        assert default_world().pump("default-world-test").status().rate_ml_per_h == Decimal("0.5")

    run(body())
    assert default_world() is default_world()


def test_wire_fault_plan_is_honoured_without_a_wire(world: World) -> None:
    """sim:// rehearses a lost link like the real transports: the operation acts, its reply is lost or bad."""
    from drivers.base import DriverTimeout, ProtocolError

    plan = world.faults("a")

    async def body() -> None:
        d = open_driver("sim://a", DriverOptions(world=world, deadman_s=0, timeout_s=1.0))
        await d.connect()
        plan.drop_next(1)
        with pytest.raises(DriverTimeout):
            await d.set_rate(Decimal("0.5"))
        assert world.pump("a").status().rate_ml_per_h == Decimal("0.5")  # it acted; only the reply was lost
        plan.garble_next(1)
        with pytest.raises(ProtocolError):
            await d.read_status()
        plan.delay_next(1, 0.5)  # within the timeout: just late
        assert (await d.read_status()).rate_ml_per_h == Decimal("0.5")
        plan.delay_next(1, 2.0)  # beyond it: a timeout
        with pytest.raises(DriverTimeout):
            await d.read_status()
        plan.disconnect_next()
        with pytest.raises(DriverIOError):
            await d.read_status()
        with pytest.raises(DriverIOError, match="not connected"):
            await d.read_status()
        await d.connect()
        assert (await d.read_status()).rate_ml_per_h == Decimal("0.5")

    run(body())


def test_delivered_volume_is_read_as_the_display_shows_it(world: World, manual_clock: ManualClock) -> None:
    """4 significant digits, at most 3 decimals, rounded down: what a New Era display would read."""

    async def body() -> None:
        async with open_driver("sim://a", DriverOptions(world=world, deadman_s=0)) as d:
            model = world.pump("a")
            model.set_rate(Decimal("0.333"))
            model.run()
            manual_clock.advance(3 * 3600 + 7)
            status = await d.read_status()
            assert status.delivered_ml == Decimal("0.999")
            assert model.status().delivered_ml > status.delivered_ml

    run(body())


def test_rate_range_is_the_models_plunger_range_capped_at_its_maximum(world: World) -> None:
    """What the daemon checks the drug library against (docs/safety.md, SUP-19): the New Era mechanism by default
    (0.013..879.5 mL/h with 19.13 mm, as NewEraDriver reports), capped by the model's maximum rate; None for a model
    without a plunger range. The model refuses a rate just outside it."""
    from simulators.pump import ModelError

    d = open_driver("sim://bed-r", DriverOptions(world=world))
    assert isinstance(d, SimDriver)
    run(d.connect())
    assert d.rate_range(Decimal("19.13")) == (Decimal("0.013"), Decimal("879.5"))
    assert d.rate_range(Decimal("26.59")) == (Decimal("0.024"), Decimal(1000))  # the model's 1000 mL/h maximum
    with pytest.raises(ModelError):
        d.model.set_rate(Decimal("0.012"))
    d.model.plunger = None
    assert d.rate_range(Decimal("19.13")) is None
    run(d.close())
