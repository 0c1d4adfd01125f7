"""Following an audit log as it grows (`driverd audit tail`): whole records only, across segment rotation.

A reader never sees half a record: a line without its newline is the writer still writing it, and is read once
it is complete. When a newer segment appears, the current one is read to its end first (the writer finishes a
segment before it opens the next), so no record is skipped or repeated. Reading only: nothing here verifies the
hash chain (that is `driverd audit verify`).

A restarted writer may cut the end of the newest segment (a torn last line, or unsynced pages a power cut lost:
docs/audit.md, "Crash consistency") and append from there. So an unreadable last line is shown but not read past
until something follows it, and each poll checks that the last line read is still there: if it is not, reading
resumes after the newest line read that is still unchanged (lines already shown are not shown again).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from driverd.audit.canonical import loads_line
from driverd.audit.reader import MAX_LINE_BYTES
from driverd.audit.segments import list_segments, segment_number
from driverd.core.errors import AuditError

_KEEP = 4096


@dataclass(frozen=True, slots=True)
class TailLine:
    file: Path
    lineno: int
    raw: bytes  # the exact record line, without its newline
    record: dict[str, Any] | None  # None: the line is not a readable record (see `error`)
    error: str | None = None


class Follower:
    """The records of LOG (a segment directory or one segment file) in order, as they are appended."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.single = not log.is_dir()
        self._path: Path | None = log if self.single else None
        self._number = -1
        self._offset = 0
        self._lineno = 0
        # The newest lines read in this segment, (start, end, lineno, seq or None, hash(raw)), to find where a
        # writer's cut began. A cut spans at most group_commit_records lines; far fewer than are kept.
        self._read: deque[tuple[int, int, int, int | None, int]] = deque(maxlen=_KEEP)
        self._held: tuple[int, int] | None = None  # (offset, hash) of an unreadable last line shown, not read past
        self._skip_to_seq = 0  # after a resync from the segment start: records up to this seq were shown
        self._last_seq_shown = 0

    def _segments(self) -> list[tuple[int, Path]]:
        if self.single:
            return [(segment_number(self.log) or 0, self.log)] if self.log.exists() else []
        return list_segments(self.log)

    def backlog(self, n: int) -> list[TailLine]:
        """The last `n` records already in the log; reading goes on from the end of the log."""
        last: deque[TailLine] = deque(maxlen=max(n, 0))
        for line in self.poll():
            if n > 0:
                last.append(line)
        return list(last)

    def poll(self) -> Iterator[TailLine]:
        """Every whole record appended since the last call (from the first segment on the first call)."""
        while True:
            if self._path is None:
                segs = self._segments()
                if not segs:
                    return
                self._number, self._path = segs[0]
            yield from self._read_new()
            if self.single:
                return
            newer = [(n, p) for n, p in self._segments() if n > self._number]
            if not newer:
                return
            # Rotated: the current segment is complete now; read what was appended before the switch.
            yield from self._read_new()
            torn = self._leftover()
            if torn and self._held != (self._offset, hash(torn)):  # (an unreadable last line is shown once)
                yield TailLine(self._path, self._lineno + 1, torn, None,
                               "torn last line (partial write) at the end of a rotated segment")
            self._number, self._path = newer[0]
            self._offset = self._lineno = 0
            self._read.clear()
            self._held = None

    def _read_new(self) -> Iterator[TailLine]:
        assert self._path is not None
        try:
            with self._path.open("rb") as f:
                self._resync(f)
                f.seek(self._offset)
                while True:
                    raw = f.readline(MAX_LINE_BYTES + 1)
                    if not raw.endswith(b"\n"):
                        if len(raw) > MAX_LINE_BYTES:
                            raise AuditError(f"{self._path}:{self._lineno + 1}: line longer than "
                                             f"{MAX_LINE_BYTES} bytes")
                        return  # nothing more, or a line still being written: read it when complete
                    line = _parse(self._path, self._lineno + 1, raw[:-1])
                    key = (self._offset, hash(raw))
                    if line.record is None and not f.peek(1):
                        # The last line, unreadable: a crash's, which the restarted writer will cut. Shown once,
                        # not read past, so the reading goes on from here after the cut.
                        if self._held != key:
                            self._held = key
                            yield line
                        return
                    start, self._offset = self._offset, self._offset + len(raw)
                    self._lineno += 1
                    seq = line.record.get("seq") if line.record is not None else None
                    self._read.append((start, self._offset, self._lineno, seq if isinstance(seq, int) else None,
                                       key[1]))
                    if self._held == key:
                        self._held = None
                        continue  # shown already, when it was the last line
                    if isinstance(seq, int):
                        if seq <= self._skip_to_seq:
                            continue  # shown before the segment was read again from its start
                        self._last_seq_shown = seq
                    self._skip_to_seq = 0
                    yield line
        except FileNotFoundError:
            return  # removed under us (a test directory going away): nothing more to read
        except OSError as exc:
            raise AuditError(f"{self._path}: cannot read: {exc.strerror}") from None

    def _resync(self, f: BinaryIO) -> None:
        """If the lines last read are no longer there (a restarted writer cut them and appended), resume after the
        newest one that is unchanged."""
        if not self._read or (self._unchanged(f, self._read[-1]) and os.fstat(f.fileno()).st_size >= self._offset):
            return
        while self._read and not self._unchanged(f, self._read[-1]):
            self._read.pop()
        self._held = None
        if self._read:
            _, self._offset, self._lineno, _, _ = self._read[-1]
            return
        # Cut further back than the lines kept (not a writer's cut: the file was replaced): read the segment
        # again, skipping the records shown by seq.
        self._skip_to_seq = max(self._skip_to_seq, self._last_seq_shown)
        self._offset = self._lineno = 0

    @staticmethod
    def _unchanged(f: BinaryIO, entry: tuple[int, int, int, int | None, int]) -> bool:
        start, end, _, _, digest = entry
        f.seek(start)
        raw = f.read(end - start)
        return len(raw) == end - start and hash(raw) == digest

    def _leftover(self) -> bytes:
        assert self._path is not None
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                return f.read(MAX_LINE_BYTES)
        except OSError:
            return b""


def _parse(path: Path, lineno: int, raw: bytes) -> TailLine:
    try:
        return TailLine(path, lineno, raw, loads_line(raw))
    except ValueError as exc:
        return TailLine(path, lineno, raw, None, f"not a canonical audit record: {exc}")
