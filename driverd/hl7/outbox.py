"""The outbox: a durable, ordered store-and-forward queue of outbound HL7 messages (docs/hl7.md).

The gateway `put`s each message before anything is sent; the sender (`mllp.Sender`) sends the `head`, and marks
it `done` with the receiver's outcome once an ACK names it. So a message whose `put` returned is delivered
at-least-once, in order, across crashes and restarts, until it is ACKed (or refused by the receiver).

On disk it is one journal (`journal.py`: checksummed JSON lines, fdatasync per record, torn-tail repair,
compaction by atomic rewrite) in its own directory, ``outbox.jsonl``. Records:

- ``{"op": "put", "id", "kind", "pump", "text"}``: one message, in queue order;
- ``{"op": "done", "id", "outcome"}``: the head was delivered (or refused); always names the then head;
- ``{"op": "reserve", "upto"}``: `next_number` may hand out numbers up to `upto` (a block is reserved with one
  sync, so numbering costs one fdatasync per `RESERVE_BLOCK` numbers; after a restart numbering continues above
  the last reservation, so numbers only grow, with a gap);
- ``{"op": "state", "key", "value"}`` / ``{"op": "unset", "key"}``: the small durable key/value `state`.

Compaction rewrites the file as: format line, the reservation, the state, the pending items in order. It runs
when at least `compact_after` lines are dead (done items, their markers, superseded state and reservations) and
they are at least as many as the live ones, so its cost is amortised over the records that made it due. A failed
compaction leaves the queue as it was and is reported in `compaction_error`; it is tried again later.

Bounded: `put` raises `OutboxFull` when `max_pending` items or `max_pending_bytes` of text are pending. Nothing
is ever dropped silently: the caller decides (the gateway alarms).

A duplicate control id is refused if it names a pending item or one done since the last compaction (ids made
from `next_number` never repeat).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from driverd.hl7.journal import Journal, StoreCorrupt, StoreError, StoreIOError

FORMAT: Final = "driverd-outbox/1"
FILE_NAME: Final = "outbox.jsonl"
RESERVE_BLOCK: Final = 1000
MAX_CONTROL_ID: Final = 199  # MSH-10 is ST(199) in v2.6
MAX_STATE_BYTES: Final = 1 << 20  # one state value, as JSON

__all__ = ["FORMAT", "Item", "Outbox", "OutboxError", "OutboxFull", "StoreError", "StoreIOError"]


class OutboxError(StoreError):
    """A refused outbox operation: names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class OutboxFull(StoreError):
    """The outbox holds its maximum of pending items or bytes: the message was NOT queued."""


@dataclass(frozen=True, slots=True)
class Item:
    """One queued message."""

    control_id: str  # MSH-10
    text: str  # the whole HL7 message
    kind: str  # e.g. "ORU^R01"
    pump_id: str | None


def _check_text(value: object, field: str, *, max_len: int | None = None, printable: bool = False) -> str:
    if not isinstance(value, str) or not value:
        raise OutboxError(field, "must be a non-empty string")
    if max_len is not None and len(value) > max_len:
        raise OutboxError(field, f"must be at most {max_len} characters")
    if printable and not (value.isascii() and value.isprintable()):
        raise OutboxError(field, "must be printable ASCII")
    return value


def _check_item(control_id: str, text: str, kind: str, pump_id: str | None) -> int:
    """Refuse a bad item (OutboxError naming the field); returns the text's size in UTF-8 bytes."""
    _check_text(control_id, "control_id", max_len=MAX_CONTROL_ID, printable=True)
    _check_text(text, "text")
    _check_text(kind, "kind", max_len=64, printable=True)
    if pump_id is not None:
        _check_text(pump_id, "pump_id", max_len=256)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise OutboxError("text", "must be encodable as UTF-8 (no lone surrogates)") from None


class Outbox:
    """See the module docstring. Open with `Outbox.open`; not thread-safe (one event loop uses it)."""

    def __init__(self, journal: Journal, *, max_pending: int, max_pending_bytes: int, compact_after: int) -> None:
        self._journal = journal
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.compact_after = compact_after
        self._pending: deque[Item] = deque()
        self._pending_bytes = 0
        self._ids: set[str] = set()  # every id in the file: pending, and done since the last compaction
        self._state: dict[str, str] = {}  # key -> value as JSON text (callers get fresh copies)
        self._reserved = 0  # numbers up to this are reserved durably
        self._next = 1
        self._waiters: set[asyncio.Future[None]] = set()
        self.compaction_error: StoreError | None = None
        self._compact_failed_at = 0  # dead-line count at the last failed compaction (retry after as many more)

    # ------------------------------------------------------------------------------------------- open

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        max_pending: int = 100_000,
        max_pending_bytes: int = 256 * 1024 * 1024,
        compact_after: int = 1000,
    ) -> Outbox:
        """Open (creating 0700/0600 if needed) the outbox in `directory`; repairs a torn last line
        (`repaired_bytes` says how many bytes were cut); a damaged line elsewhere raises StoreCorrupt."""
        for name, v in (("max_pending", max_pending), ("max_pending_bytes", max_pending_bytes),
                        ("compact_after", compact_after)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OutboxError(name, "must be an integer >= 1")
        journal, records = Journal.open(Path(directory), FILE_NAME, FORMAT)
        box = cls(journal, max_pending=max_pending, max_pending_bytes=max_pending_bytes, compact_after=compact_after)
        try:
            for line, rec in records:
                box._replay(line, rec)
            box._next = box._reserved + 1
            box._maybe_compact()
        except BaseException:
            journal.close()
            raise
        return box

    def _replay(self, line: int, rec: dict[str, Any]) -> None:
        path = self._journal.path

        def field(name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
            v = rec.get(name)
            if (v is None and optional and name in rec) or (isinstance(v, kind) and not isinstance(v, bool)):
                return v
            raise StoreCorrupt(path, line, f"field {name!r} is missing or of the wrong type")

        op = rec.get("op")
        expected = {"put": {"op", "id", "kind", "pump", "text"}, "done": {"op", "id", "outcome"},
                    "reserve": {"op", "upto"}, "state": {"op", "key", "value"}, "unset": {"op", "key"}}
        if op not in expected or set(rec) != expected[op]:
            raise StoreCorrupt(path, line, f"unknown record (op {str(op)[:40]!r} with fields {sorted(rec)[:8]})")
        if op == "put":
            cid = field("id", str)
            if cid in self._ids:
                raise StoreCorrupt(path, line, f"control id {cid!r} is queued twice")
            item = Item(cid, field("text", str), field("kind", str), field("pump", str, optional=True))
            try:
                _check_item(item.control_id, item.text, item.kind, item.pump_id)
            except OutboxError as exc:
                raise StoreCorrupt(path, line, str(exc)) from None
            self._add(item)
        elif op == "done":
            cid = field("id", str)
            field("outcome", str)
            if not self._pending or self._pending[0].control_id != cid:
                raise StoreCorrupt(path, line, f"done for {cid!r}, which is not the head of the queue")
            self._remove_head()
        elif op == "reserve":
            upto = field("upto", int)
            if upto <= self._reserved:
                raise StoreCorrupt(path, line, f"reservation {upto} does not grow (was {self._reserved})")
            self._reserved = upto
        elif op == "state":
            self._state[field("key", str)] = _dumps(rec["value"])
        else:
            self._state.pop(field("key", str), None)

    # ------------------------------------------------------------------------------------------- queue

    def put(self, control_id: str, text: str, *, kind: str, pump_id: str | None) -> Item:
        """Queue a message at the tail; durable (fdatasync'd) before it returns. Raises OutboxError (bad
        argument, duplicate control id), OutboxFull (nothing queued) or StoreIOError (disk failure)."""
        size = _check_item(control_id, text, kind, pump_id)
        if control_id in self._ids:
            raise OutboxError("control_id", f"{control_id!r} is already in the outbox")
        if len(self._pending) >= self.max_pending or self._pending_bytes + size > self.max_pending_bytes:
            raise OutboxFull(f"outbox full: {len(self._pending)} messages ({self._pending_bytes} bytes) pending, "
                             f"limits {self.max_pending} / {self.max_pending_bytes} bytes; message "
                             f"{control_id!r} NOT queued")
        self._journal.append({"op": "put", "id": control_id, "kind": kind, "pump": pump_id, "text": text})
        item = Item(control_id, text, kind, pump_id)
        self._add(item)
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        return item

    def head(self) -> Item | None:
        """The oldest pending item (the one to send), or None."""
        return self._pending[0] if self._pending else None

    def pending(self) -> list[Item]:
        """Every pending (not yet done) item, oldest first."""
        return list(self._pending)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def done(self, control_id: str, outcome: str) -> None:
        """Mark the head delivered (or refused) with `outcome` (e.g. "AA", "AR"); durable before it returns.
        Only the head may be done: anything else raises OutboxError (order is kept)."""
        _check_text(outcome, "outcome", max_len=64, printable=True)
        head = self.head()
        if head is None or head.control_id != control_id:
            now = "the queue is empty" if head is None else f"the head is {head.control_id!r}"
            raise OutboxError("control_id", f"only the head can be done; {control_id!r} is not ({now})")
        self._journal.append({"op": "done", "id": control_id, "outcome": outcome})
        self._remove_head()
        self._maybe_compact()

    async def wait(self) -> None:
        """Return once an item is pending (at once if one already is)."""
        while not self._pending:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
            try:
                await fut
            finally:
                self._waiters.discard(fut)

    # ------------------------------------------------------------------------------------- counter, state

    def next_number(self) -> int:
        """A number never handed out before by this outbox, across restarts (grows; gaps after a restart)."""
        if self._next > self._reserved:
            upto = self._next + RESERVE_BLOCK - 1
            self._journal.append({"op": "reserve", "upto": upto})
            self._reserved = upto
            self._maybe_compact()
        n = self._next
        self._next += 1
        return n

    @property
    def state(self) -> dict[str, Any]:
        """A fresh copy of the durable key/value state (changing it changes nothing: use `set_state`)."""
        return {k: json.loads(v) for k, v in self._state.items()}

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON value (null, bool, number, string, list, object with string keys) under `key`; durable
        before it returns."""
        _check_text(key, "key", max_len=128)
        try:
            text = _dumps(value)
        except (TypeError, ValueError):
            raise OutboxError(f"state.{key}", "must be a JSON value (no NaN, no non-string keys)") from None
        if json.loads(text) != value:
            raise OutboxError(f"state.{key}", "must be plain JSON (lists, not tuples; string keys)")
        if len(text) > MAX_STATE_BYTES:
            raise OutboxError(f"state.{key}", f"must be at most {MAX_STATE_BYTES} bytes as JSON")
        self._journal.append({"op": "state", "key": key, "value": json.loads(text)})
        self._state[key] = text
        self._maybe_compact()

    def delete_state(self, key: str) -> None:
        """Remove `key` from the state (durable before it returns); no-op if absent."""
        if key not in self._state:
            return
        self._journal.append({"op": "unset", "key": key})
        del self._state[key]
        self._maybe_compact()

    # ------------------------------------------------------------------------------------------- upkeep

    def compact(self) -> None:
        """Rewrite the file with only the live records (pending items, reservation, state). Raises StoreIOError
        on failure; the queue is then as it was (or broken, if the directory sync failed: reopen)."""
        records: list[dict[str, Any]] = [{"format": FORMAT}]
        if self._reserved:
            records.append({"op": "reserve", "upto": self._reserved})
        records += [{"op": "state", "key": k, "value": json.loads(v)} for k, v in self._state.items()]
        records += [{"op": "put", "id": i.control_id, "kind": i.kind, "pump": i.pump_id, "text": i.text}
                    for i in self._pending]
        self._journal.rewrite(records)
        self._ids = {i.control_id for i in self._pending}
        self.compaction_error = None
        self._compact_failed_at = 0

    def _live_lines(self) -> int:
        return 1 + (1 if self._reserved else 0) + len(self._state) + len(self._pending)

    def _maybe_compact(self) -> None:
        live = self._live_lines()
        dead = self._journal.lines - live
        if dead < self.compact_after or dead < live or dead < self._compact_failed_at + self.compact_after:
            return
        try:
            self.compact()
        except StoreIOError as exc:
            # The record that made compaction due is already durable: report, do not fail its caller. A broken
            # journal makes the next call raise anyway.
            self.compaction_error = exc
            self._compact_failed_at = dead

    @property
    def repaired_bytes(self) -> int:
        """Bytes of a torn last line cut away when this outbox was opened (0: none)."""
        return self._journal.repaired_bytes

    @property
    def broken(self) -> StoreIOError | None:
        """Set after a failed sync: the outbox must be reopened."""
        return self._journal.broken

    @property
    def path(self) -> Path:
        return self._journal.path

    def close(self) -> None:
        """Release the file and its lock (writes nothing; everything was durable already)."""
        self._journal.close()
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()

    # ------------------------------------------------------------------------------------------ helpers

    def _add(self, item: Item) -> None:
        self._pending.append(item)
        self._ids.add(item.control_id)
        self._pending_bytes += len(item.text.encode("utf-8"))

    def _remove_head(self) -> None:
        item = self._pending.popleft()
        self._pending_bytes -= len(item.text.encode("utf-8"))


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
