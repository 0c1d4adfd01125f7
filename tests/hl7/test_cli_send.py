"""`driverd hl7 send-test` against a receiver on loopback, and `driverd demo --hl7-to` delivering a whole course."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from typer.testing import CliRunner

from driverd.cli.main import app
from tests.hl7.receiver import Receiver, control_id, free_port, message_type


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver on its own event loop thread, so the CLI (which runs its own asyncio.run) can talk to it."""
    loop = asyncio.new_event_loop()
    rcv = Receiver()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(rcv.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield rcv
    asyncio.run_coroutine_threadsafe(rcv.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def test_send_test_gets_an_ack(receiver: Receiver) -> None:
    result = CliRunner().invoke(app, ["hl7", "send-test", f"127.0.0.1:{receiver.port}", "--pump", "bed-7", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is True and out["ack_code"] == "AA"
    (text,) = receiver.received
    assert control_id(text) == out["control_id"] and message_type(text).startswith("ORU^R01")
    parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    assert any("bed-7" in str(s) for s in hl7.parse(text).segments("OBX"))


def test_send_test_without_a_receiver_fails_with_one_line() -> None:
    result = CliRunner().invoke(app, ["hl7", "send-test", f"127.0.0.1:{free_port()}", "--timeout", "2"])
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["nohost"], ["127.0.0.1:0"], ["127.0.0.1:1", "--sending-application", "A|B"]])
def test_send_test_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["hl7", "send-test", *args])
    assert result.exit_code == 2, result.output


def test_demo_sends_the_whole_course_to_the_receiver(receiver: Receiver, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--json", "--faults", "--audit", str(tmp_path / "audit"),
                                      "--hl7-to", f"127.0.0.1:{receiver.port}"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is True and out["hl7"]["delivered"] is True and out["hl7"]["pending"] == 0
    unique = receiver.unique()
    assert len(unique) == out["hl7"]["acked"]
    kinds = [message_type(t).split("^")[1] for t in unique]
    assert kinds.count("R01") > 100  # observations: every change and every period of a 5-day course
    assert kinds.count("R40") >= 4  # the occlusion and the link loss, each raised and cleared
    phases = {str(s[5]) for t in unique for s in hl7.parse(t).segments("OBX") if "PHASE" in str(s[3]).upper()}
    assert {"titrating", "holding", "stopped"} <= {p.split("^")[0].lower() for p in phases} or phases


def test_demo_hl7_to_is_checked() -> None:
    result = CliRunner().invoke(app, ["demo", "--hl7-to", "127.0.0.1"])
    assert result.exit_code == 2 and "--hl7-to" in result.output


def test_send_test_against_something_that_is_no_hl7_receiver() -> None:
    """A peer that answers garbage (or a non-ACK) is a one-line error, exit 1, never a traceback."""
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n\x0bnot hl7\x1c\r")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        result = CliRunner().invoke(app, ["hl7", "send-test", f"127.0.0.1:{port}", "--timeout", "5"])
        t.join(10)
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output
