"""`audit verify --all`: every problem in a log (like `git fsck`), not only the first; and the verified prefix of a
damaged log, for `report` and `export --verified-prefix`.

The checks are verify.py's own (canonical form, envelope, content hash, seq continuity, the chain, segment starts
and links, keys, checkpoints), applied to every line in one pass. After a problem the walk resynchronises on the
damaged line itself (the next seq expected is the one after it, the chain continues from its bytes), so one
damage is reported once, where it is, and the walk goes on. The first problem reported is the failure plain
`audit verify` reports (tests/audit/test_fsck.py checks it on damaged logs). A line right after one that does not
parse, or whose hash does not match its content, is not checked for its link to it: that link is broken by the
damage already reported.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from driverd.audit.canonical import ZERO_HASH, line_content_hash, loads_line
from driverd.audit.reader import MAX_LINE_BYTES, Line, iter_lines
from driverd.audit.segments import resolve_log
from driverd.audit.signing import fingerprint
from driverd.audit.verify import Failure, VerifyReport, _checkpoint, _envelope, _Fail, _segment_start, verify_log
from driverd.core.errors import AuditError

#: Problems kept in the report (the count goes on): a log of garbage must not fill memory with problems.
MAX_PROBLEMS: Final = 1000

#: Rules, in the order they are checked on a line.
RULES: Final = ("segments", "empty_segment", "line_too_long", "torn_tail", "canonical", "envelope", "content_hash",
                "seq", "chain", "segment_start", "checkpoint", "unsealed_tail")


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int | None  # the line's seq, or the seq the damaged line should have carried
    file: str
    line: int  # 1-based within the file; 0: the file or directory as a whole
    rule: str  # one of RULES
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "file": self.file, "line": self.line, "rule": self.rule, "reason": self.reason}


@dataclass(slots=True)
class FsckReport:
    path: str
    segments: int = 0
    lines: int = 0
    problems: list[Problem] = field(default_factory=list)
    count: int = 0  # every problem found (problems holds the first MAX_PROBLEMS)

    @property
    def ok(self) -> bool:
        return self.count == 0

    def add(self, problem: Problem) -> None:
        self.count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "path": self.path, "segments": self.segments, "lines": self.lines,
                "problem_count": self.count, "problems": [p.as_dict() for p in self.problems],
                "problems_left_out": self.count - len(self.problems)}


def _raw_lines(path: Path) -> Iterator[tuple[bytes, bool]]:
    """(line, too_long) for every line of the file; an over-long line is skipped to its newline, not read whole."""
    with path.open("rb") as f:
        while raw := f.readline(MAX_LINE_BYTES + 1):
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (more := f.readline(MAX_LINE_BYTES + 1)) and not more.endswith(b"\n"):
                    pass
                yield b"", True
                continue
            yield raw, False


def check_all(path: Path, *, public_key: Ed25519PublicKey | None = None, require_sealed: bool = False) -> FsckReport:
    """Every problem of LOG|DIR. Raises AuditError only if nothing is readable (no such log, no segments)."""
    segments = resolve_log(path)
    out = FsckReport(path=str(path), segments=len(segments))
    scratch = VerifyReport(path=str(path))
    if public_key is not None:
        scratch.key_source, scratch.key_fingerprint = "argument", fingerprint(public_key)
    numbers = [n for n, _ in segments]
    standalone = not path.is_dir()
    # After `audit archive`, the live log continues the archived chain from its anchor (archive.py).
    from driverd.audit.archive import anchor_problem, read_anchor

    anchor = None
    if path.is_dir():
        try:
            anchor = read_anchor(path)
        except AuditError as exc:
            out.add(Problem(None, str(path), 0, "anchor", str(exc)))
    first = anchor.first_segment if anchor is not None else 1
    if path.is_dir():
        if numbers[0] != first:
            out.add(Problem(None, str(segments[0][1]), 0, "segments", f"segment {first} is missing (log starts at "
                                                                      f"{numbers[0]})"))
        missing = sorted(set(range(first, numbers[-1] + 1)) - set(numbers) - ({first} if numbers[0] != first
                                                                               else set()))
        if missing and numbers[0] == first:
            out.add(Problem(None, str(path), 0, "segments", f"segments missing from the sequence: {missing}"))
    key = public_key
    expected: int | None = anchor.last_seq + 1 if anchor is not None else None
    prev: str | None = anchor.last_hash if anchor is not None else None
    prev_damaged = False
    good = 0  # records without a problem (a key in a later segment of an unsigned log needs it)
    unsealed_from: int | None = None
    last_file = str(segments[-1][1])
    for number, seg in segments:
        lineno = 0
        try:
            for raw, too_long in _raw_lines(seg):
                lineno += 1
                out.lines += 1
                if too_long:
                    out.add(Problem(expected, str(seg), lineno, "line_too_long",
                                    f"line longer than {MAX_LINE_BYTES} bytes (not a record the writer makes)"))
                    expected = expected + 1 if expected is not None else None
                    prev_damaged = True
                    continue
                seq, event, key, found, prev_damaged = _check(raw, seg, number, lineno, expected, prev,
                                                              prev_damaged, standalone, key, scratch, good, out)
                good += not found
                expected = seq + 1 if seq is not None else (expected + 1 if expected is not None else None)
                prev = hashlib.sha256(raw[:-1] if raw.endswith(b"\n") else raw).hexdigest()
                if event == "checkpoint":
                    unsealed_from = None
                elif seq is not None and unsealed_from is None:
                    unsealed_from = seq
        except OSError as exc:
            raise AuditError(f"{seg}: cannot read: {exc.strerror}") from None
        if lineno == 0:
            out.add(Problem(expected, str(seg), 0, "empty_segment", "empty segment (no segment_start)"))
    if anchor is not None:
        why = anchor_problem(anchor, scratch.key_fingerprint, public_key)
        if why is not None:
            out.add(Problem(None, str(path), 0, "anchor", f"archive anchor: {why}"))
    if require_sealed and unsealed_from is not None:
        out.add(Problem(unsealed_from, last_file, 0, "unsealed_tail",
                        "unsealed tail (records after the last checkpoint)"))
    return out


def _check(
    raw: bytes, seg: Path, number: int, lineno: int, expected: int | None, prev: str | None, prev_damaged: bool,
    standalone: bool, key: Ed25519PublicKey | None, scratch: VerifyReport, good: int, out: FsckReport,
) -> tuple[int | None, str | None, Ed25519PublicKey | None, int, bool]:
    """Every rule on one line. Returns its seq (if readable), its event, the key in force after it, the number of
    problems found, and whether its own bytes are damaged (then the next line's link to it is not checked)."""
    file = str(seg)
    found = 0

    def problem(seq: int | None, rule: str, reason: str) -> None:
        nonlocal found
        found += 1
        out.add(Problem(seq, file, lineno, rule, reason))

    if not raw.endswith(b"\n"):
        problem(expected, "torn_tail",
                "torn tail: no newline at the end (partial write; the writer truncates it on reopen)")
        return None, None, key, found, True
    line = raw[:-1]
    try:
        rec = loads_line(line)
    except ValueError as exc:
        problem(expected, "canonical", f"not a canonical JSON record: {exc}")
        return None, None, key, found, True
    try:
        seq = _envelope(rec)
    except _Fail as f:
        problem(expected, "envelope", f.reason)
        return None, None, key, found, True
    damaged = rec["hash"] != line_content_hash(line, rec)
    if damaged:
        problem(seq, "content_hash", "hash field does not match the record's content")
    if expected is None:
        if not (standalone and number != 1) and seq != 1:
            problem(seq, "seq", f"the log must start at seq 1, found {seq}")
        if seq == 1 and rec["prev"] != ZERO_HASH:
            problem(seq, "chain", "the first record's prev must be 64 zeros")
    else:
        if seq != expected:
            kind = "gap" if seq > expected else "duplicate or out of order"
            problem(seq, "seq", f"seq {kind}: expected {expected}, found {seq}")
        if rec["prev"] != prev and not prev_damaged:
            problem(seq, "chain", "prev does not match the hash of the previous line (chain broken)")
    if lineno == 1:
        scratch.records = good
        try:
            key = _segment_start(rec, number, None if prev_damaged else prev, key, scratch)
        except _Fail as f:
            problem(seq, "segment_start", f.reason)
    elif rec["event"] == "segment_start":
        problem(seq, "segment_start", "segment_start in the middle of a segment")
    if rec["event"] == "checkpoint":
        try:
            _checkpoint(rec, seq, key, scratch.key_fingerprint)
        except _Fail as f:
            problem(seq, "checkpoint", f.reason)
    return seq, rec["event"], key, found, damaged


# ------------------------------------------------------------------------------------------- verified prefix


@dataclass(frozen=True, slots=True)
class Prefix:
    """The part of a log `audit verify` accepts: its first `records` lines, in log order."""

    report: VerifyReport

    @property
    def complete(self) -> bool:
        return self.report.ok

    def warning(self) -> str | None:
        f = self.report.failure
        if f is None:
            return None
        where = f"{f.file}:{f.line}" if f.line else f.file
        seq = f"seq {f.seq}" if f.seq is not None else "the log's layout"
        kept = (f"only the verified part is used: seq {self.report.first_seq}..{self.report.last_seq} "
                f"({self.report.records} records)" if self.report.records else "no record verified: nothing is used")
        return (f"WARNING: the audit log does not verify: verification stopped at {seq} ({where}): {f.reason}. "
                f"{kept}; everything from there on is left out. Run `driverd audit verify --all` for every problem.")

    def as_dict(self) -> dict[str, Any]:
        f = self.report.failure
        return {"complete": self.complete, "records": self.report.records, "first_seq": self.report.first_seq,
                "last_seq": self.report.last_seq,
                "stopped_at": None if f is None else {"seq": f.seq, "file": f.file, "line": f.line,
                                                      "reason": f.reason},
                "warning": self.warning()}


def verified_prefix(path: Path, workers: int = 1) -> Prefix:
    report = verify_log(path, workers=workers)
    f = report.failure
    if f is None or f.line != 0 or not path.is_dir() or "missing from the sequence" not in f.reason:
        return Prefix(report)
    # A segment missing in the middle: verify stops before reading anything, but the segments before the gap are
    # a log of their own. Verify those (through a directory of links to them) and keep the gap as the failure.
    segments = resolve_log(path)
    run = [seg for i, (n, seg) in enumerate(segments, start=1) if n == i]
    with tempfile.TemporaryDirectory(prefix="driverd-prefix-") as tmp:
        for seg in run:
            os.symlink(seg.resolve(), Path(tmp) / seg.name)
        before = verify_log(Path(tmp), workers=workers)
    if before.failure is not None:  # damage before the gap: that is where verification stops
        before.failure = Failure(before.failure.seq, str(path / Path(before.failure.file).name), before.failure.line,
                                 before.failure.reason)
        return Prefix(before)
    after = segments[len(run)][1]
    before.ok, before.path = False, str(path)
    before.failure = Failure((before.last_seq or 0) + 1, str(after), 0, f.reason)
    return Prefix(before)


def prefix_lines(path: Path, prefix: Prefix) -> Iterator[Line]:
    """The verified lines: every line before the first failure (those all parse, so this never raises on them)."""
    return itertools.islice(iter_lines(path), prefix.report.records)
