"""`driverd sim newera|modbus` as a bench operator runs them: a port in use is one line and exit 1, --json status
lines, faults triggered at run time through `--control PATH` + `driverd sim fault`, a line printed for every fault
that fires, and pymodbus's own log records as one line each (never raw text, never a traceback). Real processes,
real loopback TCP and unix sockets; waits are bounded, never asserted on."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from typer.testing import CliRunner

from driverd.cli.main import app

DRIVERD = [sys.executable, "-c", "from driverd.cli.main import main; main()"]


class Sim:
    """A running simulator process whose stdout is read line by line (bounded waits)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*DRIVERD, "sim", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""

    def line(self, timeout: float = 20) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                chunk = os.read(fd, 4096) if sel.select(timeout=timeout) else b""
                if not chunk:
                    raise AssertionError(f"simulator printed only {self._buf!r}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def json_line(self) -> dict[str, object]:
        obj = json.loads(self.line())
        assert isinstance(obj, dict)
        return obj

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=20)
        return self.proc.returncode, err.decode()


@contextmanager
def running(*args: str) -> Iterator[Sim]:
    sim = Sim(*args)
    try:
        yield sim
    finally:
        if sim.proc.poll() is None:
            sim.stop()


@contextmanager
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# ---- a port in use -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["newera", "modbus", "harvard"])
def test_a_port_in_use_is_one_line_and_exit_1(kind: str) -> None:
    with busy_port() as port:
        res = subprocess.run([*DRIVERD, "sim", kind, "--tcp", str(port)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr == f"error: --tcp {port}: cannot listen on 127.0.0.1:{port}: address already in use\n"


@pytest.mark.parametrize("kind", ["newera", "modbus", "harvard"])
def test_a_port_in_use_with_json_is_a_json_error(kind: str) -> None:
    with busy_port() as port:
        res = subprocess.run([*DRIVERD, "sim", kind, "--tcp", str(port), "--json"], capture_output=True, text=True,
                             timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    out = json.loads(res.stdout)
    assert out["ok"] is False
    assert out["error"]["message"] == f"--tcp {port}: cannot listen on 127.0.0.1:{port}: address already in use"


def test_a_control_socket_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    with running("newera", "--tcp", "0", "--control", str(control)) as first:
        first.line()
        res = subprocess.run([*DRIVERD, "sim", "newera", "--tcp", "0", "--control", str(control)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1
        assert res.stderr == f"error: --control {control}: another simulator is listening there\n"
    assert not control.exists(), "the simulator removes its control socket when it stops"


# ---- --json status lines -----------------------------------------------------------------------------------


def test_newera_json_status_lines(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    with running("newera", "--tcp", "0", "--json", "--control", str(control)) as sim:
        hello = sim.json_line()
        assert hello["event"] == "listening" and isinstance(hello["port"], int)
        assert hello["urls"] == [f"newera+socket://127.0.0.1:{hello['port']}?address=0"]
        assert hello["control"] == str(control)
        code, err = sim.stop()
    assert code == 0 and err == ""


def test_modbus_text_lines_unchanged_then_control(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    with running("modbus", "--tcp", "0", "--units", "1,2", "--control", str(control)) as sim:
        port = int(sim.line())
        assert [sim.line(), sim.line()] == [f"modbus+tcp://127.0.0.1:{port}?unit=1",
                                            f"modbus+tcp://127.0.0.1:{port}?unit=2"]
        assert sim.line() == f"control: {control}"


# ---- faults at run time ------------------------------------------------------------------------------------


def _fault(control: Path, *words: str, unit: int | None = None) -> tuple[int, str]:
    args = ["sim", "fault", "--control", str(control), *(["--unit", str(unit)] if unit else []), *words]
    res = CliRunner().invoke(app, args)
    return res.exit_code, res.stdout + res.stderr


async def _read(port: int, unit: int) -> list[int] | None:
    """Input register 100 of `unit`, or None when nothing answers."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0)
    assert await client.connect()
    try:
        rr = await client.read_input_registers(100, count=1, device_id=unit)
        return None if rr.isError() else list(rr.registers)
    except Exception:  # pymodbus raises ModbusIOException when no reply comes: the unit is unreachable
        return None
    finally:
        client.close()


def test_modbus_cut_restore_and_alarm_at_run_time(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    with running("modbus", "--tcp", "0", "--units", "1,2", "--json", "--control", str(control)) as sim:
        port = sim.json_line()["port"]
        assert isinstance(port, int)
        assert asyncio.run(_read(port, 2)) is not None

        assert _fault(control, "cut", unit=2) == (0, "unit 2: cut\n")
        event = sim.json_line()
        assert (event["event"], event["pump"], event["kind"]) == ("fault", "modbus-2", "cut")
        assert asyncio.run(_read(port, 2)) is None, "a cut unit does not answer"
        assert asyncio.run(_read(port, 1)) is not None, "the other unit on the gateway still does"

        assert _fault(control, "restore", unit=2) == (0, "unit 2: restore\n")
        assert sim.json_line()["kind"] == "restore"
        assert asyncio.run(_read(port, 2)) is not None

        code, out = _fault(control, "occlusion")
        assert code == 0 and out == "unit 1: alarm occlusion\nunit 2: alarm occlusion\n"
        fired = [sim.json_line(), sim.json_line()]
        assert {(e["pump"], e["kind"], e["detail"]) for e in fired} == {
            ("modbus-1", "alarm", "occlusion at the pump"), ("modbus-2", "alarm", "occlusion at the pump")}
        code, err = sim.stop()
    assert code == 0 and "Traceback" not in err


def test_newera_scenario_fault_prints_a_line_when_it_fires(tmp_path: Path) -> None:
    scenario = tmp_path / "faults.toml"
    scenario.write_text('[[fault]]\nafter_requests = 1\nkind = "drop"\ncount = 1\n')
    with running("newera", "--tcp", "0", "--faults", str(scenario)) as sim:
        port = int(sim.line())
        sim.line()  # the URL
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"0VER\r")  # reply 1: sent
            first = s.recv(100)
            s.sendall(b"0VER\r")  # reply 2: dropped by the scenario
            line = sim.line()
        assert first, "the first reply went out"
        assert line.startswith("fault: ") and line.endswith(" newera-0 drop: reply 2: drop")


def test_fault_words_are_checked_before_sending(tmp_path: Path) -> None:
    control = tmp_path / "nobody.sock"
    code, out = _fault(control, "drop", "zero")
    assert code == 2 and "fault.count" in out and "[range]" in out
    code, out = _fault(control, "explode")
    assert code == 2 and "unknown fault 'explode'" in out
    code, out = _fault(control, "cut")
    assert code == 1 and f"--control {control}: cannot reach the simulator" in out


def test_an_unknown_unit_is_refused_by_the_simulator(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    with running("modbus", "--tcp", "0", "--units", "1", "--control", str(control)) as sim:
        sim.line()
        code, out = _fault(control, "cut", unit=7)
        assert code == 1 and "unit 7 is not served here (served: 1)" in out


# ---- library internals never leak ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
def test_pymodbus_records_are_one_line_each(as_json: bool) -> None:
    with running("modbus", "--tcp", "0", "--units", "1", *(["--json"] if as_json else [])) as sim:
        first = sim.line()
        port = json.loads(first)["port"] if as_json else int(first)
        # function code 0x63 does not exist: pymodbus logs that it cannot decode the frame
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"\x00\x01\x00\x00\x00\x06\x01\x63\x00\x00\x00\x01")
            s.recv(100)
        code, err = sim.stop()
    assert code == 0
    lines = err.splitlines()
    assert lines, "pymodbus did log something"
    for line in lines:
        if as_json:
            rec = json.loads(line)
            assert rec["event"] == "library_log" and rec["logger"].startswith("pymodbus")
        else:
            assert line.startswith("warning: pymodbus"), line
    assert "Traceback" not in err


def test_library_records_become_one_line_and_logging_is_put_back(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from driverd.cli.sim_console import SimConsole, library_logs_as_lines

    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.lastResort)
    with library_logs_as_lines(SimConsole(as_json=False)):
        try:
            raise ConnectionError("boom")
        except ConnectionError:
            logging.getLogger("pymodbus.logging").exception("Failed to start server\nsecond line")
        logging.getLogger("pymodbus.logging").info("below warning: not shown")
    assert capsys.readouterr().err == "error: pymodbus.logging: Failed to start server second line\n"
    assert (list(root.handlers), root.level, logging.lastResort) == before


def test_harvard_cut_at_run_time_prints_and_stops_answering(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    with running("harvard", "--tcp", "0", "--json", "--control", str(control)) as sim:
        hello = sim.json_line()
        port = hello["port"]
        assert isinstance(port, int) and hello["urls"] == [f"harvard+socket://127.0.0.1:{port}?address=0"]
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"ver\r")
            assert s.recv(200), "the pump answers before the cut"
            assert _fault(control, "cut") == (0, "unit 0: cut\n")
            assert sim.json_line()["kind"] == "cut"
            s.settimeout(1.0)
            s.sendall(b"ver\r")
            with pytest.raises(TimeoutError):
                s.recv(200)  # a cut cable: no answer (nor an echo)
