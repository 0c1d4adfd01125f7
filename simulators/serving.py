"""Serving a byte-stream pump protocol (New Era, Harvard) on a pseudo-terminal or loopback TCP.

Each protocol brings its own session (bytes in -> frames -> replies); this module owns the transports they
share: the PTY master with its reader, the TCP server with its connections, the cable pull (`hang_up`), the
background announcer (unsolicited packets), and how a reply passes the fault plan on its way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import termios
import tty
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from simulators.faults import FaultPlan

Write = Callable[[bytes], None]
HangUp = Callable[[], None]


class Session(Protocol):
    closed: bool

    async def feed(self, data: bytes) -> None: ...


SessionFactory = Callable[[Write, HangUp], Session]  # (write, disconnect) -> a session on one connection
Background = Callable[[Write], Coroutine[Any, Any, None]]  # runs while serving, writing to every connection


async def send_reply(faults: FaultPlan, reply: bytes, write: Write, disconnect: HangUp, per_byte_s: float,
                     request_len: int = 0) -> bool:
    """Send `reply` through the fault plan (drop, disconnect, delay, garble), after the wire time of the request
    and the reply at `per_byte_s`. Returns True when the fault plan hung up (the session is over)."""
    action = faults.on_reply(reply)
    if per_byte_s:
        await asyncio.sleep(per_byte_s * (request_len + len(action.payload or reply)))
    if action.kind == "drop":
        return False
    if action.kind == "disconnect":
        disconnect()
        return True
    if action.kind == "delay":
        await asyncio.sleep(action.delay_s)
    write(action.payload)
    return False


class Announces(Protocol):
    def poll_unsolicited(self) -> bytes | None: ...


async def announce_unsolicited(protocol: Announces, plan: FaultPlan, write: Write, period_s: float) -> None:
    """The pump models are lazy: look for an unsolicited packet (an alarm to announce) now and then, send it.
    The method is looked up at every poll, so a protocol object can be wrapped while it is served."""
    while True:
        await asyncio.sleep(period_s)
        packet = protocol.poll_unsolicited()
        if packet is not None and not plan.is_cut:  # sent into a cut cable: lost, as on the wire
            write(packet)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t


@contextlib.asynccontextmanager
async def serve_pty(make_session: SessionFactory, background: Background,
                    announce: bytes | None = None) -> AsyncIterator[tuple[str, HangUp]]:
    """A new PTY pair; yields (the slave's device path, hang_up). `announce` is written once at start."""
    loop = asyncio.get_running_loop()
    master, slave = os.openpty()
    # Raw at once: with the default line discipline the slave would echo our replies back to us (and translate
    # CR/LF; XON passes through).
    tty.setraw(slave, termios.TCSANOW)
    os.set_blocking(master, False)
    device = os.ttyname(slave)
    state = {"master": master}
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def write(data: bytes) -> None:
        fd = state["master"]
        if fd < 0:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(fd, data)  # a full buffer means nobody reads: the bytes are lost, as on a wire

    def hang_up() -> None:
        fd = state["master"]
        if fd >= 0:
            loop.remove_reader(fd)
            os.close(fd)
            state["master"] = -1

    def readable() -> None:
        try:
            data = os.read(state["master"], 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # EIO: no slave open right now; we hold our own slave fd, so this is rare
        if data:
            queue.put_nowait(data)

    session = make_session(write, hang_up)

    async def worker() -> None:
        while True:
            await session.feed(await queue.get())
            if session.closed:
                return

    loop.add_reader(master, readable)
    if announce is not None:
        write(announce)
    tasks = [asyncio.create_task(worker()), asyncio.create_task(background(write))]
    try:
        yield device, hang_up
    finally:
        await _cancel(tasks)
        hang_up()
        os.close(slave)


@contextlib.asynccontextmanager
async def serve_tcp(make_session: SessionFactory, background: Background, host: str, port: int,
                    announce: bytes | None = None) -> AsyncIterator[tuple[int, HangUp]]:
    """A TCP server on host:port (0 = any free port); yields (the port, hang_up: drop every open connection).
    `announce` goes to the first connection only (nobody listens before that)."""
    writers: set[asyncio.StreamWriter] = set()
    pending_announce = [announce]

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def write(data: bytes) -> None:
            if not writer.is_closing():
                writer.write(data)

        session = make_session(write, writer.close)
        if pending_announce[0] is not None:
            write(pending_announce[0])
            pending_announce[0] = None
        try:
            while not session.closed:
                data = await reader.read(4096)
                if not data:
                    break
                await session.feed(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writers.discard(writer)
            writer.close()

    def hang_up() -> None:
        for w in list(writers):
            w.close()

    def broadcast(data: bytes) -> None:
        for w in list(writers):
            if not w.is_closing():
                w.write(data)

    server = await asyncio.start_server(client, host, port)
    chosen = server.sockets[0].getsockname()[1]
    ticker = asyncio.create_task(background(broadcast))
    try:
        yield chosen, hang_up
    finally:
        await _cancel([ticker])
        server.close()
        hang_up()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
