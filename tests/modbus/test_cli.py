"""`driverd sim modbus`: first stdout line is the port / device path; SIGTERM ends it; usage errors exit 2."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from typer.testing import CliRunner

from driverd.cli.main import app

DRIVERD = [sys.executable, "-c", "from driverd.cli.main import main; main()"]


def _start(*args: str) -> tuple[subprocess.Popen[bytes], list[str]]:
    proc = subprocess.Popen([*DRIVERD, "sim", "modbus", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    wanted = 1 + len(args[args.index("--units") + 1].split(","))  # port/path, then one URL per unit
    fd, buf = proc.stdout.fileno(), b""
    with selectors.DefaultSelector() as sel:  # bounded wait: a simulator that never prints fails, never hangs
        sel.register(fd, selectors.EVENT_READ)
        while buf.count(b"\n") < wanted:
            chunk = os.read(fd, 4096) if sel.select(timeout=20) else b""
            if not chunk:
                proc.kill()
                proc.wait(timeout=20)
                raise AssertionError(f"simulator printed only {buf!r}")
            buf += chunk
    return proc, buf.decode().splitlines()[:wanted]


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)


def test_tcp_prints_the_port_and_serves_each_unit() -> None:
    proc, lines = _start("--tcp", "0", "--units", "1,2")
    try:
        port = int(lines[0])
        assert lines[1:] == [f"modbus+tcp://127.0.0.1:{port}?unit=1", f"modbus+tcp://127.0.0.1:{port}?unit=2"]

        async def read() -> list[int]:
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=1)
            assert await client.connect()
            try:
                return list((await client.read_input_registers(100, count=1, device_id=2)).registers)
            finally:
                client.close()

        assert asyncio.run(asyncio.wait_for(read(), 20)) == [1]
    finally:
        assert _stop(proc) == 0


def test_pty_prints_the_device_path() -> None:
    proc, lines = _start("--pty", "--units", "3")
    try:
        path = lines[0]
        assert path.startswith("/dev/") and lines[1] == f"modbus+rtu://{path}?unit=3"

        async def read() -> list[int]:
            client = AsyncModbusSerialClient(path, framer=FramerType.RTU, timeout=2, retries=1)
            assert await client.connect()
            try:
                return list((await client.read_input_registers(100, count=1, device_id=3)).registers)
            finally:
                client.close()

        assert asyncio.run(asyncio.wait_for(read(), 20)) == [1]
    finally:
        assert _stop(proc) == 0


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--tcp", "0", "--pty"],
        ["--tcp", "70000"],
        ["--tcp", "0", "--units", "1,,2"],
        ["--tcp", "0", "--units", "0"],
        ["--tcp", "0", "--units", "248"],
        ["--tcp", "0", "--units", "1,1"],
        ["--tcp", "zero"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["sim", "modbus", *args])
    assert result.exit_code == 2, result.output


def test_bad_fault_scenario_or_map_exits_1(tmp_path: Path) -> None:
    scenario = tmp_path / "f.toml"
    scenario.write_text('[[fault]]\nafter_requests = -1\nkind = "explode"\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["sim", "modbus", "--tcp", "0", "--faults", str(scenario)])
    assert result.exit_code == 1
    result = CliRunner().invoke(app, ["sim", "modbus", "--tcp", "0", "--map", str(tmp_path / "missing.toml")])
    assert result.exit_code == 1
