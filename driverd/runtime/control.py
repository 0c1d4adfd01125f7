"""The control API: JSON lines over a Unix domain socket, and the clients the CLI uses.

Wire format: one JSON object per line each way.

    {"op": "status"}
    {"op": "push", "schedule": {...signed schedule...}}
    {"op": "command", "pump_id": "bed-1", "action": "hold", "by": "dr-x", "reason": "...",
     "dose_mg_per_24h": "100"}                       (dose optional; a string or an exact number)
    {"op": "change_syringe", "pump_id": "bed-1", "fill_volume_ml": "17", "concentration_mg_per_ml": "50",
     "by": "rn-x", "reason": "..."}                  (concentration optional: default the one in use)

Replies are the daemon's answer (`{"ok": true, ...}` or `{"ok": false, "refusals": [...]}`), or for a request
that is not understood `{"ok": false, "error": "...", "field": "..."|null}`. Requests are parsed like schedule
documents (load_json: numbers as Decimal from their literal text, no duplicate keys, no NaN), so a pushed
schedule reaches the signature check with exactly the values that were signed.

Access control is the socket file's mode and group (only the daemon's group can connect). Every connection is
handled in its own task behind a catch-all: a malformed, oversized or slow request gets an error reply (or is
closed) and never reaches or stops the daemon's loop.

What one client can cost is bounded (ControlSettings, `[control]` in driverd.toml; docs/operations.md):
- every text that can reach the audit log (pump id, by, reason, action, dose) and the pushed schedule's size
  are checked here, before the daemon sees them; the request line itself is size-limited;
- a whole request line must arrive within read_timeout_s, else the connection is dropped unanswered;
- connections are capped in total and per client process (SO_PEERCRED pid). A new connection over a cap makes
  room by closing an idle one (no request being worked on): that of the process holding the most connections,
  the longest idle first. So slow or silent clients cannot lock out a status request; only connections that
  are all busy with requests make a newcomer wait ("too many connections");
- one process has at most max_inflight_per_peer push/command requests being worked on; its others wait;
- refusals logged one by one are a token bucket per client user (uid): the excess is still answered but is
  counted and logged as one `request_refused_summary` record (audit) / `control_warnings_suppressed` (ops log).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import grp
import json
import os
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from driverd.core.canonical import canonical_bytes, decimal_text
from driverd.core.errors import DriverdError, ValidationError
from driverd.core.schedule_parse import load_json
from driverd.runtime.config import CONTROL_CHARS, ControlSettings, valid_pump_id

DEFAULT_LIMITS: Final = ControlSettings()
MAX_REQUEST_BYTES: Final = DEFAULT_LIMITS.max_request_bytes
MAX_REPLY_BYTES: Final = 8 * 1024 * 1024
MAX_CONNECTIONS: Final = DEFAULT_LIMITS.max_connections
READ_TIMEOUT_S: Final = DEFAULT_LIMITS.read_timeout_s
REQUEST_TIMEOUT_S: Final = DEFAULT_LIMITS.request_timeout_s
MAX_SOCKET_PATH: Final = 107  # sun_path is 108 bytes including the terminating NUL
MAX_ACTION_CHARS: Final = 32
MAX_DOSE_CHARS: Final = 32
SUMMARY_EVERY_S: Final = 60.0  # suppressed refusals are summarised at least this often

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


@dataclass(frozen=True, slots=True)
class ChangeSyringeRequest:
    pump_id: str
    fill_volume_ml: Decimal
    concentration_mg_per_ml: Decimal | None
    by: str
    reason: str


Request = StatusRequest | PushRequest | CommandRequest | ChangeSyringeRequest

_FIELDS: Final[dict[str, frozenset[str]]] = {
    "status": frozenset({"op"}),
    "push": frozenset({"op", "schedule"}),
    "command": frozenset({"op", "pump_id", "action", "by", "reason", "dose_mg_per_24h"}),
    "change_syringe": frozenset({"op", "pump_id", "fill_volume_ml", "concentration_mg_per_ml", "by", "reason"}),
}


def _text(doc: Mapping[str, Any], name: str, max_chars: int) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value.strip() or len(value) > max_chars or CONTROL_CHARS.search(value):
        raise RequestError(f"required text of 1..{max_chars} characters without control characters", name)
    return value


def parse_request(line: bytes, limits: ControlSettings = DEFAULT_LIMITS) -> Request:
    """One request line -> a typed request, or RequestError naming the field and the rule (and the limit)."""
    if len(line) > limits.max_request_bytes:
        raise RequestError(f"request larger than {limits.max_request_bytes} bytes")
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
            raise RequestError(f"unknown field for op {op!r}", ascii(str(key)[:64])[1:-1])
    if op == "status":
        return StatusRequest()
    if op == "push":
        return PushRequest(_schedule(doc.get("schedule"), limits))
    pump_id = doc.get("pump_id")
    if not valid_pump_id(pump_id):
        raise RequestError("required: a pump id of 1..64 letters, digits, '-' or '_'", "pump_id")
    if op == "change_syringe":
        fill = doc.get("fill_volume_ml")
        if fill is None:
            raise RequestError("required: the new syringe's fill in mL", "fill_volume_ml")
        conc = doc.get("concentration_mg_per_ml")
        return ChangeSyringeRequest(pump_id, _dose(fill, "fill_volume_ml"),
                                    None if conc is None else _dose(conc, "concentration_mg_per_ml"),
                                    _text(doc, "by", limits.max_text_chars),
                                    _text(doc, "reason", limits.max_text_chars))
    action = _text(doc, "action", MAX_ACTION_CHARS)
    by = _text(doc, "by", limits.max_text_chars)
    reason = _text(doc, "reason", limits.max_text_chars)
    dose = doc.get("dose_mg_per_24h")
    return CommandRequest(pump_id, action, by, reason, None if dose is None else _dose(dose))


def _dose(dose: object, field: str = "dose_mg_per_24h") -> Decimal:
    """The dose (or another quantity) as a plain Decimal. Exponent forms are resolved here: 0E-999999999 is a valid
    zero whose plain text is a gigabyte long, and the daemon prints every dose it is given."""
    rule = f"a decimal string of at most {MAX_DOSE_CHARS} characters, or a number"
    if isinstance(dose, bool) or not isinstance(dose, (str, int, Decimal)):
        raise RequestError(rule, field)
    if isinstance(dose, str) and len(dose) > MAX_DOSE_CHARS:
        raise RequestError(rule, field)
    try:
        value = Decimal(dose)
        return Decimal(decimal_text(value))  # refuses more than 100 digits in plain notation
    except (ArithmeticError, ValueError):
        raise RequestError(f"{rule} of at most 100 digits in plain notation", field) from None


def _schedule(schedule: object, limits: ControlSettings) -> Mapping[str, Any]:
    if not isinstance(schedule, Mapping):
        raise RequestError("required: the signed schedule as a JSON object", "schedule")
    try:
        size = len(canonical_bytes(schedule))
    except (TypeError, ValueError) as exc:  # e.g. a number of 200 digits, or nesting deeper than any schedule
        raise RequestError(f"not a schedule document: {exc}", "schedule") from None
    if size > limits.max_schedule_bytes:
        raise RequestError(f"larger than {limits.max_schedule_bytes} bytes (canonical JSON)", "schedule")
    pump_id = schedule.get("pump_id")
    if isinstance(pump_id, str) and (len(pump_id) > 64 or CONTROL_CHARS.search(pump_id)):
        # Named in the refusal record even when the rest is refused: keep it short and printable there.
        raise RequestError("a pump id of at most 64 characters without control characters", "schedule/pump_id")
    return schedule


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
    except (ValueError, ArithmeticError, RecursionError) as exc:  # not UTF-8 / JSON, huge exponent, too deep
        raise ControlError(f"unreadable reply from the daemon: {type(exc).__name__}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise ControlError("unreadable reply from the daemon: not an object with 'ok'")
    return doc


# --------------------------------------------------------------------------------------------- server


class DaemonAPI(Protocol):
    """What the server needs from driverd.runtime.daemon.Daemon."""

    async def push_schedule(self, doc: Any) -> dict[str, Any]: ...

    async def command(self, pump_id: Any, action: Any, by: Any, reason: Any, dose: Any = None) -> dict[str, Any]: ...

    async def change_syringe(self, pump_id: Any, fill: Any, concentration: Any, by: Any,
                             reason: Any) -> dict[str, Any]: ...

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


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end: SO_PEERCRED (pid, uid, gid), or only a connection number if unavailable."""

    conn: int
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None

    @property
    def process(self) -> tuple[str, int]:
        """Connection caps and in-flight limits are per client process."""
        return ("pid", self.pid) if self.pid is not None else ("conn", self.conn)

    @property
    def user(self) -> tuple[str, int]:
        """The refusal-logging budget is per client user: forking more processes does not buy more."""
        return ("uid", self.uid) if self.uid is not None else ("conn", self.conn)

    @property
    def log(self) -> dict[str, int]:
        if self.pid is None:
            return {"peer_conn": self.conn}
        assert self.uid is not None and self.gid is not None
        return {"peer_pid": self.pid, "peer_uid": self.uid, "peer_gid": self.gid}


def _peer(writer: asyncio.StreamWriter, conn: int) -> Peer:
    """The connecting process from SO_PEERCRED."""
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except (AttributeError, OSError):
        return Peer(conn)
    return Peer(conn, pid, uid, gid)


# The client of the request being worked on, seen by the daemon's refusal gate (asyncio copies it into the
# request's task).
_CURRENT_PEER: Final[contextvars.ContextVar[Peer | None]] = contextvars.ContextVar("driverd_control_peer",
                                                                                   default=None)


class Throttle:
    """A token bucket per key (burst, then per_minute): which events are logged one by one.

    Events over the budget are counted by kind and handed out as a summary (take_summary/take_all), so a
    client that repeats a refused request cannot fill the disk with individual records.
    """

    def __init__(self, burst: int, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_s = per_minute / 60.0
        self.clock = clock
        self._tokens: dict[tuple[str, int], tuple[float, float]] = {}  # key -> (tokens, at)
        self._suppressed: dict[tuple[str, int], Counter[str]] = {}

    def admit(self, key: tuple[str, int], kind: str) -> bool:
        now = self.clock()
        tokens, at = self._tokens.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        if tokens >= 1.0:
            self._tokens[key] = (tokens - 1.0, now)
            return True
        self._tokens[key] = (tokens, now)
        self._suppressed.setdefault(key, Counter())[kind] += 1
        return False

    def take_summary(self, key: tuple[str, int]) -> Counter[str] | None:
        return self._suppressed.pop(key, None)

    def take_all(self) -> dict[tuple[str, int], Counter[str]]:
        out, self._suppressed = self._suppressed, {}
        now = self.clock()
        # Forget buckets that have refilled: the table only holds keys that were recently active.
        for key, (tokens, at) in list(self._tokens.items()):
            if tokens + (now - at) * self.per_s >= self.burst:
                del self._tokens[key]
        return out


@dataclass(eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    peer: Peer
    idle_since: float
    busy: bool = False  # a complete request is being worked on: never evicted
    evicted: bool = False


@dataclass
class _Process:
    connections: int = 0
    inflight: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))


class ControlServer:
    def __init__(
        self,
        daemon: DaemonAPI,
        path: Path,
        mode: int = 0o660,
        group: str | int | None = None,
        *,
        limits: ControlSettings = DEFAULT_LIMITS,
        **overrides: Any,
    ) -> None:
        """`overrides`: single ControlSettings fields (e.g. read_timeout_s=0.5), for tests and tools."""
        self.daemon = daemon
        self.path = Path(path)
        self.mode = mode
        self.group = group
        self.limits = dataclasses.replace(limits, **overrides)
        self.max_connections = self.limits.max_connections
        self.per_process = min(self.limits.max_connections_per_peer, self.max_connections)
        self.read_timeout_s = self.limits.read_timeout_s
        self.request_timeout_s = self.limits.request_timeout_s
        self.requests = 0  # requests answered (including error replies)
        self.evictions = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self._processes: dict[tuple[str, int], _Process] = {}
        self._next_conn = 0
        self._inode: int | None = None
        self._refusals = Throttle(self.limits.refusal_log_burst, self.limits.refusal_log_per_minute)
        self._warnings = Throttle(self.limits.refusal_log_burst, self.limits.refusal_log_per_minute)
        self._summaries: asyncio.Task[None] | None = None

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
                                                           limit=self.limits.max_request_bytes)
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
        if hasattr(self.daemon, "refusal_gate"):
            self.daemon.refusal_gate = self._admit_refusal
        self._summaries = asyncio.create_task(self._summarise_periodically(), name="control-summaries")
        log.info("control_listening", socket=str(self.path), mode=f"{self.mode:04o}",
                 **dataclasses.asdict(self.limits))

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
        if self._summaries is not None:
            self._summaries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._summaries
            self._summaries = None
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
            self._server = None
        self._write_summaries()
        if getattr(self.daemon, "refusal_gate", None) == self._admit_refusal:
            self.daemon.refusal_gate = None  # type: ignore[attr-defined]  # checked by hasattr in start()
        # Remove the socket file only if it is still ours (not a successor daemon's).
        with contextlib.suppress(OSError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    # ------------------------------------------------------------------------------------------ refusal logging

    def _admit_refusal(self, reason: str) -> bool:
        """The daemon's gate for a `request_refused` audit record: True to write it, False if over budget."""
        peer = _CURRENT_PEER.get()
        if peer is None:  # not from a control client (e.g. the demo driving the daemon directly)
            return True
        if not self._refusals.admit(peer.user, str(reason)[:64]):
            return False
        # Back under budget: the suppressed ones are summarised before the next single record.
        pending = self._refusals.take_summary(peer.user)
        if pending:
            self._audit_summary(peer.user, pending)
        return True

    def _warn(self, peer: Peer, event: str, **fields: Any) -> None:
        """An operational-log warning about one client, within that client user's budget."""
        if self._warnings.admit(peer.user, event):
            pending = self._warnings.take_summary(peer.user)
            if pending:
                log.warning("control_warnings_suppressed", peer=f"{peer.user[0]} {peer.user[1]}",
                            counts=dict(pending))
            log.warning(event, **fields, **peer.log)

    def _audit_summary(self, who: tuple[str, int], counts: Counter[str]) -> None:
        audit = getattr(self.daemon, "audit", None)
        if audit is None:
            return
        try:
            audit.append("request_refused_summary", pump_id=None, course_id=None, durable=True,
                         peer=f"{who[0]} {who[1]}", refused=sum(counts.values()), reasons=dict(sorted(counts.items())),
                         note="refusals beyond the logging budget: answered, not logged one by one")
        except Exception as exc:  # the audit writer reports its own failures; never break the server for it
            log.error("control_summary_not_logged", error=f"{type(exc).__name__}: {exc}")

    def _write_summaries(self) -> None:
        for who, counts in self._refusals.take_all().items():
            self._audit_summary(who, counts)
        for who, counts in self._warnings.take_all().items():
            log.warning("control_warnings_suppressed", peer=f"{who[0]} {who[1]}", counts=dict(counts))

    async def _summarise_periodically(self) -> None:
        while True:
            await asyncio.sleep(SUMMARY_EVERY_S)
            self._write_summaries()

    # ------------------------------------------------------------------------------------------ connections

    def _admit(self, conn: _Conn) -> bool:
        """Room for a new connection under both caps, closing idle connections if needed; False if all busy."""
        key = conn.peer.process
        mine = [c for c in self._conns if c.peer.process == key]
        if len(mine) >= self.per_process and not self._evict(mine):
            return False
        return len(self._conns) < self.max_connections or self._evict(list(self._conns))

    def _evict(self, candidates: list[_Conn]) -> bool:
        """Close the idle connection of the process holding the most connections, the longest idle first."""
        idle = [c for c in candidates if not c.busy and not c.evicted]
        if not idle:
            return False
        victim = min(idle, key=lambda c: (-self._processes[c.peer.process].connections, c.idle_since))
        victim.evicted = True
        self._release(victim)
        victim.writer.close()  # its reader sees EOF; a partial line it sent is never acted on
        self.evictions += 1
        self._warn(victim.peer, "control_connection_evicted", reason="idle connection closed to make room")
        return True

    def _release(self, conn: _Conn) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        proc = self._processes[conn.peer.process]
        proc.connections -= 1
        if proc.connections <= 0:
            del self._processes[conn.peer.process]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_conn += 1
        peer = _peer(writer, self._next_conn)
        conn = _Conn(writer, peer, time.monotonic())
        if not self._admit(conn):
            self._warn(peer, "control_busy")
            await self._send(writer, {"ok": False, "error": "too many connections; try again", "field": None})
            await self._close(writer)
            return
        self._conns.add(conn)
        proc = self._processes.setdefault(
            peer.process, _Process(inflight=asyncio.Semaphore(self.limits.max_inflight_per_peer)))
        proc.connections += 1
        try:
            await self._serve(reader, conn)
        except Exception as exc:  # a broken connection must never reach the daemon
            log.warning("control_connection_error", error=f"{type(exc).__name__}: {exc}"[:300], **peer.log)
        finally:
            self._release(conn)
            await self._close(writer)

    async def _serve(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        writer, peer = conn.writer, conn.peer
        while True:
            conn.busy, conn.idle_since = False, time.monotonic()
            try:
                # The deadline covers the whole line: a client sending a byte now and then is dropped too.
                line = await asyncio.wait_for(reader.readline(), timeout=self.read_timeout_s)
            except TimeoutError:
                return  # idle or too slow: drop the connection (no partial request is ever acted on)
            except (ValueError, asyncio.LimitOverrunError):
                # StreamReader limit: the line is longer than max_request_bytes. The stream position is now
                # unknown, so answer and close.
                self.requests += 1
                self._warn(peer, "control_request_rejected", error="oversized")
                limit = self.limits.max_request_bytes
                await self._send(writer, RequestError(f"request larger than {limit} bytes").reply())
                return
            if conn.evicted or not line:
                return
            if not line.endswith(b"\n"):  # the client closed mid-line: an unfinished request is not acted on
                await self._send(writer, RequestError("request not terminated by a newline; not acted on").reply())
                return
            if not line.strip():
                continue
            conn.busy = True
            reply = await self._dispatch(line, peer)
            self.requests += 1
            if not await self._send(writer, reply):
                return

    async def _dispatch(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = parse_request(line, self.limits)
        except RequestError as exc:
            self._warn(peer, "control_request_rejected", error=exc.message[:200], field=exc.field)
            return exc.reply()
        op = type(request).__name__.removesuffix("Request").lower()
        _CURRENT_PEER.set(peer)  # copied into the request's task: the daemon's refusal gate reads it there
        call = asyncio.ensure_future(self._call(request, peer))
        try:
            reply = await asyncio.wait_for(asyncio.shield(call), timeout=self.request_timeout_s)
        except TimeoutError:
            # Withdraw it: a pump channel that has not reached the request yet skips it and logs
            # `request_expired` (a command applied minutes after the client gave up is a hazard). One the channel
            # has started is finished and logged there (never half done): so the outcome is unknown.
            call.cancel()
            log.error("control_request_timeout", op=op, outcome="withdrawn unless already started", **peer.log)
            call.add_done_callback(lambda f: _log_late(op, peer.log, f))
            return {"ok": False, "field": None,
                    "error": f"no answer within {self.request_timeout_s:g} s; the request is withdrawn unless the "
                             "daemon had already started it, so it may still take effect: check `driverd status`"}
        except Exception as exc:
            log.exception("control_request_failed", op=op, **peer.log)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}", "field": None}
        log.info("control_request", op=op, ok=reply.get("ok") is True, refusals=_reasons(reply), **peer.log)
        return reply

    async def _call(self, request: Request, peer: Peer) -> dict[str, Any]:
        if isinstance(request, StatusRequest):
            return self.daemon.status()  # cheap and never queued: always answerable
        proc = self._processes.get(peer.process)
        async with proc.inflight if proc is not None else contextlib.nullcontext():
            if isinstance(request, PushRequest):
                return await self.daemon.push_schedule(request.schedule)
            if isinstance(request, ChangeSyringeRequest):
                return await self.daemon.change_syringe(request.pump_id, request.fill_volume_ml,
                                                        request.concentration_mg_per_ml, request.by, request.reason)
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
