"""The order log: the durable record of every received order, for idempotency on MSH-10 (docs/hl7.md).

The gateway calls `begin(control_id, digest)` before it acts on an order. It is durable before it returns, so
after any crash the order is known to have been received. `begin` returns the prior entry when the control id
was seen before: its digest (the same message resent, or a different message reusing the id), whether it was
finished, and the replies recorded for it. `finish(control_id, replies)` records the replies sent (durable).

An entry begun but never finished, found after a restart, means the order may or may not have been applied:
the gateway answers it "outcome unknown" and never applies it again.

On disk: one journal (`journal.py`), ``orders.jsonl``, with ``{"op": "begin", "id", "digest", "at"}`` and
``{"op": "finish", "id", "replies"}`` records. Bounded: only the newest `max_entries` entries begun within
`max_age` are kept (both bounds apply; the oldest go first). A control id that was forgotten that way is new
again. Memory holds the kept entries with their replies; the file is compacted (atomic rewrite of the kept
entries) when its dead lines are at least `compact_after` and at least as many as the live ones.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from driverd.hl7.journal import Journal, StoreCorrupt, StoreError, StoreIOError

FORMAT: Final = "driverd-orderlog/1"
FILE_NAME: Final = "orders.jsonl"
MAX_CONTROL_ID: Final = 199
MAX_DIGEST: Final = 128
MAX_REPLIES: Final = 8
MAX_REPLY_CHARS: Final = 256 * 1024
_DIGEST: Final = re.compile(r"[0-9A-Za-z:_\-+/=]{1,128}")

__all__ = ["FORMAT", "OrderLog", "OrderLogError", "Prior", "StoreError", "StoreIOError"]


class OrderLogError(StoreError):
    """A refused order-log operation: names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


@dataclass(frozen=True, slots=True)
class Prior:
    """What the log holds for a control id seen before."""

    control_id: str
    digest: str
    at: datetime  # when it was begun
    finished: bool
    replies: tuple[str, ...]  # as recorded by `finish` (empty while unfinished)


@dataclass(slots=True)
class _Entry:
    digest: str
    at: datetime
    replies: tuple[str, ...] | None = None  # None: not finished


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _check_id(control_id: object) -> str:
    if not isinstance(control_id, str) or not control_id:
        raise OrderLogError("control_id", "must be a non-empty string")
    if len(control_id) > MAX_CONTROL_ID:
        raise OrderLogError("control_id", f"must be at most {MAX_CONTROL_ID} characters")
    if not control_id.isprintable():
        raise OrderLogError("control_id", "must not contain control characters")
    try:
        control_id.encode("utf-8")
    except UnicodeEncodeError:
        raise OrderLogError("control_id", "must be valid text (no lone surrogates)") from None
    return control_id


def _check_replies(replies: object) -> tuple[str, ...]:
    if not isinstance(replies, list | tuple) or len(replies) > MAX_REPLIES:
        raise OrderLogError("replies", f"must be a list of at most {MAX_REPLIES} strings")
    for i, r in enumerate(replies):
        if not isinstance(r, str) or not r or len(r) > MAX_REPLY_CHARS:
            raise OrderLogError(f"replies[{i}]", f"must be a non-empty string of at most {MAX_REPLY_CHARS} characters")
        try:
            r.encode("utf-8", "surrogateescape")  # a reply may echo undecodable bytes of the order back
        except UnicodeEncodeError:
            raise OrderLogError(f"replies[{i}]", "must be encodable as UTF-8") from None
    return tuple(replies)


class OrderLog:
    """See the module docstring. Open with `OrderLog.open`; not thread-safe (one event loop uses it)."""

    def __init__(self, journal: Journal, *, max_entries: int, max_age: timedelta, compact_after: int,
                 clock: Callable[[], datetime]) -> None:
        self._journal = journal
        self.max_entries = max_entries
        self.max_age = max_age
        self.compact_after = compact_after
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest begun first
        self.compaction_error: StoreError | None = None
        self._compact_failed_at = 0

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        max_entries: int = 100_000,
        max_age: timedelta = timedelta(days=30),
        compact_after: int = 1000,
        clock: Callable[[], datetime] = _utc_now,
    ) -> OrderLog:
        """Open (creating 0700/0600 if needed) the order log in `directory`; repairs a torn last line
        (`repaired_bytes`); a damaged line elsewhere raises StoreCorrupt. `clock` gives aware datetimes."""
        for name, v in (("max_entries", max_entries), ("compact_after", compact_after)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OrderLogError(name, "must be an integer >= 1")
        if not isinstance(max_age, timedelta) or max_age <= timedelta(0):
            raise OrderLogError("max_age", "must be a positive timedelta")
        journal, records = Journal.open(Path(directory), FILE_NAME, FORMAT)
        log = cls(journal, max_entries=max_entries, max_age=max_age, compact_after=compact_after, clock=clock)
        try:
            for line, rec in records:
                log._replay(line, rec)
            log._evict()
            log._maybe_compact()
        except BaseException:
            journal.close()
            raise
        return log

    def _replay(self, line: int, rec: dict[str, Any]) -> None:
        path = self._journal.path
        op = rec.get("op")
        expected = {"begin": {"op", "id", "digest", "at"}, "finish": {"op", "id", "replies"}}
        if op not in expected or set(rec) != expected[op]:
            raise StoreCorrupt(path, line, f"unknown record (op {str(op)[:40]!r} with fields {sorted(rec)[:8]})")
        try:
            cid = _check_id(rec["id"])
            if op == "begin":
                digest = _check_digest(rec["digest"])
                at = _parse_at(rec["at"])
                # Begun again: only possible after the earlier entry was forgotten (bounds). The newest wins.
                self._entries.pop(cid, None)
                self._entries[cid] = _Entry(digest, at)
                self._evict_count()
            else:
                replies = _check_replies(rec["replies"])
                entry = self._entries.get(cid)
                if entry is None:
                    raise StoreCorrupt(path, line, f"finish for {cid!r}, which was not begun")
                if entry.replies is not None:
                    raise StoreCorrupt(path, line, f"{cid!r} is finished twice")
                entry.replies = replies
        except OrderLogError as exc:
            raise StoreCorrupt(path, line, str(exc)) from None

    # ------------------------------------------------------------------------------------------ api

    def begin(self, control_id: str, digest: str) -> Prior | None:
        """Record that the order `control_id` (content `digest`) was received, durably, and return None; or,
        if the id was seen before, record nothing and return what is known of it."""
        _check_id(control_id)
        _check_digest(digest)
        prior = self.get(control_id)
        if prior is not None:
            return prior
        at = self._clock()
        if at.tzinfo is None:
            raise OrderLogError("clock", "must give timezone-aware datetimes")
        self._journal.append({"op": "begin", "id": control_id, "digest": digest, "at": at.isoformat()})
        self._entries[control_id] = _Entry(digest, at)
        self._evict()
        self._maybe_compact()
        return None

    def finish(self, control_id: str, replies: list[str]) -> None:
        """Record the replies sent for a begun, unfinished order; durable before it returns."""
        _check_id(control_id)
        kept = _check_replies(replies)
        entry = self._entries.get(control_id)
        if entry is None:
            raise OrderLogError("control_id", f"{control_id!r} was not begun (or is older than the log keeps)")
        if entry.replies is not None:
            raise OrderLogError("control_id", f"{control_id!r} is already finished")
        self._journal.append({"op": "finish", "id": control_id, "replies": list(kept)})
        entry.replies = kept
        self._maybe_compact()

    def get(self, control_id: str) -> Prior | None:
        """What is known of `control_id` (None: not seen, or forgotten)."""
        entry = self._entries.get(control_id)
        if entry is None:
            return None
        return Prior(control_id, entry.digest, entry.at, entry.replies is not None, entry.replies or ())

    def unfinished(self) -> list[Prior]:
        """Entries begun and never finished (after a restart: orders whose outcome is unknown), oldest first."""
        return [p for cid in self._entries if (p := self.get(cid)) is not None and not p.finished]

    def __len__(self) -> int:
        return len(self._entries)

    # --------------------------------------------------------------------------------------- upkeep

    def _evict_count(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _evict(self) -> None:
        self._evict_count()
        oldest = self._clock() - self.max_age
        # Entries are in the order begun; a clock stepped back may leave a younger one first: stop there.
        while self._entries and next(iter(self._entries.values())).at < oldest:
            self._entries.popitem(last=False)

    def compact(self) -> None:
        """Rewrite the file with only the kept entries. Raises StoreIOError on failure (log unchanged, or broken
        if the directory sync failed: reopen)."""
        records: list[dict[str, Any]] = [{"format": FORMAT}]
        for cid, e in self._entries.items():
            records.append({"op": "begin", "id": cid, "digest": e.digest, "at": e.at.isoformat()})
            if e.replies is not None:
                records.append({"op": "finish", "id": cid, "replies": list(e.replies)})
        self._journal.rewrite(records)
        self.compaction_error = None
        self._compact_failed_at = 0

    def _maybe_compact(self) -> None:
        live = 1 + sum(1 if e.replies is None else 2 for e in self._entries.values())
        dead = self._journal.lines - live
        if dead < self.compact_after or dead < live or dead < self._compact_failed_at + self.compact_after:
            return
        try:
            self.compact()
        except StoreIOError as exc:
            self.compaction_error = exc  # the record that made it due is durable already: report, retry later
            self._compact_failed_at = dead

    @property
    def repaired_bytes(self) -> int:
        return self._journal.repaired_bytes

    @property
    def broken(self) -> StoreIOError | None:
        return self._journal.broken

    @property
    def path(self) -> Path:
        return self._journal.path

    def close(self) -> None:
        self._journal.close()


def _check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise OrderLogError("digest", "must be 1-128 characters of hex/base64 text")
    return digest


def _parse_at(text: object) -> datetime:
    if not isinstance(text, str):
        raise OrderLogError("at", "must be an ISO 8601 timestamp")
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise OrderLogError("at", "must be an ISO 8601 timestamp") from None
    if at.tzinfo is None:
        raise OrderLogError("at", "must have a UTC offset")
    return at
