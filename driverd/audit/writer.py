"""The audit writer: structlog processors -> canonical JSON line -> hash chain -> write -> fdatasync.

Durability contract:
- `append(..., durable=True)` returns only after the record is written and fdatasync'd (write-ahead: the
  runtime logs a setpoint intent this way before the command goes on the wire).
- `durable=False` records (bulk telemetry) are group-committed: synced once `group_commit_records` are pending
  or the oldest pending one is `group_commit_ms` old (real monotonic time), whichever comes first. The check
  runs synchronously inside append; there is no background thread, so the runtime calls `flush()` on a timer
  (every `group_commit_ms`) to bound the delay when no further records arrive. `close()` always syncs.
- Any error on write or sync (ENOSPC, EIO, ...) raises AuditError and kills the writer: every later call
  raises. Nothing is retried: after a failed fsync the kernel may have dropped the dirty pages, so a retry
  that "succeeds" would lie. `on_dead` (if set) is called once, with the error, the moment the writer dies,
  so the owner can make the pumps safe at once whichever caller happened to hit the error.
- Files are created with fixed modes whatever the umask: the directory 0750 (the daemon's group may read
  the log), segments 0640.
- On open, what a crash can leave at the end of the newest segment is cut and a `torn_tail_truncated` record
  is appended: a torn last line (crash mid-write), or unsynced pages a power cut lost (zeros) followed only by
  records of `AuditConfig.bulk_events` (`_lost_page_start`). Nothing before that is touched; any other damage is
  left for verify. A cut that removes whole records, or more than the record keeps, is first saved whole to a
  side file (`cut_file_name`) in the log directory.

The writer is synchronous and single-threaded; one process may hold a log directory at a time (flock).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.canonical import (
    ENVELOPE_FIELDS,
    ZERO_HASH,
    AuditFieldError,
    canonicalize,
    format_ts,
    hashed_line,
    loads_line,
    parse_ts,
    record_hash,
    sha256_hex,
)
from driverd.audit.durable import make_dirs
from driverd.audit.segments import segment_name, segment_names
from driverd.audit.signing import fingerprint, public_b64, sign_checkpoint
from driverd.core.errors import AuditError, ConfigError, Problem

FORMAT: Final = "driverd-audit/1"
_DURABLE_KEY: Final = "_durable"
_RESERVED: Final = ENVELOPE_FIELDS | {_DURABLE_KEY}
DIR_MODE: Final = 0o750
SEGMENT_MODE: Final = 0o640
# Records only the writer itself may produce (a caller-made "checkpoint" would be signed by our key).
WRITER_EVENTS: Final = frozenset({"segment_start", "checkpoint", "torn_tail_truncated", "log_reopened"})

TORN_KEEP_BYTES: Final = 64 * 1024  # how much of a torn tail its record keeps (base64); the hash covers all of it

EventDict = MutableMapping[str, Any]


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Writer tuning. Checkpoint time is measured with the injected clock; group commit with real time."""

    segment_max_records: int = 100_000
    checkpoint_every_records: int = 1000
    checkpoint_every_s: int | Decimal = 60
    group_commit_ms: int = 200
    group_commit_records: int = 256
    # Events the owner only ever appends with durable=False (the daemon: channel.BULK_EVENTS). A lost-page cut at
    # open may remove only these (`_lost_page_start`); append refuses one of them with durable=True. Empty (the
    # default): the writer cannot tell which records may have been unsynced, so it makes no lost-page cut at all.
    bulk_events: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        problems: list[Problem] = []
        bulk = self.bulk_events
        if not isinstance(bulk, frozenset) or not all(isinstance(e, str) and e for e in bulk):
            problems.append(Problem("audit.bulk_events", "type", "must be a frozenset of non-empty event names"))
        elif bulk & WRITER_EVENTS:
            name = sorted(bulk & WRITER_EVENTS)[0]
            problems.append(Problem("audit.bulk_events", "writer-event",
                                    f"{name!r} is a writer record, always fdatasync'd: it cannot be bulk"))
        for name in ("segment_max_records", "checkpoint_every_records", "group_commit_records"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(Problem(f"audit.{name}", "positive-int", "must be an integer >= 1"))
        for name in ("checkpoint_every_s", "group_commit_ms"):
            v = getattr(self, name)
            ok_type = isinstance(v, int | Decimal) and not isinstance(v, bool)
            if not ok_type or not Decimal(v).is_finite() or Decimal(v) < 0:
                problems.append(Problem(f"audit.{name}", "non-negative", "must be a finite number >= 0 (no float)"))
        if isinstance(self.segment_max_records, int) and self.segment_max_records < 3:
            # segment_start + one record + the sealing checkpoint
            problems.append(Problem("audit.segment_max_records", "minimum", "must be at least 3"))
        if problems:
            raise ConfigError(problems)

    @property
    def checkpoint_interval(self) -> timedelta:
        return timedelta(microseconds=int(Decimal(self.checkpoint_every_s) * 1_000_000))


class _Sink:
    """The structlog "logger" at the end of the pipeline: writes the rendered line durably."""

    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer

    def _write(self, *, line: bytes, record: dict[str, Any], durable: bool) -> dict[str, Any]:
        return self._writer._commit_user(line, record, durable)

    # Every level writes: audit records have no levels, and none may be filtered out.
    msg = info = debug = warning = warn = error = critical = exception = fatal = log = _write


class AuditWriter:
    """Append-only, hash-chained, checkpoint-signed audit log in a directory of segments."""

    def __init__(
        self,
        directory: Path,
        config: AuditConfig,
        signing_key: Ed25519PrivateKey | None,
        clock: Callable[[], datetime],
        dir_fd: int,
    ) -> None:
        self.directory = directory
        self.config = config
        self._key = signing_key
        self._fingerprint = fingerprint(signing_key.public_key()) if signing_key else None
        self._clock = clock
        self._dir_fd = dir_fd
        self._fd = -1
        self._segment = 0
        self._segment_records = 0
        self._seq = 0
        self._prev = ZERO_HASH
        self._appended_head = ZERO_HASH
        self._last_event = ""
        self._pending = 0
        self._pending_since_ns = 0
        self._since_checkpoint = 0
        self._last_checkpoint_at: datetime | None = None
        self._last_ts: datetime | None = None
        self._dead: AuditError | None = None
        self._closed = False
        self._reopen_pending = False  # log_reopened not yet written (AuditWriter.open(announce=False))
        self.on_dead: Callable[[AuditError], None] | None = None
        # Called with every record a caller appended, as written (the daemon keeps its exposure ledger with it).
        self.on_append: Callable[[dict[str, Any]], None] | None = None
        self.on_sync: Callable[[float], None] | None = None  # real seconds of each group-commit fdatasync (metrics)
        # Derived once: append checks them on every record.
        self._group_commit_ns = Decimal(config.group_commit_ms) * 1_000_000
        self._checkpoint_interval = config.checkpoint_interval
        self._staged_ts: datetime | None = None  # the ts of the record in the pipeline (saves re-parsing it)
        self._processors: list[Callable[[Any, str, EventDict], Any]] = [
            self._p_user_gate,
            self._p_envelope,
            self._p_canonicalize,
            self._p_chain,
            self._p_render,
        ]
        self._logger: Any = structlog.wrap_logger(
            _Sink(self), processors=self._processors, wrapper_class=structlog.BoundLogger
        )

    # ----------------------------------------------------------------------------------------- public API

    @classmethod
    def open(
        cls,
        path_dir: Path,
        config: AuditConfig,
        signing_key: Ed25519PrivateKey | None,
        clock: Callable[[], datetime],
        *,
        announce: bool = True,
    ) -> AuditWriter:
        """Open (creating if needed) the log directory, recover a torn tail, and start appending.

        Reopening an existing log writes `log_reopened` and a checkpoint, at once, or with `announce=False` only
        when `reopened()` is called (start-up calls it after the log verified)."""
        path_dir = Path(path_dir)
        try:
            make_dirs(path_dir, DIR_MODE)
            dir_fd = os.open(path_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise AuditError(f"{path_dir}: cannot open audit directory: {exc.strerror}") from None
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(dir_fd)
            raise AuditError(f"{path_dir}: audit log is in use by another writer") from None
        writer = cls(path_dir, config, signing_key, clock, dir_fd)
        try:
            writer._start(announce)
        except BaseException:
            writer._release()
            raise
        return writer

    def append(
        self, event: str, *, pump_id: str | None, course_id: str | None, durable: bool, **fields: Any
    ) -> dict[str, Any]:
        """Write one record; returns it as written. durable=True: fdatasync'd before returning."""
        self._check_usable()
        bad = sorted(set(fields) & _RESERVED)
        if bad:
            raise AuditFieldError(bad[0], "reserved", f"field name {bad[0]!r} is reserved for the record envelope")
        self._announce_pending()
        result: dict[str, Any] = self._logger.info(
            event, pump_id=pump_id, course_id=course_id, **{_DURABLE_KEY: durable}, **fields
        )
        if self.on_append is not None:
            self.on_append(result)
        return result

    def flush(self) -> None:
        """Group-commit now: fdatasync everything written so far."""
        self._check_usable()
        self._sync()

    def flush_due(self) -> bool:
        """Group-commit only if due: fdatasync when the oldest unsynced record is `group_commit_ms` old (real
        monotonic time). For a loop that wakes far more often than group_commit_ms (the virtual-time demo wakes
        on every poll), where flush() would cost one fdatasync per wake-up. Returns whether it synced."""
        self._check_usable()
        if self._pending == 0 or time.monotonic_ns() - self._pending_since_ns < self._group_commit_ns:
            return False
        self._sync()
        return True

    def rotate(self) -> None:
        """Start a new segment now, unless the current one holds hardly more than its own start (a state snapshot
        opens a segment, so start-up reads and verifies only from there)."""
        self._check_usable()
        self._announce_pending()
        if self._segment_records > 3:
            self._rotate()

    def checkpoint(self, reason: str = "manual") -> dict[str, Any] | None:
        """Force a signed checkpoint (None without a signing key: there is nothing to sign with)."""
        self._check_usable()
        self._announce_pending()
        return self._write_checkpoint(reason)

    def close(self) -> None:
        """Checkpoint, sync and close. A dead writer releases its files and raises its error."""
        if self._closed:
            return
        if self._dead is not None:
            self._release()
            raise AuditError(f"audit writer is dead: {self._dead}") from self._dead
        try:
            self._announce_pending()
            if self._last_event != "checkpoint":
                self._write_checkpoint("close")
            self._sync()
        finally:
            self._release()

    def abandon(self) -> None:
        """Release the files without writing anything more (start-up refused after the log was opened)."""
        with contextlib.suppress(AuditError):
            self._sync()
        self._release()

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._dead is not None:
            self._release()
            return
        self.close()

    @property
    def seq(self) -> int:
        """Seq of the last record written."""
        return self._seq

    @property
    def head(self) -> str:
        """SHA-256 of the last line written (the next record's `prev`)."""
        return self._prev

    @property
    def appended_head(self) -> str:
        """SHA-256 of the line of the last record `append` wrote: not `head`, which after an append may be the line
        of a checkpoint the append wrote after it (every N records, or every interval). A state delta names its
        parent by this hash."""
        return self._appended_head

    @property
    def segment(self) -> int:
        return self._segment

    @property
    def dead(self) -> bool:
        return self._dead is not None

    # --------------------------------------------------------------------------------------- processors

    def _p_user_gate(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        # Only caller records pass through here (internal ones skip it), so rotation cannot recurse.
        if event_dict.get("event") in WRITER_EVENTS:
            name = event_dict["event"]
            raise AuditFieldError("event", "reserved", f"event {name!r} is written only by the audit writer")
        if self._segment_records >= self.config.segment_max_records:
            self._rotate()
        return event_dict

    def _p_envelope(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        event = event_dict.get("event")
        if not isinstance(event, str) or not event:
            raise AuditFieldError("event", "required", "event name must be a non-empty string")
        for name in ("seq", "ts", "prev", "hash"):
            if name in event_dict:
                raise AuditFieldError(name, "reserved", f"field name {name!r} is reserved for the record envelope")
        for name in ("pump_id", "course_id"):
            v = event_dict.setdefault(name, None)
            if v is not None and not isinstance(v, str):
                raise AuditFieldError(name, "type", f"{name} must be a string or None")
        now = self._clock()
        event_dict["ts"] = format_ts(now)
        self._staged_ts = now
        event_dict["seq"] = self._seq + 1
        return event_dict

    def _p_canonicalize(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        durable = event_dict.pop(_DURABLE_KEY, True)
        if not isinstance(durable, bool):
            raise AuditFieldError("durable", "type", "durable must be true or false")
        if durable and event_dict["event"] in self.config.bulk_events:
            # A lost-page cut may remove a bulk event: one that was fdatasync'd (and maybe acted on) must not be.
            raise AuditFieldError("durable", "bulk", f"event {event_dict['event']!r} is in audit.bulk_events: "
                                  "it is never written durably (take it out of bulk_events to write it so)")
        if not durable and self.config.bulk_events and event_dict["event"] not in self.config.bulk_events:
            # ... and the cut goes by name, so a name must say how its records are written: never both ways.
            raise AuditFieldError("durable", "not-bulk", f"event {event_dict['event']!r} is not in "
                                  "audit.bulk_events: it is always written durably (or add it to bulk_events)")
        record = {}
        for k, v in event_dict.items():
            # Fast path for the common already-canonical scalars (ASCII text, None, plain int); the rest, and
            # anything that could be refused, goes through canonicalize, the one conversion function.
            t = type(v)
            record[k] = v if v is None or t is int or (t is str and v.isascii()) else canonicalize(v, k)
        return {_DURABLE_KEY: durable, "record": record}

    def _p_chain(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        record = event_dict["record"]
        record["prev"] = self._prev
        if record["event"] == "checkpoint" and self._key is not None:
            record["sig"] = sign_checkpoint(self._key, record)
        # The hash and the rendered line come from one encoding pass (same bytes as record_hash + dumps).
        line, record["hash"] = hashed_line(record)
        event_dict["line"] = line
        return event_dict

    def _p_render(self, _logger: Any, _method: str, event_dict: EventDict) -> dict[str, Any]:
        record = event_dict["record"]
        return {"line": event_dict["line"], "record": record, "durable": event_dict[_DURABLE_KEY]}

    def _pipeline_internal(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Run the same processors (minus rotation) for a writer-generated record and commit it durably."""
        ed: EventDict = {"event": event, "pump_id": None, "course_id": None, _DURABLE_KEY: True, **fields}
        for proc in self._processors[1:]:
            ed = proc(None, "info", ed)
        return self._commit(ed["line"], ed["record"], True)

    # ------------------------------------------------------------------------------------------ commit

    def _commit_user(self, line: bytes, record: dict[str, Any], durable: bool) -> dict[str, Any]:
        self._commit(line, record, durable)
        self._appended_head = self._prev  # before a checkpoint below moves `head` on
        self._since_checkpoint += 1
        if not durable:
            now_ns = time.monotonic_ns()
            if self._pending == 1:
                self._pending_since_ns = now_ns
            due = now_ns - self._pending_since_ns >= self._group_commit_ns
            if self._pending >= self.config.group_commit_records or due:
                self._sync()
        self._maybe_checkpoint()
        return record

    def _commit(self, line: bytes, record: dict[str, Any], durable: bool) -> dict[str, Any]:
        data = line + b"\n"
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self._die(f"write to {segment_name(self._segment)} failed", exc)
        self._seq = record["seq"]
        self._prev = sha256_hex(line)
        self._last_event = record["event"]
        staged, self._staged_ts = self._staged_ts, None
        self._last_ts = staged if staged is not None else parse_ts(record["ts"])
        self._segment_records += 1
        self._pending += 1
        if durable:
            self._sync()
        return record

    def _sync(self) -> None:
        if self._pending == 0:
            return
        started = time.perf_counter()
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._die(f"fdatasync of {segment_name(self._segment)} failed", exc)
        self._pending = 0
        if self.on_sync is not None:
            with contextlib.suppress(Exception):  # metrics never fail a write
                self.on_sync(time.perf_counter() - started)

    def _die(self, what: str, exc: OSError) -> None:
        err = AuditError(f"{what}: {exc.strerror or exc} (errno {exc.errno}); audit writer stopped, not retried")
        err.__cause__ = exc
        self._dead = err
        if self.on_dead is not None:
            callback, self.on_dead = self.on_dead, None
            with contextlib.suppress(Exception):  # the owner's reaction must not hide the error itself
                callback(err)
        raise err from exc

    def _check_usable(self) -> None:
        if self._dead is not None:
            raise AuditError(f"audit writer is dead: {self._dead}") from self._dead
        if self._closed:
            raise AuditError("audit writer is closed")

    # ------------------------------------------------------------------------------- checkpoint/rotate

    def _maybe_checkpoint(self) -> None:
        if self._key is None or self._since_checkpoint == 0:
            return
        if self._since_checkpoint >= self.config.checkpoint_every_records:
            self._write_checkpoint("records")
            return
        if (
            self._last_checkpoint_at is not None
            and self._last_ts is not None
            and self._last_ts - self._last_checkpoint_at >= self._checkpoint_interval
        ):
            self._write_checkpoint("interval")

    def _write_checkpoint(self, reason: str) -> dict[str, Any] | None:
        if self._key is None:
            return None
        # count = number of records before this checkpoint = seq of the head record; head = its line hash.
        rec = self._pipeline_internal(
            "checkpoint",
            {"count": self._seq, "head": self._prev, "key_fingerprint": self._fingerprint, "reason": reason},
        )
        self._since_checkpoint = 0
        self._last_checkpoint_at = self._last_ts
        return rec

    def _rotate(self) -> None:
        self._write_checkpoint("rotate")
        self._sync()
        try:
            os.close(self._fd)
        except OSError as exc:
            self._die("close of full segment failed", exc)
        self._fd = -1
        self._create_segment(self._segment + 1)

    def _create_segment(self, number: int) -> None:
        name = segment_name(number)
        try:
            self._fd = os.open(
                name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SEGMENT_MODE,
                dir_fd=self._dir_fd
            )
            os.fsync(self._dir_fd)  # the new name itself must survive a crash
        except OSError as exc:
            self._die(f"cannot create segment {name}", exc)
        self._segment = number
        self._segment_records = 0
        self._write_segment_start()

    def _write_segment_start(self) -> None:
        self._pipeline_internal(
            "segment_start",
            {
                "format": FORMAT,
                "segment": self._segment,
                "prev_segment_hash": self._prev,
                "key_fingerprint": self._fingerprint,
                "public_key": public_b64(self._key.public_key()) if self._key else None,
            },
        )
        self._last_checkpoint_at = self._last_ts

    # ----------------------------------------------------------------------------------- open/recover

    def _start(self, announce: bool) -> None:
        # Names, not Paths: a year's log has ~9,000 segments and only the first and last two are opened here.
        segs = segment_names(self.directory)
        if not segs:
            self._create_segment(1)
            return
        numbers = [n for n, _ in segs]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            raise AuditError(f"{self.directory}: segment numbers are not consecutive: {numbers}")
        self._check_key(self.directory / segs[0][1], len(segs) == 1)
        number, path = segs[-1][0], self.directory / segs[-1][1]
        torn = _recover_tail(path, number, self.config.group_commit_records, self.config.bulk_events, self._dir_fd)
        data = _read(path)
        if not data:
            # The crash tore this segment's very first line: restart the segment from the previous one.
            if len(segs) > 1:
                previous = self.directory / segs[-2][1]
                last = _last_line(_read(previous))
                if last is None:
                    raise AuditError(f"{previous}: previous segment is empty; refusing to continue")
                self._adopt_last_line(last, previous)
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except OSError as exc:
                raise AuditError(f"{path}: cannot open segment: {exc.strerror}") from None
            self._segment = number
            self._segment_records = 0
            self._write_segment_start()
        else:
            last = _last_line(data)
            assert last is not None
            self._adopt_last_line(last, path)
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except OSError as exc:
                raise AuditError(f"{path}: cannot open segment: {exc.strerror}") from None
            self._segment = number
            self._segment_records = data.count(b"\n")
        if torn is not None:
            fields: dict[str, Any] = {
                "segment": number,
                "offset": torn.offset,
                "reason": torn.reason,
                "removed_bytes": len(torn.removed),
                "removed_lines": torn.lines,
                "removed_seqs": list(torn.seqs),
                "removed_sha256": sha256_hex(torn.removed),
                # What was cut, for the auditor (bounded; the hash covers all of it).
                "removed_b64": base64.b64encode(torn.removed[:TORN_KEEP_BYTES]).decode("ascii"),
            }
            if torn.file is not None:
                fields["removed_file"] = torn.file  # all of it (its sha256 is removed_sha256)
            self._pipeline_internal("torn_tail_truncated", fields)
        self._reopen_pending = True
        if announce:
            self.reopened()

    def reopened(self) -> None:
        """Log `log_reopened` and a signed checkpoint for a writer opened with `announce=False`, once start-up
        has verified the log: a refused start then leaves the log as it found it (bar a tail repair, logged once).
        Does nothing if there is nothing to announce (a new log, or already announced)."""
        self._check_usable()
        if not self._reopen_pending:
            return
        self._reopen_pending = False
        self._pipeline_internal("log_reopened", {"segment": self._segment, "recovered_seq": self._seq})
        self._last_checkpoint_at = self._last_ts
        self._write_checkpoint("open")

    def _announce_pending(self) -> None:
        # Opened with announce=False: the restart is logged before anything new (a record, a checkpoint, a
        # rotation, the close), so no record of this run reads as the previous run's.
        if self._reopen_pending:
            self.reopened()

    def _adopt_last_line(self, line: bytes, path: Path) -> None:
        try:
            rec = loads_line(line)
        except ValueError as exc:
            raise AuditError(f"{path}: last record is damaged ({exc}); refusing to append") from None
        seq = rec.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or rec.get("hash") != record_hash(rec):
            raise AuditError(f"{path}: last record fails its own hash; refusing to append (run audit verify)")
        self._seq = seq
        self._prev = sha256_hex(line)
        self._last_event = str(rec.get("event"))
        self._last_ts = parse_ts(rec["ts"])

    def _check_key(self, first_segment: Path, only_segment: bool) -> None:
        line = _first_line(first_segment)
        if line is None:
            return
        try:
            rec = loads_line(line)
        except ValueError:
            if only_segment and _read(first_segment).count(b"\n") == 1:
                return  # the torn first line of a brand-new log: recovery truncates it
            raise AuditError(f"{first_segment}: first record is damaged; refusing to append") from None
        logged = rec.get("key_fingerprint")
        if rec.get("event") != "segment_start":
            raise AuditError(f"{first_segment}: does not start with segment_start; refusing to append")
        if logged != self._fingerprint:
            raise AuditError(
                f"{self.directory}: signing key fingerprint {self._fingerprint} does not match the log's "
                f"{logged}; refusing to append (start a new log directory for a new key)"
            )

    def _release(self) -> None:
        self._closed = True
        for fd in (self._fd, self._dir_fd):
            if fd >= 0:
                # closing after a fatal error: the error itself is already reported
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = -1
        self._dir_fd = -1


def get_audit_logger(writer: AuditWriter) -> Any:
    """A structlog logger over the writer's pipeline: `log.info("event", pump_id=..., course_id=..., **fields)`.

    Records are durable by default on this path; pass `durable=False` for telemetry. Returns the record.
    """
    return structlog.wrap_logger(
        _Sink(writer),
        processors=[_durable_kwarg, *writer._processors],
        wrapper_class=structlog.BoundLogger,
    )


def _durable_kwarg(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    if "durable" in event_dict:
        event_dict[_DURABLE_KEY] = event_dict.pop("durable")
    if _DURABLE_KEY not in event_dict:
        event_dict[_DURABLE_KEY] = True
    return event_dict


# ----------------------------------------------------------------------------------------- file helpers


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuditError(f"{path}: cannot read segment: {exc.strerror}") from None


def _first_line(path: Path) -> bytes | None:
    with path.open("rb") as f:
        line = f.readline()
    if not line.endswith(b"\n"):
        return None
    return line[:-1]


def _last_line(data: bytes) -> bytes | None:
    if not data:
        return None
    body = data[:-1] if data.endswith(b"\n") else data
    return body[body.rfind(b"\n") + 1 :]


def _line_parses(line: bytes) -> bool:
    try:
        loads_line(line)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class TailCut:
    """What `_recover_tail` cut from the newest segment (logged as `torn_tail_truncated`)."""

    offset: int
    removed: bytes
    reason: str  # "torn_last_line" or "lost_unsynced_page"
    lines: int  # lines removed (a partial last line counts as one)
    seqs: tuple[int, ...]  # seqs of the whole, readable records that were cut with the damage
    file: str | None  # the side file in the log directory holding all of `removed` (None: the record keeps it all)


def cut_file_name(segment: int, offset: int, removed: bytes) -> str:
    """The side file a cut's bytes are saved to: `cut-<segment>-<offset>-<sha256 prefix>.bin`. Never a segment
    name (segments.SEGMENT_RE), so the writer, verify, fsck, recovery, tail and archive all leave it alone."""
    return f"cut-{segment:06d}-{offset}-{sha256_hex(removed)[:16]}.bin"


def _recover_tail(
    path: Path, segment: int, max_unsynced: int, bulk_events: frozenset[str], dir_fd: int
) -> TailCut | None:
    """Repair what a crash can leave at the end of the newest segment, and nothing else:

    - a torn last line (no newline, or not parseable): cut;
    - lost unsynced pages (`_lost_page_start`): cut from the first damaged line.

    Anything else is left untouched (verify then refuses the start). Before truncating, a lost-page cut (it removes
    readable records) or any cut larger than the record keeps (TORN_KEEP_BYTES) is written whole to a side file
    (`cut_file_name`), fsynced with its directory: nothing readable is destroyed. Returns what was cut, or None."""
    data = _read(path)
    if not data:
        return None
    cut: int | None = None
    reason = "torn_last_line"
    if data.endswith(b"\n"):
        last = _last_line(data)
        assert last is not None
        if not _line_parses(last):
            cut = len(data) - len(last) - 1
    else:
        cut = data.rfind(b"\n") + 1
    if cut is not None and not _torn_line_is_unsynced(data[cut:], bulk_events):
        return None
    body_end = len(data) if cut is None else cut
    seqs: tuple[int, ...] = ()
    if data.find(b"\x00", 0, body_end) >= 0:
        lost = _lost_page_start(data, body_end, max_unsynced, bulk_events)
        if lost is not None:
            cut, seqs = lost
            reason = "lost_unsynced_page"
    if cut is None:
        return None
    removed = data[cut:]
    side: str | None = None
    if reason == "lost_unsynced_page" or len(removed) > TORN_KEEP_BYTES:
        side = cut_file_name(segment, cut, removed)
        _save_cut(path.parent / side, removed, dir_fd)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, cut)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AuditError(f"{path}: cannot truncate torn tail: {exc.strerror}") from None
    lines = removed.count(b"\n") + (0 if removed.endswith(b"\n") else 1)
    return TailCut(cut, removed, reason, lines, seqs, side)


def _save_cut(path: Path, removed: bytes, dir_fd: int) -> None:
    """Write `removed` to `path` and make it durable (file and name) before the segment is truncated. A crash in
    between leaves the segment as it was: the next open makes the same cut and rewrites the same file whole."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, SEGMENT_MODE)
        try:
            os.fchmod(fd, SEGMENT_MODE)  # whatever the umask, like a segment: the daemon's group may read it
            view = memoryview(removed)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(dir_fd)
    except OSError as exc:
        raise AuditError(f"{path}: cannot save the bytes of a tail cut: {exc.strerror}; nothing cut") from None


_NUL_RUN: Final = re.compile(rb"\x00+")
# In what is left of a damaged line: a record's event name (canonical JSON escapes a quote inside a string, so this
# is a key), or a checkpoint's signature (the one writer record whose event name may be lost to the zeros).
_EVENT_KEY: Final = re.compile(rb'"event":"([^"\x00]*)("?)')
_SIG_KEY: Final = b'"sig":"'
SECTOR: Final = 512  # the smallest unit a disk or page cache loses: a lost page is whole sectors of zeros


def _lost_page_start(
    data: bytes, body_end: int, max_unsynced: int, bulk_events: frozenset[str]
) -> tuple[int, tuple[int, ...]] | None:
    """Where to cut if the NUL bytes before `body_end` can only be unsynced pages a power cut lost, else None.

    With delayed allocation (ext4, xfs) a crash can lose page N of the unsynced tail while page N+1 reached the
    disk; page N reads back as zeros and the later records read fine.

    The rule on syncs, exactly: the writer is single-threaded and writes each record as it is appended; an
    fdatasync covers every byte written before it. A durable record (a writer record, or append(durable=True))
    is fdatasync'd before its append returns, so before any later byte is written. So:
    - a durable record with anything after it was fdatasync'd, and every byte up to its end was on disk (and may
      have been acted on: a setpoint goes on the wire only then); a durable last record may have been too (a
      power cut during its fdatasync cannot be told apart). Zeros before either are real damage;
    - that fdatasync also synced the non-durable records written before it since the last sync (they lie before
      it in the file, so the rule above covers them);
    - a non-durable record written after a durable one is NOT covered by it: that fdatasync returned before the
      record was written. Only such records, after the last durable one, can have been lost unsynced.
    The log does not mark durability, so the writer goes by name: only `bulk_events` (which the owner never writes
    durably, and append refuses to) may follow the damage. Bulk records may also have been synced by a group
    commit (every `group_commit_records`, bounded below; or on time, which the log does not record): a cut may
    then take bulk records that were on disk, but never one a caller waited for.

    So a loss is accepted only if:
    - every run of NULs from the first one on (up to the torn last line, if any) looks like a lost page
      (`_nul_runs_are_sectors`), which a stray zero byte does not;
    - the damaged line is not the segment's first (segment_start is fdatasync'd before anything follows it) and
      the line before it is a readable record;
    - every readable record after the damage is a bulk event with a rising seq, and every other line holds a
      lost page whose remains name only bulk events (a name cut short by the zeros, or a checkpoint's signature,
      refuses). A record wholly inside the zeroed bytes cannot be seen: see docs/audit.md, "Lost unsynced pages";
    - at most `max_unsynced` (group_commit_records) lines follow the damaged line's start, and at most that many
      seqs follow the last record before it: the writer never has more than that many records unsynced.
    With no bulk events configured nothing qualifies: the writer cannot tell what may have been unsynced.
    """
    if not bulk_events:
        return None
    first_nul = data.find(b"\x00", 0, body_end)
    start = data.rfind(b"\n", 0, first_nul) + 1
    if start == 0:
        return None
    prev_start = data.rfind(b"\n", 0, start - 1) + 1
    try:
        before = loads_line(data[prev_start : start - 1])
    except ValueError:
        return None
    base = before.get("seq")
    if isinstance(base, bool) or not isinstance(base, int):
        return None
    if not _nul_runs_are_sectors(data, first_nul, body_end):
        return None
    seqs: list[int] = []
    lines = 0
    pos = start
    while pos < body_end:
        end = data.find(b"\n", pos, body_end)
        if end < 0:
            return None  # cannot happen: body_end follows a newline
        line = data[pos:end]
        pos = end + 1
        lines += 1
        if lines > max_unsynced:
            return None
        if b"\x00" in line:
            # A lost page (its sectors checked above). What is left of the records it held must be bulk events':
            # a durable one was fdatasync'd before anything after it was written.
            if not _remains_are_bulk(line, bulk_events):
                return None
            continue
        try:
            rec = loads_line(line)
        except ValueError:
            return None  # damage that is not a lost page
        seq = rec.get("seq")
        if rec.get("event") not in bulk_events or isinstance(seq, bool) or not isinstance(seq, int):
            return None
        if seq <= (seqs[-1] if seqs else base) or seq - base > max_unsynced:
            return None
        seqs.append(seq)
    return start, tuple(seqs)


def _remains_are_bulk(line: bytes, bulk_events: frozenset[str]) -> bool:
    """Whether what is left of a zeroed line names only bulk events: no other event name, none cut short by the
    zeros, and no checkpoint signature (the one writer record whose name may be lost to the zeros)."""
    if _SIG_KEY in line:
        return False
    return all(m.group(2) and m.group(1).decode("ascii", "replace") in bulk_events for m in _EVENT_KEY.finditer(line))


def _torn_line_is_unsynced(tail: bytes, bulk_events: frozenset[str]) -> bool:
    """Whether a torn last line can be cut: the record the crash interrupted (its append never returned, so it was
    never acted on). Zeros that run to the end of the file are that record's lost end. Bytes after zeros, though,
    may be later records whose newlines the zeros hid, i.e. the line may hold several records, and then the first
    was followed by writes (a durable one had been fdatasync'd): only bulk events may show in it, as for a lost page
    (`_lost_page_start`). A stray zero in the line refuses too, unless the line names only bulk events."""
    first_nul = tail.find(b"\x00")
    if first_nul < 0 or not tail[first_nul:].strip(b"\x00"):
        return True
    return _remains_are_bulk(tail, bulk_events)


def _nul_runs_are_sectors(data: bytes, first_nul: int, end: int) -> bool:
    """Each run of zeros ends on a sector boundary and starts on one (a lost new page) or at a line start (a lost
    rewrite of the page holding the last synced bytes: it reads back as it was then, zeros after the old end)."""
    return all(
        m.end() % SECTOR == 0 and (m.start() % SECTOR == 0 or data[m.start() - 1] == 0x0A)
        for m in _NUL_RUN.finditer(data, first_nul, end)
    )
