"""`driverd sim harvard`: a real process serving a real PTY / TCP port; the driver talks to it; SIGTERM ends it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from decimal import Decimal

import pytest

from driverd.core.errors import ValidationError
from drivers.base import DriverOptions, PumpState
from drivers.registry import open_driver

CLI = [sys.executable, "-m", "driverd.cli.main", "sim", "harvard"]


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
        proc, first, url = await _start(*args, "--address", "4", "--diameter", "21.59")
        try:
            if mode == "pty":
                assert first.startswith("/dev/") and url == f"harvard+serial://{first}?address=4&baud=115200"
            else:
                assert int(first) > 0 and url == f"harvard+socket://127.0.0.1:{first}?address=4"
            probe = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "driverd.cli.main", "pump", "probe", url, "--json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(probe.communicate(), 30)
            report = json.loads(out)
            assert probe.returncode == 0 and report["model"] == "11 ELITE I Single" and report["deadman_s"] == 0, err
            with pytest.raises(ValidationError, match="no dead-man"):
                open_driver(url, DriverOptions(timeout_s=1.0, deadman_s=30))
            driver = open_driver(url + "&without_deadman=allow", DriverOptions(timeout_s=1.0, deadman_s=30))
            await driver.connect()
            try:
                assert (await driver.identify()).model == "11 ELITE I Single"
                assert (await driver.read_status()).diameter_mm == Decimal("21.59")
                assert await driver.set_rate(Decimal("2.083")) == Decimal("2.083")
                await driver.run()
                assert (await driver.read_status()).state is PumpState.INFUSING
                await driver.stop()
            finally:
                await driver.close()
        finally:
            assert await _stop(proc) == 0

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize(
    ("args", "word"),
    [(["--pty", "--tcp", "0"], "exactly one"), (["--pty", "--address", "100"], "--address"),
     (["--pty", "--baud", "4800"], "--baud"), (["--pty", "--diameter", "abc"], "--diameter"),
     (["--tcp", "70000"], "--tcp")],
)
def test_cli_refuses_bad_arguments(args: list[str], word: str) -> None:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and word in done.stderr + done.stdout
