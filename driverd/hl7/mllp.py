"""MLLP transport on python-hl7's streams: the outbound `Sender` and the inbound order listener (`serve_orders`).

Framing is python-hl7's (`hl7.mllp.open_hl7_connection`, `start_hl7_server`, `HL7StreamReader.readblock`,
`HL7StreamWriter.writeblock`). The one addition is `FrameReader`, which drops stray bytes before a frame's
start byte (VT) so that a good frame after garbage is still read (see its docstring for why).

Encoding policy: frames are bytes; we decode them as UTF-8 with ``errors="surrogateescape"`` and encode replies
the same way. Valid UTF-8 (ASCII included: the HL7 default character set) arrives as is. Each byte that is not
UTF-8 arrives as a lone surrogate U+DC80..U+DCFF, so nothing is lost or guessed: the MSH can still be read to
answer the message, ``text.encode("utf-8", "surrogateescape")`` gives back the exact bytes received, and
`undecodable(text)` says where the first bad byte is, so a handler refuses such a message (AR) instead of acting
on text it cannot read. Our own outbound messages must be valid UTF-8 (the outbox refuses anything else).

Sender (delivery guarantees, docs/hl7.md): at-least-once, in order, one message in flight. The outbox head is
sent; the sender waits for an ACK whose MSA-2 is that message's MSH-10 (ACKs for other ids, replies that are not
ACKs and codes outside HL7 table 0008 are ignored and counted); AA/CA (accepted) mark it done with that code;
AR/CR/AE/CE mark it done with that code too: the receiver has refused this exact message, and sending it again
would get the same answer and hold up every message behind it forever, so it is reported (`on_outcome`, which the
gateway logs as an error and audits) and the queue moves on. A timeout, a refused or reset connection or a
connection closed by the peer: close, wait (exponential backoff), reconnect and resend the SAME message (same
MSH-10; the receiver de-duplicates). A crash between the send and `done` also resends it after a restart.

Order listener: one task per connection, one frame at a time per connection (the handler may send an accept
ACK and, later, the application reply before the next frame is read). Limits, each closing only the offending
connection: a frame above `max_frame_bytes` (the reader never holds more than about twice that), a frame not
complete within `frame_timeout_s` of its first byte (unterminated or trickled), no frame at all within
`idle_timeout_s`, a peer that does not read our replies within `frame_timeout_s`. Over `max_connections` a new
connection is closed at once (the connections already being served are kept: an idle one goes after
`idle_timeout_s` anyway, and dropping the idlest would let a flood of new connections evict good peers). An
exception in the handler is counted and logged; the connection and the server go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import hl7
import structlog
from hl7.mllp import HL7StreamReader, HL7StreamWriter, open_hl7_connection, start_hl7_server

from driverd.core.errors import DriverdError
from driverd.hl7.journal import StoreError
from driverd.hl7.outbox import Item, Outbox

log = structlog.get_logger("driverd.hl7.mllp")

START_BLOCK: Final = b"\x0b"  # only to find where a frame starts; framing itself is python-hl7's
ENCODING: Final = "utf-8"
ENCODING_ERRORS: Final = "surrogateescape"
ACCEPTED: Final = frozenset({"AA", "CA"})
REJECTED: Final = frozenset({"AR", "CR", "AE", "CE"})
MAX_REPLY_BYTES: Final = 1_048_576  # an ACK larger than this closes the sender's connection (then: resend)

Send = Callable[[str], Awaitable[None]]
Handler = Callable[[str, Send], Awaitable[None]]
AckParser = Callable[[str], tuple[str, str, str]]
OutcomeCallback = Callable[[Item, str, str], None]

_UNDECODABLE: Final = re.compile("[\udc80-\udcff]")


class ConnectionLost(DriverdError):
    """A reply could not be sent: the peer closed the connection, reset it, or stopped reading."""


def undecodable(text: str) -> str | None:
    """Why `text` (as the listener decodes it) is not valid UTF-8, naming the first bad byte; None if it is."""
    m = _UNDECODABLE.search(text)
    if m is None:
        return None
    return f"byte 0x{ord(m.group()) - 0xDC00:02X} at character {m.start()} is not valid UTF-8"


def decode(block: bytes) -> str:
    return block.decode(ENCODING, ENCODING_ERRORS)


def encode(text: str) -> bytes:
    return text.encode(ENCODING, ENCODING_ERRORS)


def parse_ack(text: str) -> tuple[str, str, str]:
    """(MSA-2 acknowledged control id, MSA-1 code, MSA-3 text) of an ACK, read with `hl7.parse`. Raises
    ValueError when it is not an ACK. The gateway may pass its own (messages.parse_ack) to `Sender`."""
    try:
        msa = hl7.parse(text).segment("MSA")
        code, acked = str(msa(1)), str(msa(2))
        detail = str(msa(3)) if len(msa) > 3 else ""
    except Exception as exc:  # python-hl7 raises ParseException, KeyError or IndexError on a malformed message
        raise ValueError(f"not an ACK: {type(exc).__name__}: {exc}") from None
    if not code or not acked:
        raise ValueError("MSA-1/MSA-2: ACK code and acknowledged control id are required")
    return acked, code, detail


class FrameReader:
    """`HL7StreamReader.readblock`, resynchronised on the start byte.

    Why a wrapper: python-hl7's readblock reads up to FS CR and raises InvalidBlockError when that stretch does
    not begin with VT, having consumed it, so one stray byte between frames (line noise, a peer's keep-alive
    newline) also loses the good frame after it. asyncio's StreamReader has no public peek, so before calling the
    library's readblock this drops the bytes before the next VT from the reader's buffer (the same internal
    buffer python-hl7's readblock trims itself); and when a frame was abandoned half-way and a new one started
    (VT ... VT ... FS CR), the part before the last VT is dropped as well. Everything dropped is counted in
    `discarded`. It also offers `wait_readable`, so the listener can time the idle gap and the frame separately.
    """

    def __init__(self, reader: HL7StreamReader) -> None:
        self.reader = reader
        self.discarded = 0
        self._reported = 0

    def take_discarded(self) -> int:
        """Bytes discarded since the last call."""
        n, self._reported = self.discarded - self._reported, self.discarded
        return n

    async def wait_readable(self) -> bool:
        """Wait for the next byte; False at end of stream."""
        r: Any = self.reader
        while not r._buffer:
            if (exc := r.exception()) is not None:
                raise exc
            if r._eof:
                return False
            await r._wait_for_data("wait_readable")
        return True

    async def readblock(self) -> bytes:
        """The next frame's content (VT and FS CR removed). Raises ValueError (frame over the limit; python-hl7),
        asyncio.IncompleteReadError (end of stream inside a frame)."""
        r: Any = self.reader
        while True:
            if (exc := r.exception()) is not None:
                raise exc
            i = r._buffer.find(START_BLOCK)
            drop = len(r._buffer) if i < 0 else i
            if drop:
                del r._buffer[:drop]
                self.discarded += drop
                r._maybe_resume_transport()
            if i >= 0:
                break
            if r._eof:
                raise asyncio.IncompleteReadError(b"", None)
            await r._wait_for_data("readblock")
        block: bytes = await self.reader.readblock()
        restart = block.rfind(START_BLOCK)
        if restart >= 0:
            self.discarded += restart + 1
            block = block[restart + 1 :]
        return block


# ------------------------------------------------------------------------------------------------- sender


@dataclass
class SenderCounters:
    sent: int = 0  # first transmissions
    resent: int = 0  # the same message again (after a timeout or a lost connection)
    acked: int = 0  # accepted (AA/CA)
    rejected: int = 0  # refused by the receiver (AR/CR/AE/CE): done, reported
    connects: int = 0
    connect_failures: int = 0
    timeouts: int = 0  # no matching ACK within ack_timeout_s
    disconnects: int = 0  # reset / closed by the peer / stream error
    ignored_replies: int = 0  # an ACK naming another control id
    bad_replies: int = 0  # a reply that is not an ACK, or has an unknown code
    error_retries: int = 0  # AE/CE answers followed by a resend (before the message counts as refused)


def _positive(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: must be a finite number > 0")
    return float(v)


class Sender:
    """Delivers the outbox over MLLP (see the module docstring). `await run()` until `stop()`.

    `parse_ack(text) -> (acked control id, code, detail)` reads a reply (it may raise: the reply is then
    ignored). `on_outcome(item, code, detail)` is called once per message marked done, accepted or not, after
    the done is durable; an exception in it is logged and delivery goes on. `counters` counts for benches."""

    def __init__(
        self,
        outbox: Outbox,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        ack_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        backoff_s: tuple[float, float] = (0.5, 30.0),
        parse_ack: AckParser = parse_ack,
        on_outcome: OutcomeCallback | None = None,
        error_retries: int = 5,
    ) -> None:
        self.outbox = outbox
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.ack_timeout_s = _positive("ack_timeout_s", ack_timeout_s)
        self.connect_timeout_s = _positive("connect_timeout_s", connect_timeout_s)
        lo, hi = (_positive("backoff_s", b) for b in backoff_s)
        if lo > hi:
            raise ValueError("backoff_s: (first, most) with first <= most")
        self.backoff_s = (lo, hi)
        self.parse_ack = parse_ack
        self.on_outcome = on_outcome
        # An application error (AE/CE) may be the receiver's passing trouble (Mirth answers AE when a destination
        # is down): the same message is tried again this many times (with the backoff) before it counts as refused.
        # A reject (AR/CR) is final at once: the receiver will not take this message.
        if isinstance(error_retries, bool) or not isinstance(error_retries, int) or error_retries < 0:
            raise ValueError("error_retries: an integer >= 0")
        self.error_retries = error_retries
        self.counters = SenderCounters()
        self.connected = False
        self.last_error = ""  # why the last attempt failed (for status)
        self._stopping = False
        self._task: asyncio.Task[Any] | None = None
        self._conn: tuple[FrameReader, HL7StreamWriter] | None = None
        self._last_sent: str | None = None

    def stop(self) -> None:
        """Stop `run` (it returns). A message in flight stays in the outbox: it is sent again next time."""
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def run(self) -> None:
        """Send until `stop()` (it never ends on its own: every failure is retried after a backoff and shown in
        `last_error`)."""
        if self._stopping:
            return
        self._task = asyncio.current_task()
        try:
            await self._loop()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            self._close()
            self._task = None

    async def _loop(self) -> None:
        failures = 0
        errors: tuple[str, int] = ("", 0)  # (control id, AE/CE answers it got so far)
        while True:
            item = self.outbox.head()
            if item is None:
                await self.outbox.wait()
                continue
            try:
                if self._conn is None:
                    self._conn = await self._connect()
                code, detail = await self._deliver(item, *self._conn)
            except (OSError, TimeoutError, EOFError, ValueError, ssl.SSLError) as exc:
                # (IncompleteReadError is an EOFError; an over-long reply is python-hl7's ValueError)
                self._close()
                self.last_error = f"{type(exc).__name__}: {exc}"
                failures += 1
                await asyncio.sleep(self.backoff_delay(failures))
                continue
            if code in ("AE", "CE"):
                seen = errors[1] + 1 if errors[0] == item.control_id else 1
                errors = (item.control_id, seen)
                if seen <= self.error_retries:
                    self.counters.error_retries += 1
                    self.last_error = f"{item.control_id}: receiver answered {code} ({detail[:200]}); retry {seen}"
                    failures += 1
                    await asyncio.sleep(self.backoff_delay(failures))
                    continue
            try:
                self.outbox.done(item.control_id, code)
            except StoreError as exc:
                # The disk failed: the message stays the head and is sent again after the backoff (the receiver
                # de-duplicates on MSH-10). The gateway sees the same failure on its next put and alarms.
                self.last_error = f"outbox: {exc}"
                _log("error", "hl7_outbox_done_failed", control_id=item.control_id, error=str(exc), priority="crit")
                failures += 1
                await asyncio.sleep(self.backoff_delay(failures))
                continue
            failures = 0
            self.last_error = ""
            if code in ACCEPTED:
                self.counters.acked += 1
            else:
                self.counters.rejected += 1
            if self.on_outcome is not None:
                try:
                    self.on_outcome(item, code, detail)
                except Exception as exc:  # the owner's reaction must not stop delivery
                    _log("error", "hl7_on_outcome_failed", control_id=item.control_id, error=repr(exc))

    def backoff_delay(self, failures: int) -> float:
        """Seconds to wait after `failures` failed attempts in a row: first, doubling, capped at most."""
        return float(min(self.backoff_s[1], self.backoff_s[0] * 2.0 ** min(failures - 1, 60)))

    async def _connect(self) -> tuple[FrameReader, HL7StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                kwargs: dict[str, Any] = {"limit": MAX_REPLY_BYTES}
                if self.ssl_context is not None:
                    kwargs.update(ssl=self.ssl_context, ssl_handshake_timeout=self.connect_timeout_s)
                    if self.server_hostname is not None:
                        kwargs["server_hostname"] = self.server_hostname
                reader, writer = await open_hl7_connection(self.host, self.port, **kwargs)
        except (OSError, TimeoutError, ssl.SSLError):
            self.counters.connect_failures += 1
            raise
        self.counters.connects += 1
        self.connected = True
        return FrameReader(reader), writer

    async def _deliver(self, item: Item, frames: FrameReader, writer: HL7StreamWriter) -> tuple[str, str]:
        if self._last_sent == item.control_id:
            self.counters.resent += 1
        else:
            self.counters.sent += 1
            self._last_sent = item.control_id
        try:
            async with asyncio.timeout(self.ack_timeout_s):
                writer.writeblock(encode(item.text))
                await writer.drain()
                while True:
                    try:
                        block = await frames.readblock()
                    except asyncio.IncompleteReadError:
                        self.counters.disconnects += 1
                        raise
                    try:
                        acked, code, detail = self.parse_ack(decode(block))
                    except Exception:
                        self.counters.bad_replies += 1
                        continue
                    if acked != item.control_id:
                        self.counters.ignored_replies += 1
                        continue
                    if code not in ACCEPTED and code not in REJECTED:
                        self.counters.bad_replies += 1
                        continue
                    return code, detail
        except TimeoutError:
            self.counters.timeouts += 1
            raise
        except (ConnectionError, ssl.SSLError):
            self.counters.disconnects += 1
            raise

    def _close(self) -> None:
        if self._conn is not None:
            self._conn[1].transport.abort()  # nothing of ours is left to flush: the message will be resent
            self._conn = None
        self.connected = False


# ------------------------------------------------------------------------------------------ order listener


@dataclass
class ListenerStats:
    connections: int = 0  # accepted and served
    refused: int = 0  # closed at once: over max_connections
    frames: int = 0  # handed to the handler
    undecodable_frames: int = 0  # of which not valid UTF-8 (the handler still gets them; see `undecodable`)
    discarded_bytes: int = 0  # stray bytes outside frames
    too_large: int = 0
    frame_timeouts: int = 0
    idle_timeouts: int = 0
    incomplete: int = 0  # the peer closed inside a frame
    handler_errors: int = 0
    send_failures: int = 0


class OrderServer:
    """The running listener (what `serve_orders` returns): `port`, `stats`, `close()`, `await wait_closed()`;
    also an async context manager."""

    def __init__(self, handler: Handler, *, max_frame_bytes: int, frame_timeout_s: float, idle_timeout_s: float,
                 max_connections: int) -> None:
        self._handler = handler
        self.max_frame_bytes = max_frame_bytes
        self.frame_timeout_s = frame_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.stats = ListenerStats()
        self.server: asyncio.Server | None = None
        self._active: dict[asyncio.Task[Any], HL7StreamWriter] = {}

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self.server.sockets) if self.server is not None else ()

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening and drop every connection."""
        if self.server is not None:
            self.server.close()
        for task, writer in list(self._active.items()):
            writer.transport.abort()
            task.cancel()

    async def wait_closed(self) -> None:
        tasks = list(self._active)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def __aenter__(self) -> OrderServer:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()
        await self.wait_closed()

    async def _connection(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        if len(self._active) >= self.max_connections:
            self.stats.refused += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._active[task] = writer
        self.stats.connections += 1
        frames = FrameReader(reader)
        try:
            await self._serve(frames, writer)
        except asyncio.CancelledError:
            pass  # close(): the connection goes with the server
        except Exception as exc:  # a transport error on this connection: only it ends
            _log("warning", "hl7_connection_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.stats.discarded_bytes += frames.take_discarded()
            del self._active[task]
            writer.transport.abort()

    async def _serve(self, frames: FrameReader, writer: HL7StreamWriter) -> None:
        send = self._sender(writer)
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    if not await frames.wait_readable():
                        return
            except TimeoutError:
                self.stats.idle_timeouts += 1
                return
            try:
                async with asyncio.timeout(self.frame_timeout_s):
                    block = await frames.readblock()
            except TimeoutError:
                self.stats.frame_timeouts += 1
                return
            except ValueError:  # python-hl7: over the limit (its buffer is cleared)
                self.stats.too_large += 1
                return
            except asyncio.IncompleteReadError:
                self.stats.incomplete += 1
                return
            self.stats.discarded_bytes += frames.take_discarded()
            text = decode(block)
            self.stats.frames += 1
            if undecodable(text) is not None:
                self.stats.undecodable_frames += 1
            try:
                await self._handler(text, send)
            except ConnectionLost:
                self.stats.send_failures += 1
                return
            except Exception as exc:
                self.stats.handler_errors += 1
                _log("error", "hl7_handler_failed", error=f"{type(exc).__name__}: {exc}")

    def _sender(self, writer: HL7StreamWriter) -> Send:
        async def send(reply: str) -> None:
            data = encode(reply)
            if writer.is_closing():
                raise ConnectionLost("connection closed")
            try:
                async with asyncio.timeout(self.frame_timeout_s):
                    writer.writeblock(data)
                    await writer.drain()
            except TimeoutError:
                raise ConnectionLost(f"peer did not read the reply within {self.frame_timeout_s:g} s") from None
            except (ConnectionError, ssl.SSLError, OSError) as exc:
                raise ConnectionLost(f"{type(exc).__name__}: {exc}") from None

        return send


async def serve_orders(
    handler: Handler,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_frame_bytes: int = 1_048_576,
    frame_timeout_s: float = 10.0,
    idle_timeout_s: float = 300.0,
    max_connections: int = 64,
) -> OrderServer:
    """Listen for MLLP frames on host:port; `handler(text, send)` is awaited once per frame (see the module
    docstring for the limits and the encoding). Returns the running `OrderServer`."""
    for name, v in (("max_frame_bytes", max_frame_bytes), ("max_connections", max_connections)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be an integer >= 1")
    srv = OrderServer(handler, max_frame_bytes=max_frame_bytes,
                      frame_timeout_s=_positive("frame_timeout_s", frame_timeout_s),
                      idle_timeout_s=_positive("idle_timeout_s", idle_timeout_s), max_connections=max_connections)
    kwargs: dict[str, Any] = {"limit": max_frame_bytes}
    if ssl_context is not None:
        kwargs.update(ssl=ssl_context, ssl_handshake_timeout=srv.frame_timeout_s)
    srv.server = await start_hl7_server(srv._connection, host, port, **kwargs)
    return srv


def _log(level: str, event: str, **fields: Any) -> None:
    with contextlib.suppress(Exception):  # stderr may be a closed pipe: logging must never fail the transport
        getattr(log, level)(event, **fields)
