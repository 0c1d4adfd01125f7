"""`driverd audit replay LOG --since WHEN`: replay the decisions from the newest full state snapshot at or before
WHEN to the end of the log, instead of from the first record ever written.

An auditor looking into last week's incident should not wait for a year of history to be replayed. Start-up
already trusts a signed snapshot (docs/audit.md, "Snapshots"); the window replay trusts it the same way and no
further:
- the snapshot must be sealed by a later signed checkpoint, and the log is verified (chain, links, signatures)
  from the snapshot's segment to its end before anything is replayed: a window that does not verify is refused;
- the replayer is seeded from the snapshot exactly as a parallel replay's worker is at a cut
  (`replay_parallel._resume`: states, library, versions, ledger, the snapshot's schedules, the segment, and the
  snapshot as the parent of the next delta), and every record after it is replayed and every later snapshot and
  delta checked, as in a whole replay;
- what the window does not show is said in its result: that the state at the snapshot is the snapshot's, and that
  `audit verify --full` is what checks every snapshot against the history before it.
No per-course report: a course that began before the snapshot would show only its tail (`audit report` reads the
whole log).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from driverd.audit.canonical import parse_ts
from driverd.audit.replay import ReplayResult
from driverd.audit.replay_parallel import (
    _Hit,
    _replay_slice,
    _scan,
    _segment_of,
    _Slice,
    _snapshot_at,
    _Unusual,
)
from driverd.audit.segments import resolve_log
from driverd.audit.snapshot import read_snapshot
from driverd.audit.verify import verify_log
from driverd.core.errors import AuditError, DriverdError


@dataclass(slots=True)
class Window:
    """Where a window replay started and what vouches for it (for the CLI's text and JSON)."""

    since: str
    snapshot_seq: int | None = None  # None: no sealed snapshot at or before `since`: the whole log was replayed
    snapshot_ts: str | None = None
    segment: int | None = None  # the snapshot's segment: the log was verified from it on
    records: int = 0  # records replayed after the snapshot
    verified: dict[str, Any] = field(default_factory=dict)  # the suffix's VerifyReport (as_dict)

    def as_dict(self) -> dict[str, Any]:
        return {"since": self.since, "snapshot_seq": self.snapshot_seq, "snapshot_ts": self.snapshot_ts,
                "segment": self.segment, "records": self.records, "verified": self.verified}

    def text_lines(self) -> list[str]:
        if self.snapshot_seq is None:
            return [f"  window: no sealed state snapshot at or before {self.since}: the whole log was replayed"]
        v = self.verified
        key = f"checkpoints signed by {v.get('key_fingerprint')}" if v.get("key_fingerprint") else "unsigned log"
        return [
            f"  window: from the state snapshot at seq {self.snapshot_seq} ({self.snapshot_ts}), the newest sealed "
            f"one at or before {self.since}; {self.records} records replayed after it",
            f"  verified from segment {self.segment} to the end first: {v.get('records')} records, "
            f"{v.get('checkpoints')} checkpoints ({key})",
            "  the state at that snapshot is the snapshot's: `driverd audit verify --full` checks every snapshot "
            "against the history before it",
        ]


def _at_or_before(files: list[Path], since: datetime) -> Iterator[tuple[int, _Hit, dict[str, Any]]]:
    """The full snapshots with ts <= since, newest first, reading files from the newest back (so a window near the
    end of a long log reads only its last segments): (file index, hit, record)."""
    for index in range(len(files) - 1, -1, -1):
        snaps, _ = _scan(files[index], index)
        for hit in reversed(snaps):
            rec = _snapshot_at(files, hit)
            try:
                ts = parse_ts(rec["ts"])
            except (KeyError, TypeError, ValueError):
                raise _Unusual(f"{files[index]}: the snapshot at seq {rec.get('seq')} has no valid ts") from None
            if ts <= since:
                yield index, hit, rec


def _sealed_and_verified(path: Path, segs: list[tuple[int, Path]], since: datetime, public_key: Any,
                         window: Window) -> tuple[int, _Hit, dict[str, Any]] | None:
    """The newest full snapshot at or before `since` that a later signed checkpoint seals, the log verified from
    its segment to the end (AuditError if it does not verify); None if there is none."""
    for index, hit, rec in _at_or_before([p for _, p in segs], since):
        number = segs[index][0]
        report = verify_log(path, public_key=public_key, first_segment=max(number, 1), segments=segs[index:]) \
            if path.is_dir() else verify_log(path, public_key=public_key)
        window.verified = report.as_dict()
        if not report.ok:
            raise AuditError(f"the log from segment {number} on does not verify: {report.failure}; not replayed")
        if report.last_checkpoint_seq is not None and report.last_checkpoint_seq >= rec["seq"]:
            return index, hit, rec
        # Written just before a crash, without its checkpoint: as start-up does, an older one is taken.
    return None


def replay_since(path: Path, since: datetime, *, public_key: Any = None) -> tuple[ReplayResult, Window]:
    """Replay LOG from the newest sealed full snapshot at or before `since` (see the module's text). Raises
    AuditError when the log from that snapshot on does not verify, or the snapshot cannot seed a replay."""
    window = Window(since=since.isoformat().replace("+00:00", "Z"))
    segs = resolve_log(path)
    files = [p for _, p in segs]
    try:
        found = _sealed_and_verified(path, segs, since, public_key, window)
    except _Unusual as exc:
        raise AuditError(str(exc)) from None
    if found is None:
        from driverd.audit.replay_parallel import replay_log

        return replay_log(path, report=False), window
    index, hit, rec = found
    number = segs[index][0]
    segment = _segment_of(files[index])
    if segment is None:
        raise AuditError(f"{files[index]}: does not begin with a segment_start; replay the whole log instead")
    try:
        accepted = tuple(read_snapshot(rec).schedules)
    except DriverdError as exc:
        raise AuditError(f"the state snapshot at seq {rec['seq']} does not read: {exc}") from None
    ranges = tuple((str(files[i]), hit.end if i == index else 0, None) for i in range(index, len(files)))
    sl = _Slice(0, ranges, (str(files[index]), hit.start, hit.end), rec["seq"], segment, None, accepted)
    try:  # seeded and replayed as a parallel replay's last slice is (it reads and checks the seed line itself)
        out = _replay_slice(sl)
    except _Unusual as exc:  # a seed that does not seed, seqs out of order, a torn last line: the log changed?
        raise AuditError(f"{exc}; not replayed") from None
    result = ReplayResult(divergences=out.divergences, interrupted=out.interrupted, inputs=out.inputs,
                          outputs_checked=out.outputs_checked)
    # Not `seeded_from`: that says the log before the snapshot was archived; the window says what it is.
    window.snapshot_seq, window.snapshot_ts, window.segment = rec["seq"], rec.get("ts"), number
    window.records = out.records
    return result, window
