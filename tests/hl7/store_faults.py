"""Crash and disk-failure injection for the HL7 stores (outbox, order log).

`FaultyOS` stands in for the `os` module inside `driverd.hl7.journal` (monkeypatched there only, so pytest and
asyncio are untouched). Every call that touches the disk is a crash point: `crash_matrix` runs an operation once
to list its calls, then for each call k runs it again on a fresh store and stops the "process" at k: before the
call, after it, and (for a write) half-way through it. A crash is the `Crash` BaseException, which no store
code catches, so nothing runs after it (as with SIGKILL: what the kernel has is what is on disk). The store is
then reopened and `check` decides whether what it holds is allowed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from driverd.hl7 import journal

DISK_CALLS = ("open", "write", "fdatasync", "fsync", "ftruncate", "replace", "unlink")


class Crash(BaseException):
    """The process died here."""


class FaultyOS:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.crash_at: int | None = None
        self.mode = "before"  # "before" | "after" | "partial"
        self.fail: dict[str, int] = {}  # call name -> errno: every such call fails (while set)
        self.fail_once_at: tuple[int, int] | None = None  # (call index, errno)
        self.short_write_then: int | None = None  # errno: the next write stores half its bytes, the one after fails
        self._shorted = False
        self.open_fds: set[int] = set()  # opened through this and not closed yet (what a dying process drops)

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name == "close":
            def close(fd: int) -> None:
                self.open_fds.discard(fd)
                real(fd)

            return close
        if name == "open":
            real_open = real

            def real(*args: Any, **kwargs: Any) -> Any:
                fd = real_open(*args, **kwargs)
                self.open_fds.add(fd)
                return fd
        if name not in DISK_CALLS:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            k = len(self.calls)
            self.calls.append(name)
            if name in self.fail:
                raise OSError(self.fail[name], os.strerror(self.fail[name]))
            if self.fail_once_at is not None and self.fail_once_at[0] == k:
                err = self.fail_once_at[1]
                raise OSError(err, os.strerror(err))
            if name == "write" and self.short_write_then is not None:
                fd, data = args
                if not self._shorted:
                    self._shorted = True
                    return real(fd, bytes(data)[: max(1, len(data) // 2)])
                err, self.short_write_then, self._shorted = self.short_write_then, None, False
                raise OSError(err, os.strerror(err))
            if self.crash_at == k:
                if self.mode == "before":
                    raise Crash(f"before {name} (call {k})")
                if self.mode == "partial" and name == "write":
                    fd, data = args
                    real(fd, bytes(data)[: max(1, len(data) // 2)])
                    raise Crash(f"half-way through write (call {k})")
                with contextlib.suppress(OSError):  # the call failed, then the process died: same thing
                    real(*args, **kwargs)
                raise Crash(f"after {name} (call {k})")
            return real(*args, **kwargs)

        return call

    def kill(self) -> None:
        """The process died: the kernel closes its files (and drops its locks)."""
        for fd in list(self.open_fds):
            self.close(fd)

    def reset(self) -> None:
        self.calls = []
        self.crash_at = None
        self.fail = {}
        self.fail_once_at = None
        self.short_write_then = None
        self._shorted = False


def install(monkeypatch: pytest.MonkeyPatch) -> FaultyOS:
    """Put a FaultyOS in place of `os` inside driverd.hl7.journal (undone by the monkeypatch fixture)."""
    f = FaultyOS()
    monkeypatch.setattr(journal, "os", f)
    return f


def crash_matrix(
    tmp: Path,
    faulty: FaultyOS,
    setup: Callable[[Path], Any],
    op: Callable[[Any], Any],
    check: Callable[[Path], None],
) -> int:
    """Crash `op` at each of its disk calls (before / after / half-way through a write); after each crash the
    store is closed (fds only) and `check(directory)` reopens and judges it. Returns how many crashes ran."""
    probe = tmp / "probe"
    store = setup(probe)
    faulty.reset()
    op(store)
    calls = list(faulty.calls)
    store.close()
    assert calls, "the operation touched no disk call"
    runs = 0
    for k, name in enumerate(calls):
        for mode in ("before", "after", "partial") if name == "write" else ("before", "after"):
            d = tmp / f"run-{k}-{mode}"
            store = setup(d)
            faulty.reset()
            faulty.crash_at, faulty.mode = k, mode
            try:
                op(store)
            except Crash:
                pass
            else:
                raise AssertionError(f"no crash at call {k} ({name}, {mode}): the call sequence changed")
            finally:
                faulty.reset()
                faulty.kill()
                store.close()
            check(d)
            shutil.rmtree(d)
            runs += 1
    return runs


def file_bytes(directory: Path, name: str) -> bytes:
    return (directory / name).read_bytes()
