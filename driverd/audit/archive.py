"""`driverd audit archive`: move sealed segments whose courses have ended out of the live log (issue 12, item 2).

The live log keeps its newest part, which starts with a state snapshot sealed by a signed checkpoint, so start-up
recovery (which starts from the newest snapshot anyway) and replay of the live log alone (seeded from that first
snapshot) give the same states as the whole log. An **archive anchor** (`archive-anchor.json`, signed with the
daemon's audit key) left in the live directory names the archived segments (number, seqs, size, SHA-256, where
they went) and the last archived line's hash, which the first live record's `prev` must equal: `audit verify`
checks the live log from there on, and `audit verify LOG --archive DIR` checks the whole chain.

The move is a sequence of durable steps, each a crash point that leaves a log that verifies and recovers:
1. copy every segment into DIR (`.part`, fsync, rename, fsync DIR) and read each copy back (SHA-256);
2. write the anchor atomically (`.tmp`, fsync, rename, fsync the live directory);
3. remove the archived segments from the live directory, oldest first, then fsync it.
Before step 2 the live log is untouched; from step 2 on, the anchor says where the live log starts, and the
segments before it still present are archived copies that readers skip. Running `archive` again finishes an
interrupted run (idempotent).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from driverd.audit.canonical import dumps, format_ts, parse_ts, sha256_hex
from driverd.audit.durable import fsync_dir, make_dirs
from driverd.audit.reader import iter_lines
from driverd.audit.segments import ANCHOR_NAME, list_segments, segment_name
from driverd.audit.signing import fingerprint, public_from_b64
from driverd.core.errors import AuditError
from driverd.core.state import ACTIVE

ANCHOR_FORMAT: Final = "driverd-archive-anchor/1"
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")
_WRITER_RECORDS: Final = frozenset({"segment_start", "checkpoint", "torn_tail_truncated", "log_reopened"})
_COPY_BLOCK: Final = 1 << 20

#: A step boundary hook (tests raise from it to simulate a crash there): called with the step just completed.
StepHook = Callable[[str], None]


class ArchiveRefused(AuditError):
    """Nothing was moved (or an interrupted run could not be finished): `reason` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message

    @property
    def nothing_to_archive(self) -> bool:
        """Nothing is old enough to go yet (a normal outcome for a run from cron), not something wrong."""
        return self.reason in NOTHING_TO_ARCHIVE


#: Refusals that only mean no segment may go yet: the segments are too recent for --before, the live log has too
#: few closed segments, or a course with records in the oldest segments is still running. A later run archives
#: them. Every other refusal (unsealed, does_not_verify, key_*, no_snapshot, ...) needs a person.
NOTHING_TO_ARCHIVE = frozenset({"not_before_date", "live_segment", "course_active"})


@dataclass(frozen=True, slots=True)
class ArchivedSegment:
    segment: int
    first_seq: int
    last_seq: int
    bytes: int
    sha256: str  # of the whole file
    archive: str  # the archive directory it was moved to (absolute)

    def fields(self) -> dict[str, Any]:
        return {"segment": self.segment, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "bytes": self.bytes, "sha256": self.sha256, "archive": self.archive}


@dataclass(frozen=True, slots=True)
class Anchor:
    first_segment: int  # the live log's first segment
    last_seq: int  # seq of the last archived record (the live log starts at last_seq + 1)
    last_hash: str  # SHA-256 of the last archived line (= the first live record's prev)
    snapshot_seq: int  # the sealed state snapshot the live log starts from
    segments: tuple[ArchivedSegment, ...]  # every archived segment, 1 .. first_segment - 1
    archived_at: str
    key_fingerprint: str | None
    public_key: str | None  # base64 raw Ed25519 (as in segment_start), so the anchor can be checked on its own
    sig: str | None

    def fields(self) -> dict[str, Any]:
        """Everything but `sig`: what the signature covers."""
        return {"format": ANCHOR_FORMAT, "first_segment": self.first_segment, "last_seq": self.last_seq,
                "last_hash": self.last_hash, "snapshot_seq": self.snapshot_seq,
                "segments": [s.fields() for s in self.segments], "archived_at": self.archived_at,
                "key_fingerprint": self.key_fingerprint, "public_key": self.public_key}

    def to_bytes(self) -> bytes:
        return dumps({**self.fields(), "sig": self.sig}) + b"\n"


def anchor_payload(anchor: Anchor) -> bytes:
    return dumps(anchor.fields())


# ------------------------------------------------------------------------------------------------ reading


def read_anchor(directory: Path) -> Anchor | None:
    """The live directory's anchor, or None. Raises AuditError naming the field and the rule when malformed."""
    path = directory / ANCHOR_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        from driverd.audit.canonical import loads_line

        raw = loads_line(data[:-1] if data.endswith(b"\n") else data)
    except ValueError as exc:
        raise AuditError(f"{path}: not a canonical JSON archive anchor: {exc}") from None

    def bad(name: str, rule: str) -> AuditError:
        return AuditError(f"{path}: {name}: {rule}")

    def integer(obj: dict[str, Any], name: str, minimum: int, where: str = "") -> int:
        v = obj.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise bad(where + name, f"expected an integer >= {minimum}")
        return v

    def hex64(obj: dict[str, Any], name: str, where: str = "") -> str:
        v = obj.get(name)
        if not isinstance(v, str) or not _HEX64.match(v):
            raise bad(where + name, "expected 64 lowercase hex digits")
        return v

    if raw.get("format") != ANCHOR_FORMAT:
        raise bad("format", f"expected {ANCHOR_FORMAT!r}, found {raw.get('format')!r}")
    known = {"format", "first_segment", "last_seq", "last_hash", "snapshot_seq", "segments", "archived_at",
             "key_fingerprint", "public_key", "sig"}
    extra = sorted(set(raw) - known)
    if extra:
        raise bad(extra[0], "unknown field")
    first = integer(raw, "first_segment", 2)
    segs_raw = raw.get("segments")
    if not isinstance(segs_raw, list) or not all(isinstance(x, dict) for x in segs_raw):
        raise bad("segments", "expected a list of objects")
    segments = []
    for i, s in enumerate(segs_raw):
        w = f"segments[{i}]."
        archive = s.get("archive")
        if not isinstance(archive, str) or not archive:
            raise bad(w + "archive", "expected a directory path")
        segments.append(ArchivedSegment(integer(s, "segment", 1, w), integer(s, "first_seq", 1, w),
                                        integer(s, "last_seq", 1, w), integer(s, "bytes", 1, w), hex64(s, "sha256", w),
                                        archive))
    if [s.segment for s in segments] != list(range(1, first)):
        raise bad("segments", f"expected segments 1..{first - 1}, in order")
    seq = 1
    for s in segments:
        if s.first_seq != seq or s.last_seq < s.first_seq:
            raise bad(f"segments[{s.segment - 1}]", f"seqs must continue from {seq}")
        seq = s.last_seq + 1
    last_seq = integer(raw, "last_seq", 1)
    if last_seq != seq - 1:
        raise bad("last_seq", f"expected {seq - 1}, the last archived segment's last seq")
    snapshot_seq = integer(raw, "snapshot_seq", last_seq + 1)
    archived_at = raw.get("archived_at")
    try:
        parse_ts(archived_at)  # type: ignore[arg-type]
    except AuditError:
        raise bad("archived_at", "expected an RFC 3339 UTC time") from None
    fp, pub, sig = raw.get("key_fingerprint"), raw.get("public_key"), raw.get("sig")
    if fp is not None and (not isinstance(fp, str) or not _HEX64.match(fp)):
        raise bad("key_fingerprint", "expected 64 lowercase hex digits or null")
    for name, v in (("public_key", pub), ("sig", sig)):
        if v is not None and not isinstance(v, str):
            raise bad(name, "expected a base64 string or null")
    if (fp is None) != (pub is None) or (fp is None) != (sig is None):
        raise bad("sig", "key_fingerprint, public_key and sig are all set (signed) or all null (unsigned log)")
    return Anchor(first, last_seq, hex64(raw, "last_hash"), snapshot_seq, tuple(segments), str(archived_at), fp,
                  pub, sig)


def anchor_problem(anchor: Anchor, log_fingerprint: str | None, key: Ed25519PublicKey | None) -> str | None:
    """Why the anchor is not authentic for a log signed with `key` (fingerprint `log_fingerprint`), or None.
    An unsigned log has an unsigned anchor."""
    if log_fingerprint is None:
        return None if anchor.sig is None else "the anchor is signed but the live log has no key"
    if anchor.sig is None or anchor.public_key is None:
        return "the anchor is not signed but the log is"
    if anchor.key_fingerprint != log_fingerprint:
        return f"the anchor's key {anchor.key_fingerprint} is not the log's key {log_fingerprint}"
    try:
        own = public_from_b64(anchor.public_key)
    except AuditError as exc:
        return f"anchor {exc}"
    if fingerprint(own) != log_fingerprint:
        return "the anchor's public_key does not match its key_fingerprint"
    check = key if key is not None else own
    try:
        check.verify(base64.b64decode(anchor.sig.encode("ascii"), validate=True), anchor_payload(anchor))
    except (binascii.Error, ValueError, UnicodeEncodeError, InvalidSignature):
        return "the anchor's signature does not verify"
    return None


# ------------------------------------------------------------------------------------------------ planning


@dataclass(slots=True)
class _SegmentInfo:
    number: int
    path: Path
    first_seq: int = 0
    last_seq: int = 0
    last_hash: str = ""
    last_ts: datetime | None = None
    sealed: bool = False  # its last record is a checkpoint
    courses: set[tuple[str, str]] = field(default_factory=set)  # (pump, course) with records here
    # The first state snapshot, if only the writer's own records come before it and a checkpoint after it.
    opening_snapshot: dict[str, Any] | None = None
    # It opens with a state delta instead: never a cut (the live log must start from a full snapshot), and not a
    # reason worth reporting either (most segments open so).
    opening_delta: bool = False


def _scan(number: int, path: Path) -> _SegmentInfo:
    info = _SegmentInfo(number, path)
    course_data = False
    snapshot: dict[str, Any] | None = None
    for line in iter_lines(path):
        rec = line.record
        event = rec.get("event")
        if not info.first_seq:
            info.first_seq = rec["seq"]
        info.last_seq = rec["seq"]
        info.last_hash = sha256_hex(line.raw)
        info.last_ts = parse_ts(rec["ts"])
        info.sealed = event == "checkpoint"
        if event == "checkpoint" and snapshot is not None and info.opening_snapshot is None:
            info.opening_snapshot = snapshot
        if event == "state_snapshot" and not course_data:
            snapshot = rec
        info.opening_delta = info.opening_delta or (event == "state_delta" and not course_data)
        if event not in _WRITER_RECORDS:
            course_data = True
        pump, course = rec.get("pump_id"), rec.get("course_id")
        if isinstance(pump, str) and isinstance(course, str):
            info.courses.add((pump, course))
    return info


def _active_course(snapshot: dict[str, Any], courses: set[tuple[str, str]]) -> tuple[str, str] | None:
    """A course with records in the segments to archive that has not ended at the snapshot (still active, or its
    end-of-course record not yet logged), or None."""
    from driverd.audit.snapshot import read_snapshot

    states = read_snapshot(snapshot).states
    for pump, course in sorted(courses):
        st = states.get(pump)
        if st is not None and st.course_id == course and (st.phase in ACTIVE or st.summary_due):
            return pump, course
    return None


@dataclass(slots=True)
class Plan:
    first: int  # first segment to archive
    cut: int  # the new first live segment
    segments: list[_SegmentInfo]  # to archive
    snapshot: dict[str, Any]  # the cut segment's opening snapshot


def plan(closed: list[_SegmentInfo], before: datetime) -> Plan:
    """The largest prefix of `closed` (the live log's segments oldest first, less the one being written, which is
    neither moved nor read) that may go: every segment sealed, entirely before `before`, its courses ended by the
    snapshot that opens the segment after it (itself a closed segment, which stays). Raises ArchiveRefused naming
    why the oldest segment cannot go when none can."""
    if len(closed) < 2:
        raise ArchiveRefused("live_segment", "too few segments: the segment being written is never archived, and "
                                             "the live log must keep a closed segment that opens with a snapshot")
    reason: ArchiveRefused | None = None
    best: Plan | None = None
    courses: set[tuple[str, str]] = set()
    live = closed
    for i, seg in enumerate(live[:-1]):
        if not seg.sealed:
            reason = reason or ArchiveRefused("unsealed", f"segment {seg.number} does not end with a signed "
                                                          "checkpoint")
            break
        if seg.last_ts is None or seg.last_ts >= before:
            reason = reason or ArchiveRefused(
                "not_before_date", f"segment {seg.number} has records at or after {format_ts(before)} (its last at "
                                   f"{format_ts(seg.last_ts) if seg.last_ts else '?'})")
            break
        courses |= seg.courses
        nxt = live[i + 1]
        if nxt.opening_snapshot is None:
            reason = reason or (None if nxt.opening_delta else ArchiveRefused(
                "no_snapshot", f"segment {nxt.number} does not open with a sealed state snapshot, so the live log "
                               f"could not start there"))
            continue
        active = _active_course(nxt.opening_snapshot, courses)
        if active is not None:
            reason = reason or ArchiveRefused(
                "course_active", f"course {active[1]} on pump {active[0]} has records in segments up to "
                                 f"{seg.number} and has not ended at the snapshot (seq {nxt.opening_snapshot['seq']})")
            continue
        best = Plan(live[0].number, nxt.number, live[: i + 1], nxt.opening_snapshot)
    if best is None:
        raise reason or ArchiveRefused("no_snapshot", "no closed segment after the oldest opens with a sealed full "
                                                      "state snapshot (only deltas), so the live log could not start "
                                                      "there")
    return best


# ------------------------------------------------------------------------------------------------ the move


@dataclass(slots=True)
class ArchiveResult:
    log: str
    archive: str
    archived: list[int] = field(default_factory=list)  # segments moved by this run
    finished: list[int] = field(default_factory=list)  # segments of an interrupted run, removed now
    first_segment: int = 1  # the live log's first segment afterwards
    last_seq: int = 0
    bytes_moved: int = 0
    snapshot_seq: int | None = None
    signed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"ok": True, "log": self.log, "archive": self.archive, "archived": self.archived,
                "finished": self.finished, "first_segment": self.first_segment, "last_seq": self.last_seq,
                "bytes_moved": self.bytes_moved, "snapshot_seq": self.snapshot_seq, "signed": self.signed,
                "anchor": str(Path(self.log) / ANCHOR_NAME)}


def _file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while block := f.read(_COPY_BLOCK):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _write_file(path: Path, chunks: Iterator[bytes], mode: int) -> None:
    """Write and fsync a new file (replacing a leftover one); on an I/O error (disk full) it is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        for data in chunks:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def _blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(_COPY_BLOCK):
            yield block


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the writer's directory lock when no daemon holds it, so none starts on a half-moved log (it refuses,
    loudly, and systemd retries). With the daemon running, archive goes ahead: it never touches the segment
    being written."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def archive_log(log: Path, before: datetime, dest: Path, key: Ed25519PrivateKey | None, *,
                now: Callable[[], datetime] = lambda: datetime.now(UTC), step: StepHook | None = None,
                public_key: Ed25519PublicKey | None = None) -> ArchiveResult:
    """Move the sealed segments of LOG entirely before `before` whose courses have ended into `dest`. `key`: the
    daemon's audit key (required for a signed log: it signs the anchor). Raises ArchiveRefused (nothing moved,
    or an interrupted run left as it was) or AuditError for an I/O failure (disk full: the live log is intact)."""
    hook = step or (lambda _name: None)
    log = Path(log)
    if not log.is_dir():
        raise ArchiveRefused("not_a_directory", f"{log}: the live log must be a directory of segments")
    dest = Path(os.path.abspath(dest))
    if dest == Path(os.path.abspath(log)):
        raise ArchiveRefused("same_directory", "the archive directory must not be the live log directory")
    with _locked(log):
        return _archive(log, before, dest, key, now, hook, public_key)


def _archive(log: Path, before: datetime, dest: Path, key: Ed25519PrivateKey | None, now: Callable[[], datetime],
             hook: StepHook, public_key: Ed25519PublicKey | None) -> ArchiveResult:
    from driverd.audit.replay import Replayer
    from driverd.audit.verify import verify_log

    result = ArchiveResult(str(log), str(dest))
    try:
        anchor = read_anchor(log)
    except AuditError as exc:
        raise ArchiveRefused("anchor_invalid", str(exc)) from None
    segs = list_segments(log)
    if not segs:
        raise ArchiveRefused("empty", f"{log}: no audit segments")
    if anchor is not None:
        first_seg = [(n, p) for n, p in segs if n == anchor.first_segment]
        if not first_seg:
            raise ArchiveRefused("does_not_verify", f"segment {anchor.first_segment}, where the anchor says the live "
                                                    "log starts, is missing")
        report = verify_log(log, public_key=public_key, segments=first_seg)
        if not report.ok:  # the anchor itself, before acting on it
            raise ArchiveRefused("does_not_verify", f"the live log does not verify: {report.failure}")
        if key is not None and report.key_fingerprint != fingerprint(key.public_key()):
            raise ArchiveRefused("key_mismatch", f"--key {fingerprint(key.public_key())} is not the log's key "
                                                 f"{report.key_fingerprint}")
    first_live = anchor.first_segment if anchor is not None else 1
    if anchor is not None:
        result.finished = _finish(log, anchor, segs, hook)
        segs = [(n, p) for n, p in segs if n >= first_live]
        result.first_segment, result.last_seq, result.snapshot_seq = first_live, anchor.last_seq, anchor.snapshot_seq
        result.signed = anchor.sig is not None
    elif segs[0][0] != 1:
        raise ArchiveRefused("no_anchor", f"{log}: the log starts at segment {segs[0][0]} and has no archive anchor")
    infos = [_scan(n, p) for n, p in segs[:-1]]  # the segment being written is not read: it may be growing
    try:
        chosen = plan(infos, before)
    except ArchiveRefused:
        if result.finished:
            return result  # an interrupted run finished; nothing more may go
        raise
    # What goes, and the segment the live log will open with, must verify (chain, signatures, and the anchor of an
    # earlier archive). Only closed segments: the daemon may be appending to the last one meanwhile.
    report = verify_log(log, public_key=public_key, segments=[(i.number, i.path) for i in infos
                                                               if i.number <= chosen.cut])
    if not report.ok:
        raise ArchiveRefused("does_not_verify", f"the live log does not verify: {report.failure}")
    if report.key_fingerprint is not None and key is None:
        raise ArchiveRefused("key_required", "the log is signed: give the daemon's audit key (--key) to sign the "
                                             "archive anchor")
    if key is not None and report.key_fingerprint != fingerprint(key.public_key()):
        raise ArchiveRefused("key_mismatch", f"--key {fingerprint(key.public_key())} is not the log's key "
                                             f"{report.key_fingerprint}")
    log_fp = report.key_fingerprint
    # The snapshot the live log will start from must be what replay of the log up to it gives (as `verify --full`
    # checks): replay what is archived now (from the live log's start) through that snapshot.
    replayer = Replayer()
    snap_seq = chosen.snapshot["seq"]
    for info in [*chosen.segments, next(i for i in infos if i.number == chosen.cut)]:
        for line in iter_lines(info.path):
            replayer.add(line.record)
            if line.record["seq"] >= snap_seq:
                break
    divergences = replayer.result.divergences
    if divergences:
        d = divergences[0]
        raise ArchiveRefused("replay_diverges", f"replay up to the snapshot at seq {snap_seq} diverges at seq {d.seq} "
                                                f"({d.kind}: {replayer.result.detail(d)})")
    # 1. Copy into DIR, durably, and read every copy back.
    try:
        _make_archive_dir(dest)
        moved = [_copy(info, dest, hook) for info in chosen.segments]
        fsync_dir(dest)
    except OSError as exc:
        raise AuditError(f"{dest}: archiving failed, nothing removed from the live log: {exc.strerror or exc} "
                         f"(errno {exc.errno})") from None
    hook("dest_synced")
    # 2. The anchor, atomically.
    previous = list(anchor.segments) if anchor is not None else []
    last = chosen.segments[-1]
    new = Anchor(chosen.cut, last.last_seq, last.last_hash, snap_seq, tuple(previous + moved), format_ts(now()),
                 log_fp, None, None)
    if key is not None:
        from driverd.audit.signing import public_b64

        unsigned = Anchor(new.first_segment, new.last_seq, new.last_hash, new.snapshot_seq, new.segments,
                          new.archived_at, log_fp, public_b64(key.public_key()), None)
        sig = base64.b64encode(key.sign(anchor_payload(unsigned))).decode("ascii")
        new = Anchor(unsigned.first_segment, unsigned.last_seq, unsigned.last_hash, unsigned.snapshot_seq,
                     unsigned.segments, unsigned.archived_at, log_fp, unsigned.public_key, sig)
    try:
        _write_anchor(log, new, hook)
    except OSError as exc:
        raise AuditError(f"{log}: cannot write the archive anchor, nothing removed from the live log: "
                         f"{exc.strerror or exc} (errno {exc.errno})") from None
    # 3. Remove the archived segments from the live directory.
    _remove(log, [info.number for info in chosen.segments], hook)
    result.archived = [info.number for info in chosen.segments]
    result.first_segment, result.last_seq, result.snapshot_seq = chosen.cut, last.last_seq, snap_seq
    result.bytes_moved = sum(m.bytes for m in moved)
    result.signed = new.sig is not None
    return result


def _make_archive_dir(dest: Path) -> None:
    from driverd.audit.writer import DIR_MODE

    make_dirs(dest, DIR_MODE)


def _copy(info: _SegmentInfo, dest: Path, hook: StepHook) -> ArchivedSegment:
    from driverd.audit.writer import SEGMENT_MODE

    digest, size = _file_sha256(info.path)
    target = dest / segment_name(info.number)
    entry = ArchivedSegment(info.number, info.first_seq, info.last_seq, size, digest, str(dest))
    if target.exists():
        have = _file_sha256(target)
        if have == (digest, size):
            return entry  # copied by an earlier run
        if not (have[1] < size and _is_prefix(target, info.path)):
            raise ArchiveRefused("archive_conflict", f"{target} exists and is not a copy of this log's segment "
                                                     f"{info.number}: use an empty directory or this log's own "
                                                     "archive")
        # A torn copy (cut short): copied again below.
    part = dest / (segment_name(info.number) + ".part")
    _write_file(part, _blocks(info.path), SEGMENT_MODE)
    hook(f"copied:{info.number}")
    os.replace(part, target)
    hook(f"renamed:{info.number}")
    if _file_sha256(target) != (digest, size):  # read back what the archive now holds
        raise OSError(errno.EIO, f"{target}: the copy reads back different from {info.path}")
    return entry


def _is_prefix(short: Path, long: Path) -> bool:
    with short.open("rb") as a, long.open("rb") as b:
        while block := a.read(_COPY_BLOCK):
            if b.read(len(block)) != block:
                return False
    return True


def _write_anchor(log: Path, anchor: Anchor, hook: StepHook) -> None:
    from driverd.audit.writer import SEGMENT_MODE

    tmp = log / (ANCHOR_NAME + ".tmp")
    _write_file(tmp, iter([anchor.to_bytes()]), SEGMENT_MODE)
    hook("anchor_tmp")
    os.replace(tmp, log / ANCHOR_NAME)
    hook("anchor_renamed")
    fsync_dir(log)
    hook("anchor_synced")


def _remove(log: Path, numbers: list[int], hook: StepHook) -> None:
    # Oldest first: a crash leaves the live directory's segments consecutive (the writer requires that).
    try:
        for n in numbers:
            with contextlib.suppress(FileNotFoundError):
                (log / segment_name(n)).unlink()
            hook(f"removed:{n}")
        fsync_dir(log)
    except OSError as exc:
        raise AuditError(f"{log}: removing archived segments failed ({exc.strerror or exc}); the anchor is "
                         "written, run `driverd audit archive` again to finish") from None
    hook("live_synced")


def _finish(log: Path, anchor: Anchor, segs: list[tuple[int, Path]], hook: StepHook) -> list[int]:
    """An earlier run wrote its anchor but was cut short before removing every archived segment: check each one
    left against the anchor (and its archived copy: copied again if that is missing or torn), then remove them."""
    left = [(n, p) for n, p in segs if n < anchor.first_segment]
    if not left:
        try:
            fsync_dir(log)  # the last run may have crashed after its last removal, before making it durable
        except OSError as exc:
            raise AuditError(f"{log}: cannot sync the directory: {exc.strerror or exc}") from None
        return []
    by_number = {s.segment: s for s in anchor.segments}
    for n, p in left:
        entry = by_number[n]
        digest, size = _file_sha256(p)
        if (digest, size) != (entry.sha256, entry.bytes):
            raise ArchiveRefused("leftover_differs", f"{p} is below the anchor's first segment but is not the "
                                                     f"segment it archived (SHA-256 differs); left as it is")
        copy = Path(entry.archive) / segment_name(n)
        try:
            ok = copy.exists() and _file_sha256(copy) == (digest, size)
        except OSError:
            ok = False
        if not ok:  # the archived copy is gone or torn: this is the last good copy, archive it again first
            try:
                _make_archive_dir(Path(entry.archive))
                info = _SegmentInfo(n, p, entry.first_seq, entry.last_seq)
                _copy(info, Path(entry.archive), hook)
                fsync_dir(Path(entry.archive))
            except OSError as exc:
                raise AuditError(f"{copy}: cannot restore the archived copy: {exc.strerror or exc}") from None
    _remove(log, [n for n, _ in left], hook)
    return [n for n, _ in left]


# ------------------------------------------------------------------------------------------------ whole chain


def archive_segments(anchor: Anchor, archives: list[Path]) -> list[tuple[int, Path]]:
    """The anchor's archived segments, found in `archives` (else where the anchor says), each checked against
    the size and SHA-256 the anchor recorded. Raises AuditError naming the first missing or different one."""
    out: list[tuple[int, Path]] = []
    for entry in anchor.segments:
        name = segment_name(entry.segment)
        candidates = [d / name for d in archives] or [Path(entry.archive) / name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise AuditError(f"archived segment {entry.segment} ({name}) is not in "
                             f"{', '.join(str(c.parent) for c in candidates)}")
        try:
            digest, size = _file_sha256(found)
        except OSError as exc:
            raise AuditError(f"{found}: cannot read: {exc.strerror}") from None
        if (digest, size) != (entry.sha256, entry.bytes):
            raise AuditError(f"{found}: not the segment the anchor archived (size or SHA-256 differs: torn or "
                             "altered copy)")
        out.append((entry.segment, found))
    return out


def parse_before(text: str, option: str = "--before") -> datetime:
    """`--before DATE` (or the option named `option`): YYYY-MM-DD (midnight UTC) or an RFC 3339 time with a
    zone. Raises ValueError."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{option}: not a date (YYYY-MM-DD) or an RFC 3339 time: {text!r}") from None
    if t.tzinfo is None:
        raise ValueError(f"{option}: give a time zone (e.g. Z) or a plain date: {text!r}")
    return t.astimezone(UTC)




def whole_chain(log: Path, archives: list[Path]) -> list[tuple[int, Path]]:
    """The archived segments (checked against the anchor) followed by the live ones."""
    anchor = read_anchor(log)
    if anchor is None:
        raise AuditError(f"{log}: --archive given but the log has no archive anchor ({ANCHOR_NAME})")
    return archive_segments(anchor, archives) + [(n, p) for n, p in list_segments(log) if n >= anchor.first_segment]


def verify_with_archive(log: Path, archives: list[Path], **kw: Any) -> Any:
    """`audit verify LOG --archive DIR`: the archived segments (each as the anchor recorded it) followed by the
    live ones, verified as one chain from seq 1; then the anchor's signature. Returns a VerifyReport."""
    from driverd.audit.verify import Failure, VerifyReport, verify_log

    anchor = read_anchor(log)
    if anchor is None:
        raise AuditError(f"{log}: --archive given but the log has no archive anchor ({ANCHOR_NAME})")
    try:
        archived = archive_segments(anchor, archives)
    except AuditError as exc:
        return VerifyReport(path=str(log), ok=False, failure=Failure(None, str(log / ANCHOR_NAME), 0, str(exc)))
    live = [(n, p) for n, p in list_segments(log) if n >= anchor.first_segment]
    report = verify_log(log, segments=archived + live, **kw)
    if report.ok:
        problem = anchor_problem(anchor, report.key_fingerprint, kw.get("public_key"))
        if problem is not None:
            report.ok = False
            report.failure = Failure(None, str(log / ANCHOR_NAME), 0, f"archive anchor: {problem}")
            return report
        dirs = sorted({str(p.parent) for _, p in archived})
        report.archived = {"segments": len(archived), "last_seq": anchor.last_seq,
                           "snapshot_seq": anchor.snapshot_seq, "archives": dirs, "signed": anchor.sig is not None,
                           "archived_at": anchor.archived_at}
        report.notes.append(f"whole chain: segments 1..{anchor.first_segment - 1} from {', '.join(dirs)} (each as "
                            "the anchor recorded it), then the live log")
    return report
