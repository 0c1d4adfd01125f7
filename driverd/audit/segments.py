"""Log layout on disk: a directory of numbered segments `audit-000001.jsonl`, `audit-000002.jsonl`, ..."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from driverd.core.errors import AuditError

SEGMENT_RE: Final = re.compile(r"^audit-(\d{6,})\.jsonl$")


def segment_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def segment_number(path: Path) -> int | None:
    m = SEGMENT_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """Segments in the directory, sorted by number. Other files are ignored."""
    found: list[tuple[int, Path]] = []
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise AuditError(f"{directory}: cannot list audit directory: {exc.strerror}") from None
    for p in entries:
        n = segment_number(p)
        if n is not None and p.is_file():
            found.append((n, p))
    found.sort()
    return found


def resolve_log(path: Path) -> list[tuple[int, Path]]:
    """LOG|DIR as given on the command line: a directory of segments, or one segment file."""
    if path.is_dir():
        segs = list_segments(path)
        if not segs:
            raise AuditError(f"{path}: no audit segments (audit-NNNNNN.jsonl) in this directory")
        return segs
    if path.is_file():
        n = segment_number(path)
        # A file with another name is still readable as a log (e.g. an exported copy); number unknown = 0.
        return [(n if n is not None else 0, path)]
    raise AuditError(f"{path}: no such audit log file or directory")
