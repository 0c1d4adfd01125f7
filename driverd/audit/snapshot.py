"""Signed state snapshots (issue 12, item 1): what start-up needs to carry on without replaying the whole log.

A `state_snapshot` record (a daemon record: pump_id null) holds the course state of every pump as replay of the
log up to it gives (`core/state_records.py`, exact), the highest schedule version seen per schedule, the drug
library in force (its text: replay needs it), and the exposure ledger's builder state. The writer follows it
with a checkpoint (reason `snapshot`), whose signature seals it like every record before it.

A `state_delta` record (a format of its own, DELTA_FORMAT; written between full snapshots, every DELTA_RECORDS
records or DELTA_EVERY, see runtime/daemon.py) holds only what changed since the previous snapshot or delta, its
`parent`: per pump, the encoded fields that differ and the history rows added (and how many old rows the 24-h
window dropped), and the library and schedules when they changed. The schedule versions seen and the exposure
ledger grow with the log's history (every schedule ever pushed, every burst of the lookback year), so format 2
writes them as patches (`versions_patch`, `ledger_patch`: the entries set and the keys deleted) when they changed;
format 1 (logs written before) held the versions whole in every delta and the ledger whole when it changed. Both
are read, and replay checks each delta in its own format. The parent is named by its
seq, its segment and the SHA-256 of its exact line (the next record's `prev`), so a delta sealed by a checkpoint
also seals its ancestors: start-up rebuilds the state from the full snapshot at the root of the chain and the
deltas after it, checking each ancestor line's hash, without reading or verifying the records in between.

Start-up (`runtime/recovery.py`) takes the newest snapshot or delta sealed by a checkpoint (one whose chain does
not resolve is passed over for the one before it), verifies the log from its segment on, and replays only the
records after it. `driverd audit replay` (and `audit verify --full`) replays from the start and checks every
snapshot and every delta against the states it has computed there (a delta must be exactly the one the daemon
would write from replay's states: `SnapshotChain`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driverd.audit.canonical import loads_line
from driverd.audit.exposure import LedgerBuilder
from driverd.audit.reader import bounded_lines
from driverd.audit.segments import segment_name, segment_names
from driverd.core.errors import AuditError, DriverdError, Problem, ValidationError
from driverd.core.history import EncodedMemo, History
from driverd.core.state import CourseState
from driverd.core.state_records import STATE_FORMAT, sample_row, state_fields, state_from_fields, state_to_fields

SNAPSHOT_EVENT = "state_snapshot"
DELTA_EVENT = "state_delta"
#: Version of the delta record written (a reader refuses versions it does not know: DELTA_FORMATS). Full snapshots
#: keep STATE_FORMAT.
DELTA_FORMAT = 2
DELTA_FORMATS = (1, 2)
#: A parent is among the first lines of its segment (a snapshot or delta opens its segment: writer.rotate).
PARENT_WITHIN_LINES = 16


@dataclass
class Snapshot:
    seq: int
    segment: int
    states: dict[str, CourseState]
    versions: dict[str, int]
    library: str | None
    ledger: LedgerBuilder
    schedules: list[dict[str, Any]]  # the schedule_accepted records (pump_id, schedule, document) of its states
    line: int = 0  # its line in its segment (start-up skips the lines up to it without parsing them)
    line_sha256: str | None = None  # SHA-256 of its line (a delta after it names it so)


def snapshot_fields(states: Mapping[str, CourseState], versions: Mapping[str, int], library: str | None,
                    ledger: LedgerBuilder, accepted: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`accepted`: schedule digest -> its `schedule_accepted` record; the snapshot keeps those of the schedules in
    its states (pump_id, schedule fields, signed document), so start-up re-verifies them against the trust store
    as it does every logged schedule."""
    return {"format": STATE_FORMAT, "states": {p: state_to_fields(s) for p, s in sorted(states.items())},
            "versions": dict(sorted(versions.items())), "library": library, "ledger": ledger.to_fields(),
            "schedules": schedules_in(states, accepted)}


def full_fields(enc: Encoded) -> dict[str, Any]:
    """`snapshot_fields` of what `SnapshotChain.encode` encoded (the same fields)."""
    return {"format": STATE_FORMAT,
            "states": {p: {**f, "samples": [sample_row(x) for x in enc.samples[p]]} for p, f in enc.states.items()},
            "versions": enc.versions, "library": enc.library, "ledger": enc.ledger, "schedules": enc.schedules}


def schedules_in(states: Mapping[str, CourseState], accepted: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    out = []
    for _, state in sorted(states.items()):
        rec = accepted.get(state.schedule.digest) if state.schedule is not None else None
        if rec is not None:
            out.append({"seq": rec.get("seq"), "pump_id": rec.get("pump_id"), "schedule": rec.get("schedule"),
                        "document": rec.get("document")})
    return out


def read_snapshot(rec: Mapping[str, Any], segment: int = 0, *, decode_states: bool = True) -> Snapshot:
    """Raises ValidationError naming the field and the rule. `decode_states=False`: the states are left out
    (`states` is empty; replay, which has them already, compares them in their encoded form)."""
    if rec.get("format") != STATE_FORMAT:
        raise ValidationError([Problem("format", "version", f"unknown snapshot format {rec.get('format')!r}")])
    states, versions, library = rec.get("states"), rec.get("versions"), rec.get("library")
    if not isinstance(states, dict):
        raise ValidationError([Problem("states", "type", "expected an object")])
    if not isinstance(versions, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                 for v in versions.values()):
        raise ValidationError([Problem("versions", "type", "expected an object of integers")])
    if library is not None and not isinstance(library, str):
        raise ValidationError([Problem("library", "type", "expected a string or null")])
    schedules = rec.get("schedules")
    if not isinstance(schedules, list) or not all(isinstance(x, dict) for x in schedules):
        raise ValidationError([Problem("schedules", "type", "expected a list of objects")])
    seq = rec.get("seq")
    return Snapshot(seq if isinstance(seq, int) else 0, segment,
                    {p: state_from_fields(f, f"states.{p}") for p, f in states.items()} if decode_states else {},
                    dict(versions), library, LedgerBuilder.from_fields(rec.get("ledger")), list(schedules))


# ------------------------------------------------------------------------------------------ deltas


@dataclass
class Encoded:
    """What a snapshot holds, its state fields encoded as the log holds them (the history as the samples
    themselves: encoded only when written, so the daemon keeps no second copy of every pump's history)."""

    states: dict[str, dict[str, Any]]  # pump -> state fields without "samples" (shared, never modified)
    samples: dict[str, History]  # pump -> the history (the state's own: an immutable view, no copy)
    versions: dict[str, int]
    library: str | None
    ledger: dict[str, Any]
    schedules: list[Any]


class RowMemo:
    """History rows (`sample_row`) encoded once for all the snapshots and deltas that hold them (`History.encoded`:
    a history is a view of an append-only buffer). Replay keeps one (it checks every snapshot and delta of a log);
    the daemon does not (it would keep a second copy of every pump's history as rows)."""

    def __init__(self) -> None:
        self._memo: EncodedMemo[list[str]] = {}
        self._kept: EncodedMemo[list[str]] = {}

    def rows(self, history: History) -> list[list[str]]:
        """`[sample_row(x) for x in history]` (a new list; the rows in it are shared: never modify them)."""
        return history.encoded(sample_row, self._memo, self._kept)

    def round(self) -> None:
        """A snapshot or delta is done: the buffers no history of it used are forgotten."""
        self._memo, self._kept = self._kept, {}


class SnapshotChain:
    """The last snapshot or delta written (by the daemon) or checked (by replay), and the next delta against it.

    The daemon and replay share this code, so replay checks a delta by computing the very record the daemon
    would have written from replay's own states and comparing the two. A history shares its samples with the
    histories it grew from, so the rows a delta adds are found by identity and only they are encoded.

    A pump whose state is the very object encoded last time (states are immutable) reuses those fields, and a new
    state reuses the encoding of every field that holds the same object as the last one (state_fields' `since`):
    the encoding is a function of the values, so the result is what encoding it afresh gives."""

    def __init__(self, row_memo: RowMemo | None = None) -> None:
        self.row_memo = row_memo
        self._last: Encoded | Callable[[], Encoded] | None = None
        self.parent: dict[str, Any] | None = None  # {"seq", "segment", "line_sha256"} of the last one
        self.since: int = 0  # deltas since the last full snapshot
        self._fields: dict[str, tuple[CourseState, dict[str, Any]]] = {}  # pump -> (state, its state_fields)

    def fields(self, pump: str, state: CourseState) -> dict[str, Any]:
        """`state_fields(state)` (shared: the caller must not modify it), encoded only if `state` is not the
        object last encoded for `pump`."""
        hit = self._fields.get(pump)
        if hit is not None and hit[0] is state:
            return hit[1]
        fields = state_fields(state, hit)  # the fields this state shares with the last one are not encoded again
        self._fields[pump] = (state, fields)
        return fields

    def encode(self, states: Mapping[str, CourseState], versions: Mapping[str, int], library: str | None,
               ledger: dict[str, Any], schedules: list[Any]) -> Encoded:
        enc = Encoded({}, {}, dict(sorted(versions.items())), library, ledger, schedules)
        for pump, state in sorted(states.items()):
            enc.states[pump] = self.fields(pump, state)
            enc.samples[pump] = state.samples
        for pump in [p for p in self._fields if p not in states]:
            del self._fields[pump]  # only the pumps of the last encoding are kept
        return enc

    def _rows(self, history: History, start: int = 0) -> list[list[str]]:
        """The rows of history[start:]: from the row memo if the chain has one (a slice of the same rows)."""
        if self.row_memo is None:
            return [sample_row(x) for x in history[start:]]
        return self.row_memo.rows(history)[start:]

    def last(self) -> Encoded | None:
        if callable(self._last):
            self._last = self._last()
        return self._last

    def mark(self, last: Encoded | Callable[[], Encoded], parent: dict[str, Any], *, full: bool) -> None:
        """`last` was written (or checked) as the record `parent` names; a callable is encoded when a delta needs
        it (replay meets many full snapshots and may meet no delta)."""
        self._last, self.parent = last, parent
        self.since = 0 if full else self.since + 1

    def delta_fields(self, cur: Encoded, fmt: int = DELTA_FORMAT) -> dict[str, Any] | None:
        """The `state_delta` fields taking the last snapshot to `cur`, or None when there is no last one. `fmt`:
        one of DELTA_FORMATS (replay checks an older log's deltas in the format they were written in)."""
        if fmt not in DELTA_FORMATS:
            raise ValueError(f"unknown state delta format {fmt!r}")
        prev = self.last()
        if prev is None or self.parent is None or self.parent.get("line_sha256") is None:
            return None
        pumps: dict[str, Any] = {}
        for pump, fields in cur.states.items():
            old = prev.states.get(pump)
            if old is None:
                pumps[pump] = {"state": {**fields, "samples": self._rows(cur.samples[pump])}}
                continue
            patch: dict[str, Any] = {"fields": {k: v for k, v in fields.items() if old.get(k) != v}}
            history = _history_patch(prev.samples[pump], cur.samples[pump], self._rows)
            if patch["fields"] or history != {"drop": 0, "add": []}:
                pumps[pump] = {**patch, **history}
        out: dict[str, Any] = {"format": fmt, "parent": dict(self.parent), "pumps": pumps,
                               "gone": sorted(set(prev.states) - set(cur.states))}
        if fmt == 1:
            out["versions"] = cur.versions
        elif cur.versions != prev.versions:
            out["versions_patch"] = dict_patch(prev.versions, cur.versions)
        if cur.library != prev.library:
            out["library"] = cur.library
        if cur.ledger != prev.ledger:
            lpatch = ledger_patch(prev.ledger, cur.ledger) if fmt == 2 else None
            if lpatch is None:
                out["ledger"] = cur.ledger
            else:
                out["ledger_patch"] = lpatch
        if cur.schedules != prev.schedules:
            out["schedules"] = cur.schedules
        if self.row_memo is not None:
            self.row_memo.round()  # every pump's history was encoded above (a patch holds its rows)
        return out


def dict_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """{"set": the entries of `new` that `old` lacks or holds another value for, "del": the keys of `old` that `new`
    lacks, sorted}: `apply_dict_patch(old, it)` gives `new` (values compared by ==: the encoded values are JSON
    strings, integers and lists of strings, for which == is exact)."""
    return {"set": {k: v for k, v in new.items() if k not in old or old[k] != v},
            "del": sorted(k for k in old if k not in new)}


def ledger_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ledger's fields (LedgerBuilder.to_fields: an object of objects) as a `dict_patch` per object that
    changed (an object `old` lacks is patched from empty: `retired` appears when pruning starts); None when that
    cannot say it (an object `new` lacks, or one that is not an object): the ledger is then written whole."""
    if not set(old) <= set(new) or not all(isinstance(v, dict) for v in (*old.values(), *new.values())):
        return None
    return {k: dict_patch(old.get(k, {}), v) for k, v in new.items() if old.get(k) != v}


def _history_patch(old: History, new: History, rows: Callable[[History, int], list[list[str]]]) -> dict[str, Any]:
    """{"drop": k, "add": rows} when `new` is `old` less its first k samples plus those of `rows` (the 24-h window
    slid and grew), else {"samples": rows of new} (the history was restarted: a new course). Samples are compared
    by identity, else by their rows (exact: a Decimal's exponent counts). Histories that grew from one another
    share their samples, so the identical run is counted without touching them (History.same_run) and only the
    samples after it, if any, are compared one by one. `rows(h, i)`: the rows of h[i:] (SnapshotChain._rows)."""
    if not new:
        return {"drop": len(old), "add": []}
    k = old.count_before(new[0].at)  # times strictly increase: the only possible overlap
    kept = len(old) - k
    if kept <= len(new):
        same = old.same_run(k, new)  # old[k + i] is new[i] for i < same
        if same == kept or all(a is b or sample_row(a) == sample_row(b)
                               for a, b in zip(old[k + same:], new[same:kept], strict=True)):
            return {"drop": k, "add": rows(new, kept)}
    return {"samples": rows(new, 0)}


def _bad(path: str, rule: str, detail: str) -> ValidationError:
    return ValidationError([Problem(path, rule, detail)])


def parent_ref(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A delta's `parent` field, checked: {"seq": int, "segment": int, "line_sha256": 64 hex}."""
    ref = rec.get("parent")
    if not isinstance(ref, dict) or set(ref) != {"seq", "segment", "line_sha256"}:
        raise _bad("parent", "type", "expected an object with seq, segment and line_sha256")
    for key in ("seq", "segment"):
        if isinstance(ref[key], bool) or not isinstance(ref[key], int) or ref[key] < 1:
            raise _bad(f"parent.{key}", "type", "expected a positive integer")
    h = ref["line_sha256"]
    if not isinstance(h, str) or len(h) != 64 or h.strip("0123456789abcdef"):
        raise _bad("parent.line_sha256", "type", "expected 64 lowercase hex digits")
    return ref


_DELTA_KEYS = {1: frozenset({"format", "parent", "pumps", "gone", "versions", "library", "ledger", "schedules"}),
               2: frozenset({"format", "parent", "pumps", "gone", "versions_patch", "library", "ledger",
                             "ledger_patch", "schedules"})}


def apply_delta(base: dict[str, Any], rec: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot fields (`states` with rows, `versions`, `library`, `ledger`, `schedules`) after `rec`, a
    `state_delta` of any of DELTA_FORMATS, from `base`, those of its parent (not modified). Raises ValidationError
    naming the field and the rule; the states themselves are checked when the result is read (`read_snapshot`)."""
    fmt = rec.get("format")
    if isinstance(fmt, bool) or fmt not in DELTA_FORMATS:
        raise _bad("format", "version", f"unknown state delta format {fmt!r}")
    unknown = sorted(k for k in rec if k not in _DELTA_KEYS[fmt] and k not in _ENVELOPE)
    if unknown:
        raise _bad(unknown[0], "unknown", "not a field of a state delta")
    pumps, gone = rec.get("pumps"), rec.get("gone")
    if not isinstance(pumps, dict):
        raise _bad("pumps", "type", "expected an object")
    if not isinstance(gone, list) or not all(isinstance(g, str) for g in gone):
        raise _bad("gone", "type", "expected a list of pump ids")
    states: dict[str, Any] = dict(base["states"])
    for pump in gone:
        if states.pop(pump, None) is None:
            raise _bad(f"gone.{pump}", "unknown", "no such pump in the parent")
    for pump, patch in pumps.items():
        states[pump] = _apply_patch(states.get(pump), patch, f"pumps.{pump}")
    out = {"states": states, "versions": rec.get("versions"), "library": base.get("library"),
           "ledger": base.get("ledger"), "schedules": base.get("schedules")}
    for key in ("library", "ledger", "schedules"):
        if key in rec:
            out[key] = rec[key]
    if fmt == 1:
        return out
    out["versions"] = base.get("versions")  # format 2: unchanged unless patched
    if "versions_patch" in rec:
        out["versions"] = apply_dict_patch(base.get("versions"), rec["versions_patch"], "versions_patch")
    if "ledger_patch" in rec:
        if "ledger" in rec:
            raise _bad("ledger_patch", "conflict", "a delta holds the ledger whole or as a patch, not both")
        out["ledger"] = _apply_ledger_patch(base.get("ledger"), rec["ledger_patch"])
    return out


def apply_dict_patch(old: Any, patch: Any, path: str) -> dict[str, Any]:
    """`old` with `patch` ({"set": {...}, "del": [keys of old]}, `dict_patch`) applied, keys sorted as a record
    holds them. Raises ValidationError naming the field and the rule; the values are checked when read."""
    if not isinstance(patch, dict) or set(patch) != {"set", "del"}:
        raise _bad(path, "type", "expected an object with set and del")
    if not isinstance(patch["set"], dict):
        raise _bad(f"{path}.set", "type", "expected an object")
    dels = patch["del"]
    if not isinstance(dels, list) or not all(isinstance(k, str) for k in dels):
        raise _bad(f"{path}.del", "type", "expected a list of keys")
    if not isinstance(old, dict):
        raise _bad(path, "unknown", "a patch for an object the parent does not hold")
    for key in dels:
        if key not in old or key in patch["set"]:
            raise _bad(f"{path}.del.{key}", "unknown", "not a key of the parent's object, or also set")
    if len(set(dels)) != len(dels):
        raise _bad(f"{path}.del", "unique", "a key deleted twice")
    gone = set(dels)
    return dict(sorted({**{k: v for k, v in old.items() if k not in gone}, **patch["set"]}.items()))


def _apply_ledger_patch(old: Any, patch: Any) -> dict[str, Any]:
    if not isinstance(patch, dict):
        raise _bad("ledger_patch", "type", "expected an object")
    if not isinstance(old, dict):
        raise _bad("ledger_patch", "unknown", "a patch for a ledger the parent does not hold")
    out = dict(old)
    for key, sub in patch.items():
        out[key] = apply_dict_patch(old.get(key, {}), sub, f"ledger_patch.{key}")
    return dict(sorted(out.items()))


def _apply_patch(old: Any, patch: Any, path: str) -> dict[str, Any]:
    if not isinstance(patch, dict):
        raise _bad(path, "type", "expected an object")
    if set(patch) == {"state"}:
        if not isinstance(patch["state"], dict):
            raise _bad(f"{path}.state", "type", "expected an object")
        return patch["state"]
    if set(patch) not in ({"fields", "drop", "add"}, {"fields", "samples"}):
        raise _bad(path, "type", "expected {state} or {fields, drop, add} or {fields, samples}")
    if not isinstance(old, dict) or not isinstance(old.get("samples"), list):
        raise _bad(path, "unknown", "a patch for a pump the parent does not hold")
    fields = patch["fields"]
    if not isinstance(fields, dict) or "samples" in fields or not set(fields) <= set(old):
        raise _bad(f"{path}.fields", "type", "expected an object of the state's fields")
    out = {**old, **fields}
    if "samples" in patch:
        if not isinstance(patch["samples"], list):
            raise _bad(f"{path}.samples", "type", "expected a list")
        out["samples"] = patch["samples"]
        return out
    drop, add, rows = patch["drop"], patch["add"], old["samples"]
    if isinstance(drop, bool) or not isinstance(drop, int) or not 0 <= drop <= len(rows):
        raise _bad(f"{path}.drop", "range", f"expected an integer from 0 to {len(rows)}")
    if not isinstance(add, list):
        raise _bad(f"{path}.add", "type", "expected a list")
    out["samples"] = rows[drop:] + add
    return out


_ENVELOPE = frozenset({"seq", "ts", "event", "pump_id", "course_id", "prev", "hash"})


def delta_body(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A delta record less its envelope: what `SnapshotChain.delta_fields` gives."""
    return {k: v for k, v in rec.items() if k not in _ENVELOPE}


# ------------------------------------------------------------------------------------------ finding them


class ChainBroken(Exception):
    """A delta's ancestors cannot be read back exactly (start-up then takes an older snapshot)."""


def _candidates(path: Path) -> tuple[list[tuple[int, int, bytes]], int | None]:
    """(snapshot and delta lines of a segment as (seq, line number, line), the last checkpoint's seq). Only lines
    whose bytes name those events are parsed (canonical JSON: `"event":"..."` appears as such at the top level;
    a nested one is told apart by parsing). Integrity is verify's job."""
    found: list[tuple[int, int, bytes]] = []
    checkpoint: int | None = None
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(bounded_lines(f), start=1):
                is_cp = b'"event":"checkpoint"' in raw
                if not is_cp and b'"event":"state_' not in raw:
                    continue
                try:
                    rec = loads_line(raw.rstrip(b"\n"))
                except ValueError:
                    continue  # a torn last line: not sealed; damage elsewhere: verify refuses it
                seq = rec.get("seq")
                if not isinstance(seq, int):
                    continue
                if rec.get("event") == "checkpoint":
                    checkpoint = seq
                elif rec.get("event") in (SNAPSHOT_EVENT, DELTA_EVENT):
                    found.append((seq, n, raw.rstrip(b"\n")))
    except (OSError, ValueError):  # LineTooLong is a ValueError: verify reports it
        pass
    return found, checkpoint


def newest_snapshot(audit_dir: Path, names: list[tuple[int, str]] | None = None) -> Snapshot | None:
    """The newest snapshot or delta sealed by a later checkpoint, as a Snapshot (a delta rebuilt from its chain),
    reading segments from the newest back (so only the segments after it and its own are read). A delta whose
    chain does not resolve (an ancestor missing or not the line its child names) is passed over for an older
    one. Integrity is not checked here: verify from its segment on. `names`: the directory's `segment_names`, when
    the caller has listed it already."""
    sealed_after: int | None = None  # seq of the newest checkpoint seen in the segments read so far
    for number, name in reversed(segment_names(audit_dir) if names is None else names):
        found, checkpoint = _candidates(audit_dir / name)
        sealed_after = checkpoint if checkpoint is not None else sealed_after
        for seq, lineno, raw in reversed(found):
            if sealed_after is None or sealed_after <= seq:
                continue  # written just before a crash, without its checkpoint
            try:
                rec = loads_line(raw)
                if rec.get("event") == SNAPSHOT_EVENT:
                    snap = read_snapshot(rec, number)
                else:
                    snap = read_snapshot({**resolve_delta(audit_dir, rec), "seq": seq}, number)
            except (ChainBroken, DriverdError, ValueError):
                continue
            snap.line = lineno
            snap.line_sha256 = hashlib.sha256(raw).hexdigest()
            return snap
    return None


def resolve_delta(audit_dir: Path, rec: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot fields a delta stands for: its ancestors read back by their segment and line hash, up to a
    full snapshot, and the deltas applied in order. Raises ChainBroken, or ValidationError for a malformed one."""
    chain: list[Mapping[str, Any]] = [rec]
    while chain[-1].get("event") == DELTA_EVENT:
        if len(chain) > 100_000:
            raise ChainBroken("delta chain too long")
        chain.append(_read_parent(audit_dir, parent_ref(chain[-1])))
    root = chain.pop()
    if root.get("format") != STATE_FORMAT or not isinstance(root.get("states"), dict):
        raise _bad("format", "version", f"unknown snapshot format {root.get('format')!r}")
    fields = {k: root.get(k) for k in ("states", "versions", "library", "ledger", "schedules")}
    for delta in reversed(chain):
        fields = apply_delta(fields, delta)
    return {"format": STATE_FORMAT, **fields}


def _read_parent(audit_dir: Path, ref: dict[str, Any]) -> dict[str, Any]:
    path = audit_dir / segment_name(ref["segment"])
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(bounded_lines(f)):
                if n >= PARENT_WITHIN_LINES:
                    break
                line = raw.rstrip(b"\n")
                if hashlib.sha256(line).hexdigest() == ref["line_sha256"]:
                    rec = loads_line(line)
                    if rec.get("seq") != ref["seq"] or rec.get("event") not in (SNAPSHOT_EVENT, DELTA_EVENT):
                        raise ChainBroken(f"the line of seq {ref['seq']} holds another record")
                    return rec
    except (OSError, ValueError, AuditError) as exc:
        raise ChainBroken(f"segment {ref['segment']}: {exc}") from None
    raise ChainBroken(f"seq {ref['seq']} not found at the start of segment {ref['segment']}")
