"""Log layout on disk: a directory of numbered segments `audit-000001.jsonl`, `audit-000002.jsonl`, ..."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Final

from driverd.core.errors import AuditError

SEGMENT_RE: Final = re.compile(r"^audit-(\d{6,})\.jsonl$")
#: Left in the live log directory by `driverd audit archive` (driverd/audit/archive.py): the segments before its
#: `first_segment` were archived; the live log is the segments from there on.
ANCHOR_NAME: Final = "archive-anchor.json"


def segment_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def segment_number(path: Path) -> int | None:
    m = SEGMENT_RE.match(path.name)
    return int(m.group(1)) if m else None


def segment_names(directory: Path) -> list[tuple[int, str]]:
    """(number, file name) of the segments in the directory, sorted by number; other files are ignored.

    One `scandir` pass: the entry's type comes with the listing (no stat per file), and no Path is built. A year's
    log holds ~9,000 segments (a state delta opens each) and start-up lists them several times: with a stat and a
    Path per entry that was most of a restart (bench/README.md section 16)."""
    found: list[tuple[int, str]] = []
    match = SEGMENT_RE.match
    try:
        with os.scandir(directory) as it:
            for entry in it:
                m = match(entry.name)
                if m is not None and entry.is_file():
                    found.append((int(m.group(1)), entry.name))
    except OSError as exc:
        raise AuditError(f"{directory}: cannot list audit directory: {exc.strerror}") from None
    found.sort()
    return found


def list_segments(directory: Path, first: int = 0) -> list[tuple[int, Path]]:
    """Segments in the directory numbered `first` or above, sorted by number. Other files are ignored."""
    return [(n, directory / name) for n, name in segment_names(directory) if n >= first]


def anchor_first_segment(directory: Path) -> int:
    """The first segment of the live log: the archive anchor's `first_segment`, or 1 without an anchor. (The
    anchor is checked in full, signature included, by verify: archive.py.)"""
    anchor = directory / ANCHOR_NAME
    try:
        data = anchor.read_bytes()
    except FileNotFoundError:
        return 1
    except OSError as exc:
        raise AuditError(f"{anchor}: cannot read the archive anchor: {exc.strerror}") from None
    try:
        first = json.loads(data).get("first_segment")
    except (ValueError, AttributeError):
        first = None
    if isinstance(first, bool) or not isinstance(first, int) or first < 2:
        raise AuditError(f"{anchor}: first_segment: not an archive anchor (expected an integer >= 2)")
    return first


def resolve_log(path: Path) -> list[tuple[int, Path]]:
    """LOG|DIR as given on the command line: a directory of segments, or one segment file. In a directory with an
    archive anchor, the live log starts at the anchor's first segment: segments before it (left by an archive cut
    short between writing the anchor and removing them) are archived copies and are not read."""
    if path.is_dir():
        first = anchor_first_segment(path)
        segs = [(n, p) for n, p in list_segments(path) if n >= first]
        if not segs:
            raise AuditError(f"{path}: no audit segments (audit-NNNNNN.jsonl) in this directory")
        return segs
    if path.is_file():
        n = segment_number(path)
        # A file with another name is still readable as a log (e.g. an exported copy); number unknown = 0.
        return [(n if n is not None else 0, path)]
    raise AuditError(f"{path}: no such audit log file or directory")
