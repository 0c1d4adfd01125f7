"""The daemon process: sd_notify datagrams, the watchdog control loop (pings stop when a channel stalls),
start-up failures, and `driverd run` as a real subprocess stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from driverd.runtime.channel import Channel
from driverd.runtime.clock import ScaledClock
from driverd.runtime.config import DaemonConfig, load_config
from driverd.runtime.control import ControlServer, request, request_sync
from driverd.runtime.daemon import Daemon
from driverd.runtime.notify import notify, watchdog_interval
from driverd.runtime.service import ControlLoop, configure_logging, serve, serve_config
from simulators.world import World

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
START = datetime(2026, 12, 1, 8, 55, tzinfo=UTC)
TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _ops_logs_to_stderr() -> Iterator[None]:
    configure_logging(sys.__stderr__, json_output=True)
    yield
    structlog.reset_defaults()


@pytest.fixture
def d() -> Iterator[Path]:
    """A short directory: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dd", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(d: Path, pumps: tuple[str, ...] = ("bed-1", "bed-2")) -> Path:
    path = d / "driverd.toml"
    entries = "".join(f'\n[[pumps]]\nid = "{p}"\nurl = "sim://{p}"\n' for p in pumps)
    path.write_text(
        f'[daemon]\nprotocol = "{CONFIG}/protocols/ketamine-burst.toml"\ntrust_dir = "{CONFIG}/keys/demo/trusted"\n'
        f'audit_dir = "audit"\ncontrol_socket = "ctl.sock"\npoll_period_s = 0.1\nlink_timeout_s = 5\n'
        f"deadman_s = 0\ndriver_timeout_s = 0.5\n{entries}",
        encoding="utf-8",
    )
    return path


class Listener:
    """The service manager's end of $NOTIFY_SOCKET: a Unix datagram socket we read without blocking."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        new = []
        while True:
            try:
                new.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        self.messages += new
        return new

    def has(self, line: str) -> bool:
        if self.sock.fileno() >= 0:
            self.drain()
        return any(line in m.split("\n") for m in self.messages)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(d: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    path = str(d / "notify.sock")
    lst = Listener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield lst
    lst.close()


async def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------------ sd_notify


def test_notify_sends_datagram_to_path_socket(listener: Listener) -> None:
    assert notify("READY=1\nSTATUS=running") is True
    assert listener.drain() == ["READY=1\nSTATUS=running"]


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"driverd-test-{os.getpid()}-{time.monotonic_ns()}"
    lst = Listener(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("WATCHDOG=1") is True
        assert lst.drain() == ["WATCHDOG=1"]
    finally:
        lst.close()


def test_notify_is_a_noop_without_a_manager(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": str(d / "nobody-listens")}) is False  # never raises


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


# ------------------------------------------------------------------------------------------------ service


async def run_service(
    config: DaemonConfig,
    scenario: Callable[[Daemon, ControlServer, ControlLoop], Any],
    *,
    stall_after_s: float = 5.0,
) -> int:
    """serve_config with a fast watchdog; `scenario` runs once the daemon is ready, then the daemon stops."""
    stop = asyncio.Event()
    ready: asyncio.Future[tuple[Daemon, ControlServer, ControlLoop]] = asyncio.get_running_loop().create_future()
    clock = ScaledClock(START, 1.0)
    task = asyncio.create_task(serve_config(
        config, clock, world=World(clock), stop_event=stop, install_signal_handlers=False,
        on_ready=lambda *parts: ready.set_result(parts), ping_every_s=0.01, stall_after_s=stall_after_s,
    ))
    try:
        waiters: set[asyncio.Future[Any]] = {ready, task}
        done, _ = await asyncio.wait(waiters, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        assert ready in done, "daemon did not become ready"
        await scenario(*ready.result())
    finally:
        stop.set()
    return await asyncio.wait_for(task, TIMEOUT)


def test_ready_then_watchdog_pings_then_stopping(d: Path, listener: Listener) -> None:
    config = load_config(write_config(d))

    async def scenario(daemon: Daemon, server: ControlServer, control: ControlLoop) -> None:
        assert listener.has("READY=1")
        await until(lambda: listener.has("WATCHDOG=1"), "a WATCHDOG=1 ping")
        reply = await request(config.control_socket, {"op": "status"}, TIMEOUT)
        assert reply["ok"] is True
        assert control.health.problems == ()

    assert asyncio.run(run_service(config, scenario)) == 0
    listener.drain()
    assert listener.messages[0].startswith("READY=1")
    assert listener.messages[-1].startswith("STOPPING=1")
    assert not config.control_socket.exists()


def test_channel_stalled_from_start_gets_no_pings(d: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    hung: list[str] = []

    async def hang(self: Channel) -> None:
        hung.append(self.pump_id)
        await asyncio.Event().wait()

    monkeypatch.setattr(Channel, "run", hang)
    config = load_config(write_config(d))

    async def scenario(daemon: Daemon, server: ControlServer, control: ControlLoop) -> None:
        assert listener.has("READY=1")
        await until(lambda: any("no completed poll" in p for p in control.health.problems), "the stall report")
        seen = control.ticks
        await until(lambda: control.ticks >= seen + 5, "five more control-loop ticks")
        assert sorted(hung) == ["bed-1", "bed-2"]

    assert asyncio.run(run_service(config, scenario, stall_after_s=0.3)) == 0
    listener.drain()
    assert not any("WATCHDOG=1" in m for m in listener.messages)
    assert any(m.startswith("STATUS=unhealthy: channel bed-1") for m in listener.messages)


def test_channel_stalling_mid_run_stops_the_pings(d: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Channel.poll

    async def poll(self: Channel) -> None:
        if self.pump_id == "bed-2" and self.polls >= 5:
            await asyncio.Event().wait()  # the driver call that never returns (and a bug that ignores timeouts)
        await original(self)

    monkeypatch.setattr(Channel, "poll", poll)
    config = load_config(write_config(d))

    async def scenario(daemon: Daemon, server: ControlServer, control: ControlLoop) -> None:
        await until(lambda: listener.has("WATCHDOG=1"), "pings while healthy")
        await until(lambda: any("bed-2: no poll for" in p for p in control.health.problems), "the stall report")
        listener.drain()
        before = len(listener.messages)
        seen = control.ticks
        await until(lambda: control.ticks >= seen + 5, "five more control-loop ticks")
        listener.drain()
        assert not any("WATCHDOG=1" in m for m in listener.messages[before:])
        # The control socket still answers: operators can see what is wrong while systemd restarts us.
        reply = await request(config.control_socket, {"op": "status"}, TIMEOUT)
        assert reply["ok"] is True

    assert asyncio.run(run_service(config, scenario, stall_after_s=0.3)) == 0
    assert any(m.startswith("STATUS=unhealthy: channel bed-2: no poll for") for m in listener.messages)


def test_dead_channel_task_stops_the_pings(d: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    async def crash(self: Channel) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(Channel, "run", crash)
    config = load_config(write_config(d, pumps=("bed-1",)))

    async def scenario(daemon: Daemon, server: ControlServer, control: ControlLoop) -> None:
        await until(lambda: "channel bed-1: task not running" in control.health.problems, "the dead task")
        seen = control.ticks
        await until(lambda: control.ticks >= seen + 3, "three more control-loop ticks")

    assert asyncio.run(run_service(config, scenario)) == 0
    listener.drain()
    assert not any("WATCHDOG=1" in m for m in listener.messages)


def test_invalid_config_lists_every_problem(d: Path, capfd: pytest.CaptureFixture[str]) -> None:
    bad = d / "bad.toml"
    bad.write_text('[daemon]\nprotocol = 5\npoll_period_s = 1.0\ndeadman_s = 1\nsurprise = true\n', encoding="utf-8")
    assert asyncio.run(serve(bad)) == 1
    err = capfd.readouterr().err  # fd 2: the op log's stream (operator messages are JSON lines there)
    for fragment in ("daemon.protocol", "daemon.surprise", "daemon.deadman_s", "daemon.audit_dir", "pumps"):
        assert fragment in err
    assert "Traceback" not in err
    assert asyncio.run(serve(d / "missing.toml")) == 1


def test_start_failure_is_exit_1_and_the_daemon_is_stopped(d: Path, capfd: pytest.CaptureFixture[str]) -> None:
    config = load_config(write_config(d))
    config.control_socket.write_text("not a socket")
    clock = ScaledClock(START, 1.0)
    code = asyncio.run(asyncio.wait_for(
        serve_config(config, clock, world=World(clock), install_signal_handlers=False), TIMEOUT))
    assert code == 1
    assert "not a socket" in capfd.readouterr().err
    assert config.control_socket.read_text() == "not a socket"
    events = [json.loads(line)["event"] for f in sorted(config.audit_dir.glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    assert "daemon_start" in events and "daemon_stop" in events


# ------------------------------------------------------------------------------------------------ process


def test_driverd_run_subprocess_ready_status_sigterm(d: Path) -> None:
    cfg = write_config(d, pumps=("bed-1",))
    notify_path = d / "notify.sock"
    lst = Listener(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    stderr_path = d / "stderr.log"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "driverd.cli.main", "run", "--config", str(cfg)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        async def wait_for(line: str) -> None:
            await until(lambda: lst.has(line) or proc.poll() is not None, line)
            assert lst.has(line), f"driverd exited with {proc.returncode} before {line}"

        asyncio.run(wait_for("READY=1"))
        asyncio.run(wait_for("WATCHDOG=1"))
        reply = request_sync(d / "ctl.sock", {"op": "status"}, TIMEOUT)
        assert reply["ok"] is True and [p["pump_id"] for p in reply["pumps"]] == ["bed-1"]
        assert oct((d / "ctl.sock").stat().st_mode & 0o777) == oct(0o660)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(TIMEOUT)
        lst.drain()
        lst.close()
    assert lst.has("STOPPING=1")
    assert not (d / "ctl.sock").exists()
    # Operational logs: JSON lines on stderr (not a terminal), one per event.
    records = [json.loads(line) for line in stderr_path.read_text().splitlines() if line.strip()]
    events = [r["event"] for r in records]
    for expected in ("daemon_starting", "control_listening", "daemon_ready", "signal_received", "daemon_stopped"):
        assert expected in events
    assert all("timestamp" in r and "level" in r for r in records)
