"""Crash recovery: rebuild every pump's course state by replaying the audit log through the pure core.

Start-up opens the writer first (`open_log`): that cuts a torn last line (or unsynced pages a power cut lost) back
to the last whole record and logs the cut, so a crash never blocks the next start. Then the log is verified (chain,
seqs, checkpoint signatures) and replayed; only then does the writer log `log_reopened` and sign a checkpoint.
Decisions a crash cut off after their input are recomputed by the core (`interrupted`: never sent, see
replay.py). A log that does not verify, whose replay really diverges from what was logged, or
that holds a schedule not signed by a key in the trust store stops the daemon from starting (fail loudly: never
guess a state).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from driverd.audit.canonical import loads_line
from driverd.audit.exposure import LedgerBuilder
from driverd.audit.reader import LineTooLong, bounded_lines
from driverd.audit.replay import Interrupted, Replayer
from driverd.audit.schedules import ScheduleChecker
from driverd.audit.segments import anchor_first_segment, segment_names
from driverd.audit.snapshot import newest_snapshot
from driverd.audit.verify import verify_log
from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.core.errors import AuditError
from driverd.core.state import CourseState
from driverd.signing import TrustStore


@dataclass
class Recovered:
    states: dict[str, CourseState] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # schedule_id -> highest accepted version
    records: int = 0
    interrupted: list[Interrupted] = field(default_factory=list)  # decisions a crash cut off (recomputed)
    ledger: LedgerBuilder = field(default_factory=LedgerBuilder)  # the exposure ledger, as of the log's end
    library: str | None = None  # the drug library text in force at the log's end
    snapshot_seq: int | None = None  # the state snapshot start-up began from (None: the whole log)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # digest -> schedule_accepted (fields)


def open_log(
    audit_dir: Path, config: AuditConfig, key: Ed25519PrivateKey | None, clock: Callable[[], datetime],
    trust: TrustStore,
) -> tuple[AuditWriter, Recovered]:
    """Start-up: open the writer (torn-tail repair, logged), then rebuild every course from the log. The writer
    logs `log_reopened` (and its checkpoint) only once the log verified and replayed: a refused start appends
    nothing, so a daemon restarted in a loop on a damaged log does not grow it or sign checkpoints over it."""
    writer = AuditWriter.open(audit_dir, config, key, clock, announce=False)
    try:
        recovered = recover(audit_dir, trust, key.public_key() if key is not None else None)
        writer.reopened()
        return writer, recovered
    except BaseException:
        writer.abandon()
        raise


def recover(audit_dir: Path, trust: TrustStore, public_key: Ed25519PublicKey | None = None) -> Recovered:
    """Rebuild every course. From the newest signed state snapshot or delta if there is one (the log is verified
    from its segment on, with the daemon's own key when given, and only the records after it are replayed), else
    from the whole log."""
    # Start-up makes a few hundred thousand objects that all live on (the history samples of every state) and no
    # cycles worth collecting: the cyclic GC's passes over them were a third of a 32-pump start (bench/README.md,
    # section 15). Reference counting still frees everything else.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _recover(audit_dir, trust, public_key)
    finally:
        if enabled:
            gc.enable()


def _recover(audit_dir: Path, trust: TrustStore, public_key: Ed25519PublicKey | None) -> Recovered:
    # One listing for all of recovery (nothing writes to the log meanwhile): a year's log holds ~9,000 segments
    # and each listing costs 10-20 ms (bench/README.md, section 20).
    names = segment_names(audit_dir) if audit_dir.is_dir() else []
    if not names:
        return Recovered()
    snap = newest_snapshot(audit_dir, names)
    # By number, not position: after `audit archive` the directory no longer starts at segment 1.
    first = snap.segment if snap is not None else anchor_first_segment(audit_dir)
    segments = [(n, audit_dir / name) for n, name in names if n >= first]
    # From a snapshot, the log before it is not read: the suffix must be signed with the daemon's own key.
    if snap is not None and snap.segment > 1:  # what verify_log would list itself (it reads no anchor then)
        report = verify_log(audit_dir, public_key=public_key, first_segment=snap.segment,
                            segments=segments or [(names[-1][0], audit_dir / names[-1][1])])
    else:
        report = verify_log(audit_dir, public_key=public_key if snap else None, first_segment=1)
    if not report.ok:
        failure = report.failure
        raise AuditError(f"audit log does not verify; refusing to start: {failure}")
    replayer = Replayer()
    schedules = ScheduleChecker(trust)  # adopt a schedule only if its signed document verifies (docs/audit.md)
    out = Recovered()
    if snap is not None:
        replayer.seed(snap)
        if snap.library is not None:
            schedules.add({"event": "library_loaded", "text": snap.library})
        out.versions = dict(snap.versions)
        out.ledger = snap.ledger
        out.snapshot_seq = snap.seq
        for acc in snap.schedules:  # the schedules of the snapshot's courses: re-verified like logged ones
            rec = {"event": "schedule_accepted", **acc}  # with its own seq, for the refusal's message
            schedules.add(rec)
            if isinstance(acc.get("schedule"), dict):
                out.accepted[str(acc["schedule"].get("digest"))] = rec
    for number, path in segments:
        # The lines up to the snapshot are not parsed (one is the snapshot itself, up to a few MB).
        skip = snap.line if snap is not None and number == snap.segment else 0
        for rec in _records(path, skip):
            if snap is not None and rec["seq"] <= snap.seq:
                continue
            schedules.add(rec)
            replayer.add(rec)
            out.ledger.add(rec)
            out.records += 1
            if rec.get("event") == "schedule_accepted" and isinstance(rec.get("schedule"), dict):
                out.accepted[str(rec["schedule"].get("digest"))] = rec
                sched = rec["schedule"]
                sid, ver = sched.get("schedule_id"), sched.get("version")
                if isinstance(sid, str) and isinstance(ver, int):
                    out.versions[sid] = max(out.versions.get(sid, 0), ver)
    result = replayer.finish()
    if result.divergences:
        bad = result.divergences[0]
        raise AuditError(f"audit replay diverges at seq {bad.seq} ({bad.kind}: {result.detail(bad)}); refusing to "
                         "start")
    out.states = replayer.states()
    out.interrupted = list(result.interrupted)
    out.library = replayer.library_text
    return out


def _records(path: Path, skip: int) -> Iterator[dict[str, Any]]:
    """The records of one segment after its first `skip` lines (those are not parsed), as `iter_lines` reads
    them (verify has just checked them: an error here means the file changed since)."""
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(bounded_lines(f), start=1):
                if n <= skip:
                    continue
                if not raw.endswith(b"\n"):
                    raise AuditError(f"{path}:{n}: torn last line (partial write); run `driverd audit verify`")
                try:
                    yield loads_line(raw[:-1])
                except ValueError as exc:
                    raise AuditError(f"{path}:{n}: not a canonical audit record: {exc}") from None
    except (LineTooLong, OSError) as exc:
        raise AuditError(f"{path}: cannot read: {exc}") from None
