"""The real daemon process for the kill -9 campaign (tests/runtime/test_kill9.py): `driverd run` on a scaled clock.

usage: kill9_daemon.py CONFIG START T0 SPEED                  one daemon
       kill9_daemon.py --fork-server CONFIG START T0 SPEED    a daemon per "start" line on stdin (see below)

A daemon runs exactly what `driverd run --config CONFIG` runs (service.serve: Daemon, control socket, control
loop with the audit group-commit timer), with real drivers pointed at simulators that live in another process
(the test), on a clock shared with them: virtual time START at CLOCK_MONOTONIC reading T0, running SPEED times
real time. CLOCK_MONOTONIC is system-wide, so the pumps (whose physics run on the same anchor) and the daemon
agree on the time across processes and restarts. It prints "ready" once the control socket accepts requests,
and "exit CODE" when it returns (1: it refused to start). Operational logs go to stderr.

The fork server imports everything once, then per line "start STDERR_PATH" forks a daemon process (stderr to
that file) and prints "pid PID"; per line "wait PID" it reaps it and prints "exited PID STATUS". Forking from a
pre-imported parent skips ~1.3 s of imports per restart; the process that is killed is the daemon itself.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
import traceback
from datetime import datetime, timedelta
from pathlib import Path

from driverd.runtime.clock import ScaledClock
from driverd.runtime.service import configure_logging, serve


def anchored_clock(start: datetime, t0: float, speed: float) -> ScaledClock:
    """A ScaledClock reading `start` at monotonic time `t0` (the same time base in every process), to within
    0.1 ms of real time: retried if the process was descheduled while the clock was being built."""
    while True:
        before = time.monotonic()
        clock = ScaledClock(start + timedelta(seconds=(before - t0) * speed), speed)
        if time.monotonic() - before < 1e-4:
            return clock


def say(line: str) -> None:
    """One line in ONE write(2): the fork server and its children share this pipe, and print() may write a line
    and its newline separately, so "pid N" and a child's "ready" could interleave ("pid Nready")."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def run_daemon(argv: list[str]) -> int:
    config, start, t0, speed = Path(argv[0]), datetime.fromisoformat(argv[1]), float(argv[2]), float(argv[3])
    configure_logging(sys.stderr, json_output=True)
    clock = anchored_clock(start, t0, speed)
    code = asyncio.run(serve(config, clock, on_ready=lambda *_: say("ready")))
    say(f"exit {code}")
    return code


def fork_server(argv: list[str]) -> int:
    for name in ("drivers.newera.driver", "drivers.modbus.driver"):  # the daemons open these: import them once
        importlib.import_module(name)
    for line in sys.stdin:
        op, _, arg = line.strip().partition(" ")
        if op == "start":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    fd = os.open(arg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    os.dup2(fd, 2)
                    os.close(fd)
                    code = run_daemon(argv)
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    os._exit(code)  # never return into the server's loop
            say(f"pid {pid}")
        elif op == "wait":
            _, status = os.waitpid(int(arg), 0)
            say(f"exited {arg} {status}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(fork_server(args[1:]) if args[:1] == ["--fork-server"] else run_daemon(args))
