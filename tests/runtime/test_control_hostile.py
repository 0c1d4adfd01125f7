"""A control client cannot exhaust the daemon (issue #11 item 4) and no hostile request escapes as an uncaught
exception (item 5). A real Daemon with sim:// pumps behind a real ControlServer on a Unix socket; hostile clients
are raw sockets in this process or in a separate client process (a different SO_PEERCRED peer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driverd.audit.reader import iter_lines, iter_records
from driverd.audit.replay import replay_lines
from driverd.audit.report import build_report
from driverd.audit.verify import verify_log
from driverd.core.canonical import canonical_bytes
from driverd.runtime.channel import Channel
from driverd.runtime.control import (
    MAX_REQUEST_BYTES,
    ControlError,
    RequestError,
    Throttle,
    exchange_sync,
    parse_request,
)
from tests.runtime.test_control import (
    BEFORE_FIRST_STEP,
    IDLE,
    TIMEOUT,
    LiveDaemon,
    _ops_logs_to_stderr,  # noqa: F401  # autouse fixture: operational logs to stderr
    short_dir,
    signed_doc,
)

STATUS = b'{"op": "status"}\n'


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(str(path))
    return s


class Dribblers:
    """Slow clients in this process: connected, half of them sending nothing, half a byte now and then."""

    def __init__(self, path: Path, n: int) -> None:
        self.socks = [_connect(path) for _ in range(n)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._dribble, daemon=True)
        self._thread.start()

    def _dribble(self) -> None:
        while not self._stop.wait(0.05):
            for s in self.socks[::2]:
                with contextlib.suppress(OSError):  # dropped by the server: fine
                    s.send(b" ")  # whitespace: never completes a request

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        for s in self.socks:
            s.close()


SLOW_CLIENT_PROCESS = textwrap.dedent("""
    import socket, sys, time
    socks = []
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sys.argv[1])
        s.send(b'{"op": "sta')  # a request that is never finished
        socks.append(s)
    print("connected", flush=True)
    for _ in range(600):  # a byte now and then, for at most a minute (the test kills us sooner)
        for s in socks:
            try:
                s.send(b" ")
            except OSError:
                pass
        time.sleep(0.1)
""")


@pytest.fixture
def slow_process() -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(path: Path, n: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CLIENT_PROCESS, str(path), str(n)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(TIMEOUT)


# ------------------------------------------------------------------------------------------------ slow-loris


@pytest.mark.parametrize("cap", [{"max_connections": 16, "max_connections_per_peer": 16}, {}],
                         ids=["cap-16-all-slow", "default-caps"])
def test_status_is_answered_with_16_slow_clients_connected(cap: dict[str, int]) -> None:
    # Read deadline far beyond the test: only the server's room-making can let the status request in.
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, read_timeout_s=600, **cap) as live:
        slow = Dribblers(live.socket, 16)
        try:
            reply = live.call({"op": "status"})
            assert reply["ok"] is True and [p["pump_id"] for p in reply["pumps"]] == ["bed-1", "bed-2"]
            assert live.courses() == IDLE  # and again: the cap stays usable
        finally:
            slow.close()


def test_slow_clients_in_another_process_cannot_lock_out_status(slow_process: Any) -> None:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, read_timeout_s=600) as live:
        slow_process(live.socket, 16)  # a different client process: held to its own per-process cap
        assert live.call({"op": "status"})["ok"] is True
        assert live.server is not None and live.server.evictions >= 8  # 16 tried, at most 8 were held


def test_a_request_dribbled_byte_by_byte_is_dropped_at_the_read_deadline() -> None:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, read_timeout_s=0.5) as live:
        s = _connect(live.socket)
        got = b""
        for byte in b'{"op": "command", "pump_id": "bed-1", "action": "stop", "by": "a", "reason": "b"}':
            try:
                s.send(bytes([byte]))
            except OSError:
                break  # the server dropped us
            threading.Event().wait(0.05)  # the whole line takes about 4 s: far past the 0.5 s deadline
        else:
            got = s.recv(100)
        assert got == b""  # closed without an answer: the request was never acted on
        s.close()
        assert live.call({"op": "status"})["ok"] is True
        assert not [r for r in live.audit_records() if r["event"] in ("clinician_command", "request_refused")]


def test_an_unfinished_line_is_not_acted_on() -> None:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP) as live:
        s = _connect(live.socket)
        s.sendall(b'{"op": "command", "pump_id": "bed-1", "action": "stop", "by": "a", "reason": "b"}')
        s.shutdown(socket.SHUT_WR)  # end of stream without the newline
        reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is False and "not terminated by a newline" in reply["error"]
        s.close()
        assert not [r for r in live.audit_records() if r["event"] == "clinician_command"]


# ------------------------------------------------------------------------------------------------ fairness


def test_one_process_backlog_does_not_delay_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_inflight_per_peer=1: of one process's three commands only one reaches the pump channel at a time,
    so another process's command is applied second, not fourth."""
    original = Channel.poll
    stuck, release = threading.Event(), threading.Event()

    async def poll(self: Channel) -> None:
        if self.pump_id == "bed-2" and self.polls == 1:
            stuck.set()
            for _ in range(int(TIMEOUT / 0.01)):  # bounded: never hangs the test
                if release.is_set():
                    break
                await asyncio.sleep(0.01)
        await original(self)

    def busy(live: LiveDaemon) -> int:
        assert live.server is not None
        return sum(c.busy for c in live.server._conns)

    def wait_busy(live: LiveDaemon, n: int) -> None:
        for _ in range(600):
            if busy(live) >= n:
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"{busy(live)} requests in progress, expected {n}")

    monkeypatch.setattr(Channel, "poll", poll)
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, max_inflight_per_peer=1, read_timeout_s=600,
                                      request_timeout_s=600) as live:
        assert stuck.wait(TIMEOUT)
        mine = []
        for i in range(3):
            s = _connect(live.socket)
            s.sendall(json.dumps({"op": "command", "pump_id": "bed-2", "action": "stop", "by": f"p1-{i}",
                                  "reason": "x"}).encode() + b"\n")
            mine.append(s)
            wait_busy(live, i + 1)  # in this order
        other = subprocess.Popen(
            [sys.executable, "-c", "import sys, json; from driverd.runtime.control import request_sync; "
             "print(json.dumps(request_sync(sys.argv[1], {'op': 'command', 'pump_id': 'bed-2', 'action': 'stop', "
             "'by': 'p2', 'reason': 'x'}, 60)))", str(live.socket)],
            stdout=subprocess.PIPE, text=True)
        try:
            wait_busy(live, 4)
            release.set()
            out, _ = other.communicate(timeout=TIMEOUT)
        finally:
            other.kill()
        assert json.loads(out)["refusals"][0]["reason"] == "illegal_transition"  # applied (idle: nothing to stop)
        for s in mine:
            assert json.loads(s.makefile("rb").readline())["refusals"][0]["reason"] == "illegal_transition"
            s.close()
        order = [r["by"] for r in live.audit_records() if r["event"] == "clinician_command"]
        assert order == ["p1-0", "p2", "p1-1", "p1-2"]


# ------------------------------------------------------------------------------------------------ bounds


def _command(**fields: Any) -> dict[str, Any]:
    return {"op": "command", "pump_id": "bed-1", "action": "hold", "by": "dr-a", "reason": "r", **fields}


BOUNDS: list[tuple[dict[str, Any] | bytes, str, str]] = [
    (_command(pump_id="p" * 65), "pump_id", "1..64"),
    (_command(pump_id="bed 1"), "pump_id", "1..64"),
    (_command(pump_id="bed-1\x00"), "pump_id", "1..64"),
    (_command(by="b" * 257), "by", "1..256"),
    (_command(by=""), "by", "1..256"),
    (_command(by="dr\nx"), "by", "control characters"),
    (_command(reason="r" * 10_000), "reason", "1..256"),
    (_command(reason="\x1b[2J"), "reason", "control characters"),
    (_command(action="a" * 33), "action", "1..32"),
    (_command(dose_mg_per_24h="1" * 33), "dose_mg_per_24h", "32"),
    ({"op": "push", "schedule": {"pump_id": "p" * 65}}, "schedule/pump_id", "64"),
    ({"op": "push", "schedule": {"pad": "x" * 70_000}}, "schedule", "65536"),
    (b'{"op": "push", "schedule": {"n": 1E+200}}', "schedule", "digits"),
]


def _enc(payload: dict[str, Any] | bytes) -> bytes:
    return payload if isinstance(payload, bytes) else canonical_bytes(payload)


@pytest.mark.parametrize(("payload", "field", "limit"), BOUNDS)
def test_fields_that_reach_the_audit_log_are_bounded(payload: dict[str, Any] | bytes, field: str, limit: str) -> None:
    try:
        parse_request(_enc(payload))
    except RequestError as exc:
        assert exc.field == field
        assert limit in exc.message
    else:
        raise AssertionError("accepted")


def test_bounded_fields_over_the_socket_change_nothing_and_log_nothing(live: LiveDaemon) -> None:
    for payload, field, limit in BOUNDS:
        reply = live.raw(_enc(payload) + b"\n")
        assert reply["ok"] is False and reply["field"] == field and limit in reply["error"], reply
    assert live.courses() == IDLE
    assert not [r for r in live.audit_records() if r["event"] in ("request_refused", "clinician_command")]


def test_limits_come_from_the_settings() -> None:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, max_request_bytes=2048, max_text_chars=8,
                                      max_schedule_bytes=1024) as live:
        reply = live.raw(b'{"op": "status", "pad": "' + b"x" * 3000 + b'"}\n')
        assert reply == {"ok": False, "error": "request larger than 2048 bytes", "field": None}
        reply = live.call(_command(by="123456789"))
        assert reply["field"] == "by" and "1..8" in reply["error"]
        reply = live.call({"op": "push", "schedule": {"pad": "x" * 1100}})
        assert reply["field"] == "schedule" and "1024" in reply["error"]
        reply = live.call(_command(by="12345678"))  # within the limit: reaches the course (idle: nothing to hold)
        assert reply["refusals"][0]["reason"] == "illegal_transition"
        assert live.courses() == IDLE


@pytest.fixture
def live() -> Iterator[LiveDaemon]:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP) as daemon:
        yield daemon


# ------------------------------------------------------------------------------------------------ refusal logging


def test_refusals_beyond_the_budget_are_answered_but_logged_as_one_summary() -> None:
    unsigned = {k: v for k, v in signed_doc().items() if k != "signature"}
    with short_dir() as d:
        live = LiveDaemon(d, BEFORE_FIRST_STEP, refusal_log_burst=3, refusal_log_per_minute=1)
        with live:
            for _ in range(40):
                reply = live.call({"op": "push", "schedule": unsigned})
                assert reply["ok"] is False and reply["refusals"][0]["reason"] == "unsigned"
            for _ in range(5):  # malformed requests: answered, their ops-log warnings throttled the same way
                assert live.raw(b"{oops\n")["ok"] is False
            assert live.call({"op": "status"})["ok"] is True
        records = live.audit_records()
        assert [r["reason"] for r in records if r["event"] == "request_refused"] == ["unsigned"] * 3
        summaries = [r for r in records if r["event"] == "request_refused_summary"]
        assert len(summaries) == 1  # written when the server closed (or once a minute while running)
        assert summaries[0]["refused"] == 37 and summaries[0]["reasons"] == {"unsigned": 37}
        assert verify_log(live.config.audit_dir).ok  # a regular, chained record
        assert replay_lines(iter_lines(live.config.audit_dir)).ok  # replay and report take it in their stride
        assert build_report(iter_records(live.config.audit_dir)) is not None


def test_throttle_refills_and_summarises() -> None:
    now = [0.0]
    t = Throttle(burst=2, per_minute=60, clock=lambda: now[0])
    key = ("uid", 1)
    assert [t.admit(key, "x") for _ in range(4)] == [True, True, False, False]
    assert t.admit(("uid", 2), "x") is True  # another user has its own budget
    now[0] += 1.0  # one token back
    assert t.admit(key, "y") is True
    assert t.take_summary(key) == {"x": 2}
    assert t.take_summary(key) is None
    assert t.admit(key, "z") is False
    now[0] += 600
    assert t.take_all() == {key: {"z": 1}}
    assert t._tokens == {}  # refilled buckets are forgotten


# ------------------------------------------------------------------------------------------------ fuzz


def _deep(n: int) -> bytes:
    return b'{"op": "push", "schedule": ' + b"[" * n + b"]" * n + b"}"


HOSTILE_LINES = [
    b'{"op": "command", "pump_id": "bed-1", "action": "reduce", "by": "a", "reason": "b", '
    b'"dose_mg_per_24h": 1e999999999}',
    b'{"op": "command", "pump_id": "bed-1", "action": "reduce", "by": "a", "reason": "b", '
    b'"dose_mg_per_24h": 1E+999999999999999999999}',
    b'{"op": "command", "pump_id": "bed-1", "action": "reduce", "by": "a", "reason": "b", '
    b'"dose_mg_per_24h": "1e999999999"}',
    b'{"op": "command", "pump_id": "bed-1", "action": "reduce", "by": "a", "reason": "b", '
    b'"dose_mg_per_24h": -0.0e-999999999}',
    b'{"op": "push", "schedule": {"hold_days": 1e999999999, "pump_id": "bed-1"}}',
    b'{"op": "push", "schedule": {"hold_days": 1E+999999999999999999999}}',
    b'{"op": "push", "schedule": {"version": ' + b"9" * 5000 + b"}}",
    _deep(100_000),
    _deep(60),
    b'{"op": "status", "\xff": 1}',
    b'{"op": "\xc0\xaf"}',
    b'{"op": "status\x00"}',
    b'{"op": "push", "schedule": {"pump_id": "\\ud800"}}',
    b'{"op": "command", "pump_id": "bed-1", "action": "hold", "by": "\\u0000", "reason": "b"}',
    b'{"op": "push", "schedule": {"patient_ref": "' + b"x" * 200_000 + b'"}}',
    b'{"' + b"k" * 100_000 + b'": 1}',
]


def _json_values() -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
               | st.sampled_from(["1e999999999", "\x00", "\ud800", "x" * 300, "-1", "NaN"])
               | st.decimals(allow_nan=False, allow_infinity=False))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                      max_size=4), max_leaves=12)


def _line(value: Any) -> bytes:
    try:
        return json.dumps(value, default=str).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return b"{}"


hostile_lines = st.one_of(
    st.sampled_from(HOSTILE_LINES),
    st.binary(max_size=400).map(lambda b: b.replace(b"\n", b" ")),
    st.builds(lambda op, k, v: _line({"op": op, k: v}),
              st.sampled_from(["status", "push", "command", "x"]),
              st.sampled_from(["schedule", "pump_id", "by", "reason", "action", "dose_mg_per_24h", "op", "zz"]),
              _json_values()),
    st.builds(lambda pid, act, by, reason, dose: _line({"op": "command", "pump_id": pid, "action": act, "by": by,
                                                          "reason": reason, "dose_mg_per_24h": dose}),
              _json_values(), st.sampled_from(["hold", "reduce", "nope", "\x00"]), _json_values(), _json_values(),
              _json_values()),
    st.builds(lambda doc: _line({"op": "push", "schedule": doc}), _json_values()),
)


def _check_reply(reply: dict[str, Any]) -> None:
    if reply["ok"] is True:
        assert "pumps" in reply  # only a status request can succeed here
        return
    if "refusals" in reply:  # refused by the daemon (and logged)
        assert reply["refusals"] and all(isinstance(r["reason"], str) for r in reply["refusals"])
    else:
        assert isinstance(reply["error"], str) and reply["error"]


def test_hostile_requests_over_the_socket_get_clear_answers_and_the_daemon_keeps_running() -> None:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP) as live:

        def check(line: bytes) -> None:
            if not line.strip():  # a blank line is skipped: the status request after it is answered
                line += b"\n" + STATUS[:-1]
            try:
                reply = exchange_sync(live.socket, line + b"\n", TIMEOUT)
            except ControlError as exc:  # the server closed the connection without any answer: a bug
                raise AssertionError(f"no answer to {line[:120]!r}: {exc}") from None
            _check_reply(reply)

        @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(hostile_lines)
        def fuzz(line: bytes) -> None:
            check(line)

        for line in HOSTILE_LINES:  # every named one, whatever hypothesis picks
            check(line)
        fuzz()
        assert live.call({"op": "status"})["ok"] is True
        assert live.courses() == IDLE


@settings(max_examples=500, deadline=None)
@given(hostile_lines)
def test_parse_request_on_hostile_lines_only_raises_request_error(line: bytes) -> None:
    try:
        parse_request(line)
    except RequestError as exc:
        assert exc.reply()["ok"] is False and exc.message


def test_oversized_request_without_newline_from_a_client_that_keeps_sending(live: LiveDaemon) -> None:
    s = _connect(live.socket)
    sent = 0
    try:
        while sent < 4 * MAX_REQUEST_BYTES:
            sent += s.send(b"x" * 65536)
    except OSError:
        pass  # the server answered and closed
    try:
        line = s.makefile("rb").readline()
    except OSError:  # reset: the server closed with our unread bytes pending
        line = b""
    assert not line or json.loads(line)["ok"] is False
    s.close()
    assert live.call({"op": "status"})["ok"] is True
