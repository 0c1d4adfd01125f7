"""The operational log: one JSON object per line on stderr, each with a journald priority.

This is not the record (the audit log is). Every course line here is derived from an audit record as it is
appended (`OpLog.record`, fed by the daemon's `on_append` hook), so the two can never tell different stories
and no second decision path exists: transitions, setpoints sent and read back, alarms raised and cleared,
link loss and restore, refusals, schedule pushes, clinician commands and reloads.

Priority: each line carries `"priority"` (a syslog name: crit, err, warning, notice, info, debug). Under
systemd (stderr connected to the journal, detected by comparing $JOURNAL_STREAM with stderr's device and
inode as systemd.exec(5) describes) each line is also prefixed with `<N>`, the syslog level journald reads
and strips (SyslogLevelPrefix=, on by default, set explicitly in the unit); sd-daemon(3) documents the
prefix. Alarms are `err`, or `crit` where the pump may have delivered other than commanded, so
`journalctl -p err -u driverd` lists them.

Third-party libraries (pymodbus, pyserial, asyncio) log through the stdlib `logging` module; a root handler
passes their records to structlog, so the stream never carries a raw text line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict

#: syslog priorities (sd-daemon(3), syslog(3)).
PRIORITIES: Final[dict[str, int]] = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5,
                                     "info": 6, "debug": 7}
_METHOD_PRIORITY: Final = {"debug": "debug", "info": "info", "msg": "info", "warning": "warning", "warn": "warning",
                           "error": "err", "exception": "err", "critical": "crit", "fatal": "crit"}
#: Alarm causes where the pump may have delivered other than commanded: crit, the others err.
CRIT_ALARMS: Final = frozenset({"unexpected_infusion", "dose_ceiling", "rate_mismatch", "readback_mismatch"})
#: Key id of the published demo key (config/keys/demo): never to be trusted outside a bench.
DEMO_KEY_IDS: Final = frozenset({"85ae298ab8d11af0"})
#: Identical lines from a library (same logger, same text) at most once per this many seconds.
FOREIGN_REPEAT_S: Final = 60.0

log = structlog.get_logger("driverd.oplog")
_json_lines = False  # set by configure_logging: stderr carries JSON lines only


class _SafeStream:
    """A text stream whose write errors (EPIPE on a closed stderr, EIO, a closed file) are dropped: a lost
    operational log line must never change what the daemon does."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False


def is_journal_stream(stream: TextIO) -> bool:
    """True when `stream` is the journal connection systemd gave us ($JOURNAL_STREAM = "device:inode")."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def add_priority(_logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """`priority` as a syslog name: the caller's own (e.g. "notice", which logging has no level for), else from
    the method. An unknown name falls back to the method's."""
    given = event_dict.get("priority")
    if not (isinstance(given, str) and given in PRIORITIES):
        event_dict["priority"] = _METHOD_PRIORITY.get(method, "info")
    return event_dict


class JournalRenderer:
    """JSON (sorted keys), optionally prefixed `<N>` with the line's syslog priority for journald."""

    def __init__(self, *, prefix: bool) -> None:
        self.prefix = prefix
        self._json = structlog.processors.JSONRenderer(sort_keys=True, default=_default)

    def __call__(self, logger: Any, method: str, event_dict: EventDict) -> str:
        level = PRIORITIES.get(str(event_dict.get("priority")), 6)
        text = str(self._json(logger, method, event_dict))
        # One line per record whatever a field holds (JSON escapes newlines; this guards the prefix logic).
        text = text.replace("\n", "\\n")
        return f"<{level}>{text}" if self.prefix else text


def _default(obj: object) -> Any:
    return str(obj)


_LAST_RESORT: Final = logging.lastResort if logging.lastResort is not None else logging.StreamHandler()


class StructlogHandler(logging.Handler):
    """Routes stdlib `logging` records (pymodbus, pyserial, asyncio, warnings) to structlog. A library's own
    error is not an alarm: its priority is capped at `warning`; identical lines repeat at most once a minute
    (a pump that stays unreachable would otherwise add one per poll)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if not structlog.is_configured():  # logging reset since (tests in one process): as Python would do
            _LAST_RESORT.handle(record)
            return
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string: still one JSON line
            message = f"{record.msg!r} % {record.args!r}"
        key = (record.name, message[:500])
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < FOREIGN_REPEAT_S:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) > 1000:
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        fields: dict[str, Any] = {"logger": record.name, "message": message[:4000],
                                  "priority": "warning" if record.levelno >= logging.WARNING else "info"}
        repeats = self._suppressed.pop(key, 0)
        if repeats:
            fields["repeated"] = repeats
        if record.exc_info and record.exc_info[0] is not None:
            fields["exc_info"] = record.exc_info
        with contextlib.suppress(Exception):
            structlog.get_logger("driverd.foreign").info("library_log", **fields)

    def handleError(self, record: logging.LogRecord) -> None:
        pass  # never a traceback on stderr from the logging machinery itself


def route_stdlib_logging() -> None:
    """Every stdlib logging record (WARNING and up) and every Python warning goes through structlog."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StructlogHandler):
            root.removeHandler(handler)
    handler = StructlogHandler()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.lastResort = handler  # a logger with propagate=False and no handler of its own: still JSON
    logging.captureWarnings(True)


def configure_logging(stream: TextIO | None = None, *, json_output: bool | None = None,
                      priority_prefix: bool | None = None) -> None:
    """Operational logs to stderr: JSON lines (with `<N>` when stderr is the journal) unless a terminal."""
    stream = stream or sys.stderr
    safe = _SafeStream(stream)
    if json_output is None:
        json_output = not safe.isatty()
    if priority_prefix is None:
        priority_prefix = json_output and is_journal_stream(stream)
    renderer: Any = (JournalRenderer(prefix=priority_prefix) if json_output
                     else structlog.dev.ConsoleRenderer(colors=False))
    global _json_lines
    _json_lines = bool(json_output)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_priority,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(safe),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    route_stdlib_logging()


def json_lines() -> bool:
    """Whether stderr is the JSON op-log stream (then a message for the operator is a JSON line too)."""
    return _json_lines


def emit(priority: str, event: str, **fields: Any) -> None:
    """One op-log line at a syslog priority; never raises (stderr may be a closed pipe)."""
    method = {"crit": "critical", "err": "error", "warning": "warning", "debug": "debug"}.get(priority, "info")
    with contextlib.suppress(Exception):
        getattr(log, method)(event, priority=priority, **fields)


class OpLog:
    """Audit records -> op-log lines. Holds only what a line needs from an earlier record (the rate each pump's
    last setpoint sent, to say whether its read-back matched)."""

    def __init__(self) -> None:
        self._sent: dict[str | None, tuple[Any, str]] = {}  # pump id -> (setpoint id, rate sent)

    def record(self, rec: Mapping[str, Any]) -> None:
        """Called with each audit record as appended; never raises."""
        with contextlib.suppress(Exception):
            self._record(rec)

    def _record(self, rec: Mapping[str, Any]) -> None:
        name = rec.get("event")
        base = {"pump_id": rec.get("pump_id"), "course_id": rec.get("course_id"), "audit_seq": rec.get("seq")}
        if name == "transition":
            emit("notice", "transition", **base, **_pick(rec, "from", "to", "cause"))
        elif name == "setpoint":
            self._sent[rec.get("pump_id")] = (rec.get("setpoint_id"), str(rec.get("rate_ml_per_h")))
            # Logged (fdatasync'd) as the write-ahead record, just before the bytes go to the pump.
            emit("notice", "setpoint_sent", **base, **_pick(rec, "setpoint_id", "rate_ml_per_h", "dose_mg_per_24h",
                                                            "requested_mg_per_24h", "intent", "source", "reason",
                                                            "attempt"))
        elif name == "setpoint_result":
            sent = self._sent.get(rec.get("pump_id"))
            readback = rec.get("readback_ml_per_h")
            fields = _pick(rec, "setpoint_id", "readback_ml_per_h", "error")
            if sent is not None and sent[0] == rec.get("setpoint_id") and _same(readback, sent[1]):
                emit("notice", "setpoint_verified", **base, **fields)
            else:
                # Reported, not judged: the core's own outcome (retry, alarm) follows as its own line.
                emit("warning", "setpoint_not_verified", **base, **fields,
                     sent_ml_per_h=None if sent is None else sent[1])
        elif name == "alarm":
            code = str(rec.get("code"))
            emit("crit" if code in CRIT_ALARMS else "err", "alarm_raised", **base, cause=code, detail=rec.get("detail"))
        elif name == "notice" and rec.get("code") == "alarm_cleared":
            emit("notice", "alarm_cleared", **base, cause=rec.get("detail"))
        elif name == "notice":
            emit("notice", "course_notice", **base, code=rec.get("code"), detail=rec.get("detail"))
        elif name == "link_lost":
            emit("warning", "link_lost", **base, detail=rec.get("detail"))
        elif name == "link_restored":
            emit("notice", "link_restored", **base)
        elif name == "refused" or name == "request_refused":
            emit("warning", "refused", **base, **_pick(rec, "source", "reason", "detail"))
        elif name == "request_refused_summary":
            emit("warning", "refusals_summarised", **base, **{k: v for k, v in rec.items() if k not in _ENVELOPE})
        elif name == "schedule_accepted":
            sched = rec.get("schedule") if isinstance(rec.get("schedule"), Mapping) else {}
            assert isinstance(sched, Mapping)
            emit("notice", "schedule_pushed", **base, schedule_id=sched.get("schedule_id"),
                 version=sched.get("version"), digest=sched.get("digest"))
        elif name == "clinician_command":
            emit("notice", "clinician_command", **base, **_pick(rec, "action", "by", "reason", "dose_mg_per_24h",
                                                                "fill_volume_ml", "concentration_mg_per_ml"))
        elif name == "request_expired":
            emit("warning", "request_expired", **base, **_pick(rec, "request", "detail"))
        elif name == "clock_stepped":
            emit("warning", "clock_stepped", **base, **_pick(rec, "delta_s", "direction", "wall_at"))
        elif name == "exposure_override":
            emit("warning", "exposure_override", **base, **_pick(rec, "reason", "approved_by", "breaches"))
        elif name == "course_summary":
            emit("notice", "course_ended", **base, **_pick(rec, "cause", "delivered_mg", "commanded_mg", "syringes",
                                                           "alarms"))
        elif name == "pump_verified":
            emit("info", "pump_verified", **base, **_pick(rec, "diameter_mm", "model"))
        elif name == "config_reloaded":
            emit("notice", "config_reloaded", **_pick(rec, "config_sha256", "applied", "trust_keys"),
                 audit_seq=rec.get("seq"))
            if rec.get("not_applied"):
                emit("warning", "config_reload_not_applied", not_applied=rec.get("not_applied"),
                     detail="these settings change only at a restart; the running values are kept",
                     audit_seq=rec.get("seq"))


_ENVELOPE: Final = frozenset({"event", "seq", "ts", "prev", "hash", "pump_id", "course_id", "v"})


def _pick(rec: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: rec[k] for k in keys if k in rec}


def _same(a: object, b: object) -> bool:
    try:
        return a is not None and Decimal(str(a)) == Decimal(str(b))
    except (InvalidOperation, ValueError):
        return False


def startup_warnings(*, audit_key_configured: bool, trusted_key_ids: Iterable[str], mode: str) -> list[str]:
    """What a start (or a reload) must warn about: an unsigned audit log, the published demo key trusted."""
    found: list[str] = []
    if not audit_key_configured:
        found.append("audit_unsigned")
        emit("warning", "audit_unsigned", mode=mode,
             detail="no [daemon] audit_key: checkpoints are not signed, so the log proves no origin")
    demo = sorted(set(trusted_key_ids) & DEMO_KEY_IDS)
    if demo:
        found.append("demo_key_trusted")
        emit("warning", "demo_key_trusted", key_ids=demo, mode=mode,
             detail="the trust store holds the published DEMO key (config/keys/demo): anyone can sign schedules "
                    "it accepts; NOT FOR CLINICAL USE")
    return found
