"""What a standalone simulator prints: its status lines (stdout; plain text, or one JSON object a line with
--json), a line for every fault that fires, library log records as one line each on stderr (never a raw
traceback), and one-line errors with exit 1 (a port in use, a control socket taken)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from driverd.cli.output import EXIT_REFUSED, fail, usage
from driverd.core.errors import QuantityError
from driverd.core.quantities import parse_decimal
from simulators.faults import FaultEvent, FaultPlan


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SimConsole:
    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json

    def _out(self, text: str, *, err: bool = False) -> None:
        stream = sys.stderr if err else sys.stdout
        with contextlib.suppress(OSError, ValueError):  # a closed pipe must not stop the simulator
            stream.write(text + "\n")
            stream.flush()

    def listening(self, first: str, urls: list[str], **fields: Any) -> None:
        """The start-up lines. Text: the port or device path, then one driver URL a line (scripts read these)."""
        if self.as_json:
            one = {"url": urls[0]} if len(urls) == 1 else {}
            self._out(json.dumps({"event": "listening", "urls": urls, **one, **fields}, sort_keys=True))
            return
        self._out(first)
        for url in urls:
            self._out(url)
        control = fields.get("control")
        if control:
            self._out(f"control: {control}")

    def fault(self, pump: str, ev: FaultEvent) -> None:
        at = _now()
        if self.as_json:
            self._out(json.dumps({"event": "fault", "at": at, "pump": pump, "kind": ev.kind, "detail": ev.detail},
                                 sort_keys=True))
        else:
            self._out(f"fault: {at} {pump} {ev.kind}: {ev.detail}")

    def stopped(self) -> None:
        if self.as_json:
            self._out(json.dumps({"event": "stopped", "at": _now()}))

    def library(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string
            message = f"{record.msg!r}"
        message = " ".join(message.split())[:1000]  # one line, whatever the library put in it
        if self.as_json:
            self._out(json.dumps({"event": "library_log", "at": _now(), "logger": record.name,
                                  "level": record.levelname.lower(), "message": message}, sort_keys=True), err=True)
        else:
            self._out(f"{record.levelname.lower()}: {record.name}: {message}", err=True)

    def error(self, message: str, *, error_code: str | None = None) -> NoReturn:
        fail(message, as_json=self.as_json, code=EXIT_REFUSED, error_code=error_code)


class _OneLine(logging.Handler):
    """Library records (pymodbus, asyncio, pyserial) as one status line each, without their traceback."""

    def __init__(self, console: SimConsole) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.library(record)

    def handleError(self, record: logging.LogRecord) -> None:
        pass  # never a traceback from the logging machinery itself


_LIBRARIES = ("pymodbus", "serial", "asyncio")


@contextlib.contextmanager
def library_logs_as_lines(console: SimConsole) -> Iterator[None]:
    """While the simulator serves, every stdlib logging record at WARNING and up goes through `console` as one
    line and nothing below does; the process's logging is put back as it was afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.lastResort)
    libs = {name: logging.getLogger(name) for name in _LIBRARIES}
    saved_libs = {name: (lib.level, lib.propagate, list(lib.handlers)) for name, lib in libs.items()}
    handler = _OneLine(console)
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    logging.lastResort = handler  # a logger with propagate=False and no handler of its own: still one line
    for lib in libs.values():
        lib.setLevel(logging.WARNING)
        lib.propagate = True
        # a library's own stream handler would print raw text
        lib.handlers = [h for h in lib.handlers if isinstance(h, logging.NullHandler)]
    try:
        yield
    finally:
        root.handlers, level, logging.lastResort = saved[0], saved[1], saved[2]
        root.setLevel(level)
        for name, lib in libs.items():
            lvl, propagate, handlers = saved_libs[name]
            lib.setLevel(lvl)
            lib.propagate = propagate
            lib.handlers = handlers


@contextlib.contextmanager
def library_logs_silenced() -> Iterator[None]:
    """For a one-shot client command (`pump probe`): the driver turns a library's failure into its own error,
    which the command prints as one line, so the library's own log records (pymodbus's "Failed to connect" and
    the like) are dropped instead of reaching the terminal as raw text; logging is put back afterwards."""
    libs = [logging.getLogger(name) for name in _LIBRARIES]
    saved = [(lib.propagate, list(lib.handlers)) for lib in libs]
    for lib in libs:
        lib.propagate = False
        lib.handlers = [logging.NullHandler()]  # a handler of its own: Python's last resort never prints it
    try:
        yield
    finally:
        for lib, (propagate, handlers) in zip(libs, saved, strict=True):
            lib.propagate = propagate
            lib.handlers = handlers


def listen_error(what: str, exc: OSError) -> str:
    """`--tcp 502: cannot listen on 127.0.0.1:502: address already in use` (one line)."""
    # asyncio's bind error wraps the system's reason in a long sentence: the errno's own text says it
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    return f"{what}: {reason[:1].lower()}{reason[1:]}"


# ------------------------------------------------------------------------------ what every simulator command shares

E = TypeVar("E")


class ListenError(Exception):
    """The simulator could not open what it serves on (a port in use, a control socket taken)."""


def check_serial_endpoint(pty: bool, tcp: int | None, address: int, baud: int, baud_rates: tuple[int, ...],
                          as_json: bool) -> None:
    """The options of a serial-protocol simulator (New Era, Harvard): usage error (exit 2) naming the option."""
    if pty == (tcp is not None):
        usage("give exactly one of --pty or --tcp PORT", as_json)
    if tcp is not None and not 0 <= tcp <= 65535:
        usage(f"--tcp: port must be 0..65535, got {tcp}", as_json)
    if not 0 <= address <= 99:
        usage(f"--address: must be 0..99, got {address}", as_json)
    if baud not in baud_rates:
        usage(f"--baud: must be one of {', '.join(map(str, baud_rates))}, got {baud}", as_json)


def decimal_option(text: str, name: str, maximum: Decimal, as_json: bool = False) -> Decimal:
    """A positive decimal option (`--fill`, `--diameter`); a usage error naming it otherwise."""
    try:
        return parse_decimal(text, name, maximum=maximum, allow_zero=False)
    except QuantityError as exc:
        usage(f"--{name}: {exc}", as_json)


def run_simulator(console: SimConsole, open_server: Callable[[], AbstractAsyncContextManager[E]],
                  describe: Callable[[E], tuple[str, list[str], dict[str, Any]]], *, tcp: int | None, host: str,
                  control: Path | None, plans: Mapping[int, FaultPlan]) -> None:
    """Serve until SIGINT/SIGTERM with library logs as lines: open the server (and the `--control` socket), print
    the listening line (`describe`: first line, urls, JSON extras), wait, print the stop. What cannot be opened is
    one error line and exit 1."""
    try:
        with library_logs_as_lines(console):
            asyncio.run(_serve_until_signal(console, open_server, describe, tcp=tcp, host=host, control=control,
                                            plans=plans))
    except ListenError as exc:
        console.error(str(exc))


async def _serve_until_signal(console: SimConsole, open_server: Callable[[], AbstractAsyncContextManager[E]],
                              describe: Callable[[E], tuple[str, list[str], dict[str, Any]]], *, tcp: int | None,
                              host: str, control: Path | None, plans: Mapping[int, FaultPlan]) -> None:
    from simulators.control import serve_control

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        try:
            endpoint = await stack.enter_async_context(open_server())
        except OSError as exc:
            raise ListenError(listen_error(f"--tcp {tcp}: cannot listen on {host}:{tcp}", exc)) from None
        if control is not None:
            try:
                await stack.enter_async_context(serve_control(control, plans))
            except OSError as exc:
                raise ListenError(listen_error(f"--control {control}", exc)) from None
        first, urls, extra = describe(endpoint)
        console.listening(first, urls, control=str(control) if control else None, **extra)
        await stop.wait()
    console.stopped()
