"""MLLP over real loopback TCP (and TLS): the sender's delivery rules and the order listener's robustness.

Every listener scenario runs with a ticker task counting its turns: the count must move during each hostile
exchange (the event loop is never blocked). No assertion is about how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hl7
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hl7.mllp import HL7StreamReader, HL7StreamWriter, open_hl7_connection, start_hl7_server
from hl7.mllp.streams import CARRIAGE_RETURN, END_BLOCK, START_BLOCK

from driverd.hl7.mllp import (
    ConnectionLost,
    OrderServer,
    Send,
    Sender,
    parse_ack,
    serve_orders,
    undecodable,
)
from driverd.hl7.outbox import Item, Outbox
from tests.hl7.store_faults import install

LOCAL = "127.0.0.1"
WAIT = 30.0  # upper bound for anything to happen (a hang fails the test instead of blocking the suite)


def msg(cid: str, body: str = "OBX|1|NM|rate||1") -> str:
    return f"MSH|^~\\&|DRIVERD|WARD|PCD|HOSP|20260302120000||ORU^R01^ORU_R01|{cid}|P|2.6\r{body}\r"


def ack_for(text: str, code: str = "AA", detail: str = "") -> str:
    ack = hl7.parse(text).create_ack(code, message_id=f"ACK-{control_id(text)}")
    if detail:
        ack.segment("MSA").assign_field(detail, 3)
    return str(ack)


def control_id(text: str) -> str:
    return str(hl7.parse(text).segment("MSH")(10))


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(120):
            return await coro

    return asyncio.run(bounded())


async def until(cond: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Ticker:
    """A task that only counts its turns of the event loop."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def moving(ticker: Ticker) -> AsyncIterator[None]:
    """The ticker must advance while the block runs."""
    before = ticker.ticks
    yield
    assert ticker.ticks > before, "the event loop was blocked"


async def acking(text: str, send: Send) -> None:
    await send(ack_for(text))


async def exchange(reader: HL7StreamReader, writer: HL7StreamWriter, text: str) -> str:
    writer.writeblock(text.encode())
    await writer.drain()
    async with asyncio.timeout(WAIT):
        return (await reader.readblock()).decode()


async def closed_by_peer(reader: HL7StreamReader) -> bool:
    """True once the peer has closed (EOF or reset) — waits for it."""
    try:
        async with asyncio.timeout(WAIT):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    return True


class _Port:
    """The port of the listener the current test runs (set by `listener`)."""

    def __init__(self) -> None:
        self.port = 0

    def get(self) -> int:
        return self.port


SERVER_PORT = _Port()


@contextlib.asynccontextmanager
async def listener(handler: Callable[[str, Send], Awaitable[None]] = acking, **kw: Any) -> AsyncIterator[OrderServer]:
    server = await serve_orders(handler, LOCAL, 0, **kw)
    SERVER_PORT.port = server.port
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def outbox(tmp_path: Path, *cids: str) -> Outbox:
    box = Outbox.open(tmp_path / "outbox")
    for c in cids:
        box.put(c, msg(c), kind="ORU^R01", pump_id="bed-1")
    return box


def fast_sender(box: Outbox, port: int, **kw: Any) -> Sender:
    kw.setdefault("ack_timeout_s", 5.0)
    return Sender(box, LOCAL, port, backoff_s=(0.01, 0.05), connect_timeout_s=5.0, **kw)


# ================================================================================================ sender


def test_default_ack_parser_reads_msa() -> None:
    text = ack_for(msg("C1"), "AE", "bad rate")
    assert parse_ack(text) == ("C1", "AE", "bad rate")
    assert parse_ack(ack_for(msg("C2"))) == ("C2", "AA", "")
    for bad in ("", "hello", "MSH|^~\\&|A\rPID|1\r", "MSH|^~\\&|A\rMSA|AA\r", "MSH|^~\\&|A\rMSA||C1\r"):
        with pytest.raises(ValueError):
            parse_ack(bad)


def test_sender_delivers_in_order_with_one_message_in_flight(tmp_path: Path) -> None:
    box = outbox(tmp_path, "C1", "C2", "C3", "C4")
    got: list[str] = []
    overlapped: list[str] = []

    async def receiver(reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        while True:
            try:
                text = (await reader.readblock()).decode()
            except asyncio.IncompleteReadError:
                return
            got.append(control_id(text))
            # Before we ACK, nothing else may arrive.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    overlapped.append((await reader.readblock()).decode())
            writer.writeblock(ack_for(text).encode())
            await writer.drain()

    async def main() -> None:
        server = await start_hl7_server(receiver, LOCAL, 0)
        sender = fast_sender(box, server.sockets[0].getsockname()[1])
        task = asyncio.create_task(sender.run())
        await until(lambda: box.head() is None, "all delivered")
        box.put("C5", msg("C5"), kind="ORU^R40", pump_id=None)  # wakes the idle sender
        await until(lambda: box.head() is None, "C5 delivered")
        sender.stop()
        await task
        server.close()
        assert got == ["C1", "C2", "C3", "C4", "C5"] and overlapped == []
        c = sender.counters
        assert (c.sent, c.resent, c.acked, c.rejected, c.connects) == (5, 0, 5, 0, 1)

    run(main())
    box.close()


def test_no_ack_in_time_resends_the_same_message(tmp_path: Path) -> None:
    box = outbox(tmp_path, "C1", "C2")
    got: list[str] = []

    async def handler(text: str, send: Send) -> None:
        got.append(control_id(text))
        if len(got) > 1:  # the first copy is never answered
            await send(ack_for(text))

    async def main() -> None:
        async with listener(handler) as server:
            sender = fast_sender(box, server.port, ack_timeout_s=0.3)
            task = asyncio.create_task(sender.run())
            await until(lambda: box.head() is None, "delivered")
            sender.stop()
            await task
        assert got == ["C1", "C1", "C2"]
        c = sender.counters
        assert (c.sent, c.resent, c.acked, c.timeouts) == (2, 1, 2, 1)

    run(main())
    box.close()


def test_connection_refused_then_the_receiver_comes_up(tmp_path: Path) -> None:
    box = outbox(tmp_path, "C1")
    port = free_port()

    async def main() -> None:
        sender = fast_sender(box, port)
        task = asyncio.create_task(sender.run())
        await until(lambda: sender.counters.connect_failures >= 3, "retrying")
        assert box.head() is not None and "Error" in sender.last_error
        server = await serve_orders(acking, LOCAL, port)
        await until(lambda: box.head() is None, "delivered once the receiver is up")
        sender.stop()
        await task
        server.close()
        await server.wait_closed()
        assert sender.counters.acked == 1 and sender.last_error == ""

    run(main())
    box.close()


def test_reset_or_closed_connection_resends_the_same_message(tmp_path: Path) -> None:
    box = outbox(tmp_path, "C1", "C2")
    got: list[str] = []
    conns = [0]

    async def receiver(reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        conns[0] += 1
        n = conns[0]
        text = (await reader.readblock()).decode()
        got.append(control_id(text))
        if n == 1:
            writer.transport.abort()  # reset
            return
        if n == 2:
            writer.close()  # orderly close, no reply
            return
        while True:
            writer.writeblock(ack_for(text).encode())
            await writer.drain()
            try:
                text = (await reader.readblock()).decode()
            except asyncio.IncompleteReadError:
                return
            got.append(control_id(text))

    async def main() -> None:
        server = await start_hl7_server(receiver, LOCAL, 0)
        sender = fast_sender(box, server.sockets[0].getsockname()[1])
        task = asyncio.create_task(sender.run())
        await until(lambda: box.head() is None, "delivered")
        sender.stop()
        await task
        server.close()
        assert got == ["C1", "C1", "C1", "C2"]
        c = sender.counters
        assert (c.sent, c.resent, c.acked, c.connects, c.disconnects) == (2, 2, 2, 3, 2)

    run(main())
    box.close()


def test_other_acks_and_garbage_are_ignored_until_the_right_ack(tmp_path: Path) -> None:
    box = outbox(tmp_path, "C1")

    async def handler(text: str, send: Send) -> None:
        await send(ack_for(msg("OTHER")))  # a late ACK for something else
        await send("not an ack at all")
        await send(ack_for(text, "ZZ"))  # not an acknowledgement code
        await send(ack_for(text, "CA"))

    async def main() -> None:
        async with listener(handler) as server:
            sender = fast_sender(box, server.port)
            task = asyncio.create_task(sender.run())
            await until(lambda: box.head() is None, "delivered")
            sender.stop()
            await task
        c = sender.counters
        assert (c.acked, c.ignored_replies, c.bad_replies, c.resent) == (1, 1, 2, 0)

    run(main())
    box.close()


@pytest.mark.parametrize("code", ["AR", "CR"])
def test_a_rejected_message_is_done_reported_and_not_resent(tmp_path: Path, code: str) -> None:
    box = outbox(tmp_path, "C1", "C2")
    got: list[str] = []
    outcomes: list[tuple[Item, str, str]] = []

    async def handler(text: str, send: Send) -> None:
        got.append(control_id(text))
        await send(ack_for(text, code if len(got) == 1 else "AA", "no such patient" if len(got) == 1 else ""))

    async def main() -> None:
        async with listener(handler) as server:
            sender = fast_sender(box, server.port, on_outcome=lambda i, o, d: outcomes.append((i, o, d)))
            task = asyncio.create_task(sender.run())
            await until(lambda: box.head() is None, "both done")
            sender.stop()
            await task
        assert got == ["C1", "C2"]
        assert [(i.control_id, o, d) for i, o, d in outcomes] == [("C1", code, "no such patient"), ("C2", "AA", "")]
        assert (sender.counters.rejected, sender.counters.acked) == (1, 1)

    run(main())
    box.close()


@pytest.mark.parametrize(("code", "errors", "final"), [("AE", 2, "AA"), ("CE", 1, "AA"), ("AE", 9, "AE")])
def test_an_application_error_is_retried_then_refused(tmp_path: Path, code: str, errors: int, final: str) -> None:
    """AE/CE may be the receiver's passing trouble: the same message (same MSH-10) again, up to error_retries
    times; then it counts as refused and the queue moves on."""
    box = outbox(tmp_path, "C1", "C2")
    got: list[str] = []
    outcomes: list[tuple[str, str]] = []

    async def handler(text: str, send: Send) -> None:
        got.append(control_id(text))
        first = control_id(text) == "C1" and got.count("C1") <= errors
        await send(ack_for(text, code if first else "AA", "destination down" if first else ""))

    async def main() -> None:
        async with listener(handler) as server:
            sender = fast_sender(box, server.port, error_retries=3,
                                 on_outcome=lambda i, o, d: outcomes.append((i.control_id, o)))
            task = asyncio.create_task(sender.run())
            await until(lambda: box.head() is None, "both done")
            sender.stop()
            await task
        tries = errors + 1 if errors <= 3 else 1 + 3  # the first send and its resends
        assert got == ["C1"] * tries + ["C2"]
        assert outcomes == [("C1", final if errors <= 3 else code), ("C2", "AA")]
        assert sender.counters.error_retries == min(errors, 3)

    run(main())
    box.close()


def test_a_failing_outcome_callback_does_not_stop_delivery(tmp_path: Path) -> None:
    box = outbox(tmp_path, "C1", "C2")

    def boom(_item: Item, _outcome: str, _detail: str) -> None:
        raise RuntimeError("observer bug")

    async def main() -> None:
        async with listener() as server:
            sender = fast_sender(box, server.port, on_outcome=boom)
            task = asyncio.create_task(sender.run())
            await until(lambda: box.head() is None, "delivered")
            sender.stop()
            await task

    run(main())
    box.close()


def test_stop_keeps_the_message_in_flight_and_a_restart_resends_it(tmp_path: Path) -> None:
    box = outbox(tmp_path, "C1")
    got: list[str] = []
    answer = [False]

    async def handler(text: str, send: Send) -> None:
        got.append(control_id(text))
        if answer[0]:
            await send(ack_for(text))

    async def main() -> None:
        nonlocal box
        async with listener(handler) as server:
            sender = fast_sender(box, server.port, ack_timeout_s=60)
            task = asyncio.create_task(sender.run())
            await until(lambda: got == ["C1"], "sent")
            sender.stop()
            await asyncio.wait_for(task, WAIT)  # returns, no exception
            assert [i.control_id for i in box.pending()] == ["C1"]
            box.close()  # "restart"
            box = Outbox.open(tmp_path / "outbox")
            answer[0] = True
            sender = fast_sender(box, server.port)
            task = asyncio.create_task(sender.run())
            await until(lambda: box.head() is None, "delivered after the restart")
            sender.stop()
            await task
        assert got == ["C1", "C1"]

    run(main())
    box.close()


def test_an_outbox_that_cannot_record_the_ack_is_retried_and_the_message_resent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = outbox(tmp_path, "C1", "C2")
    faulty = install(monkeypatch)
    faulty.fail = {"write": errno.ENOSPC}  # the disk is full when the first ACK comes
    got: list[str] = []

    async def handler(text: str, send: Send) -> None:
        got.append(control_id(text))
        await send(ack_for(text))

    async def main() -> None:
        async with listener(handler) as server:
            sender = fast_sender(box, server.port)
            task = asyncio.create_task(sender.run())
            await until(lambda: sender.last_error.startswith("outbox:") and len(got) >= 2, "done failing")
            assert [i.control_id for i in box.pending()] == ["C1", "C2"]
            faulty.reset()  # space again
            await until(lambda: box.head() is None, "delivered")
            sender.stop()
            await task
        assert got[0] == got[1] == "C1" and got[-1] == "C2" and set(got) == {"C1", "C2"}
        assert sender.counters.acked == 2 and sender.last_error == ""

    run(main())
    box.close()


def test_stop_before_run_and_bad_settings(tmp_path: Path) -> None:
    box = outbox(tmp_path)
    sender = Sender(box, LOCAL, 1)
    sender.stop()
    run(sender.run())  # returns at once
    for kw in ({"ack_timeout_s": 0}, {"connect_timeout_s": float("nan")}, {"backoff_s": (2.0, 1.0)},
               {"ack_timeout_s": True}):
        with pytest.raises(ValueError):
            Sender(box, LOCAL, 1, **kw)
    s = Sender(box, LOCAL, 1, backoff_s=(0.5, 30.0))
    assert [s.backoff_delay(n) for n in (1, 2, 3, 4, 5, 6, 7, 100)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    box.close()


# ====================================================================================== order listener


async def raw_client() -> tuple[HL7StreamReader, HL7StreamWriter]:
    return await open_hl7_connection(LOCAL, SERVER_PORT.get())


def test_stray_bytes_between_frames_are_dropped_and_the_next_frame_is_read() -> None:
    seen: list[str] = []

    async def handler(text: str, send: Send) -> None:
        seen.append(text)
        await send(ack_for(text))

    async def main() -> None:
        async with Ticker() as t, listener(handler) as server, moving(t):
            reader, writer = await raw_client()
            one, two, three = msg("G1").encode(), msg("G2").encode(), msg("G3").encode()
            junk = b"\r\nnoise" + END_BLOCK + CARRIAGE_RETURN + b"more"
            # garbage (with a stray FS CR) before a frame; a frame abandoned half-way then a whole one
            writer.write(junk)
            writer.writeblock(one)
            writer.write(START_BLOCK + b"MSH|half a fra")
            writer.writeblock(two)
            writer.write(b"\n")
            writer.writeblock(three)
            await writer.drain()
            acks = [parse_ack((await reader.readblock()).decode()) for _ in range(3)]
            writer.close()
            await until(lambda: server.active == 0, "connection closed")
        assert [control_id(s) for s in seen] == ["G1", "G2", "G3"]
        assert [a[0] for a in acks] == ["G1", "G2", "G3"]
        assert server.stats.discarded_bytes == len(junk) + len(b"\x0bMSH|half a fra") + 1
        assert server.stats.frames == 3

    run(main())


@pytest.mark.parametrize("terminated", [False, True])
def test_a_10_mb_frame_closes_its_connection_without_being_buffered(monkeypatch: pytest.MonkeyPatch,
                                                                    terminated: bool) -> None:
    peak = [0]
    original = asyncio.StreamReader.feed_data

    def feed(self: asyncio.StreamReader, data: bytes) -> None:
        original(self, data)
        peak[0] = max(peak[0], len(self._buffer))  # type: ignore[attr-defined]

    monkeypatch.setattr(HL7StreamReader, "feed_data", feed)
    seen: list[str] = []

    async def handler(text: str, send: Send) -> None:
        seen.append(text)
        await send(ack_for(text))

    async def main() -> None:
        async with Ticker() as t, listener(handler, max_frame_bytes=1_048_576) as server:
            reader, writer = await raw_client()
            huge = b"MSH|^~\\&|" + b"A" * (10 * 1024 * 1024)
            async with moving(t):
                if terminated:
                    writer.writeblock(huge)
                else:
                    writer.write(START_BLOCK + huge)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                assert await closed_by_peer(reader)
            writer.transport.abort()
            assert server.stats.too_large == 1 and seen == []
            # the server goes on
            reader, writer = await raw_client()
            reply = await exchange(reader, writer, msg("OK"))
            assert parse_ack(reply)[0] == "OK"
            writer.close()
        assert peak[0] < 3 * 1_048_576 + 512 * 1024, peak[0]

    run(main())


@pytest.mark.parametrize("how", ["unterminated", "trickle", "garbage-only"])
def test_an_unfinished_or_trickled_frame_is_dropped_after_the_frame_timeout(how: str) -> None:
    async def main() -> None:
        async with Ticker() as t, listener(frame_timeout_s=0.3) as server:
            reader, writer = await raw_client()
            async with moving(t):
                if how == "unterminated":
                    writer.write(START_BLOCK + msg("U1").encode())
                elif how == "garbage-only":
                    writer.write(b"GET / HTTP/1.1\r\n")
                else:
                    async def trickle() -> None:
                        data = START_BLOCK + msg("T1").encode() + END_BLOCK + CARRIAGE_RETURN
                        with contextlib.suppress(ConnectionError):
                            for b in data:
                                writer.write(bytes([b]))
                                await writer.drain()
                                await asyncio.sleep(0.05)

                    task = asyncio.create_task(trickle())
                assert await closed_by_peer(reader)
            if how == "trickle":
                task.cancel()
            writer.transport.abort()
            assert server.stats.frame_timeouts == 1 and server.stats.frames == 0
            if how == "garbage-only":
                assert server.stats.discarded_bytes == len(b"GET / HTTP/1.1\r\n")
            reader, writer = await raw_client()
            assert parse_ack(await exchange(reader, writer, msg("OK")))[0] == "OK"
            writer.close()

    run(main())


def test_an_idle_connection_is_dropped_after_the_idle_timeout() -> None:
    async def main() -> None:
        async with Ticker() as t, listener(idle_timeout_s=0.3) as server:
            reader, writer = await raw_client()
            assert parse_ack(await exchange(reader, writer, msg("I1")))[0] == "I1"  # then silence
            async with moving(t):
                assert await closed_by_peer(reader)
            writer.transport.abort()
            assert server.stats.idle_timeouts == 1

    run(main())


def test_over_max_connections_new_connections_are_closed_at_once() -> None:
    async def main() -> None:
        async with Ticker() as t, listener(max_connections=64) as server:
            async with moving(t):
                conns = await asyncio.gather(*(raw_client() for _ in range(100)))
                await until(lambda: server.stats.connections + server.stats.refused == 100, "all accepted")

            async def attempt(reader: HL7StreamReader, writer: HL7StreamWriter, i: int) -> bool:
                try:
                    return parse_ack(await exchange(reader, writer, msg(f"M{i}")))[0] == f"M{i}"
                except (asyncio.IncompleteReadError, ConnectionError):
                    return False

            async with moving(t):
                served = await asyncio.gather(*(attempt(r, w, i) for i, (r, w) in enumerate(conns)))
            assert served.count(True) == 64 and served.count(False) == 36
            assert (server.stats.connections, server.stats.refused, server.active) == (64, 36, 64)
            kept = [c for c, ok in zip(conns, served, strict=True) if ok]
            for _r, w in conns:
                if (_r, w) not in kept:
                    w.transport.abort()
            for _r, w in kept[:10]:
                w.close()
            await until(lambda: server.active == 54, "ten closed")
            more = await asyncio.gather(*(raw_client() for _ in range(10)))
            ok = await asyncio.gather(*(attempt(r, w, 100 + i) for i, (r, w) in enumerate(more)))
            assert all(ok) and server.active == 64
            for _r, w in [*kept[10:], *more]:
                w.close()

    run(main())


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"caf\xe9", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_bytes_that_are_not_utf8_reach_the_handler_marked_and_exactly_recoverable(bad: bytes) -> None:
    got: list[str] = []

    async def handler(text: str, send: Send) -> None:
        got.append(text)
        problem = undecodable(text)
        await send(ack_for(text, "AR" if problem else "AA", problem or ""))

    async def main() -> None:
        async with Ticker() as t, listener(handler) as server:
            reader, writer = await raw_client()
            raw = msg("U1", "PID|||x").encode().replace(b"|||x", b"|||" + bad)
            async with moving(t):
                writer.writeblock(raw)
                await writer.drain()
                reply_bytes = await reader.readblock()
            writer.close()
            acked, code, detail = parse_ack(reply_bytes.decode("utf-8", "surrogateescape"))
            assert (acked, code) == ("U1", "AR") and "is not valid UTF-8" in detail
            assert got[-1].encode("utf-8", "surrogateescape") == raw  # nothing lost or guessed
            assert server.stats.undecodable_frames >= 1

    run(main())


def test_valid_utf8_text_arrives_as_is() -> None:
    got: list[str] = []

    async def handler(text: str, send: Send) -> None:
        got.append(text)
        await send(ack_for(text))

    async def main() -> None:
        async with listener(handler) as server:
            reader, writer = await raw_client()
            text = msg("U2", "PID|||Zoë^Müller")
            await exchange(reader, writer, text)
            writer.close()
            assert got == [text] and undecodable(text) is None and server.stats.undecodable_frames == 0

    run(main())


def test_a_handler_exception_never_kills_the_connection_or_the_server() -> None:
    async def handler(text: str, send: Send) -> None:
        if "BOOM" in text:
            raise RuntimeError("handler bug")
        await send(ack_for(text))

    async def main() -> None:
        async with Ticker() as t, listener(handler) as server:
            reader, writer = await raw_client()
            async with moving(t):
                writer.writeblock(msg("B1", "OBX|BOOM").encode())
                assert parse_ack(await exchange(reader, writer, msg("B2")))[0] == "B2"
            writer.close()
            assert server.stats.handler_errors == 1
            reader, writer = await raw_client()
            assert parse_ack(await exchange(reader, writer, msg("B3")))[0] == "B3"
            writer.close()

    run(main())


def test_a_reply_to_a_peer_that_left_raises_connection_lost_and_the_server_goes_on() -> None:
    outcome: list[BaseException] = []

    async def main() -> None:
        left = asyncio.Event()

        async def handler(text: str, send: Send) -> None:
            await left.wait()
            try:
                for _ in range(100):  # the first writes may still land in the kernel's buffers
                    await send(ack_for(text))
                    await asyncio.sleep(0.01)
            except ConnectionLost as exc:
                outcome.append(exc)
                raise

        async with Ticker() as t, listener(handler) as server:
            _reader, writer = await raw_client()
            writer.writeblock(msg("L1").encode())
            await writer.drain()
            await until(lambda: server.stats.frames == 1, "received")
            writer.transport.abort()
            left.set()
            async with moving(t):
                await until(lambda: server.active == 0, "connection ended")
            assert len(outcome) == 1 and server.stats.send_failures == 1

    run(main())


def test_close_drops_open_connections() -> None:
    async def main() -> None:
        server = await serve_orders(acking, LOCAL, 0)
        SERVER_PORT.port = server.port
        reader, writer = await raw_client()
        assert parse_ack(await exchange(reader, writer, msg("X1")))[0] == "X1"
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)
        assert await closed_by_peer(reader)
        assert server.active == 0
        with pytest.raises(OSError):
            await raw_client()

    run(main())


def test_bad_listener_settings() -> None:
    for kw in ({"max_frame_bytes": 0}, {"max_connections": True}, {"frame_timeout_s": -1}, {"idle_timeout_s": 0}):
        with pytest.raises(ValueError):
            run(serve_orders(acking, LOCAL, 0, **kw))


# =================================================================================================== TLS


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "driverd-test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address(LOCAL))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_both_ways_with_a_self_signed_certificate(tmp_path: Path, mutual: bool) -> None:
    cert, key = self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    if mutual:
        server_ctx.load_verify_locations(cafile=str(cert))
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        client_ctx.load_cert_chain(cert, key)
    box = outbox(tmp_path, "T1", "T2")
    got: list[str] = []

    async def handler(text: str, send: Send) -> None:
        got.append(control_id(text))
        await send(ack_for(text))

    async def main() -> None:
        async with Ticker() as t, listener(handler, ssl_context=server_ctx, frame_timeout_s=2.0) as server:
            sender = fast_sender(box, server.port, ssl_context=client_ctx)
            task = asyncio.create_task(sender.run())
            await until(lambda: box.head() is None, "delivered over TLS")
            sender.stop()
            await task
            assert got == ["T1", "T2"]
            # A plain-text peer (or, with mutual TLS, one without a certificate) is dropped; the server goes on.
            async with moving(t):
                if mutual:
                    anon = ssl.create_default_context(cafile=str(cert))
                    # (TLS 1.3: the client's handshake ends before the server checks its certificate, so the
                    # refusal may show as an alert or as the connection closing)
                    with contextlib.suppress(ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
                        reader, writer = await open_hl7_connection(LOCAL, server.port, ssl=anon)
                        writer.writeblock(msg("N1").encode())
                        await writer.drain()
                        await reader.readblock()
                        raise AssertionError("a client without a certificate was answered")
                else:
                    reader, writer = await raw_client()
                    writer.writeblock(msg("N1").encode())
                    await writer.drain()
                    assert await closed_by_peer(reader)
                    writer.transport.abort()
            assert server.stats.frames == 2  # nothing from the refused peer reached the handler
            box.put("T3", msg("T3"), kind="ORU^R01", pump_id=None)
            sender = fast_sender(box, server.port, ssl_context=client_ctx)
            task = asyncio.create_task(sender.run())
            await until(lambda: box.head() is None, "delivered again over TLS")
            sender.stop()
            await task
        assert got == ["T1", "T2", "T3"]

    run(main())
    box.close()


def test_sender_refuses_a_receiver_it_cannot_verify(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other, _ = self_signed(other_dir)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    box = outbox(tmp_path, "V1")

    async def main() -> None:
        async with listener(ssl_context=server_ctx, frame_timeout_s=2.0) as server:
            sender = fast_sender(box, server.port, ssl_context=ssl.create_default_context(cafile=str(other)))
            task = asyncio.create_task(sender.run())
            await until(lambda: sender.counters.connect_failures >= 2, "refused")
            sender.stop()
            await task
            assert box.head() is not None and "CERTIFICATE_VERIFY_FAILED" in sender.last_error
            assert server.stats.frames == 0

    run(main())
    box.close()
