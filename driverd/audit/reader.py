"""Reading records back (export, report, replay). Verification is verify.py's job; this only parses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final, NamedTuple

from driverd.audit.canonical import loads_line
from driverd.audit.segments import resolve_log
from driverd.core.errors import AuditError


class Line(NamedTuple):
    """One record as read (immutable; a named tuple: made for every line replay reads, at a tenth of the cost of a
    frozen dataclass)."""

    file: Path
    lineno: int
    raw: bytes  # exact bytes without the newline
    record: dict[str, Any]


# Far above any record the writer makes (the largest hold a drug library or a schedule, each at most 1 MiB):
# a garbage file without newlines is refused instead of read into memory whole.
MAX_LINE_BYTES: Final = 16 << 20


class LineTooLong(ValueError):
    pass


def bounded_lines(f: IO[bytes]) -> Iterator[bytes]:
    """The lines of f (with their newline), raising LineTooLong for one longer than MAX_LINE_BYTES."""
    while raw := f.readline(MAX_LINE_BYTES + 1):
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise LineTooLong(f"line longer than {MAX_LINE_BYTES} bytes")
        yield raw


def total_bytes(path: Path) -> int:
    return sum(p.stat().st_size for _, p in resolve_log(path))


def iter_lines(path: Path, progress: Callable[[int], None] | None = None) -> Iterator[Line]:
    """Every record of LOG|DIR in order. A torn or non-canonical line raises AuditError naming file:line."""
    for _, seg in resolve_log(path):
        n = 0
        try:
            with seg.open("rb") as f:
                for n, raw in enumerate(bounded_lines(f), start=1):  # n is also used after the loop
                    if progress is not None:
                        progress(len(raw))
                    if not raw.endswith(b"\n"):
                        raise AuditError(f"{seg}:{n}: torn last line (partial write); run `driverd audit verify`")
                    line = raw[:-1]
                    try:
                        rec = loads_line(line)
                    except ValueError as exc:
                        raise AuditError(f"{seg}:{n}: not a canonical audit record: {exc}") from None
                    yield Line(seg, n, line, rec)
        except LineTooLong as exc:
            raise AuditError(f"{seg}:{n + 1}: {exc}") from None
        except OSError as exc:
            raise AuditError(f"{seg}: cannot read: {exc.strerror}") from None


def iter_records(path: Path, progress: Callable[[int], None] | None = None) -> Iterator[dict[str, Any]]:
    for line in iter_lines(path, progress):
        yield line.record
