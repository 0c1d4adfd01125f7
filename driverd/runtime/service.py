"""`driverd run`: the daemon process. Config, daemon, control socket, the control loop, sd_notify, signals.

The control loop is the liveness check systemd relies on. Every tick it flushes the audit group commit, and
it sends WATCHDOG=1 only while every channel task is alive and has polled its pump recently. A stalled
channel or a blocked event loop therefore stops the pings, and systemd (WatchdogSec=) kills and restarts us;
recovery from the audit log then resumes every course in a safe state.

If the audit log dies (disk full, file-size limit, I/O error, read-only filesystem), the daemon's fail-safe
stops every pump (driverd.runtime.failsafe); this module then withholds the pings, tells systemd why, holds
for `failsafe_hold_s` so `status` can show it, and exits with EXIT_AUDIT_DEAD (systemd restarts it).

Nothing here may fail because stderr is gone (a closed pipe): log writes swallow their own errors, and the
signal handler sets the stop before it does anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from driverd.core.errors import AuditError, ConfigError, DriverdError
from driverd.runtime import oplog
from driverd.runtime.clock import RealClock, RuntimeClock, ScaledClock
from driverd.runtime.config import DaemonConfig, load_config
from driverd.runtime.control import ControlServer
from driverd.runtime.daemon import Daemon
from driverd.runtime.failsafe import safe_log
from driverd.runtime.filemodes import unsafe_file_modes
from driverd.runtime.notify import notify, watchdog_interval
from driverd.runtime.reload import ReloadResult, reload

if TYPE_CHECKING:
    from driverd.runtime.metrics import MetricsExporter

TICK_S = 0.2
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_AUDIT_DEAD = 3  # the audit log died at run time; every pump was stopped by the fail-safe

log = structlog.get_logger("driverd.service")


def _say(message: str, priority: str = "err") -> None:
    """One line for the operator on stderr; never raises. A readable line on a terminal; a JSON op-log line
    (`operator_message`, with its priority) when stderr is the JSON stream, which never carries raw text."""
    if oplog.json_lines():
        oplog.emit(priority, "operator_message", message=message)
        return
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


def configure_logging(stream: TextIO | None = None, *, json_output: bool | None = None,
                      priority_prefix: bool | None = None) -> None:
    """Operational logs (not the audit log) to stderr: JSON lines for journald, readable text on a terminal
    (driverd.runtime.oplog)."""
    oplog.configure_logging(stream, json_output=json_output, priority_prefix=priority_prefix)


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
        if self.daemon.failsafe.active:
            problems.append(f"audit log dead: {self.daemon.failsafe.reason}; every pump stopped by the fail-safe")
        elif audit is not None and audit.dead:
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
        audit = self.daemon.audit
        if audit is None or not audit.dead:
            with contextlib.suppress(AuditError):  # the writer's on_dead hook has started the fail-safe
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
                with contextlib.suppress(Exception):
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
    speed: float | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or `stop_event`). Returns the process exit code.

    `speed`: course time runs N x real time (benches against external simulators); refused unless the config
    says `[daemon] mode = "bench"`, so a ward config can never run on a scaled clock."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("config_invalid", config=str(config_path), problems=[str(p) for p in exc.problems])
        for p in exc.problems:
            _say(f"driverd: config {config_path}: {p}")
        return EXIT_FAILED
    if speed is not None:
        if config.mode != "bench":
            log.error("speed_refused", config=str(config_path), setting="daemon.mode", mode=config.mode, speed=speed)
            _say(f"driverd: --speed {speed:g} refused: {config_path} is not a bench config; a scaled clock needs "
                 f'daemon.mode = "bench" (it is "{config.mode}")')
            return EXIT_FAILED
        clock = ScaledClock(datetime.now(UTC), speed)
        log.warning("clock_scaled", speed=speed, detail="course time runs this many times faster than real time; "
                    "the audit log's times are course times (bench only)")
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
    hup = Reloader(config.path, follow_stall=stall_after_s is None)
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, _on_signal, stop, sig)
                installed.append(sig)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, hup)  # reload (ExecReload= in the unit)
            installed.append(signal.SIGHUP)
        # Past a file-size limit (RLIMIT_FSIZE / LimitFSIZE=) a write must fail with EFBIG, which the audit
        # writer turns into the fail-safe, not kill the process with SIGXFSZ while pumps are running.
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    unsafe = unsafe_file_modes(config)
    for problem in unsafe:
        log.warning("unsafe_file_mode", problem=problem, mode=config.mode)
    if unsafe and config.mode == "production":
        for problem in unsafe:
            _say(f"driverd: cannot start in production mode: {problem}")
        for sig in installed:
            loop.remove_signal_handler(sig)
        return EXIT_FAILED
    daemon = Daemon(config, clock, world=world)
    daemon.oplog = oplog.OpLog()
    server = ControlServer(daemon, config.control_socket, config.socket_mode, limits=config.control)
    control = ControlLoop(daemon, stall_after_s=stall_after_s or stall_threshold_s(config),
                          ping_every_s=ping_every_s if ping_every_s is not None else watchdog_interval())
    control_task: asyncio.Task[None] | None = None
    exporter: MetricsExporter | None = None
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
            _say(f"driverd: cannot start: {exc}")
            code = EXIT_FAILED
            return code
        assert daemon.trust is not None
        oplog.startup_warnings(audit_key_configured=config.audit_key is not None,
                               trusted_key_ids=daemon.trust.keys, mode=config.mode)
        if config.metrics is not None:
            exporter = _start_metrics(daemon, config)
        control_task = asyncio.create_task(control.run(), name="control-loop")
        notify("READY=1\nSTATUS=running")
        log.info("daemon_ready", socket=str(config.control_socket), watchdog_ping_s=control.ping_every_s,
                 stall_after_s=control.stall_after_s)
        hup.daemon, hup.control = daemon, control
        if on_ready is not None:
            on_ready(daemon, server, control)
        code = await _run_until_stopped(daemon, config, stop)
        if code == EXIT_OK:
            notify("STOPPING=1\nSTATUS=stopping")
        else:
            notify("STOPPING=1\nSTATUS=" + _dead_status(daemon))
        safe_log(log, "info", "daemon_stopping")
    finally:
        if control_task is not None:
            control_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control_task
        with contextlib.suppress(Exception):
            await server.close()
        if exporter is not None:
            exporter.stop()
        if started:
            if daemon.failsafe.active:  # a stop mid-fail-safe: let it finish stopping the pumps first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(daemon.failsafe.done.wait(), timeout=stall_threshold_s(config))
            try:
                await daemon.stop()
            except Exception as exc:
                safe_log(log, "error", "daemon_stop_failed", error=f"{type(exc).__name__}: {exc}")
                code = max(code, EXIT_FAILED)
            if daemon.failsafe.active:  # the log died during the stop itself: the pumps still get their stop
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(daemon.failsafe.done.wait(), timeout=stall_threshold_s(config))
                code = EXIT_AUDIT_DEAD
        for sig in installed:
            loop.remove_signal_handler(sig)
        safe_log(log, "info", "daemon_stopped", exit_code=code)
    return code


def _start_metrics(daemon: Daemon, config: DaemonConfig) -> MetricsExporter | None:
    """The Prometheus endpoint, if it can listen. A port in use is an error line, not a failed start: metrics
    are an observer, and refusing to start would leave every pump unsupervised (their dead-man stops them)."""
    from driverd.runtime.metrics import MetricsExporter

    assert config.metrics is not None
    exporter = MetricsExporter(daemon, config.metrics)
    try:
        host, port = exporter.start()
    except OSError as exc:
        exporter.stop()
        log.error("metrics_failed", host=config.metrics.host, port=config.metrics.port,
                  error=f"{type(exc).__name__}: {exc}")
        return None
    log.info("metrics_listening", host=host, port=port, url=f"http://{_url_host(host)}:{port}/metrics")
    return exporter


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _run_until_stopped(daemon: Daemon, config: DaemonConfig, stop: asyncio.Event) -> int:
    """Wait for a stop signal, or for the fail-safe to finish; after the latter, hold so `status` can show
    what happened (a signal ends the hold early) and return EXIT_AUDIT_DEAD."""
    config = daemon.config  # failsafe_hold_s as a reload may have changed it
    stopped = asyncio.ensure_future(stop.wait())
    failed = asyncio.ensure_future(daemon.failsafe.done.wait())
    try:
        await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
        if not daemon.failsafe.active:
            return EXIT_OK
        await failed
        fs = daemon.failsafe
        safe, unsafe = fs.stopped(), fs.unverified()
        notify("STATUS=" + _dead_status(daemon))
        _say(f"driverd: the audit log cannot be written: {fs.reason}", "crit")
        _say(f"driverd: fail-safe: pumps stopped and read back: {', '.join(safe) or 'none'}"
             + (f"; NOT verified stopped: {', '.join(unsafe)}" if unsafe else ""), "crit")
        _say(f"driverd: refusing every request; exiting with code {EXIT_AUDIT_DEAD} in {config.failsafe_hold_s:g} s "
             "(free space or fix the disk; the restart repairs a torn last line by itself)")
        safe_log(log, "error", "audit_dead_exit_pending", hold_s=config.failsafe_hold_s, stopped=safe,
                 not_verified=unsafe)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopped), timeout=config.failsafe_hold_s)
        return EXIT_AUDIT_DEAD
    finally:
        for fut in (stopped, failed):
            fut.cancel()


def _dead_status(daemon: Daemon) -> str:
    fs = daemon.failsafe
    unsafe = fs.unverified()
    text = f"audit log dead: {fs.reason}; pumps stopped by fail-safe" + (
        f" except {', '.join(unsafe)} (not verified)" if unsafe else "")
    return text[:400]


class Reloader:
    """The SIGHUP handler: a reload (driverd.runtime.reload) once the daemon runs; before that it is ignored,
    with a line saying so (systemd's default for SIGHUP, exiting, would stop every pump's supervision)."""

    def __init__(self, config_path: Path, *, follow_stall: bool = True) -> None:
        self.config_path = config_path
        self.follow_stall = follow_stall  # the stall threshold follows a reloaded poll period (unless fixed)
        self.daemon: Daemon | None = None
        self.control: ControlLoop | None = None
        self.results: list[ReloadResult] = []

    def __call__(self) -> None:
        if self.daemon is None or self.control is None:
            oplog.emit("warning", "config_reload_ignored", detail="SIGHUP while starting: send it again once ready")
            return
        result = reload(self.daemon, self.config_path)
        self.results.append(result)
        if result.ok and self.follow_stall:
            self.control.stall_after_s = stall_threshold_s(self.daemon.config)


def _on_signal(stop: asyncio.Event, sig: int) -> None:
    # Set the stop first: nothing before it may fail (a log write to a closed stderr raised EPIPE here once,
    # and the signal was lost).
    stop.set()
    safe_log(log, "info", "signal_received", signal=signal.Signals(sig).name)

