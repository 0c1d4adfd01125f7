"""What a standalone simulator prints: its status lines (stdout; plain text, or one JSON object a line with
--json), a line for every fault that fires, library log records as one line each on stderr (never a raw
traceback), and one-line errors with exit 1 (a port in use, a control socket taken)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, NoReturn

from driverd.cli.output import EXIT_REFUSED, fail
from simulators.faults import FaultEvent


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
