"""Following an audit log as it grows (`driverd audit tail`): whole records only, across segment rotation.

A reader never sees half a record: a line without its newline is the writer still writing it, and is read once
it is complete. When a newer segment appears, the current one is read to its end first (the writer finishes a
segment before it opens the next), so no record is skipped or repeated. Reading only: nothing here verifies the
hash chain (that is `driverd audit verify`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driverd.audit.canonical import loads_line
from driverd.audit.reader import MAX_LINE_BYTES
from driverd.audit.segments import list_segments, segment_number
from driverd.core.errors import AuditError


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
            if torn:
                yield TailLine(self._path, self._lineno + 1, torn, None,
                               "torn last line (partial write) at the end of a rotated segment")
            self._number, self._path = newer[0]
            self._offset = self._lineno = 0

    def _read_new(self) -> Iterator[TailLine]:
        assert self._path is not None
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                while True:
                    raw = f.readline(MAX_LINE_BYTES + 1)
                    if not raw.endswith(b"\n"):
                        if len(raw) > MAX_LINE_BYTES:
                            raise AuditError(f"{self._path}:{self._lineno + 1}: line longer than "
                                             f"{MAX_LINE_BYTES} bytes")
                        return  # nothing more, or a line still being written: read it when complete
                    self._offset += len(raw)
                    self._lineno += 1
                    yield _parse(self._path, self._lineno, raw[:-1])
        except FileNotFoundError:
            return  # removed under us (a test directory going away): nothing more to read
        except OSError as exc:
            raise AuditError(f"{self._path}: cannot read: {exc.strerror}") from None

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
