"""The audit log dies at run time (disk full, file-size limit, I/O error, read-only filesystem): every pump is
stopped and read back (checked on the simulated pump itself), `status` shows the dead log and no running pump,
requests are refused, systemd hears why and gets no more pings, the process exits non-zero, and a restart once
the cause is gone starts on the same log and verifies it.

In-process: the writer's os.write / os.fdatasync raise ENOSPC, EIO or EROFS. Real processes: `driverd run` as
a subprocess driving a New Era simulator served from this test over loopback TCP, killed by RLIMIT_FSIZE
(prlimit on the running daemon) or by filling a small tmpfs (when this machine lets the test mount one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from driverd.audit.reader import iter_records
from driverd.audit.segments import list_segments
from driverd.audit.verify import verify_log
from driverd.runtime.clock import ScaledClock
from driverd.runtime.config import load_config
from driverd.runtime.control import ControlServer, request
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import SYRINGE, demo_schedule
from driverd.runtime.failsafe import AUDIT_DEAD
from driverd.runtime.service import EXIT_AUDIT_DEAD, ControlLoop, configure_logging, serve_config
from driverd.signing import generate_keypair, load_public_key
from drivers.base import PumpState
from simulators.clock import SystemClock
from simulators.faults import FaultPlan
from simulators.pump import PumpModel
from simulators.world import World

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
START = datetime(2026, 12, 1, 8, 55, tzinfo=UTC)
TIMEOUT = 60.0
PUMPS = ("bed-1", "bed-2")


@pytest.fixture(autouse=True)
def _ops_logs_to_stderr() -> Iterator[None]:
    configure_logging(sys.__stderr__, json_output=True)
    yield
    structlog.reset_defaults()


@pytest.fixture
def d() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ddfs", dir="/tmp"))  # short: Unix socket paths are <= 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def write_config(d: Path, pumps: dict[str, str], *, audit_dir: Path | None = None, hold_s: float = 0) -> Path:
    """deadman_s = 0: the pumps' own dead-man is off, so only the fail-safe can have stopped them."""
    key, _pub = generate_keypair(d / "keys", "audit")
    path = d / "driverd.toml"
    entries = "".join(f'\n[[pumps]]\nid = "{p}"\nurl = "{url}"\n' for p, url in pumps.items())
    path.write_text(
        f'[daemon]\nprotocol = "{CONFIG}/protocols/ketamine-burst.toml"\ntrust_dir = "{CONFIG}/keys/demo/trusted"\n'
        f'audit_dir = "{audit_dir or d / "audit"}"\naudit_key = "{key}"\ncontrol_socket = "ctl.sock"\n'
        f"poll_period_s = 0.1\nlink_timeout_s = 5\ndeadman_s = 0\ndriver_timeout_s = 0.5\n"
        f"failsafe_hold_s = {hold_s}\n\n[audit]\ngroup_commit_ms = 1\ngroup_commit_records = 1\n{entries}",
        encoding="utf-8",
    )
    return path


def all_records(audit_dir: Path) -> list[dict[str, Any]]:
    return [r for _, p in list_segments(audit_dir) for r in iter_records(p)]


def check_dead_status(reply: dict[str, Any], pumps: tuple[str, ...]) -> None:
    """`status` from a daemon whose log is dead: unhealthy, every pump stopped by the fail-safe, none shown
    infusing or with its link up."""
    assert reply["ok"] is True
    assert reply["health"] == "audit_dead"
    assert reply["audit"]["state"] == "dead" and reply["audit"]["error"]
    assert [p["pump_id"] for p in reply["pumps"]] == list(pumps)
    for p in reply["pumps"]:
        assert p["link"] == "unknown"
        assert p["pump_state"] == "stopped_by_failsafe", p
        assert p["pump_rate_ml_per_h"] == "0" and p["failsafe"]["stopped"] is True


# ------------------------------------------------------------------------------------------ in-process


class Fault:
    """Makes the audit writer's own os.write or os.fdatasync fail with `err`, once armed (other fds untouched)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, call: str, err: int) -> None:
        self.daemon: Daemon | None = None
        self.armed = False
        self.hits = 0
        real = getattr(os, call)

        def fake(fd: int, *args: Any) -> Any:
            audit = self.daemon.audit if self.daemon is not None else None
            if self.armed and audit is not None and fd == audit._fd:
                self.hits += 1
                raise OSError(err, os.strerror(err))
            return real(fd, *args)

        monkeypatch.setattr(os, call, fake)


@pytest.mark.parametrize(("call", "err"), [("write", errno.ENOSPC), ("write", errno.EIO), ("write", errno.EROFS),
                                           ("write", errno.EFBIG), ("fdatasync", errno.EIO)])
def test_audit_error_in_process_stops_every_pump_and_exits(d: Path, monkeypatch: pytest.MonkeyPatch,
                                                          call: str, err: int) -> None:
    config = load_config(write_config(d, {p: f"sim://{p}" for p in PUMPS}, hold_s=0))
    clock = ScaledClock(START, 1.0)
    world = World(clock)
    for p in PUMPS:
        world.pump(p, diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]), fill_volume_ml=Decimal("20"))
    fault = Fault(monkeypatch, call, err)
    listener = Listener(d / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(d / "notify.sock"))
    seen: dict[str, Any] = {}

    async def scenario(daemon: Daemon, control: ControlLoop) -> None:
        for i, p in enumerate(PUMPS, 1):
            reply = await daemon.push_schedule(demo_schedule(p, i, START - timedelta(minutes=5)))
            assert reply["ok"] is True, reply
        await until(lambda: all(world.pump(p).status().state is PumpState.INFUSING for p in PUMPS), "infusing")
        assert daemon.status()["health"] == "ok"
        await until(lambda: control.pings > 0, "a watchdog ping while healthy")
        fault.armed = True
        await until(daemon.failsafe.done.is_set, "the fail-safe to finish")
        seen["status"] = daemon.status()
        seen["command"] = await daemon.command("bed-1", "hold", "nurse", "test")
        seen["push"] = await daemon.push_schedule(demo_schedule("bed-1", 1, START))

    async def main() -> int:
        async def on_ready_task(daemon: Daemon, control: ControlLoop) -> None:
            fault.daemon = daemon
            await scenario(daemon, control)

        tasks: list[asyncio.Task[None]] = []

        def on_ready(daemon: Daemon, _server: ControlServer, control: ControlLoop) -> None:
            tasks.append(asyncio.create_task(on_ready_task(daemon, control)))

        code = await asyncio.wait_for(serve_config(config, clock, world=world, install_signal_handlers=False,
                                                   on_ready=on_ready, ping_every_s=0.01), TIMEOUT)
        await asyncio.wait_for(tasks[0], TIMEOUT)  # the scenario's assertions
        return code

    code = asyncio.run(main())
    notes = listener.drain()
    listener.close()
    assert code == EXIT_AUDIT_DEAD  # exited by itself (hold 0), non-zero
    assert fault.hits >= 1
    for p in PUMPS:  # the pumps themselves, not only what the daemon says
        assert world.pump(p).status().state is PumpState.STOPPED
        assert world.pump(p).status().rate_ml_per_h > 0  # it had been running: the stop, not a zero rate
    check_dead_status(seen["status"], PUMPS)
    assert seen["command"]["ok"] is False and seen["command"]["refusals"][0]["reason"] == "audit_dead"
    assert seen["push"]["ok"] is False and seen["push"]["refusals"][0]["reason"] == "audit_dead"
    dead_at = next(i for i, m in enumerate(notes) if "audit log dead" in m)
    assert notes[dead_at].startswith("STATUS=")
    assert os.strerror(err) in notes[dead_at]
    assert not any("WATCHDOG=1" in m for m in notes[dead_at:])
    assert any(m.startswith("WATCHDOG=1") for m in notes[:dead_at])
    # Restart on the same log with the fault gone: it starts, and the log verifies.
    fault.armed = False
    config2 = load_config(write_config_again(d))
    clock2 = ScaledClock(START + timedelta(minutes=30), 1.0)

    async def restart() -> dict[str, Any]:
        stop = asyncio.Event()
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def on_ready(daemon: Daemon, _s: ControlServer, _c: ControlLoop) -> None:
            ready.set_result(daemon.status())
            stop.set()

        code2 = await asyncio.wait_for(serve_config(config2, clock2, world=world, install_signal_handlers=False,
                                                    stop_event=stop, on_ready=on_ready), TIMEOUT)
        assert code2 == 0
        return ready.result()

    assert asyncio.run(restart())["health"] == "ok"
    report = verify_log(config.audit_dir, public_key=load_public_key(d / "keys" / "audit.pub"))
    assert report.ok, report


def write_config_again(d: Path) -> Path:
    return d / "driverd.toml"  # same file, same keys


# ------------------------------------------------------------------------------------------ real processes


class Listener:
    def __init__(self, path: Path) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def close(self) -> None:
        self.sock.close()


class Proc:
    """`driverd run` as a subprocess, with $NOTIFY_SOCKET and a fast watchdog."""

    def __init__(self, d: Path, cfg: Path, name: str) -> None:
        self.notify = Listener(d / f"{name}.notify")
        self.stderr_path = d / f"{name}.stderr"
        env = {**os.environ, "NOTIFY_SOCKET": str(d / f"{name}.notify"), "WATCHDOG_USEC": "200000"}
        env.pop("WATCHDOG_PID", None)
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "driverd.cli.main", "run", "--config", str(cfg)],
                                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)

    def has(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for m in self.notify.drain() for line in m.split("\n"))

    async def wait_ready(self) -> None:
        await until(lambda: self.has("READY=1") or self.proc.poll() is not None, "READY=1")
        assert self.proc.poll() is None, self.stderr()

    async def wait_exit(self) -> int:
        await until(lambda: self.proc.poll() is not None, "the daemon to exit")
        return int(self.proc.returncode)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        self.notify.close()


@contextlib.asynccontextmanager
async def newera_pump(name: str) -> Any:
    """A New Era simulator in this process (real clock), on loopback TCP: the test reads the pump directly."""
    from simulators.newera import serve_newera

    model = PumpModel(SystemClock(), fill_volume_ml=Decimal("20"), diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]))
    async with serve_newera(model, FaultPlan(alarm_hook=model.inject_alarm), tcp_port=0) as ep:
        yield model, ep.url


async def start_course(d: Path, proc: Proc, models: dict[str, PumpModel]) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    for i, name in enumerate(models, 1):
        reply = await request(d / "ctl.sock", {"op": "push",
                                               "schedule": demo_schedule(name, i, now - timedelta(minutes=5))})
        assert reply["ok"] is True, reply
    await until(lambda: all(m.status().state is PumpState.INFUSING for m in models.values())
                or proc.proc.poll() is not None, "every pump infusing")
    assert proc.proc.poll() is None, proc.stderr()


async def next_record(d: Path) -> None:
    """Make the daemon write until its log dies. A steady course logs a pump report only about once a minute
    (telemetry compaction), so the log could otherwise take that long to meet the full disk (and a tmpfs takes
    appends into the page it already holds); clinician requests are logged at once, and the one that meets the
    error is answered with it."""
    for _ in range(200):  # ack_clock: logged, and leaves the pumps infusing (the fail-safe must stop them)
        reply = await request(d / "ctl.sock", {"op": "command", "pump_id": "bed-1", "action": "ack_clock",
                                               "by": "nurse", "reason": "test: write until the log dies"}, TIMEOUT)
        if reply.get("ok") is not True and ("error" in reply or AUDIT_DEAD in str(reply.get("refusals"))):
            return
    raise AssertionError("the log never died")


async def dead_daemon_checks(d: Path, proc: Proc, models: dict[str, PumpModel], why: str) -> None:
    """While the dead daemon holds: status, refusals, systemd messages; then SIGTERM ends the hold: exit 3."""
    async def status() -> dict[str, Any]:
        return await request(d / "ctl.sock", {"op": "status"}, TIMEOUT)

    replies: list[dict[str, Any]] = []

    async def dead_and_done() -> bool:
        replies.append(await status())
        return replies[-1].get("audit", {}).get("failsafe") == "done"

    deadline = time.monotonic() + TIMEOUT
    while not await dead_and_done():
        assert proc.proc.poll() is None, proc.stderr()
        assert time.monotonic() < deadline, replies[-1]
        await asyncio.sleep(0.05)
    check_dead_status(replies[-1], tuple(models))
    assert why in replies[-1]["audit"]["error"]
    for name, model in models.items():
        assert model.status().state is PumpState.STOPPED, name  # the pump itself
    # No reply ever showed a pump running with its link up once the log was dead.
    for r in replies:
        if r.get("health") == "audit_dead":
            assert all(p["link"] == "unknown" and p["pump_state"] != "infusing" for p in r["pumps"])
    cli = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "driverd.cli.main", "status", "--socket",
                                                   str(d / "ctl.sock")], capture_output=True, text=True,
                                  timeout=TIMEOUT, check=False)
    assert cli.returncode == 0 and "UNHEALTHY (audit_dead)" in cli.stdout and why in cli.stdout, cli
    assert "pump state: stopped_by_failsafe (read back 0 mL/h)" in cli.stdout, cli.stdout
    cmd = await request(d / "ctl.sock", {"op": "command", "pump_id": "bed-1", "action": "hold", "by": "nurse",
                                         "reason": "test"}, TIMEOUT)
    assert cmd["ok"] is False and cmd["refusals"][0]["reason"] == "audit_dead", cmd
    push = await request(d / "ctl.sock", {"op": "push", "schedule": demo_schedule("bed-1", 1, START)}, TIMEOUT)
    assert push["ok"] is False and push["refusals"][0]["reason"] == "audit_dead", push
    notes = proc.notify.drain()
    dead_at = next(i for i, m in enumerate(notes) if "audit log dead" in m)
    assert why in notes[dead_at]
    assert not any("WATCHDOG=1" in m for m in notes[dead_at:]), notes[dead_at:]
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.wait_exit() == EXIT_AUDIT_DEAD
    err = proc.stderr()
    assert "driverd: the audit log cannot be written:" in err and why in err
    assert "pumps stopped and read back: bed-1" in err
    for model in models.values():
        assert model.status().state is PumpState.STOPPED


async def restart_and_verify(d: Path, cfg: Path, models: dict[str, PumpModel], audit_dir: Path) -> None:
    proc = Proc(d, cfg, "restart")
    try:
        await proc.wait_ready()
        reply = await request(d / "ctl.sock", {"op": "status"}, TIMEOUT)
        assert reply["health"] == "ok"
        for model in models.values():
            assert model.status().state is PumpState.STOPPED  # a restart never restarts a pump by itself
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0, proc.stderr()
    finally:
        proc.close()
    report = verify_log(audit_dir, public_key=load_public_key(d / "keys" / "audit.pub"))
    assert report.ok, report
    events = [r["event"] for r in all_records(audit_dir)]
    assert events.count("daemon_start") == 2 and "log_reopened" in events


def test_file_size_limit_on_a_running_daemon(d: Path) -> None:
    async def main() -> None:
        async with newera_pump("bed-1") as (m1, url1), newera_pump("bed-2") as (m2, url2):
            models = {"bed-1": m1, "bed-2": m2}
            cfg = write_config(d, {"bed-1": url1, "bed-2": url2}, hold_s=120)
            proc = Proc(d, cfg, "first")
            try:
                await proc.wait_ready()
                await start_course(d, proc, models)
                # Cap every file the daemon writes at the current size of the segment: its next append fails.
                size = max(p.stat().st_size for _, p in list_segments(d / "audit"))
                resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE, (size, size))
                await next_record(d)
                await dead_daemon_checks(d, proc, models, os.strerror(errno.EFBIG))
            finally:
                proc.close()
            await restart_and_verify(d, cfg, models, d / "audit")  # the limit was the process's: gone

    asyncio.run(asyncio.wait_for(main(), 240))


def _can_mount_tmpfs(d: Path) -> bool:
    target = d / "probe"
    target.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], capture_output=True,
                         check=False)
    if res.returncode != 0:
        return False
    subprocess.run(["umount", str(target)], check=True)
    return True


def test_disk_full_on_a_small_filesystem(d: Path) -> None:
    if shutil.which("mount") is None or os.geteuid() != 0 or not _can_mount_tmpfs(d):
        pytest.skip("needs root and tmpfs mounts (the file-size-limit test covers the same path)")
    fs = d / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(fs)], check=True)
    try:
        async def main() -> None:
            async with newera_pump("bed-1") as (m1, url1):
                models = {"bed-1": m1}
                cfg = write_config(d, {"bed-1": url1}, audit_dir=fs / "audit", hold_s=120)
                proc = Proc(d, cfg, "first")
                try:
                    await proc.wait_ready()
                    await start_course(d, proc, models)
                    filler = fs / "filler"
                    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
                    try:  # take every free block
                        with contextlib.suppress(OSError):
                            while True:
                                os.write(fd, b"\0" * 4096)
                    finally:
                        os.close(fd)
                    await next_record(d)
                    await dead_daemon_checks(d, proc, models, os.strerror(errno.ENOSPC))
                finally:
                    proc.close()
                filler.unlink()  # space freed
                await restart_and_verify(d, cfg, models, fs / "audit")

        asyncio.run(asyncio.wait_for(main(), 240))
        torn = [r for r in all_records(fs / "audit") if r["event"] == "torn_tail_truncated"]
        print("torn_tail_truncated records after the full disk:", json.dumps(torn))  # noted in docs/audit.md
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)
