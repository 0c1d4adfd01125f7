"""Crash recovery: rebuild every pump's course state by replaying the audit log through the pure core.

Start-up opens the writer first (`open_log`): that cuts a torn last line back to the last whole record and logs the
cut, so a crash mid-write never blocks the next start. Then the log is verified (chain, seqs, checkpoint
signatures) and replayed. Decisions a crash cut off after their input are recomputed by the core (`interrupted`:
never sent, see replay.py). A log that does not verify, whose replay really diverges from what was logged, or
that holds a schedule not signed by a key in the trust store stops the daemon from starting (fail loudly: never
guess a state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.reader import iter_lines
from driverd.audit.replay import Interrupted, Replayer
from driverd.audit.schedules import ScheduleChecker
from driverd.audit.segments import list_segments
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


def open_log(
    audit_dir: Path, config: AuditConfig, key: Ed25519PrivateKey | None, clock: Callable[[], datetime],
    trust: TrustStore,
) -> tuple[AuditWriter, Recovered]:
    """Start-up: open the writer (torn-tail repair, logged), then rebuild every course from the log."""
    writer = AuditWriter.open(audit_dir, config, key, clock)
    try:
        return writer, recover(audit_dir, trust)
    except BaseException:
        writer.abandon()
        raise


def recover(audit_dir: Path, trust: TrustStore) -> Recovered:
    if not audit_dir.is_dir() or not list_segments(audit_dir):
        return Recovered()
    report = verify_log(audit_dir)
    if not report.ok:
        failure = report.failure
        raise AuditError(f"audit log does not verify; refusing to start: {failure}")
    replayer = Replayer()
    schedules = ScheduleChecker(trust)  # adopt a schedule only if its signed document verifies (docs/audit.md)
    out = Recovered()
    for _, path in list_segments(audit_dir):
        for line in iter_lines(path):
            rec = line.record
            schedules.add(rec)
            replayer.add(rec)
            out.records += 1
            if rec.get("event") == "schedule_accepted" and isinstance(rec.get("schedule"), dict):
                sched = rec["schedule"]
                sid, ver = sched.get("schedule_id"), sched.get("version")
                if isinstance(sid, str) and isinstance(ver, int):
                    out.versions[sid] = max(out.versions.get(sid, 0), ver)
    result = replayer.finish()
    if result.divergences:
        first = result.divergences[0]
        raise AuditError(f"audit replay diverges at seq {first.seq} ({first.kind}: {first.detail}); refusing to start")
    out.states = replayer.states()
    out.interrupted = list(result.interrupted)
    return out
