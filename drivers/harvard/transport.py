"""Blocking pyserial I/O for one Harvard pump-chain line, exposed as async request/reply transactions.

The same shape as the New Era transport (drivers/newera/transport.py): one worker thread per line serialises the
half-duplex exchange, each transaction (discard stale input, write, read until a whole reply or the deadline) runs
as one job bounded by its own deadline, and ``asyncio.wait_for`` is the backstop. pyserial URL handlers give the
same code a real tty, a PTY slave or ``socket://host:port``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import termios
import time
from collections import deque
from collections.abc import Callable
from typing import Final, TypeVar

import serial  # type: ignore[import-untyped]  # pyserial ships no type hints

from drivers.base import DriverIOError, DriverTimeout, ProtocolError
from drivers.harvard.codec import Reply, decode_reply

READ_SLICE_S: Final = 0.02
BACKSTOP_S: Final = 2.0
_T = TypeVar("_T")


def _any(reply: Reply) -> bool:
    return True


class SerialTransport:
    """One open pyserial port (``/dev/tty...`` or ``socket://host:port``), reopened after an I/O error."""

    def __init__(self, port_url: str, *, baudrate: int) -> None:
        self.port_url = port_url
        self.baudrate = baudrate
        self._serial: serial.SerialBase | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.sent: deque[bytes] = deque(maxlen=1024)  # recent requests (tests check what was never sent)
        # Ports opened so far: at `open`, and again by a transaction after an I/O error closed the port
        # (`PumpDriver.transport_opens`: the daemon checks the pump again on a reopened port).
        self.opens = 0

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    async def open(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="harvard-io")
        await self._run(self._open_blocking, timeout_s=5.0)

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await self._run(self._close_blocking, timeout_s=5.0)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def transact(
        self,
        request: bytes,
        *,
        address: int,
        poll: bool,
        body_lines: int,
        timeout_s: float,
        accept: Callable[[Reply], bool] = _any,
    ) -> Reply:
        """Write one request and return the first whole reply ``accept`` takes (it skips a late reply to an
        earlier request). Raises DriverTimeout, ProtocolError (noise, a malformed reply) or DriverIOError."""
        return await self._run(
            lambda: self._transact_blocking(request, address, poll, body_lines, timeout_s, accept), timeout_s=timeout_s
        )

    async def _run(self, fn: Callable[[], _T], *, timeout_s: float) -> _T:
        if self._executor is None:
            raise DriverIOError(f"{self.port_url}: transport is closed")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, fn)
        try:
            return await asyncio.wait_for(fut, timeout_s + BACKSTOP_S)
        except TimeoutError:
            raise DriverTimeout(f"{self.port_url}: I/O thread did not finish within {timeout_s} s") from None

    # ---- blocking side (worker thread only) -----

    def _open_blocking(self) -> None:
        if self._serial is not None:
            return
        try:
            # No software flow control: in poll mode the XON after each prompt is the end-of-reply mark, and the
            # tty layer would swallow it.
            self._serial = serial.serial_for_url(
                self.port_url, baudrate=self.baudrate, bytesize=8, parity="N", stopbits=1,
                timeout=READ_SLICE_S, write_timeout=1.0, xonxoff=False,
            )
            self.opens += 1
        except (serial.SerialException, OSError, termios.error, ValueError) as exc:
            raise DriverIOError(f"{self.port_url}: cannot open: {exc}") from None

    def _close_blocking(self) -> None:
        ser, self._serial = self._serial, None
        if ser is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                ser.close()

    def _transact_blocking(
        self,
        request: bytes,
        address: int,
        poll: bool,
        body_lines: int,
        timeout_s: float,
        accept: Callable[[Reply], bool],
    ) -> Reply:
        deadline = time.monotonic() + timeout_s
        self._open_blocking()
        ser = self._serial
        assert ser is not None
        buf = b""
        try:
            # Stale bytes (a late reply to a timed-out request, an XON) would be read as this request's reply.
            if ser.in_waiting:
                ser.read(ser.in_waiting)
            ser.write(request)
            ser.flush()
            self.sent.append(request)
            while True:
                if time.monotonic() >= deadline:
                    partial = f" ({len(buf)} bytes of a partial reply)" if buf else ""
                    raise DriverTimeout(f"{self.port_url}: no reply within {timeout_s} s{partial}")
                chunk = ser.read(max(1, ser.in_waiting))
                if not chunk:
                    continue
                buf += chunk
                while True:
                    reply, used = decode_reply(buf, address=address, poll=poll, body_lines=body_lines)
                    if reply is None:
                        break
                    buf = buf[used:]
                    if accept(reply):
                        return reply
        except ProtocolError:
            raise
        except (serial.SerialException, OSError, termios.error) as exc:
            self._close_blocking()
            raise DriverIOError(f"{self.port_url}: {exc}") from None
