"""`driverd sim newera`: a real process serving a real PTY / TCP port; the driver talks to it; SIGTERM ends it."""

from __future__ import annotations

import asyncio
import signal
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from drivers.base import AlarmKind, DriverError, DriverOptions, PumpAlarm, PumpState
from drivers.registry import open_driver

CLI = [sys.executable, "-m", "driverd.cli.main", "sim", "newera"]


async def _start(*args: str) -> tuple[asyncio.subprocess.Process, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    first = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
    url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
    return proc, first, url


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise


@pytest.mark.parametrize("mode", ["pty", "tcp"])
def test_cli_simulator_serves_a_driver(mode: str) -> None:
    async def main() -> None:
        args = ["--pty"] if mode == "pty" else ["--tcp", "0"]
        proc, first, url = await _start(*args, "--fill", "10", "--diameter", "14.5")
        try:
            if mode == "pty":
                assert first.startswith("/dev/") and url == f"newera+serial://{first}?address=0&baud=19200"
            else:
                assert int(first) > 0 and url == f"newera+socket://127.0.0.1:{first}?address=0"
            driver = open_driver(url, DriverOptions(timeout_s=1.0, deadman_s=30))
            await driver.connect()
            try:
                status = await driver.read_status()  # a pump just switched on: A?R
                assert status.alarms == {AlarmKind.POWER_INTERRUPTED}
                await driver.clear_alarm()
                assert status.diameter_mm == Decimal("14.5")
                assert await driver.set_rate(Decimal("2.083")) == Decimal("2.083")
                await driver.run()
                assert (await driver.read_status()).state is PumpState.INFUSING
                await driver.stop()
            finally:
                await driver.close()
        finally:
            assert await _stop(proc) == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_cli_firmware_without_safe_mode() -> None:
    """Issue 16.7: `--no-safe-mode` answers ? to SAF; the driver refuses it unless the URL allows it."""

    async def main() -> None:
        proc, _first, url = await _start("--tcp", "0", "--no-safe-mode", "--no-power-up")
        try:
            refused = open_driver(url, DriverOptions(timeout_s=0.5, deadman_s=30))
            with pytest.raises(DriverError, match="no safe mode"):
                await refused.connect()
            await refused.close()
            allowed = open_driver(url + "&without_safe_mode=allow", DriverOptions(timeout_s=0.5, deadman_s=30))
            await allowed.connect()
            try:
                assert await allowed.set_rate(Decimal(2)) == 2
            finally:
                await allowed.close()
        finally:
            assert await _stop(proc) == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_cli_faults_scenario_and_simple_flags(tmp_path: Path) -> None:
    scenario = tmp_path / "faults.toml"
    scenario.write_text('[[fault]]\nafter_requests = 8\nkind = "alarm"\nalarm = "occlusion"\n')

    async def main() -> None:
        proc, _first, url = await _start("--tcp", "0", "--no-power-up", "--faults", str(scenario), "--drop-next", "1")
        try:
            driver = open_driver(url, DriverOptions(timeout_s=0.5, retries=1, deadman_s=0))
            await driver.connect()  # the dropped first reply is retried (SAF is idempotent)
            try:
                await driver.set_rate(Decimal(1))
                with pytest.raises(PumpAlarm):
                    await driver.run()
            finally:
                await driver.close()
        finally:
            assert await _stop(proc) == 0

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--pty", "--tcp", "0"],
        ["--tcp", "70000"],
        ["--pty", "--address", "100"],
        ["--pty", "--baud", "4800"],
        ["--pty", "--fill", "abc"],
        ["--pty", "--diameter", "-3"],
        ["--pty", "--drop-next", "-1"],
        ["--pty", "--bogus"],
    ],
)
def test_cli_usage_errors_exit_2(args: list[str]) -> None:
    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 2, (out, err)
        assert out == b""

    asyncio.run(asyncio.wait_for(main(), 30))


def test_cli_malformed_scenario_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[fault]]\nafter_requests = -1\nkind = "explode"\n')

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "--pty", "--faults", str(bad), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 1
        assert b"fault[0].kind" in err and b"fault[0].after_requests" in err

    asyncio.run(asyncio.wait_for(main(), 30))
