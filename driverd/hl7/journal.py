"""One durable store file: an append-only journal of JSON records, one checksummed line each.

The HL7 outbox and order log are each a journal in a directory of their own. The rules (as for the audit log,
docs/audit.md, except that a failed write leaves the store usable instead of killing it):

- A line is ``CRC-32 (8 hex digits) SP JSON LF``; the JSON has sorted keys, is ASCII-only and has no NaN, so a
  line never contains a raw LF. The first line names the format (``{"format": ...}``).
- `append` writes one record and fdatasyncs it before it returns. A failed write (ENOSPC, EFBIG, EIO ...) is
  undone by truncating the file back to its length before the write: the store is unchanged and usable, and the
  error is raised. A failed fdatasync is not undone or retried (after a failed sync the kernel may have dropped
  the dirty pages, so nothing can be known about what is on disk): the journal is *broken*, every later call
  raises, and the owner reopens it, which reads back whatever the disk really holds.
- `rewrite` (compaction, and creating a new file) writes the whole new content to ``NAME.tmp``, fsyncs it,
  renames it over ``NAME`` and fsyncs the directory: a crash at any point leaves either the old or the new file,
  each complete. A leftover ``NAME.tmp`` is deleted on open.
- On open, a torn last line (no LF, or an LF-terminated line that fails its checksum: a crash mid-write, or power
  lost before the sync) is truncated away and counted in `repaired_bytes`. Only the last line can be torn: any
  other bad line is corruption, reported with its line number, never skipped. The format line is written by
  `rewrite` (synced before its rename), so it is never torn: a file that does not start with it is not a store
  of this kind and is refused without being touched.
- The directory is created 0700 and files 0600 whatever the umask (they hold patient identifiers); an existing
  directory is left as it is. One process holds a journal at a time (flock on ``NAME.lock``).

Not thread-safe: one event loop (or one thread) uses a journal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import zlib
from pathlib import Path
from typing import Any, Final

from driverd.core.errors import DriverdError

DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
_CRC_LEN: Final = 8


class StoreError(DriverdError):
    """A durable HL7 store (outbox, order log) refused an operation or cannot be used."""


class StoreIOError(StoreError):
    """The disk failed (ENOSPC, EIO, ...). `broken`: the store must be reopened before it is used again."""

    def __init__(self, message: str, errno: int | None, *, broken: bool) -> None:
        super().__init__(message)
        self.errno = errno
        self.broken = broken


class StoreCorrupt(StoreError):
    """A store file that is not what this code writes: names the file, the line (1-based) and the rule."""

    def __init__(self, path: Path, line: int, rule: str) -> None:
        super().__init__(f"{path} line {line}: {rule}")
        self.path = path
        self.line = line
        self.rule = rule


def encode_line(record: dict[str, Any]) -> bytes:
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_line(line: bytes) -> dict[str, Any] | str:
    """The record of one line (without its LF), or why it is not one."""
    if len(line) < _CRC_LEN + 3 or line[_CRC_LEN : _CRC_LEN + 1] != b" ":
        return "not a journal line (CRC SP JSON)"
    crc, body = line[:_CRC_LEN], line[_CRC_LEN + 1 :]
    try:
        expected = int(crc, 16)
    except ValueError:
        return "checksum is not 8 hex digits"
    if crc != crc.lower() or zlib.crc32(body) != expected:
        return "checksum does not match"
    try:
        record = json.loads(body, parse_constant=_no_constant)
    except ValueError:
        return "not JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    return record


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads would accept NaN / Infinity: we never write them


class Journal:
    """An open journal file; see the module docstring for the durability rules."""

    def __init__(self, directory: Path, name: str, dir_fd: int, lock_fd: int) -> None:
        self.directory = directory
        self.name = name
        self.path = directory / name
        self._dir_fd = dir_fd
        self._lock_fd = lock_fd
        self._fd = -1
        self.size = 0  # bytes in the file (all of them synced)
        self.lines = 0  # lines in the file, the format line included
        self.repaired_bytes = 0  # bytes of a torn last line removed on open
        self._broken: StoreIOError | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------- open

    @classmethod
    def open(cls, directory: Path, name: str, fmt: str) -> tuple[Journal, list[tuple[int, dict[str, Any]]]]:
        """Open (creating if needed) ``directory/name``; returns the journal and its records after the format
        line, each with its 1-based line number."""
        directory = Path(directory)
        try:
            _make_dirs(directory)
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreIOError(f"{directory}: cannot open store directory: {exc.strerror}", exc.errno,
                               broken=True) from None
        try:
            lock_fd = os.open(f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE, dir_fd=dir_fd)
        except OSError as exc:
            os.close(dir_fd)
            raise StoreIOError(f"{directory / name}.lock: cannot open: {exc.strerror}", exc.errno,
                               broken=True) from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            os.close(dir_fd)
            raise StoreError(f"{directory / name}: in use by another process") from None
        journal = cls(directory, name, dir_fd, lock_fd)
        try:
            records = journal._load(fmt)
        except BaseException:
            journal.close()
            raise
        return journal, records

    def _load(self, fmt: str) -> list[tuple[int, dict[str, Any]]]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.name}.tmp", dir_fd=self._dir_fd)  # an interrupted rewrite: the file itself is whole
        try:
            fd = os.open(self.name, os.O_RDWR | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except FileNotFoundError:
            fd = -1
        except OSError as exc:
            raise StoreIOError(f"{self.path}: cannot open: {exc.strerror}", exc.errno, broken=True) from None
        data = b""
        if fd >= 0:
            try:
                data = self._read_and_repair(fd, fmt)
            finally:
                os.close(fd)
        if not data:
            self.rewrite([{"format": fmt}])  # new (or an empty file: nothing of ours is ever empty)
            return []
        raw = data.split(b"\n")[:-1]
        records: list[tuple[int, dict[str, Any]]] = []
        for number, line in enumerate(raw[1:], 2):
            rec = decode_line(line)
            if isinstance(rec, str):
                raise StoreCorrupt(self.path, number, rec)
            records.append((number, rec))
        self.size = len(data)
        self.lines = len(raw)
        try:
            self._fd = os.open(self.name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except OSError as exc:
            raise StoreIOError(f"{self.path}: cannot open: {exc.strerror}", exc.errno, broken=True) from None
        return records

    def _read_and_repair(self, fd: int, fmt: str) -> bytes:
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        except OSError as exc:
            raise StoreIOError(f"{self.path}: cannot read: {exc.strerror}", exc.errno, broken=True) from None
        data = b"".join(chunks)
        if not data:
            return data
        # The format line is written by `rewrite` (synced before the rename), so it is never torn: a file that
        # does not start with it is not ours, and is left untouched.
        first = data.find(b"\n")
        if first < 0 or decode_line(data[:first]) != {"format": fmt}:
            raise StoreCorrupt(self.path, 1, f"not a {fmt} store (the first line must name the format)")
        if data.endswith(b"\n"):
            start = data.rfind(b"\n", 0, len(data) - 1) + 1
            if start == 0 or not isinstance(decode_line(data[start:-1]), str):
                return data  # the last line is whole
        else:
            start = data.rfind(b"\n") + 1
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError as exc:
            raise StoreIOError(f"{self.path}: cannot truncate a torn last line: {exc.strerror}", exc.errno,
                               broken=True) from None
        self.repaired_bytes = len(data) - start
        return data[:start]

    # ------------------------------------------------------------------------------------------ write

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fdatasync it. On a write error the file is truncated back (unchanged, usable)
        and StoreIOError raised; on a sync error the journal is broken (see the module docstring)."""
        line = encode_line(record)
        self._check_usable()
        try:
            _write_all(self._fd, line)
        except OSError as exc:
            self._undo_write(exc)
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise self._break(f"fdatasync of {self.path} failed", exc) from None
        self.size += len(line)
        self.lines += 1

    def _undo_write(self, exc: OSError) -> None:
        try:
            os.ftruncate(self._fd, self.size)
        except OSError as exc2:
            raise self._break(f"write to {self.path} failed ({exc.strerror}) and could not be undone", exc2) from None
        raise StoreIOError(f"write to {self.path} failed: {exc.strerror or exc} (errno {exc.errno}); nothing was "
                           "stored", exc.errno, broken=False) from None

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the whole file with `records` (the first being the format line), atomically and durably."""
        self._check_usable()
        data = b"".join(encode_line(r) for r in records)
        tmp = f"{self.name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE, dir_fd=self._dir_fd)
        except OSError as exc:
            raise StoreIOError(f"{self.directory / tmp}: cannot create: {exc.strerror} (errno {exc.errno}); store "
                               "unchanged", exc.errno, broken=False) from None
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._dir_fd)
            raise StoreIOError(f"rewrite of {self.path} failed: {exc.strerror or exc} (errno {exc.errno}); store "
                               "unchanged", exc.errno, broken=False) from None
        # The new file is in place: from here on a failure breaks the journal (the old fd is a dead inode).
        old, self._fd = self._fd, -1
        if old >= 0:
            with contextlib.suppress(OSError):
                os.close(old)
        try:
            os.fsync(self._dir_fd)  # the rename itself must survive a crash before anything is appended
            self._fd = os.open(self.name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except OSError as exc:
            raise self._break(f"rewrite of {self.path}: directory sync or reopen failed", exc) from None
        self.size = len(data)
        self.lines = len(records)

    # ------------------------------------------------------------------------------------------ state

    @property
    def broken(self) -> StoreIOError | None:
        return self._broken

    def _break(self, what: str, exc: OSError) -> StoreIOError:
        err = StoreIOError(f"{what}: {exc.strerror or exc} (errno {exc.errno}); not retried: reopen the store",
                           exc.errno, broken=True)
        self._broken = err
        return err

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: closed")
        if self._broken is not None:
            raise StoreIOError(f"{self.path}: unusable after an earlier failure ({self._broken}); reopen it",
                               self._broken.errno, broken=True)

    def close(self) -> None:
        """Release the file and the lock; writes nothing (safe after any failure)."""
        self._closed = True
        for fd in (self._fd, self._lock_fd, self._dir_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = self._dir_fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _make_dirs(path: Path) -> None:
    """Create `path` and missing parents 0700 (the umask can only narrow it), fsyncing each new name into its
    parent. An existing directory is left as it is."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        fd = os.open(d.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
