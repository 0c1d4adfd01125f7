"""The control API: JSON lines over a Unix domain socket, and the clients the CLI uses.

Wire format: one JSON object per line each way.

    {"op": "status"}
    {"op": "push", "schedule": {...signed schedule...}}
    {"op": "command", "pump_id": "bed-1", "action": "hold", "by": "dr-x", "reason": "...",
     "dose_mg_per_24h": "100"}                       (dose optional; a string or an exact number)

Replies are the daemon's answer (`{"ok": true, ...}` or `{"ok": false, "refusals": [...]}`), or for a request
that is not understood `{"ok": false, "error": "...", "field": "..."|null}`. Requests are parsed like schedule
documents (load_json: numbers as Decimal from their literal text, no duplicate keys, no NaN), so a pushed
schedule reaches the signature check with exactly the values that were signed.

Access control is the socket file's mode and group (only the daemon's group can connect). Every connection is
handled in its own task behind a catch-all: a malformed, oversized or slow request gets an error reply (or is
closed) and never reaches or stops the daemon's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import os
import socket
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from driverd.core.canonical import canonical_bytes
from driverd.core.errors import DriverdError, ValidationError
from driverd.core.schedule_parse import load_json

MAX_REQUEST_BYTES: Final = 256 * 1024
MAX_REPLY_BYTES: Final = 8 * 1024 * 1024
MAX_CONNECTIONS: Final = 16
READ_TIMEOUT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 30.0
MAX_SOCKET_PATH: Final = 107  # sun_path is 108 bytes including the terminating NUL

log = structlog.get_logger("driverd.control")


class ControlError(DriverdError):
    """The control socket cannot be set up, or a client exchange failed."""


class ControlUnavailable(ControlError):
    """No daemon answers at the socket path (missing, refused, or no permission)."""


class RequestError(DriverdError):
    """A request that is not understood: `field` names the offending member (None for the whole line)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.message = message
        self.field = field
        super().__init__(message if field is None else f"{field}: {message}")

    def reply(self) -> dict[str, Any]:
        return {"ok": False, "error": self.message, "field": self.field}


# --------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class StatusRequest:
    pass


@dataclass(frozen=True, slots=True)
class PushRequest:
    schedule: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CommandRequest:
    pump_id: str
    action: str
    by: str
    reason: str
    dose_mg_per_24h: str | int | Decimal | None = None


Request = StatusRequest | PushRequest | CommandRequest

_FIELDS: Final[dict[str, frozenset[str]]] = {
    "status": frozenset({"op"}),
    "push": frozenset({"op", "schedule"}),
    "command": frozenset({"op", "pump_id", "action", "by", "reason", "dose_mg_per_24h"}),
}


def parse_request(line: bytes) -> Request:
    """One request line -> a typed request, or RequestError naming the field and the rule."""
    if len(line) > MAX_REQUEST_BYTES:
        raise RequestError(f"request larger than {MAX_REQUEST_BYTES} bytes")
    try:
        doc = load_json(line)
    except ValidationError as exc:
        first = exc.problems[0] if exc.problems else None
        raise RequestError(first.detail if first else "invalid JSON", (first.path or None) if first else None) from None
    if not isinstance(doc, Mapping):
        raise RequestError("a request is a JSON object")
    op = doc.get("op")
    if not isinstance(op, str):
        raise RequestError("required string: one of " + ", ".join(_FIELDS), "op")
    allowed = _FIELDS.get(op)
    if allowed is None:
        raise RequestError(f"unknown op {op[:40]!r}; expected one of " + ", ".join(_FIELDS), "op")
    for key in doc:
        if key not in allowed:
            raise RequestError(f"unknown field for op {op!r}", str(key)[:64])
    if op == "status":
        return StatusRequest()
    if op == "push":
        schedule = doc.get("schedule")
        if not isinstance(schedule, Mapping):
            raise RequestError("required: the signed schedule as a JSON object", "schedule")
        return PushRequest(schedule)
    texts: dict[str, str] = {}
    for name in ("pump_id", "action", "by", "reason"):
        value = doc.get(name)
        if not isinstance(value, str):
            raise RequestError("required string", name)
        texts[name] = value
    dose = doc.get("dose_mg_per_24h")
    if dose is not None and (isinstance(dose, bool) or not isinstance(dose, (str, int, Decimal))):
        raise RequestError("a decimal string or number", "dose_mg_per_24h")
    return CommandRequest(texts["pump_id"], texts["action"], texts["by"], texts["reason"], dose)


def encode_request(payload: Mapping[str, Any]) -> bytes:
    """Exact encoding (Decimal stays its literal value; binary floats are refused) plus the line end."""
    return canonical_bytes(payload) + b"\n"


def _json_default(obj: object) -> Any:
    if isinstance(obj, Decimal):
        return format(obj, "f")
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return str(obj)


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    return json.dumps(reply, default=_json_default, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def decode_reply(line: bytes) -> dict[str, Any]:
    if not line:
        raise ControlError("the daemon closed the connection without a reply")
    try:
        doc = json.loads(line.decode("utf-8"), parse_float=Decimal)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError(f"unreadable reply from the daemon: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise ControlError("unreadable reply from the daemon: not an object with 'ok'")
    return doc


# --------------------------------------------------------------------------------------------- server


class DaemonAPI(Protocol):
    """What the server needs from driverd.runtime.daemon.Daemon."""

    async def push_schedule(self, doc: Any) -> dict[str, Any]: ...

    async def command(self, pump_id: Any, action: Any, by: Any, reason: Any, dose: Any = None) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...


def _reasons(reply: Mapping[str, Any]) -> list[Any]:
    refusals = reply.get("refusals")
    if not isinstance(refusals, list):
        return []
    return [r.get("reason") for r in refusals if isinstance(r, Mapping)]


def _log_late(op: str, peer: dict[str, int], fut: asyncio.Future[dict[str, Any]]) -> None:
    """The outcome of a request whose client was already told "unknown" (for the operational log)."""
    if fut.cancelled():
        # Skipped by the channel unless it had already started it (then it completed: see the audit log).
        log.warning("control_request_late_result", op=op, outcome="withdrawn", **peer)
    elif fut.exception() is not None:
        log.error("control_request_late_result", op=op, outcome=f"error: {fut.exception()!r}", **peer)
    else:
        reply = fut.result()
        log.warning("control_request_late_result", op=op, ok=reply.get("ok") is True, refusals=_reasons(reply),
                    **peer)


def _peer(writer: asyncio.StreamWriter) -> dict[str, int]:
    """The connecting process (pid, uid, gid) from SO_PEERCRED, for the operational log."""
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except (AttributeError, OSError):
        return {}
    return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}


class ControlServer:
    def __init__(
        self,
        daemon: DaemonAPI,
        path: Path,
        mode: int = 0o660,
        group: str | int | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout_s: float = READ_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.daemon = daemon
        self.path = Path(path)
        self.mode = mode
        self.group = group
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.request_timeout_s = request_timeout_s
        self.requests = 0  # requests answered (including error replies)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._inode: int | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ControlError(f"control socket path longer than {MAX_SOCKET_PATH} bytes: {self.path}")
        self._prepare_path()
        # Bind with no access for anyone but us, then open up to the configured mode: no window in which
        # the socket exists with the process umask's (possibly wider) permissions.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path),
                                                           limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old)
        try:
            if self.group is not None:
                gid = self.group if isinstance(self.group, int) else grp.getgrnam(self.group).gr_gid
                os.chown(self.path, -1, gid)
            os.chmod(self.path, self.mode)
            self._inode = self.path.stat().st_ino
        except (OSError, KeyError) as exc:
            await self.close()
            raise ControlError(f"cannot set owner/mode of {self.path}: {exc}") from None
        log.info("control_listening", socket=str(self.path), mode=f"{self.mode:04o}")

    def _prepare_path(self) -> None:
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            st = self.path.lstat()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it")
        # A socket file is left over after a crash. Only a socket nobody listens on is stale: never steal a
        # running daemon's socket (two daemons driving the same pumps would be a hazard).
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
            self.path.unlink()
            log.info("control_stale_socket_removed", socket=str(self.path))
            return
        finally:
            probe.close()
        raise ControlError(f"another process is listening on {self.path}; is driverd already running?")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
            self._server = None
        # Remove the socket file only if it is still ours (not a successor daemon's).
        with contextlib.suppress(OSError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    # ------------------------------------------------------------------------------------------ connections

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if len(self._writers) >= self.max_connections:
            log.warning("control_busy", **peer)
            await self._send(writer, {"ok": False, "error": "too many connections; try again", "field": None})
            await self._close(writer)
            return
        self._writers.add(writer)
        try:
            await self._serve(reader, writer, peer)
        except Exception as exc:  # a broken connection must never reach the daemon
            log.warning("control_connection_error", error=f"{type(exc).__name__}: {exc}", **peer)
        finally:
            self._writers.discard(writer)
            await self._close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: dict[str, int]) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=self.read_timeout_s)
            except TimeoutError:
                return  # idle or too slow: drop the connection (no partial request is ever acted on)
            except (ValueError, asyncio.LimitOverrunError):
                # StreamReader limit: the line is longer than MAX_REQUEST_BYTES. The stream position is now
                # unknown, so answer and close.
                self.requests += 1
                log.warning("control_request_rejected", error="oversized", **peer)
                await self._send(writer, RequestError(f"request larger than {MAX_REQUEST_BYTES} bytes").reply())
                return
            if not line:
                return
            if not line.strip():
                continue
            reply = await self._dispatch(line, peer)
            self.requests += 1
            if not await self._send(writer, reply):
                return

    async def _dispatch(self, line: bytes, peer: dict[str, int]) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except RequestError as exc:
            log.warning("control_request_rejected", error=exc.message, field=exc.field, **peer)
            return exc.reply()
        op = type(request).__name__.removesuffix("Request").lower()
        call = asyncio.ensure_future(self._call(request))
        try:
            reply = await asyncio.wait_for(asyncio.shield(call), timeout=self.request_timeout_s)
        except TimeoutError:
            # Withdraw it: a pump channel that has not reached the request yet skips it and logs
            # `request_expired` (a command applied minutes after the client gave up is a hazard). One the channel
            # has already started is finished and logged there (never half done): so the outcome is unknown.
            call.cancel()
            log.error("control_request_timeout", op=op, outcome="withdrawn unless already started", **peer)
            call.add_done_callback(lambda f: _log_late(op, peer, f))
            return {"ok": False, "field": None,
                    "error": f"no answer within {self.request_timeout_s:g} s; the request is withdrawn unless the "
                             "daemon had already started it, so it may still take effect: check `driverd status`"}
        except Exception as exc:
            log.exception("control_request_failed", op=op, **peer)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}", "field": None}
        log.info("control_request", op=op, ok=reply.get("ok") is True, refusals=_reasons(reply), **peer)
        return reply

    async def _call(self, request: Request) -> dict[str, Any]:
        if isinstance(request, StatusRequest):
            return self.daemon.status()
        if isinstance(request, PushRequest):
            return await self.daemon.push_schedule(request.schedule)
        return await self.daemon.command(request.pump_id, request.action, request.by, request.reason,
                                         request.dose_mg_per_24h)

    async def _send(self, writer: asyncio.StreamWriter, reply: Mapping[str, Any]) -> bool:
        try:
            writer.write(encode_reply(reply))
            await asyncio.wait_for(writer.drain(), timeout=self.read_timeout_s)
        except (OSError, TimeoutError, RuntimeError):
            return False
        return True

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), timeout=1)


# --------------------------------------------------------------------------------------------- clients


def _unavailable(path: Path, exc: OSError) -> ControlUnavailable:
    return ControlUnavailable(f"cannot reach driverd at {path}: {exc.strerror or exc}")


async def request(path: Path, payload: Mapping[str, Any], timeout_s: float = REQUEST_TIMEOUT_S + 5) -> dict[str, Any]:
    """Send one request, return the reply (asyncio). Raises ControlUnavailable / ControlError."""
    return await exchange(path, encode_request(payload), timeout_s)


async def exchange(path: Path, data: bytes, timeout_s: float) -> dict[str, Any]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=MAX_REPLY_BYTES),
                                                timeout=timeout_s)
    except TimeoutError:
        raise ControlUnavailable(f"cannot reach driverd at {path}: connect timed out") from None
    except OSError as exc:
        raise _unavailable(Path(path), exc) from None
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):  # the server may answer (too large) before reading it all
            await asyncio.wait_for(writer.drain(), timeout=timeout_s)
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=timeout_s)
        except TimeoutError:
            raise ControlError(f"no reply from driverd within {timeout_s:g} s") from None
        except (ValueError, ConnectionError) as exc:
            raise ControlError(f"bad reply from driverd: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return decode_reply(line)


def request_sync(path: Path, payload: Mapping[str, Any], timeout: float = REQUEST_TIMEOUT_S + 5) -> dict[str, Any]:
    """Blocking client for the CLI (no event loop needed)."""
    return exchange_sync(path, encode_request(payload), timeout)


def exchange_sync(path: Path, data: bytes, timeout: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(os.fsencode(path))
        except TimeoutError:
            raise ControlUnavailable(f"cannot reach driverd at {path}: connect timed out") from None
        except OSError as exc:
            raise _unavailable(Path(path), exc) from None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        buf = bytearray()
        try:
            while b"\n" not in buf and len(buf) <= MAX_REPLY_BYTES:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise ControlError(f"no reply from driverd within {timeout:g} s") from None
        except OSError as exc:
            if not buf:
                raise ControlError(f"connection to driverd failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    line, _, _ = bytes(buf).partition(b"\n")
    return decode_reply(line)
