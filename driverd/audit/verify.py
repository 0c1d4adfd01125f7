"""Offline verification of an audit log: canonical form, seq continuity, hash chain, segment links, signatures.

Needs no private key. Stops at the first failure and names it (seq, file, line, reason). Reads in blocks, so memory
does not grow with the log. Large logs are checked in chunks by worker processes; the report is the one a single
pass gives (see docs/audit.md, "How verify is fast, and why it is still exact").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from driverd.audit import canonical
from driverd.audit.canonical import (
    ZERO_HASH,
    hash_cut_from_line,
    line_content_hash,
    loads_line,
    parse_ts,
    record_hash,
    sha256_hex,
)
from driverd.audit.reader import MAX_LINE_BYTES, LineTooLong
from driverd.audit.segments import list_segments, resolve_log
from driverd.audit.signing import checkpoint_signature_ok, fingerprint, public_from_b64, raw_public
from driverd.core.errors import AuditError

_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")
_MISSING: Final = object()
_NOT_INLINE: Final = frozenset({"", "segment_start", "checkpoint"})  # need more than the inline checks


def canonical_fast_codec() -> Any:
    """canonical's msgspec (decode, encode) pair, or None: looked up at each use, so tests can switch it off."""
    return canonical._FAST_CODEC


def _ts_ok(value: object) -> bool:
    try:
        parse_ts(value)  # type: ignore[arg-type]
    except AuditError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Failure:
    seq: int | None  # the record's seq, or the seq the damaged line should have carried
    file: str
    line: int  # 1-based line number within the file
    reason: str


@dataclass(slots=True)
class VerifyReport:
    path: str
    ok: bool = True
    failure: Failure | None = None
    segments: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str | None = None  # SHA-256 of the last good line
    key_fingerprint: str | None = None
    key_source: str = "none"  # "argument" (--key) | "log" (key recorded in the log) | "none" (unsigned log)
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    unsealed_records: int = 0  # records after the last checkpoint
    notes: list[str] = field(default_factory=list)
    archived: dict[str, Any] | None = None  # the archive anchor the live log starts from (`audit archive`)

    @property
    def unsealed_from(self) -> int | None:
        if self.unsealed_records == 0 or self.last_seq is None:
            return None
        return self.last_seq - self.unsealed_records + 1

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unsealed_from"] = self.unsealed_from
        if d["archived"] is None:
            del d["archived"]
        return d


class _Fail(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Work is split into chunks of whole lines of one segment, so a big log (or one big segment) is verified by
# several processes. A chunk checks everything inside itself; what crosses its first line (the seq and prev link
# to the chunk before, a segment's segment_start and its key) is checked by verify_log, in log order, so the first
# failure and the report are those of a single pass over the log.
CHUNK_BYTES: Final = 8 << 20
MIN_CHUNK_BYTES: Final = 1 << 20
PARALLEL_MIN_BYTES: Final = 4 << 20  # below this, starting processes costs more than it saves


@dataclass(frozen=True, slots=True)
class _Chunk:
    number: int  # segment number (0: a file with another name)
    path: str
    start: int  # byte offset of its first line
    end: int | None  # byte offset just past its last line; None: to the end of the file
    opens_segment: bool
    key_raw: bytes | None  # the key the segment's checkpoints are checked with (raw Ed25519 public key)
    key_fingerprint: str | None


@dataclass(slots=True)
class _ChunkFailure:
    line: int  # 1-based within the chunk
    seq: int | None
    reason: str
    before_link: bool  # failed before the seq/prev link of the line would be checked (a line-level failure)
    seq_unknown: bool = False  # first line failed before its seq was read: the seq it should have is verify_log's


@dataclass(slots=True)
class _ChunkResult:
    bytes_read: int = 0
    lines: int = 0
    records: int = 0  # records that passed every check
    first: dict[str, Any] | None = None  # the first record (its link is checked by verify_log)
    last_seq: int | None = None
    head: str | None = None
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    unsealed: int = 0  # records after the chunk's last checkpoint (all of them if it has none)
    failure: _ChunkFailure | None = None


READ_BLOCK: Final = 1 << 20


def _line_batches(f: IO[bytes], limit: int | None) -> Iterator[tuple[list[bytes], bytes | None]]:
    """The lines of f (up to `limit` bytes) without their newlines, in batches read a block at a time, and at the
    end a torn last line (no newline) if there is one. Raises LineTooLong as `bounded_lines` does (after the
    lines before it), so a garbage file without newlines is never read whole."""
    rest = b""
    remaining = limit
    while True:
        want = READ_BLOCK if remaining is None else min(READ_BLOCK, remaining)
        block = f.read(want) if want > 0 else b""
        if remaining is not None:
            remaining -= len(block)
        if not block:
            if rest:
                if len(rest) > MAX_LINE_BYTES:
                    raise LineTooLong(f"line longer than {MAX_LINE_BYTES} bytes")
                yield [], rest
            return
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        if parts and max(map(len, parts)) > MAX_LINE_BYTES:
            n = next(i for i, x in enumerate(parts) if len(x) > MAX_LINE_BYTES)
            yield parts[:n], None
            raise LineTooLong(f"line longer than {MAX_LINE_BYTES} bytes")
        if parts:
            yield parts, None
        if len(rest) > MAX_LINE_BYTES:
            raise LineTooLong(f"line longer than {MAX_LINE_BYTES} bytes")


def _verify_chunk(chunk: _Chunk) -> _ChunkResult:
    """Every check of a single pass that does not need the line before the chunk. Runs in a worker process."""
    out = _ChunkResult()
    key = Ed25519PublicKey.from_public_bytes(chunk.key_raw) if chunk.key_raw is not None else None
    limit = None if chunk.end is None else chunk.end - chunk.start
    expected_seq: int | None = None
    prev_line_hash: str | None = None
    good_ts: object = _MISSING  # the last ts that parsed (records written in the same second share it)
    lineno = 0
    inline = 0  # records accepted inline, not yet added to `out`
    sha256 = hashlib.sha256
    cut = hash_cut_from_line
    fast = canonical_fast_codec()
    if fast is not None:  # used only under `fast is not None` below
        decode, encode = fast
    try:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.start)
            for batch, torn in _line_batches(f, limit):
                out.bytes_read += sum(map(len, batch)) + len(batch)  # for progress: bytes read, newlines included
                for line in batch:
                    lineno += 1
                    if prev_line_hash is not None and fast is not None:
                        # The common case (a telemetry record continuing the chain), checked inline. It accepts
                        # only what _check_line accepts, with the same effect; anything else goes there.
                        # (loads_line_fast, inlined: a line is taken only if msgspec re-encodes it byte for byte.)
                        try:
                            rec = decode(line)
                            if type(rec) is not dict or encode(rec) != line:
                                rec = None
                        except Exception:
                            rec = None
                        if rec is not None:
                            seq = rec.get("seq")
                            event = rec.get("event")
                            digest = rec.get("hash")
                            pump_id = rec.get("pump_id", _MISSING)
                            course_id = rec.get("course_id", _MISSING)
                            ts = rec.get("ts")
                            if (
                                type(seq) is int
                                and seq == expected_seq
                                and rec.get("prev") == prev_line_hash  # a hexdigest: prev is 64 lowercase hex
                                and type(event) is str
                                and event not in _NOT_INLINE
                                and (pump_id is None or type(pump_id) is str)
                                and (course_id is None or type(course_id) is str)
                                and type(digest) is str
                                and (ts == good_ts or _ts_ok(ts))
                                # Equal to a hexdigest, so hash is 64 lowercase hex: the cut is the content hash.
                                and digest == (cut(line, digest) or record_hash(rec))
                            ):
                                good_ts = ts
                                inline += 1  # added to `out` before anything else reads it (_sync)
                                prev_line_hash = sha256(line).hexdigest()
                                expected_seq = seq + 1
                                continue
                    inline = _sync(out, inline, expected_seq, prev_line_hash)
                    failure = _check_line(line + b"\n", lineno, expected_seq, prev_line_hash, chunk, key, out)
                    if failure is not None:
                        out.failure = failure
                        return out
                    prev_line_hash = out.head
                    expected_seq = out.last_seq + 1 if out.last_seq is not None else None
                if torn is not None:
                    inline = _sync(out, inline, expected_seq, prev_line_hash)
                    lineno += 1
                    out.bytes_read += len(torn)
                    out.failure = _check_line(torn, lineno, expected_seq, prev_line_hash, chunk, key, out)
                    assert out.failure is not None  # no newline: always a failure ("torn tail")
                    return out
    except LineTooLong:
        inline = _sync(out, inline, expected_seq, prev_line_hash)
        out.failure = _ChunkFailure(
            lineno + 1, expected_seq, f"line longer than {MAX_LINE_BYTES} bytes (not a record the writer makes)", True,
            seq_unknown=lineno == 0,
        )
    except OSError as exc:
        raise AuditError(f"{chunk.path}: cannot read: {exc.strerror}") from None
    _sync(out, inline, expected_seq, prev_line_hash)
    out.lines = lineno
    return out


def _sync(out: _ChunkResult, inline: int, expected_seq: int | None, head: str | None) -> int:
    """Add the records accepted inline since the last call to `out` (their seqs run up to expected_seq - 1 and
    the last one's line hash is head). Returns the new inline count: 0."""
    if inline:
        assert expected_seq is not None
        out.records += inline
        out.unsealed += inline
        out.last_seq = expected_seq - 1
        out.head = head
    return 0


def _check_line(
    raw: bytes,
    lineno: int,
    expected_seq: int | None,
    prev_line_hash: str | None,
    chunk: _Chunk,
    key: Ed25519PublicKey | None,
    out: _ChunkResult,
) -> _ChunkFailure | None:
    first = lineno == 1
    expect_desc = expected_seq
    before_link = True
    try:
        if not raw.endswith(b"\n"):
            raise _Fail("torn tail: no newline at the end (partial write; the writer truncates it on reopen)")
        line = raw[:-1]
        try:
            rec = loads_line(line)
        except ValueError as exc:
            raise _Fail(f"not a canonical JSON record: {exc}") from None
        seq = _envelope(rec)
        expect_desc = seq
        if rec["hash"] != line_content_hash(line, rec):
            raise _Fail("hash field does not match the record's content")
        before_link = False
        if first:
            out.first = rec  # its seq and prev link: verify_log's
        elif seq != expected_seq:
            kind = "gap" if seq > expected_seq else "duplicate or out of order"  # type: ignore[operator]
            raise _Fail(f"seq {kind}: expected {expected_seq}, found {seq}")
        elif rec["prev"] != prev_line_hash:
            raise _Fail("prev does not match the hash of the previous line (chain broken)")
        if not (first and chunk.opens_segment) and rec["event"] == "segment_start":
            raise _Fail("segment_start in the middle of a segment")
        if rec["event"] == "checkpoint":
            _checkpoint(rec, seq, key, chunk.key_fingerprint)
            out.checkpoints += 1
            out.last_checkpoint_seq = seq
            out.unsealed = 0
        else:
            out.unsealed += 1
    except _Fail as fail:
        return _ChunkFailure(lineno, expect_desc, fail.reason, before_link, seq_unknown=first and expect_desc is None)
    out.records += 1
    out.last_seq = seq
    out.head = sha256_hex(line)
    return None


def _split(path: Path, size: int, chunk_bytes: int) -> list[tuple[int, int | None]]:
    """Byte ranges of whole lines, about chunk_bytes each. One range if a boundary cannot be found cleanly."""
    if size <= chunk_bytes:
        return [(0, None)]
    bounds = [0]
    with path.open("rb") as f:
        pos = chunk_bytes
        while pos < size:
            f.seek(pos - 1)
            rest = f.readline(MAX_LINE_BYTES + 2)  # from the byte before pos: a line starting at pos is not skipped
            if not rest.endswith(b"\n"):
                return [(0, None)]  # a torn or over-long line there: one chunk, the single pass decides
            boundary = pos - 1 + len(rest)
            if boundary >= size:
                break
            bounds.append(boundary)
            pos = boundary + chunk_bytes
    return [(b, e) for b, e in zip(bounds, [*bounds[1:], None], strict=True)]


_Keys = list[tuple[Ed25519PublicKey | None, str | None]]


def _segment_keys(segments: list[tuple[int, Path]], public_key: Ed25519PublicKey | None, report: VerifyReport) -> _Keys:
    """The key (and its fingerprint) each segment's checkpoints will be checked with, found from the segments'
    first lines in advance (so chunks can be checked before the segments ahead of them). This replays the same
    _segment_start calls the single pass makes; where one of them fails here it fails there too (or earlier), so
    the keys of the segments after it (None here) are never used."""
    scratch = VerifyReport(path="", key_source=report.key_source, key_fingerprint=report.key_fingerprint)
    key = public_key
    keys: _Keys = []
    for i, (number, seg_path) in enumerate(segments):
        try:
            with seg_path.open("rb") as f:
                raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw.endswith(b"\n"):
                break
            scratch.records = 1 if i else 0
            key = _segment_start(loads_line(raw[:-1]), number, None, key, scratch)
        except Exception:  # the single pass reports it, with its own reason
            break
        keys.append((key, scratch.key_fingerprint))
    return keys + [(None, None)] * (len(segments) - len(keys))


def _chunks(segments: list[tuple[int, Path]], keys: _Keys, chunk_bytes: int) -> list[_Chunk]:
    out: list[_Chunk] = []
    for (number, seg_path), (key, fp) in zip(segments, keys, strict=True):
        try:
            size = seg_path.stat().st_size
        except OSError as exc:
            raise AuditError(f"{seg_path}: cannot read: {exc.strerror}") from None
        raw = raw_public(key) if key is not None else None
        for start, end in _split(seg_path, size, chunk_bytes):
            out.append(_Chunk(number, str(seg_path), start, end, start == 0, raw, fp))
    return out


def _results(chunks: list[_Chunk], workers: int) -> Iterator[_ChunkResult]:
    """Chunk results in log order; with workers > 1 computed by that many processes."""
    if workers <= 1 or len(chunks) <= 1:
        yield from map(_verify_chunk, chunks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork is the cheapest start (the workers inherit the imported modules), and safe while this is the only
    # thread: no other thread can hold a lock the children would inherit held. With other threads (rich's
    # progress bar on a terminal, a daemon), the workers start from a clean interpreter instead.
    method = "fork" if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
        futures = [pool.submit(_verify_chunk, c) for c in chunks]
        try:
            for fut in futures:
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def verify_log(
    path: Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    require_sealed: bool = False,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    chunk_bytes: int | None = None,
    first_segment: int = 1,
    segments: list[tuple[int, Path]] | None = None,
) -> VerifyReport:
    """Verify LOG (one segment file) or DIR (all segments). Raises AuditError only if nothing is readable.

    `workers` > 1 checks chunks of the log in that many processes (logs over PARALLEL_MIN_BYTES only); the
    report is the same whatever the number of workers and the chunk size (`chunk_bytes`, default: the log split
    about four ways per worker, 1 to 8 MiB a chunk).

    A directory with an archive anchor (`driverd audit archive`) is verified from the anchor's first segment, its
    first record linked to the anchor's last hash and seq, and the anchor's signature checked with the log's key.
    `segments`: verify exactly these (e.g. archived segments followed by the live ones: one chain from seq 1)."""
    from driverd.audit.archive import Anchor, read_anchor

    given = segments is not None
    if segments is None:
        # From a snapshot's segment (start-up), the archive anchor is not consulted: recovery does not need it.
        segments = (list_segments(path, first_segment) or list_segments(path)[-1:]) if first_segment > 1 \
            and path.is_dir() else resolve_log(path)
    anchor: Anchor | None = None
    if first_segment == 1 and path.is_dir() and (not given or (segments and segments[0][0] > 1)):
        try:
            anchor = read_anchor(path)
        except AuditError as exc:
            return VerifyReport(path=str(path), ok=False, failure=Failure(None, str(path), 0, str(exc)))
        if anchor is not None:
            first_segment = anchor.first_segment
    if first_segment > 1 and path.is_dir():
        # Start-up from a state snapshot (issue 12): only the segments from the snapshot's on. Their first
        # segment_start's link back is not checked (its predecessor is not read).
        segments = [(n, p) for n, p in segments if n >= first_segment] or segments[-1:]
    report = VerifyReport(path=str(path))
    report.segments = len(segments)
    standalone = not path.is_dir() or (first_segment > 1 and anchor is None)
    numbers = [n for n, _ in segments]
    if path.is_dir():
        if numbers[0] != first_segment:
            report.failure = Failure(None, str(segments[0][1]), 0,
                                     f"segment {first_segment} is missing (log starts at {numbers[0]})")
        elif numbers != list(range(first_segment, first_segment + len(numbers))):
            missing = sorted(set(range(first_segment, numbers[-1] + 1)) - set(numbers))
            report.failure = Failure(None, str(path), 0, f"segments missing from the sequence: {missing}")
        if report.failure is not None:
            report.ok = False
            return report
    if public_key is not None:
        report.key_fingerprint = fingerprint(public_key)
        report.key_source = "argument"
    total = 0
    for _, seg_path in segments:
        with contextlib.suppress(OSError):
            total += seg_path.stat().st_size
    if total < PARALLEL_MIN_BYTES:
        workers = 1
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES if workers <= 1 else min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, total // (4 * workers)))
    chunks = _chunks(segments, _segment_keys(segments, public_key, report), chunk_bytes)

    key = public_key
    expected_seq: int | None = None
    prev_line_hash: str | None = None
    if anchor is not None:  # the live log continues the archived chain
        expected_seq, prev_line_hash = anchor.last_seq + 1, anchor.last_hash
    lines_before = 0  # lines of the current segment in the chunks before this one
    results = _results(chunks, workers)
    try:
        for chunk, res in zip(chunks, results, strict=True):
            if chunk.opens_segment:
                lines_before = 0
            if progress is not None:
                progress(res.bytes_read)
            failure = _merge(chunk, res, lines_before, standalone, expected_seq, prev_line_hash, key, report)
            if failure is not None:
                report.ok = False
                report.failure = failure
                return report
            if chunk.opens_segment and res.first is not None:
                key = _key_after(chunk, key)
            lines_before += res.lines
            if res.records:
                prev_line_hash = res.head
                expected_seq = res.last_seq + 1 if res.last_seq is not None else None
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()

    if anchor is not None:
        _check_anchor(anchor, path, public_key, report)
        if not report.ok:
            return report
    if report.key_source == "log":
        report.notes.append(
            "checked against the public key recorded in the log itself: anyone who rewrote the whole log could "
            f"have replaced it, so trust rests on the fingerprint {report.key_fingerprint} being known out of band "
            "(pass --key PUB to check it)"
        )
    elif report.key_source == "none":
        report.notes.append("the log is unsigned (no key): the chain holds but no record is sealed by a signature")
    if report.unsealed_records:
        report.notes.append(
            f"unsealed tail: {report.unsealed_records} record(s) from seq {report.unsealed_from} after the last "
            "signed checkpoint (chained, not signed)"
        )
    if require_sealed and report.unsealed_records:
        report.ok = False
        report.failure = Failure(
            report.unsealed_from, str(segments[-1][1]), 0, "unsealed tail (records after the last checkpoint)"
        )
    return report


def _check_anchor(anchor: Any, path: Path, public_key: Ed25519PublicKey | None, report: VerifyReport) -> None:
    """The live log verified from the anchor's last hash on: now the anchor itself (its signature, by the log's
    key) and that the snapshot it names is in the live log."""
    from driverd.audit.archive import anchor_problem
    from driverd.audit.segments import ANCHOR_NAME, list_segments

    where = str(path / ANCHOR_NAME)
    problem = anchor_problem(anchor, report.key_fingerprint, public_key)
    if problem is None and not (report.first_seq or 0) <= anchor.snapshot_seq <= (report.last_seq or 0):
        problem = f"the anchor's snapshot seq {anchor.snapshot_seq} is not in the live log"
    if problem is not None:
        report.ok = False
        report.failure = Failure(None, where, 0, f"archive anchor: {problem}")
        return
    archives = sorted({s.archive for s in anchor.segments})
    report.archived = {"segments": len(anchor.segments), "last_seq": anchor.last_seq,
                       "snapshot_seq": anchor.snapshot_seq, "archives": archives, "signed": anchor.sig is not None,
                       "archived_at": anchor.archived_at}
    report.notes.append(
        f"segments 1..{anchor.first_segment - 1} (seq 1..{anchor.last_seq}) are archived in {', '.join(archives)}; "
        f"the live log continues from their last hash, and starts from the state snapshot at seq "
        f"{anchor.snapshot_seq} (pass --archive DIR to verify the whole chain)"
        + ("" if anchor.sig is not None else "; the anchor is unsigned, like the log")
    )
    left = [n for n, _ in list_segments(path) if n < anchor.first_segment]
    if left:
        report.notes.append(
            f"segments {left[0]}..{left[-1]} are still here though archived (an archive was cut short before "
            "removing them; run `driverd audit archive` again to finish): not read"
        )


def _key_after(chunk: _Chunk, key: Ed25519PublicKey | None) -> Ed25519PublicKey | None:
    """The key in force after a segment_start that verified: the one its chunk was checked with."""
    if chunk.key_raw is None:
        return key
    return Ed25519PublicKey.from_public_bytes(chunk.key_raw)


def _merge(
    chunk: _Chunk,
    res: _ChunkResult,
    lines_before: int,
    standalone: bool,
    expected_seq: int | None,
    prev_line_hash: str | None,
    key: Ed25519PublicKey | None,
    report: VerifyReport,
) -> Failure | None:
    """Check what crosses the chunk's first line, in the single pass's order, then add the chunk to the report.
    Returns the first failure, or None."""
    if res.lines == 0 and res.failure is None:
        return Failure(expected_seq, chunk.path, 0, "empty segment (no segment_start)")
    f = res.failure
    if f is not None and f.line == 1 and f.before_link:
        return Failure(expected_seq if f.seq_unknown else f.seq, chunk.path, lines_before + 1, f.reason)
    if f is not None and f.before_link and res.first is None:  # pragma: no cover - line 1 passed, so first is set
        raise AssertionError("chunk failed after its first line without recording it")
    rec = res.first
    assert rec is not None
    seq: int = rec["seq"]
    try:
        if expected_seq is None:
            if not (standalone and chunk.number != 1) and seq != 1:
                raise _Fail(f"the log must start at seq 1, found {seq}")
            if seq == 1 and rec["prev"] != ZERO_HASH:
                raise _Fail("the first record's prev must be 64 zeros")
            if seq != 1:
                report.notes.append(
                    f"standalone segment starting at seq {seq}: its link to the previous segment "
                    "is not checked (verify the directory for that)"
                )
        elif seq != expected_seq:
            kind = "gap" if seq > expected_seq else "duplicate or out of order"
            raise _Fail(f"seq {kind}: expected {expected_seq}, found {seq}")
        elif rec["prev"] != prev_line_hash:
            raise _Fail("prev does not match the hash of the previous line (chain broken)")
        if chunk.opens_segment:
            got = _segment_start(rec, chunk.number, prev_line_hash, key, report)
            # _segment_keys found the same key in advance (same calls, same order): the chunk was checked with it.
            if (raw_public(got) if got is not None else None) != chunk.key_raw or (  # pragma: no cover - defensive
                chunk.key_raw is not None and report.key_fingerprint != chunk.key_fingerprint
            ):
                raise _Fail("internal: segment key differs from the key found in advance")
    except _Fail as fail:
        return Failure(seq, chunk.path, lines_before + 1, fail.reason)
    report.records += res.records
    if res.records:
        if report.first_seq is None:
            report.first_seq = seq
        report.last_seq = res.last_seq
        report.head = res.head
    report.checkpoints += res.checkpoints
    if res.checkpoints:
        report.last_checkpoint_seq = res.last_checkpoint_seq
        report.unsealed_records = res.unsealed
    else:
        report.unsealed_records += res.unsealed
    if f is not None:
        return Failure(f.seq, chunk.path, lines_before + f.line, f.reason)
    return None


def _envelope(rec: dict[str, Any]) -> int:
    seq = rec.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise _Fail("seq must be a positive integer")
    try:
        parse_ts(rec.get("ts"))  # type: ignore[arg-type]
    except AuditError:
        raise _Fail(f"ts is not an RFC 3339 UTC time: {rec.get('ts')!r}") from None
    event = rec.get("event")
    if not isinstance(event, str) or not event:
        raise _Fail("event must be a non-empty string")
    for name in ("pump_id", "course_id"):
        if name not in rec:
            raise _Fail(f"{name} is missing")
        if rec[name] is not None and not isinstance(rec[name], str):
            raise _Fail(f"{name} must be a string or null")
    for name in ("prev", "hash"):
        v = rec.get(name)
        if not isinstance(v, str) or not _HEX64.match(v):
            raise _Fail(f"{name} must be 64 lowercase hex digits")
    return seq


def _segment_start(
    rec: dict[str, Any],
    number: int,
    prev_line_hash: str | None,
    key: Ed25519PublicKey | None,
    report: VerifyReport,
) -> Ed25519PublicKey | None:
    if rec["event"] != "segment_start":
        raise _Fail("a segment must begin with a segment_start record")
    if number and rec.get("segment") != number:
        raise _Fail(f"segment_start says segment {rec.get('segment')!r} but the file is segment {number}")
    link = rec.get("prev_segment_hash")
    if link != rec["prev"] or (prev_line_hash is not None and link != prev_line_hash):
        raise _Fail("prev_segment_hash does not match the last line of the previous segment")
    fp = rec.get("key_fingerprint")
    pub = rec.get("public_key")
    if fp is None and pub is None:
        if report.key_source == "argument":
            raise _Fail("the log is unsigned but --key was given")
        if report.key_source == "log":
            raise _Fail("segment has no key but earlier segments did")
        return key
    if not isinstance(fp, str) or not _HEX64.match(fp):
        raise _Fail("key_fingerprint must be 64 lowercase hex digits")
    try:
        logged = public_from_b64(pub)
    except AuditError as exc:
        raise _Fail(str(exc)) from None
    if fingerprint(logged) != fp:
        raise _Fail("public_key does not match key_fingerprint")
    if report.key_source == "argument":
        if fp != report.key_fingerprint:
            raise _Fail(f"log key fingerprint {fp} does not match --key {report.key_fingerprint}")
        return key
    if report.key_source == "log":
        if fp != report.key_fingerprint:
            raise _Fail(f"key_fingerprint changed mid-log: {report.key_fingerprint} -> {fp}")
        return key
    if report.records:
        raise _Fail("a key appears in a later segment of an unsigned log")
    report.key_source = "log"
    report.key_fingerprint = fp
    return logged


def _checkpoint(rec: dict[str, Any], seq: int, key: Ed25519PublicKey | None, key_fingerprint: str | None) -> None:
    if key is None:
        raise _Fail("checkpoint in a log without a key")
    if rec.get("count") != seq - 1:
        raise _Fail(f"checkpoint count {rec.get('count')!r} != records before it ({seq - 1})")
    if rec.get("head") != rec["prev"]:
        raise _Fail("checkpoint head does not match the previous line")
    if rec.get("key_fingerprint") != key_fingerprint:
        raise _Fail("checkpoint key_fingerprint does not match the log key")
    if not checkpoint_signature_ok(key, rec):
        raise _Fail("checkpoint signature does not verify")
