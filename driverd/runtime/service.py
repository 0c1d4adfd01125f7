"""`driverd run`: the daemon process. Config, daemon, control socket, the control loop, sd_notify, signals.

The control loop is the liveness check systemd relies on. Every tick it flushes the audit group commit, and
it sends WATCHDOG=1 only while every channel task is alive and has polled its pump recently. A stalled
channel or a blocked event loop therefore stops the pings, and systemd (WatchdogSec=) kills and restarts us;
recovery from the audit log then resumes every course in a safe state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog

from driverd.core.errors import ConfigError, DriverdError
from driverd.runtime.clock import RealClock, RuntimeClock
from driverd.runtime.config import DaemonConfig, load_config
from driverd.runtime.control import ControlServer
from driverd.runtime.daemon import Daemon
from driverd.runtime.notify import notify, watchdog_interval

TICK_S = 0.2
EXIT_OK = 0
EXIT_FAILED = 1

log = structlog.get_logger("driverd.service")


def configure_logging(stream: TextIO | None = None, *, json_output: bool | None = None) -> None:
    """Operational logs (not the audit log) to stderr: JSON lines for journald, readable text on a terminal."""
    stream = stream or sys.stderr
    if json_output is None:
        json_output = not stream.isatty()
    renderer: Any = (structlog.processors.JSONRenderer(sort_keys=True) if json_output
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def stall_threshold_s(config: DaemonConfig) -> float:
    """Real seconds a channel may go without completing a poll before we call it stalled.

    A healthy poll cycle is one poll period plus its I/O, and a cycle that primes a pump or applies a setpoint
    runs several exchanges, each bounded by 4 x driver_timeout_s in the channel: allow for 8 of them.
    """
    return 2 * config.poll_period_s + 8 * 4 * config.driver_timeout_s


@dataclass
class Health:
    """Per-channel progress as the control loop sees it (monotonic seconds)."""

    polls: dict[str, int] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    progressed_at: dict[str, float] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


class ControlLoop:
    """Every tick: flush the audit group commit, check liveness, ping the watchdog when healthy."""

    def __init__(
        self,
        daemon: Daemon,
        *,
        stall_after_s: float,
        ping_every_s: float | None,
        tick_s: float = TICK_S,
        send: Callable[[str], bool] = notify,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.daemon = daemon
        self.stall_after_s = stall_after_s
        self.ping_every_s = ping_every_s
        self.tick_s = tick_s
        self.send = send
        self.monotonic = monotonic
        self.health = Health()
        self.ticks = 0
        self.pings = 0
        self.starting = True
        self._last_ping: float | None = None
        self._reported: tuple[str, ...] = ()

    def _channel_tasks(self) -> dict[str, asyncio.Task[None]]:
        return self.daemon.channel_tasks()

    def check(self) -> tuple[str, ...]:
        """Problems that must stop the watchdog pings (empty when healthy).

        A channel counts as alive once its poll counter has moved since the loop first saw it; until then the
        pings are withheld but nothing is reported, unless that takes longer than the stall threshold.
        """
        now = self.monotonic()
        problems: list[str] = []
        self.starting = False
        tasks = self._channel_tasks()
        audit = self.daemon.audit
        if audit is not None and audit.dead:
            problems.append("audit log cannot be written")
        for pid, channel in self.daemon.channels.items():
            task = tasks.get(pid)
            if task is None or task.done():
                problems.append(f"channel {pid}: task not running")
                continue
            if pid not in self.health.polls:
                self.health.polls[pid] = channel.polls
                self.health.first_seen[pid] = now
            elif self.health.polls[pid] != channel.polls:
                self.health.polls[pid] = channel.polls
                self.health.progressed_at[pid] = now
            since = self.health.progressed_at.get(pid)
            if since is None:
                waited = now - self.health.first_seen[pid]
                if waited > self.stall_after_s:
                    problems.append(f"channel {pid}: no completed poll in {waited:.1f} s since start")
                else:
                    self.starting = True
            elif now - since > self.stall_after_s:
                problems.append(f"channel {pid}: no poll for {now - since:.1f} s")
        self.health.problems = tuple(problems)
        return self.health.problems

    def tick(self) -> None:
        self.daemon.tick_audit()
        problems = self.check()
        self.ticks += 1
        if problems:
            if problems != self._reported:
                log.error("watchdog_withheld", problems=list(problems))
                self.send("STATUS=unhealthy: " + "; ".join(problems)[:400])
            self._reported = problems
            return
        if self._reported:
            log.info("watchdog_resumed")
            self.send("STATUS=running")
            self._reported = ()
        if self.starting:
            return  # not every channel has shown progress yet: no ping, nothing to report
        now = self.monotonic()
        if self.ping_every_s is not None and (self._last_ping is None or now - self._last_ping >= self.ping_every_s):
            if self.send("WATCHDOG=1"):
                self.pings += 1
            self._last_ping = now

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a failing check withholds pings (systemd restarts us) but is logged once each
                log.exception("control_loop_error")
            await asyncio.sleep(self.tick_s)


async def serve(
    config_path: Path,
    clock: RuntimeClock | None = None,
    *,
    world: Any = None,
    stop_event: asyncio.Event | None = None,
    on_ready: Callable[[Daemon, ControlServer, ControlLoop], None] | None = None,
    install_signal_handlers: bool = True,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or `stop_event`). Returns the process exit code."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("config_invalid", config=str(config_path), problems=[str(p) for p in exc.problems])
        for p in exc.problems:
            print(f"driverd: config {config_path}: {p}", file=sys.stderr)
        return EXIT_FAILED
    return await serve_config(config, clock or RealClock(), world=world, stop_event=stop_event, on_ready=on_ready,
                              install_signal_handlers=install_signal_handlers)


async def serve_config(
    config: DaemonConfig,
    clock: RuntimeClock,
    *,
    world: Any = None,
    stop_event: asyncio.Event | None = None,
    on_ready: Callable[[Daemon, ControlServer, ControlLoop], None] | None = None,
    install_signal_handlers: bool = True,
    ping_every_s: float | None = None,
    stall_after_s: float | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    installed: list[signal.Signals] = []
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, _on_signal, stop, sig)
                installed.append(sig)
    daemon = Daemon(config, clock, world=world)
    server = ControlServer(daemon, config.control_socket, config.socket_mode, limits=config.control)
    control = ControlLoop(daemon, stall_after_s=stall_after_s or stall_threshold_s(config),
                          ping_every_s=ping_every_s if ping_every_s is not None else watchdog_interval())
    control_task: asyncio.Task[None] | None = None
    started = False
    code = EXIT_OK
    try:
        log.info("daemon_starting", config=str(config.path), pumps=[p.id for p in config.pumps])
        try:
            started = True  # from here on, stop() cleans up whatever part of start() happened
            await daemon.start()
            await server.start()
        except Exception as exc:
            if isinstance(exc, (DriverdError, OSError)):
                log.error("daemon_start_failed", error=f"{type(exc).__name__}: {exc}")
            else:  # a bug: keep the traceback in the (JSON) log, not on the console
                log.exception("daemon_start_failed", error=f"{type(exc).__name__}: {exc}")
            print(f"driverd: cannot start: {exc}", file=sys.stderr)
            code = EXIT_FAILED
            return code
        control_task = asyncio.create_task(control.run(), name="control-loop")
        notify("READY=1\nSTATUS=running")
        log.info("daemon_ready", socket=str(config.control_socket), watchdog_ping_s=control.ping_every_s,
                 stall_after_s=control.stall_after_s)
        if on_ready is not None:
            on_ready(daemon, server, control)
        await stop.wait()
        notify("STOPPING=1\nSTATUS=stopping")
        log.info("daemon_stopping")
    finally:
        if control_task is not None:
            control_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control_task
        with contextlib.suppress(Exception):
            await server.close()
        if started:
            try:
                await daemon.stop()
            except Exception as exc:
                log.error("daemon_stop_failed", error=f"{type(exc).__name__}: {exc}")
                code = EXIT_FAILED
        for sig in installed:
            loop.remove_signal_handler(sig)
        log.info("daemon_stopped", exit_code=code)
    return code


def _on_signal(stop: asyncio.Event, sig: int) -> None:
    log.info("signal_received", signal=signal.Signals(sig).name)
    stop.set()
