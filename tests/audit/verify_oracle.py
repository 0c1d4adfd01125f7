"""The oracle for tests: `driverd audit verify` as it was before the fast path (one pass, line by line, standard
library JSON only; commit 0ed788e). The fast, chunked, parallel verify_log must give the same report (first
failure: seq, file, line and reason; counts, head, key, notes) on every log, intact or damaged."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from driverd.audit.canonical import ZERO_HASH, _parse, _reference_dumps, parse_ts, sha256_hex
from driverd.audit.reader import MAX_LINE_BYTES, LineTooLong, bounded_lines
from driverd.audit.segments import resolve_log
from driverd.audit.signing import checkpoint_signature_ok, fingerprint, public_from_b64
from driverd.core.errors import AuditError

_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")


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

    @property
    def unsealed_from(self) -> int | None:
        if self.unsealed_records == 0 or self.last_seq is None:
            return None
        return self.last_seq - self.unsealed_records + 1

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unsealed_from"] = self.unsealed_from
        return d


class _Fail(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def loads_line(line: bytes) -> dict[str, Any]:
    """The reference path of canonical.loads_line: json.loads + json.dumps, nothing else."""
    obj = _parse(line)
    if _reference_dumps(obj) != line:
        raise ValueError("line is not in canonical form")
    return obj


def record_hash(record: dict[str, Any]) -> str:
    return sha256_hex(_reference_dumps({k: v for k, v in record.items() if k != "hash"}))


def _lines(path: Path, progress: Callable[[int], None] | None) -> Iterator[tuple[int, bytes | None, bool]]:
    """(line number, line without newline or None if over-long, had newline)."""
    n = 0
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(bounded_lines(f), start=1):  # n is also used after the loop
                if progress is not None:
                    progress(len(raw))
                if raw.endswith(b"\n"):
                    yield n, raw[:-1], True
                else:
                    yield n, raw, False
    except LineTooLong:
        yield n + 1, None, False
    except OSError as exc:
        raise AuditError(f"{path}: cannot read: {exc.strerror}") from None


def verify_log(
    path: Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    require_sealed: bool = False,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify LOG (one segment file) or DIR (all segments). Raises AuditError only if nothing is readable."""
    segments = resolve_log(path)
    report = VerifyReport(path=str(path))
    report.segments = len(segments)
    standalone = not path.is_dir()
    numbers = [n for n, _ in segments]
    if not standalone:
        if numbers[0] != 1:
            report.failure = Failure(None, str(segments[0][1]), 0, f"segment 1 is missing (log starts at {numbers[0]})")
        elif numbers != list(range(1, len(numbers) + 1)):
            missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
            report.failure = Failure(None, str(path), 0, f"segments missing from the sequence: {missing}")
        if report.failure is not None:
            report.ok = False
            return report
    if public_key is not None:
        report.key_fingerprint = fingerprint(public_key)
        report.key_source = "argument"
    key = public_key
    expected_seq: int | None = None
    prev_line_hash: str | None = None

    for number, seg_path in segments:
        saw_line = False
        for lineno, line, had_newline in _lines(seg_path, progress):
            expect_desc = expected_seq
            try:
                if line is None:
                    raise _Fail(f"line longer than {MAX_LINE_BYTES} bytes (not a record the writer makes)")
                if not had_newline:
                    raise _Fail("torn tail: no newline at the end (partial write; the writer truncates it on reopen)")
                try:
                    rec = loads_line(line)
                except ValueError as exc:
                    raise _Fail(f"not a canonical JSON record: {exc}") from None
                seq = _envelope(rec)
                expect_desc = seq
                if rec["hash"] != record_hash(rec):
                    raise _Fail("hash field does not match the record's content")
                if expected_seq is None:
                    if not (standalone and number != 1) and seq != 1:
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
                if not saw_line:
                    key = _segment_start(rec, number, prev_line_hash, key, report)
                elif rec["event"] == "segment_start":
                    raise _Fail("segment_start in the middle of a segment")
                if rec["event"] == "checkpoint":
                    _checkpoint(rec, seq, key, report)
                    report.checkpoints += 1
                    report.last_checkpoint_seq = seq
                    report.unsealed_records = 0
                else:
                    report.unsealed_records += 1
            except _Fail as fail:
                report.ok = False
                report.failure = Failure(expect_desc, str(seg_path), lineno, fail.reason)
                return report
            saw_line = True
            prev_line_hash = sha256_hex(line)
            expected_seq = seq + 1
            report.records += 1
            if report.first_seq is None:
                report.first_seq = seq
            report.last_seq = seq
            report.head = prev_line_hash
        if not saw_line:
            report.ok = False
            report.failure = Failure(expected_seq, str(seg_path), 0, "empty segment (no segment_start)")
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


def _checkpoint(rec: dict[str, Any], seq: int, key: Ed25519PublicKey | None, report: VerifyReport) -> None:
    if key is None:
        raise _Fail("checkpoint in a log without a key")
    if rec.get("count") != seq - 1:
        raise _Fail(f"checkpoint count {rec.get('count')!r} != records before it ({seq - 1})")
    if rec.get("head") != rec["prev"]:
        raise _Fail("checkpoint head does not match the previous line")
    if rec.get("key_fingerprint") != report.key_fingerprint:
        raise _Fail("checkpoint key_fingerprint does not match the log key")
    if not checkpoint_signature_ok(key, rec):
        raise _Fail("checkpoint signature does not verify")
