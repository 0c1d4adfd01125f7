"""Blocking pyserial I/O for one New Era line, exposed as async request/reply transactions.

Why a dedicated single-thread executor (and not loop.add_reader): pyserial's URL handlers (a real tty, a PTY
slave, ``socket://``) share one blocking API but not one pollable fd story, and a single worker thread also
serialises the line: RS-232 to a New Era pump is half-duplex, one request and one reply at a time. Each
transaction (flush stale input, write, read until a whole frame or the deadline) runs as one job, bounded
inside the thread by its own deadline (pyserial read timeouts are short slices of it) and outside by
``asyncio.wait_for`` as a backstop, so nothing ever waits forever.
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
from drivers.newera.codec import Direction, Frame, FrameDecoder

READ_SLICE_S: Final = 0.02  # pyserial read timeout per slice; the transaction deadline is the real bound
_T = TypeVar("_T")

BACKSTOP_S: Final = 2.0  # extra time the event loop grants the worker thread beyond the deadline


def _any(frame: Frame) -> bool:
    return True


class SerialTransport:
    """One open pyserial port (``/dev/tty...`` or ``socket://host:port``), reopened after an I/O error."""

    def __init__(self, port_url: str, *, baudrate: int = 19200) -> None:
        self.port_url = port_url
        self.baudrate = baudrate
        self._serial: serial.SerialBase | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # The most recent requests written (tests check what the driver never sends); bounded: a daemon runs
        # for days.
        self.sent: deque[bytes] = deque(maxlen=1024)
        # Whole frames that arrived while no request was waiting (a safe-mode pump's Auto-Alarm packet, a late
        # reply): handed to this callback (from the I/O thread) before the next request is written.
        self.on_unsolicited: Callable[[Frame], None] | None = None
        self._partial = b""  # the start of a frame still arriving when the line was drained
        # Ports opened so far: at `open`, and again by a transaction after an I/O error closed the port
        # (`PumpDriver.transport_opens`: the daemon checks the pump again on a reopened port).
        self.opens = 0

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    async def open(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="newera-io")
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
        self, request: bytes, *, safe: bool | None, timeout_s: float, accept: Callable[[Frame], bool] = _any
    ) -> Frame:
        """Write one request and return the first whole reply frame that ``accept`` takes.

        ``accept`` returning False skips a well-formed frame that cannot answer this request (a late reply
        to an earlier, timed-out request); it may raise ProtocolError for a malformed one.

        Raises DriverTimeout (nothing, or only part of a frame, by the deadline), ProtocolError (a malformed
        frame or noise), DriverIOError (the port failed; it is reopened on the next transaction).
        """
        return await self._run(lambda: self._transact_blocking(request, safe, timeout_s, accept), timeout_s=timeout_s)

    async def drain(self, *, timeout_s: float = 1.0) -> int:
        """Read what the pump sent unprompted, without sending anything; returns the number of frames handled."""
        return await self._run(self._drain_blocking, timeout_s=timeout_s)

    # ---- blocking side (worker thread only) -----

    async def _run(self, fn: Callable[[], _T], *, timeout_s: float) -> _T:
        if self._executor is None:
            raise DriverIOError(f"{self.port_url}: transport is closed")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, fn)
        try:
            return await asyncio.wait_for(fut, timeout_s + BACKSTOP_S)
        except TimeoutError:
            raise DriverTimeout(f"{self.port_url}: I/O thread did not finish within {timeout_s} s") from None

    def _open_blocking(self) -> None:
        if self._serial is not None:
            return
        try:
            self._serial = serial.serial_for_url(
                self.port_url,
                baudrate=self.baudrate,
                bytesize=8,
                parity="N",
                stopbits=1,
                timeout=READ_SLICE_S,
                write_timeout=1.0,
            )
            self.opens += 1
        except (serial.SerialException, OSError, termios.error, ValueError) as exc:
            raise DriverIOError(f"{self.port_url}: cannot open: {exc}") from None

    def _close_blocking(self) -> None:
        ser, self._serial = self._serial, None
        if ser is not None:
            # Closing a port that already failed: nothing left to release.
            with contextlib.suppress(serial.SerialException, OSError):
                ser.close()

    def _drain_blocking(self) -> int:
        self._open_blocking()
        ser = self._serial
        assert ser is not None
        try:
            pending = bytes(ser.read(ser.in_waiting)) if ser.in_waiting else b""
        except (serial.SerialException, OSError, termios.error) as exc:
            self._close_blocking()
            raise DriverIOError(f"{self.port_url}: {exc}") from None
        decoder = FrameDecoder(Direction.TO_HOST, safe=None)
        decoder.feed(self._partial + pending)
        self._partial = b""
        handled = 0
        while True:
            try:
                frame = decoder.next_frame()
            except ProtocolError:
                continue  # noise or a torn frame: nothing anyone is waiting for
            if frame is None:
                # A frame still arriving (a late reply being written right now) is not dropped: the next
                # transaction's decoder continues from it, and its accept() skips it if it answers nothing.
                self._partial = decoder.take_partial()
                return handled
            handled += 1
            if self.on_unsolicited is not None:
                self.on_unsolicited(frame)

    def _transact_blocking(
        self, request: bytes, safe: bool | None, timeout_s: float, accept: Callable[[Frame], bool]
    ) -> Frame:
        deadline = time.monotonic() + timeout_s
        self._open_blocking()
        ser = self._serial
        assert ser is not None
        decoder = FrameDecoder(Direction.TO_HOST, safe=safe)
        try:
            # Stale bytes (a late reply to a timed-out request, a safe-mode Auto-Alarm packet) would be taken
            # for this request's reply: they are read and handed to on_unsolicited first.
            self._drain_blocking()
            decoder.feed(self._partial)
            self._partial = b""
            ser.write(request)
            ser.flush()
            self.sent.append(request)
            while True:
                if time.monotonic() >= deadline:
                    partial = f" ({decoder.pending} bytes of a partial reply)" if decoder.pending else ""
                    raise DriverTimeout(f"{self.port_url}: no reply within {timeout_s} s{partial}")
                chunk = ser.read(max(1, ser.in_waiting))
                if not chunk:
                    continue
                decoder.feed(chunk)
                while (frame := decoder.next_frame()) is not None:  # ProtocolError propagates: corrupt reply
                    if accept(frame):
                        return frame
        except ProtocolError:
            raise
        # termios.error is not an OSError: a hung-up PTY raises it from pyserial's tcsetattr/flush.
        except (serial.SerialException, OSError, termios.error) as exc:
            self._close_blocking()
            raise DriverIOError(f"{self.port_url}: {exc}") from None
