"""Making directory changes durable: a new name (file, directory, rename, removal) survives a crash only once
its directory is fsynced. Standard library only, so readers (verify of an archived log) import it cheaply."""

from __future__ import annotations

import os
from pathlib import Path


def make_dirs(path: Path, mode: int) -> None:
    """Create `path` and any missing parents with `mode` (the umask can only narrow it), fsyncing each new
    name into its parent. An existing directory is left as it is (the daemon checks it at start)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def fsync_dir(path: Path) -> None:
    """Make the names in directory `path` durable (a new file, a rename, a removal)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
