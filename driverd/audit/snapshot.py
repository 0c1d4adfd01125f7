"""Signed state snapshots (issue 12, item 1): what start-up needs to carry on without replaying the whole log.

A `state_snapshot` record (a daemon record: pump_id null) holds the course state of every pump as replay of the
log up to it gives (`core/state_records.py`, exact), the highest schedule version seen per schedule, the drug
library in force (its text: replay needs it), and the exposure ledger's builder state. The writer follows it
with a checkpoint (reason `snapshot`), whose signature seals it like every record before it.

Start-up (`runtime/recovery.py`) takes the newest snapshot sealed by a checkpoint, verifies the log from the
snapshot's segment on, and replays only the records after it. `driverd audit replay` (and `audit verify --full`)
replays from the start and checks every snapshot against the states it has computed there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driverd.audit.exposure import LedgerBuilder
from driverd.audit.reader import iter_records
from driverd.audit.segments import list_segments
from driverd.core.errors import Problem, ValidationError
from driverd.core.state import CourseState
from driverd.core.state_records import STATE_FORMAT, state_from_fields, state_to_fields

SNAPSHOT_EVENT = "state_snapshot"


@dataclass
class Snapshot:
    seq: int
    segment: int
    states: dict[str, CourseState]
    versions: dict[str, int]
    library: str | None
    ledger: LedgerBuilder
    schedules: list[dict[str, Any]]  # the schedule_accepted records (pump_id, schedule, document) of its states


def snapshot_fields(states: Mapping[str, CourseState], versions: Mapping[str, int], library: str | None,
                    ledger: LedgerBuilder, accepted: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`accepted`: schedule digest -> its `schedule_accepted` record; the snapshot keeps those of the schedules in
    its states (pump_id, schedule fields, signed document), so start-up re-verifies them against the trust store
    as it does every logged schedule."""
    return {"format": STATE_FORMAT, "states": {p: state_to_fields(s) for p, s in sorted(states.items())},
            "versions": dict(sorted(versions.items())), "library": library, "ledger": ledger.to_fields(),
            "schedules": schedules_in(states, accepted)}


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


def _records(path: Path) -> Iterator[dict[str, Any]]:
    yield from iter_records(path)


def newest_snapshot(audit_dir: Path) -> Snapshot | None:
    """The newest snapshot sealed by a later checkpoint, reading segments from the newest back (so only the
    segments after it and its own are read). Integrity is not checked here: verify from its segment on."""
    segments = list_segments(audit_dir)
    sealed_after: int | None = None  # seq of the newest checkpoint seen in the segments read so far
    for number, path in reversed(segments):
        found: dict[str, Any] | None = None
        last_checkpoint: int | None = None
        for rec in _records(path):
            event = rec.get("event")
            if event == SNAPSHOT_EVENT:
                found = rec
            elif event == "checkpoint" and isinstance(rec.get("seq"), int):
                last_checkpoint = rec["seq"]
        sealed_after = last_checkpoint if last_checkpoint is not None else sealed_after
        if found is not None and sealed_after is not None and sealed_after > found["seq"]:
            return read_snapshot(found, number)
        if found is not None:
            # The newest snapshot is not sealed yet (a crash between it and its checkpoint): an older one, in
            # this segment or before, is sealed by this segment's checkpoints.
            older = _sealed_in(path, sealed_after)
            if older is not None:
                return read_snapshot(older, number)
    return None


def _sealed_in(path: Path, sealed_after: int | None) -> dict[str, Any] | None:
    if sealed_after is None:
        return None
    best: dict[str, Any] | None = None
    for rec in _records(path):
        if rec.get("event") == SNAPSHOT_EVENT and rec["seq"] < sealed_after:
            best = rec
    return best
