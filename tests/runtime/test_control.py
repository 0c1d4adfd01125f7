"""Control API over a real Unix socket: a real Daemon with sim:// pumps on a scaled clock, a ControlServer, and
the sync/async clients and the CLI talking to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from driverd.cli.main import app
from driverd.core.canonical import to_json_text
from driverd.core.schedule_parse import load_json
from driverd.runtime.channel import Channel
from driverd.runtime.clock import ScaledClock
from driverd.runtime.config import load_config
from driverd.runtime.control import (
    MAX_REQUEST_BYTES,
    CommandRequest,
    ControlError,
    ControlServer,
    ControlUnavailable,
    PushRequest,
    RequestError,
    StatusRequest,
    exchange,
    exchange_sync,
    parse_request,
    request,
    request_sync,
)
from driverd.runtime.daemon import Daemon
from driverd.runtime.service import configure_logging
from driverd.signing import generate_keypair, sign_document
from simulators.world import World

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
SIGNED = CONFIG / "schedules" / "example.signed.json"
DEMO_KEY = CONFIG / "keys" / "demo" / "demo-NOT-FOR-CLINICAL-USE.key"
BEFORE_FIRST_STEP = datetime(2026, 12, 1, 8, 55, tzinfo=UTC)
AFTER_FIRST_STEP = datetime(2026, 12, 1, 9, 0, 5, tzinfo=UTC)
AFTER_EXPIRY = datetime(2027, 7, 1, tzinfo=UTC)
TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _ops_logs_to_stderr() -> Iterator[None]:
    # As `driverd run` does: operational logs on stderr (here the real one, so CliRunner's stdout stays clean).
    configure_logging(sys.__stderr__, json_output=True)
    yield
    structlog.reset_defaults()


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="dd", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_config(d: Path, *, pumps: tuple[str, ...] = ("bed-1", "bed-2"), mode: str = "0660") -> Path:
    path = d / "driverd.toml"
    entries = "".join(f'\n[[pumps]]\nid = "{p}"\nurl = "sim://{p}"\n' for p in pumps)
    path.write_text(
        f'[daemon]\nprotocol = "{CONFIG}/protocols/ketamine-burst.toml"\ntrust_dir = "{CONFIG}/keys/demo/trusted"\n'
        f'audit_dir = "audit"\ncontrol_socket = "ctl.sock"\nsocket_mode = "{mode}"\npoll_period_s = 0.1\n'
        f"link_timeout_s = 5\ndeadman_s = 0\ndriver_timeout_s = 0.5\n{entries}",
        encoding="utf-8",
    )
    return path


class LiveDaemon:
    """Daemon + ControlServer running in a background thread's event loop (so blocking clients can call it)."""

    def __init__(self, d: Path, start: datetime, *, mode: str = "0660", **server_kw: Any) -> None:
        self.config = load_config(write_config(d, mode=mode))
        self.socket = self.config.control_socket
        self.start_at = start
        self.server_kw = server_kw
        self.server: ControlServer | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        clock = ScaledClock(self.start_at, 1.0)
        daemon = Daemon(self.config, clock, world=World(clock))
        await daemon.start()
        self.server = ControlServer(daemon, self.socket, self.config.socket_mode, **self.server_kw)
        await self.server.start()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close()
            await daemon.stop()

    def __enter__(self) -> LiveDaemon:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "daemon did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "daemon did not stop"

    def call(self, payload: dict[str, Any]) -> dict[str, Any]:
        return request_sync(self.socket, payload, TIMEOUT)

    def raw(self, data: bytes) -> dict[str, Any]:
        return exchange_sync(self.socket, data, TIMEOUT)

    def courses(self) -> list[tuple[str, str, Any]]:
        """The parts of status a refused request must not change."""
        reply = self.call({"op": "status"})
        assert reply["ok"] is True
        return [(p["pump_id"], p["phase"], p["course_id"]) for p in reply["pumps"]]

    def wait_phase(self, pump: str, phase: str) -> None:
        for _ in range(600):
            if (pump, phase) in [(p, ph) for p, ph, _ in self.courses()]:
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"{pump} never reached {phase}: {self.courses()}")

    def audit_records(self) -> list[dict[str, Any]]:
        out = []
        for f in sorted(self.config.audit_dir.glob("*.jsonl")):
            out += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        return out


@pytest.fixture
def live() -> Iterator[LiveDaemon]:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP) as daemon:
        yield daemon


def signed_doc() -> dict[str, Any]:
    doc = load_json(SIGNED.read_bytes())
    assert isinstance(doc, dict)
    return doc


def push(live: LiveDaemon, doc: Any) -> dict[str, Any]:
    return live.call({"op": "push", "schedule": doc})


IDLE = [("bed-1", "idle", None), ("bed-2", "idle", None)]


# ------------------------------------------------------------------------------------------------ status


def test_status_over_socket_lists_configured_pumps(live: LiveDaemon) -> None:
    reply = live.call({"op": "status"})
    assert reply["ok"] is True
    assert reply["now"].startswith("2026-12-01T08:5")
    assert [p["pump_id"] for p in reply["pumps"]] == ["bed-1", "bed-2"]
    assert live.courses() == IDLE


def test_async_client_gets_the_same_answer(live: LiveDaemon) -> None:
    reply = asyncio.run(asyncio.wait_for(request(live.socket, {"op": "status"}, TIMEOUT), TIMEOUT))
    assert reply["ok"] is True and len(reply["pumps"]) == 2


@pytest.mark.parametrize(("mode", "expected"), [("0660", 0o660), ("0600", 0o600)])
def test_socket_file_has_the_configured_mode(mode: str, expected: int) -> None:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, mode=mode) as live:
        st_ = live.socket.stat()
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == expected
    assert not live.socket.exists()  # removed on a clean stop


# ------------------------------------------------------------------------------------------------ push


def test_signed_schedule_accepted_then_replay_refused(live: LiveDaemon) -> None:
    reply = push(live, signed_doc())
    assert reply["ok"] is True, reply
    assert reply["schedule_id"] == "demo-course-0001" and reply["version"] == 1
    assert reply["key_id"] == "85ae298ab8d11af0"
    assert ("bed-1", "primed", "demo-course-0001") in live.courses()
    again = push(live, signed_doc())
    assert again["ok"] is False
    assert [r["reason"] for r in again["refusals"]] == ["replay"]
    assert ("bed-1", "primed", "demo-course-0001") in live.courses()



def _unsigned(doc: dict[str, Any], _tmp: Path) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "signature"}


def _wrong_key(doc: dict[str, Any], tmp: Path) -> dict[str, Any]:
    private, _ = generate_keypair(tmp, "intruder")
    return sign_document(doc, private)


def _altered(doc: dict[str, Any], _tmp: Path) -> dict[str, Any]:
    steps = [dict(s) for s in doc["steps"]]
    steps[0]["dose_mg_per_24h"] = "150"  # still a valid dose: only the signature can catch it
    return {**doc, "steps": steps}


def _wrong_pump(doc: dict[str, Any], _tmp: Path) -> dict[str, Any]:
    return sign_document({**doc, "pump_id": "bed-9"}, DEMO_KEY)


def _over_ceiling(doc: dict[str, Any], _tmp: Path) -> dict[str, Any]:
    steps = [dict(s) for s in doc["steps"]]
    steps[-1]["dose_mg_per_24h"] = "700"
    return sign_document({**doc, "steps": steps}, DEMO_KEY)


def _not_an_object(_doc: dict[str, Any], _tmp: Path) -> Any:
    return ["not", "a", "schedule"]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_unsigned, "unsigned"),
        (_wrong_key, "unknown_key"),
        (_altered, "bad_signature"),
        (_wrong_pump, "unknown_pump"),
        (_over_ceiling, "invalid"),
    ],
)
def test_bad_schedules_refused_with_reason_and_nothing_changes(
    live: LiveDaemon, tmp_path: Path, mutate: Callable[[dict[str, Any], Path], Any], reason: str
) -> None:
    reply = push(live, mutate(signed_doc(), tmp_path))
    assert reply["ok"] is False
    assert [r["reason"] for r in reply["refusals"]] == [reason]
    assert reply["refusals"][0]["detail"]
    assert live.courses() == IDLE
    # The refusal consumed nothing: the genuine schedule is still accepted afterwards.
    assert push(live, signed_doc())["ok"] is True
    refused = [r for r in live.audit_records() if r["event"] == "request_refused"]
    assert [r["reason"] for r in refused] == [reason]


def test_non_object_schedule_is_a_request_error(live: LiveDaemon) -> None:
    reply = push(live, _not_an_object(signed_doc(), Path()))
    assert reply == {"ok": False, "error": "required: the signed schedule as a JSON object", "field": "schedule"}
    assert live.courses() == IDLE


def test_expired_schedule_refused() -> None:
    with short_dir() as d, LiveDaemon(d, AFTER_EXPIRY) as live:
        reply = push(live, signed_doc())
        assert reply["ok"] is False
        assert reply["refusals"][0]["reason"] == "invalid"
        assert "expired" in reply["refusals"][0]["detail"]
        assert live.courses() == IDLE


def test_schedule_numbers_travel_as_their_literal_text(live: LiveDaemon) -> None:
    # Numbers (not strings) in the signed content: the request is parsed with Decimal, so "19.130" and 19.13
    # stay distinct values and the signature over the exact text still verifies.
    doc = signed_doc()
    doc["syringe"] = {**doc["syringe"], "inner_diameter_mm": Decimal("19.13")}
    resigned = sign_document(doc, DEMO_KEY)
    reply = push(live, resigned)
    assert reply["ok"] is True, reply


# ------------------------------------------------------------------------------------------------ malformed


MALFORMED: list[tuple[bytes, str | None]] = [
    (b"{not json\n", None),
    (b"[1, 2]\n", None),
    (b'"status"\n', None),
    (b"{}\n", "op"),
    (b'{"op": 7}\n', "op"),
    (b'{"op": "reboot"}\n', "op"),
    (b'{"op": "status", "extra": 1}\n', "extra"),
    (b'{"op": "status", "op": "status"}\n', None),
    (b'{"op": "push"}\n', "schedule"),
    (b'{"op": "push", "schedule": "x"}\n', "schedule"),
    (b'{"op": "command", "pump_id": 1, "action": "hold", "by": "a", "reason": "b"}\n', "pump_id"),
    (b'{"op": "command", "pump_id": "bed-1", "by": "a", "reason": "b"}\n', "action"),
    (b'{"op": "command", "pump_id": "bed-1", "action": "hold", "by": null, "reason": "b"}\n', "by"),
    (b'{"op": "command", "pump_id": "bed-1", "action": "hold", "by": "a", "reason": ["b"]}\n', "reason"),
    (b'{"op": "command", "pump_id": "bed-1", "action": "reduce", "by": "a", "reason": "b", '
     b'"dose_mg_per_24h": true}\n', "dose_mg_per_24h"),
    (b'{"op": "status", "n": NaN}\n', None),
    (b"\xff\xfe{}\n", None),
    (b'{"op": "status", "n": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", None),
]


@pytest.mark.parametrize(("line", "field"), MALFORMED)
def test_malformed_request_gets_error_reply_and_server_keeps_answering(
    live: LiveDaemon, line: bytes, field: str | None
) -> None:
    reply = live.raw(line)
    assert reply["ok"] is False
    assert isinstance(reply["error"], str) and reply["error"]
    if field is not None:
        assert reply["field"] == field
    assert live.courses() == IDLE


def test_oversized_request_gets_error_and_closes_then_server_answers(live: LiveDaemon) -> None:
    big = b'{"op": "status", "pad": "' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}\n'
    reply = live.raw(big)
    assert reply["ok"] is False
    assert "larger than" in reply["error"]
    # Also without a newline at all (a client that never ends its line).
    reply = live.raw(b"y" * (MAX_REQUEST_BYTES * 2))
    assert reply["ok"] is False and "larger than" in reply["error"]
    assert live.call({"op": "status"})["ok"] is True


def test_several_requests_on_one_connection_including_bad_ones(live: LiveDaemon) -> None:
    async def go() -> list[dict[str, Any]]:
        reader, writer = await asyncio.open_unix_connection(str(live.socket))
        writer.write(b'{"op": "status"}\n\n{oops\n{"op": "status"}\n')
        await writer.drain()
        replies = [json.loads(await reader.readline()) for _ in range(3)]
        writer.close()
        await writer.wait_closed()
        return replies

    first, bad, last = asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert first["ok"] is True and last["ok"] is True
    assert bad["ok"] is False and "JSON" in bad["error"]


def test_connection_limit_and_read_timeout() -> None:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, max_connections=2, read_timeout_s=0.5) as live:
        idle = []
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(TIMEOUT)
            s.connect(str(live.socket))
            s.sendall(b'{"op": "sta')  # a partial request, never finished
            idle.append(s)
        # Both slots are taken by idle clients: a third client makes room by closing the longest idle one (or,
        # once the read timeout dropped the slow clients, finds a free slot).
        reply = live.call({"op": "status"})
        assert reply["ok"] is True
        for s in idle:
            try:
                data = s.recv(100)
            except ConnectionResetError:  # closed with its partial request unread
                data = b""
            assert data == b""  # the server closed the slow connection without acting on it
            s.close()
        assert live.call({"op": "status"})["ok"] is True
        assert live.courses() == IDLE


def test_an_idle_connection_makes_room_for_a_new_one() -> None:
    # read timeout far beyond the test: only the cap can free the slot.
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, max_connections=2, max_connections_per_peer=1,
                                      read_timeout_s=600) as live:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(str(live.socket))
        s.sendall(b'{"op": "status"}\n')
        reader = s.makefile("rb")
        assert json.loads(reader.readline())["ok"] is True  # this connection holds the only slot, idle now
        assert live.call({"op": "status"})["ok"] is True  # the idle one was closed to make room
        assert reader.readline() == b""
        reader.close()
        s.close()


def test_busy_reply_when_all_slots_are_working(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only connections with a request being worked on are never closed: when all are, a newcomer is told so."""
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

    monkeypatch.setattr(Channel, "poll", poll)
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, max_connections=2, read_timeout_s=600,
                                      request_timeout_s=600) as live:
        assert stuck.wait(TIMEOUT)
        held = []
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(TIMEOUT)
            s.connect(str(live.socket))
            s.sendall(b'{"op": "command", "pump_id": "bed-2", "action": "stop", "by": "a", "reason": "b"}\n')
            held.append(s)
        assert live.server is not None
        for _ in range(600):  # both requests have reached the daemon (seen from the server's side)
            if sum(c.busy for c in live.server._conns) == 2:
                break
            threading.Event().wait(0.05)
        busy = live.call({"op": "status"})
        assert busy == {"ok": False, "error": "too many connections; try again", "field": None}
        release.set()
        for s in held:  # both commands were applied (bed-2 is idle: nothing to stop) and answered
            reply = json.loads(s.makefile("rb").readline())
            assert reply["refusals"][0]["reason"] == "illegal_transition"
        assert live.call({"op": "status"})["ok"] is True  # idle again: they make room
        for s in held:
            s.close()


@given(st.binary(max_size=300))
def test_parse_request_only_ever_raises_request_error(data: bytes) -> None:
    try:
        parsed = parse_request(data)
    except RequestError as exc:
        assert exc.reply()["ok"] is False
    else:
        assert isinstance(parsed, (StatusRequest, PushRequest, CommandRequest))


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=10))
def test_parse_request_json_values(value: object) -> None:
    line = json.dumps({"op": "command", "pump_id": value, "action": "hold", "by": "a", "reason": "b"}).encode()
    try:
        parsed = parse_request(line)
    except RequestError as exc:
        assert exc.field == "pump_id"
    else:
        assert isinstance(parsed, CommandRequest) and parsed.pump_id == value


def test_parse_request_accepts_the_three_ops() -> None:
    assert parse_request(b'{"op":"status"}') == StatusRequest()
    cmd = parse_request(
        b'{"op":"command","pump_id":"p","action":"reduce","by":"a","reason":"r","dose_mg_per_24h":50.0}'
    )
    assert cmd == CommandRequest("p", "reduce", "a", "r", Decimal("50.0"))
    push_ = parse_request(b'{"op":"push","schedule":{"hold_days":3.10}}')
    assert isinstance(push_, PushRequest)
    assert str(push_.schedule["hold_days"]) == "3.10"  # the literal text, not a binary float


# ------------------------------------------------------------------------------------------------ socket file


def test_stale_socket_is_replaced_but_live_one_and_regular_file_are_not() -> None:
    with short_dir() as d:
        path = d / "s.sock"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()  # left behind, nobody listening

        class NoDaemon:
            async def push_schedule(self, doc: Any) -> dict[str, Any]:
                return {"ok": False}

            async def command(self, *a: Any, **k: Any) -> dict[str, Any]:
                return {"ok": False}

            def status(self) -> dict[str, Any]:
                return {"ok": True, "pumps": []}

        async def go() -> None:
            first = ControlServer(NoDaemon(), path, 0o600)
            await first.start()  # stale socket removed
            assert await exchange(path, b'{"op":"status"}\n', TIMEOUT) == {"ok": True, "pumps": []}
            second = ControlServer(NoDaemon(), path, 0o600)
            with pytest.raises(ControlError, match="already running"):
                await second.start()
            assert await exchange(path, b'{"op":"status"}\n', TIMEOUT) == {"ok": True, "pumps": []}
            await first.close()
            assert not path.exists()
            path.write_text("precious")
            with pytest.raises(ControlError, match="not a socket"):
                await ControlServer(NoDaemon(), path, 0o600).start()
            assert path.read_text() == "precious"
            with pytest.raises(ControlError, match="longer than"):
                await ControlServer(NoDaemon(), d / ("x" * 120), 0o600).start()

        asyncio.run(asyncio.wait_for(go(), TIMEOUT))


def test_clients_report_an_absent_daemon() -> None:
    with short_dir() as d:
        with pytest.raises(ControlUnavailable, match="cannot reach driverd at"):
            request_sync(d / "none.sock", {"op": "status"}, 1.0)
        with pytest.raises(ControlUnavailable, match="cannot reach driverd at"):
            asyncio.run(request(d / "none.sock", {"op": "status"}, 1.0))


# ------------------------------------------------------------------------------------------------ CLI


runner = CliRunner()


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_cli_push_status_and_course_commands_against_live_socket(tmp_path: Path) -> None:
    with short_dir() as d:
        live = LiveDaemon(d, AFTER_FIRST_STEP)
        with live:
            sock = str(live.socket)
            res = cli("schedule", "push", str(SIGNED), "--socket", sock)
            assert res.exit_code == 0, res.output
            assert "ACCEPTED" in res.output and "demo-course-0001" in res.output
            res = cli("schedule", "push", str(SIGNED), "--socket", sock, "--json")
            assert res.exit_code == 1
            body = json.loads(res.stdout)
            assert body["ok"] is False and body["refusals"][0]["reason"] == "replay"
            live.wait_phase("bed-1", "titrating")  # the first step is automatic and due

            res = cli("course", "hold", "bed-1", "--by", "dr-a", "--reason", "comfortable", "--socket", sock)
            assert res.exit_code == 0, res.output
            assert "phase holding" in res.output
            res = cli("course", "resume", "bed-1", "--by", "dr-a", "--reason", "x", "--socket", sock)
            assert res.exit_code == 1
            assert "illegal_transition" in res.output
            res = cli("course", "reduce", "bed-1", "--by", "dr-a", "--reason", "x", "--dose", "lots",
                      "--socket", sock)
            assert res.exit_code == 2
            res = cli("course", "stop", "bed-1", "--by", "dr-a", "--reason", "done", "--socket", sock, "--json")
            assert res.exit_code == 0, res.output
            assert json.loads(res.stdout)["phase"] == "stopped"

            res = cli("status", "--socket", sock)
            assert res.exit_code == 0
            assert "bed-1" in res.output and "stopped" in res.output
            res = cli("status", "--socket", sock, "--json")
            assert res.exit_code == 0
            pumps = {p["pump_id"]: p for p in json.loads(res.stdout)["pumps"]}
            assert pumps["bed-1"]["phase"] == "stopped" and pumps["bed-2"]["phase"] == "idle"

            # The socket from --config (the daemon's own config file) works the same.
            res = cli("status", "--config", str(live.config.path), "--json")
            assert res.exit_code == 0 and json.loads(res.stdout)["ok"] is True
        # Every clinician command that reached the core is in the audit log, with who and why (refused ones too).
        records = live.audit_records()
        actions = [(r["action"], r["by"], r["reason"]) for r in records if r["event"] == "clinician_command"]
        assert actions == [("hold", "dr-a", "comfortable"), ("resume", "dr-a", "x"), ("stop", "dr-a", "done")]


def test_cli_refusals_and_errors_exit_codes(tmp_path: Path) -> None:
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP) as live:
        sock = str(live.socket)
        unsigned = tmp_path / "unsigned.json"
        unsigned.write_text(to_json_text(_unsigned(signed_doc(), tmp_path)), encoding="utf-8")
        res = cli("schedule", "push", str(unsigned), "--socket", sock)
        assert res.exit_code == 1
        assert "REFUSED" in res.output and "unsigned" in res.output
        garbage = tmp_path / "garbage.json"
        garbage.write_text("{nope", encoding="utf-8")
        res = cli("schedule", "push", str(garbage), "--socket", sock, "--json")
        assert res.exit_code == 1
        assert json.loads(res.stdout)["ok"] is False
        res = cli("schedule", "push", str(tmp_path / "missing.json"), "--socket", sock)
        assert res.exit_code == 2
        res = cli("course", "hold", "bed-7", "--by", "dr-a", "--reason", "x", "--socket", sock)
        assert res.exit_code == 1 and "unknown pump" in res.output
        res = cli("course", "hold", "bed-1", "--reason", "x", "--socket", sock)  # missing --by
        assert res.exit_code == 2
        assert live.courses() == IDLE


def test_cli_daemon_not_running_and_bad_config(tmp_path: Path) -> None:
    with short_dir() as d:
        sock = d / "gone.sock"
        for args in (("status",), ("schedule", "push", str(SIGNED)),
                     ("course", "stop", "bed-1", "--by", "a", "--reason", "b")):
            res = cli(*args, "--socket", str(sock))
            assert res.exit_code == 1, args
            assert f"cannot reach driverd at {sock}" in res.output
            res = cli(*args, "--socket", str(sock), "--json")
            assert res.exit_code == 1
            assert json.loads(res.stdout)["error"]["message"].startswith(f"cannot reach driverd at {sock}")
    res = cli("status", "--config", str(tmp_path / "nope.toml"))
    assert res.exit_code == 1  # a missing config is exit 1 in every command
    assert "cannot use config" in res.output
    assert "Traceback" not in res.output


def test_socket_path_removed_after_stop_even_with_open_client() -> None:
    with short_dir() as d:
        live = LiveDaemon(d, BEFORE_FIRST_STEP)
        with live:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(TIMEOUT)
            s.connect(str(live.socket))
            s.sendall(b'{"op": "status"}\n')
            reader = s.makefile("rb")
            assert json.loads(reader.readline())["ok"] is True  # the server now holds this connection
        assert reader.readline() == b""  # closed by the server on stop
        reader.close()
        s.close()
        assert not os.path.exists(live.socket)


def test_request_to_a_stuck_channel_times_out_as_unknown_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Channel.poll
    stuck = threading.Event()

    async def poll(self: Channel) -> None:
        if self.pump_id == "bed-2" and self.polls >= 1:
            stuck.set()
            await asyncio.Event().wait()  # stuck: never gets back to its inbox
        await original(self)

    monkeypatch.setattr(Channel, "poll", poll)
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, request_timeout_s=0.3) as live:
        assert stuck.wait(TIMEOUT)
        reply = live.call({"op": "command", "pump_id": "bed-2", "action": "stop", "by": "a", "reason": "b"})
        assert reply["ok"] is False
        assert "may still take effect" in reply["error"]
        assert live.call({"op": "status"})["ok"] is True  # the server is not held up by the stuck channel


def test_a_request_whose_caller_gave_up_is_never_applied_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client was told "outcome unknown"; when the stuck channel comes back it must skip the request (and
    log `request_expired`), not act on a clinician command minutes late."""
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

    monkeypatch.setattr(Channel, "poll", poll)
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP, request_timeout_s=0.3) as live:
        assert stuck.wait(TIMEOUT)
        reply = live.call({"op": "command", "pump_id": "bed-2", "action": "stop", "by": "dr-late",
                           "reason": "urgent"})
        assert reply["ok"] is False and "withdrawn" in reply["error"]
        release.set()
        for _ in range(600):
            expired = [r for r in live.audit_records() if r["event"] == "request_expired"]
            if expired:
                break
            threading.Event().wait(0.05)
        assert [(r["pump_id"], r["request"]) for r in expired] == [("bed-2", "clinician stop by dr-late: urgent")]
        assert not [r for r in live.audit_records() if r["event"] == "clinician_command"]
        # The channel is alive and answers new requests at once.
        fresh = live.call({"op": "command", "pump_id": "bed-2", "action": "stop", "by": "dr-now", "reason": "x"})
        assert fresh["refusals"][0]["reason"] == "illegal_transition"  # idle: nothing to stop, but it was applied
        commands = [r for r in live.audit_records() if r["event"] == "clinician_command"]
        assert [(r["pump_id"], r["by"]) for r in commands] == [("bed-2", "dr-now")]


def test_cli_change_syringe_against_live_socket(tmp_path: Path) -> None:
    """`driverd course change-syringe` (issue 13): refusals name the rule; a change while the pump runs stops it,
    the second command (after the swap) resumes at the same level."""
    with short_dir() as d:
        live = LiveDaemon(d, AFTER_FIRST_STEP)
        with live:
            sock = str(live.socket)
            assert cli("schedule", "push", str(SIGNED), "--socket", sock).exit_code == 0
            live.wait_phase("bed-1", "titrating")
            base = ("course", "change-syringe", "bed-1", "--by", "rn-1", "--reason", "daily", "--socket", sock)
            res = cli(*base, "--fill", "lots")
            assert res.exit_code == 2
            res = cli(*base, "--fill", "18")  # above the 20 mL model's 17 mL
            assert res.exit_code == 1 and "fill_volume" in res.output
            res = cli(*base, "--fill", "17", "--concentration", "100")  # in the library, not in the signed schedule
            assert res.exit_code == 1 and "concentration_not_approved" in res.output
            res = cli(*base, "--fill", "17", "--json")
            assert res.exit_code == 0, res.output
            body = json.loads(res.stdout)
            assert body["phase"] == "paused" and body["syringe"]["change_in_progress"]["fill_ml"] == "17"
            res = cli(*base, "--fill", "17")
            assert res.exit_code == 0, res.output
            assert "phase titrating" in res.output and "syringe at 50 mg/mL" in res.output
            assert "pump runs 0.083 mL/h (99.6 mg/24h), verified; course level 100 mg/24h; record seq" in res.output
            res = cli("status", "--socket", sock)
            assert "syringe 2: 17.000 of 17 mL at 50 mg/mL left" in res.output
