"""HarvardDriver policy: URL parsing, the missing dead-man (refused unless allowed, loudly), what goes on the wire."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from driverd.core.errors import ValidationError
from drivers.base import AlarmKind, DriverOptions, PumpState
from drivers.harvard.driver import HarvardDriver
from drivers.registry import open_driver
from simulators.clock import ManualClock
from simulators.harvard import elite_model, serve_harvard


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("harvard+serial://?address=1", "url.path"),
        ("harvard+socket://127.0.0.1?address=1", "url.host"),
        ("harvard+usb:///dev/ttyACM0", "url.transport"),
        ("harvard+serial:///dev/ttyACM0?address=100", "url.address"),
        ("harvard+serial:///dev/ttyACM0?baud=4800", "url.baud"),
        ("harvard+serial:///dev/ttyACM0?baud=12345", "url.baud"),
        ("harvard+serial:///dev/ttyACM0?without_deadman=maybe", "url.without_deadman"),
        ("harvard+serial:///dev/ttyACM0?safe=1", "url.safe"),
    ],
)
def test_malformed_urls_name_the_field(url: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        open_driver(url)
    assert info.value.problems[0].path == field


def test_registered_as_an_entry_point() -> None:
    driver = open_driver("harvard+serial:///dev/ttyACM0?address=3&baud=9600", DriverOptions(deadman_s=0))
    assert isinstance(driver, HarvardDriver) and driver.address == 3 and driver.baud == 9600
    assert not driver.has_deadman


def _run(deadman_s: int, extra: str) -> tuple[HarvardDriver, list[bytes]]:
    """Connect, set 1 mL/h, run; return the driver and every command the pump received."""

    async def main() -> tuple[HarvardDriver, list[bytes]]:
        model = elite_model(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        async with serve_harvard(model, pty=True) as ep:
            seen: list[bytes] = []
            ep.protocol.tap = lambda cmd: seen.append(f"{cmd.name} {cmd.argument}".encode())
            driver = open_driver(ep.url + extra, DriverOptions(timeout_s=0.5, deadman_s=deadman_s))
            assert isinstance(driver, HarvardDriver)
            try:
                await driver.connect()
                await driver.set_rate(Decimal(1))
                await driver.run()
                assert model.status().state is PumpState.INFUSING
            finally:
                await driver.close()
            return driver, seen

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_a_deadman_is_asked_for_but_the_elite_has_none_refused_when_built() -> None:
    """Refused by configuration: the driver is not even built, so nothing reaches the pump."""
    with pytest.raises(ValidationError) as info:
        open_driver("harvard+serial:///dev/ttyACM0", DriverOptions(deadman_s=10))
    [problem] = info.value.problems
    assert (problem.path, problem.rule) == ("url.without_deadman", "deadman") and "without_deadman=allow" in str(
        problem.detail)
    assert isinstance(open_driver("harvard+serial:///dev/ttyACM0?without_deadman=allow", DriverOptions(deadman_s=10)),
                      HarvardDriver)


def test_allowed_without_deadman_runs_and_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="drivers.harvard.driver"):
        _, seen = _run(10, "&without_deadman=allow")
    assert any("NO DEAD-MAN" in r.getMessage() for r in caplog.records)
    assert seen[:2] == [b"poll on", b"poll "]  # poll mode first: replies then end with an XON
    assert b"irate 1 m/h" in seen and b"irun " in seen
    assert not any(s.startswith((b"wrun", b"rrun", b"run ", b"tvolume", b"civolume")) for s in seen)


def test_no_deadman_requested_needs_no_flag() -> None:
    driver, _ = _run(0, "")
    assert not driver.has_deadman


@pytest.mark.parametrize("address", [0, 6])
def test_probe_of_a_pump_outside_poll_mode_frames_by_line_count_and_leaves_it_so(address: int) -> None:
    """Without poll mode the prompt has no terminator (and 'NN:' also starts body lines): counted framing."""

    async def main() -> None:
        model = elite_model(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        model.set_rate(Decimal("2.5"))
        model.run()
        async with serve_harvard(model, tcp_port=0, address=address) as ep:
            seen: list[str] = []
            ep.protocol.tap = lambda cmd: seen.append(f"{cmd.name} {cmd.argument}".strip())
            report = await open_driver(ep.url, DriverOptions(timeout_s=0.5, deadman_s=0)).probe()
            assert report.identity.model == "11 ELITE I Single" and report.deadman_s == 0
            assert report.status.state is PumpState.INFUSING and report.status.rate_ml_per_h == Decimal("2.5")
            assert seen == ["poll", "ver", "status", "irate", "diameter"] and not ep.protocol.poll

    asyncio.run(asyncio.wait_for(main(), 30))


def test_config_check_names_the_missing_deadman(tmp_path: Path) -> None:
    """`driverd config check`: a production config (dead-man on) with an Elite and no without_deadman=allow."""
    from tests.install.test_config_check import check_json, write_config

    pumps = '[[pumps]]\nid = "bed-1"\nurl = "harvard+socket://127.0.0.1:7002"\n'
    code, body = check_json(write_config(tmp_path, pumps=pumps))
    assert code == 1
    assert [(p["path"], p["rule"]) for p in body["problems"]] == [("pumps[0].url.without_deadman", "deadman")]
    allowed = '[[pumps]]\nid = "bed-1"\nurl = "harvard+socket://127.0.0.1:7002?without_deadman=allow"\n'
    code, body = check_json(write_config(tmp_path, pumps=allowed, name="allowed.toml"))
    assert code == 0 and body["problems"] == []


def test_ordered_clear_is_not_a_power_up_but_an_unordered_drop_still_is() -> None:
    """The Elite resets its infused volume only at power-up (manual p. 27), so the driver reads a counter that went
    back as POWER_INTERRUPTED. Its own ``civolume`` must not look like that; a drop it did not order still does."""

    async def main() -> None:
        clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
        model = elite_model(clock)
        async with serve_harvard(model, pty=True) as ep:
            seen: list[str] = []
            ep.protocol.tap = lambda cmd: seen.append(f"{cmd.name} {cmd.argument}".strip())
            driver = open_driver(ep.url, DriverOptions(timeout_s=0.5, deadman_s=0))
            assert isinstance(driver, HarvardDriver)
            await driver.connect()
            try:
                await driver.set_rate(Decimal(36))
                await driver.run()
                clock.advance(2)
                await driver.stop()
                assert (await driver.read_status()).delivered_ml == Decimal("0.02")
                assert await driver.clear_delivered() == 0
                assert "civolume" in seen and model.status().delivered_ml == 0
                status = await driver.read_status()
                assert status.state is PumpState.STOPPED and status.alarms == frozenset()
                await driver.run()
                clock.advance(1)
                assert (await driver.read_status()).delivered_ml == Decimal("0.01")
                model.clear_delivered()  # the counter goes back without the driver asking: not ordered
                status = await driver.read_status()
                assert AlarmKind.POWER_INTERRUPTED in status.alarms
            finally:
                await driver.close()

    asyncio.run(asyncio.wait_for(main(), 30))
