"""The delivered-volume history kept for the rolling 24-h window: an immutable sequence of samples with O(1)
append and trim (issue 12: the tuple it replaces was copied, up to 1,440 samples, on every kept sample).

A `History` is a view `[lo, hi)` of a buffer that only ever grows at its end. Appending to the newest view of a
buffer appends to the buffer in place and returns a longer view: every existing view still sees exactly the
samples it saw, because no slot of the buffer is ever written twice. Appending to an older view (a branch: the
same state stepped twice) reuses the next slot if it already holds an identical sample, else copies. Trimming
moves `lo`; the dead prefix is dropped by copying once it outgrows the live part (amortized O(1)). So a history
is a value: equal when its samples are equal, whatever buffer it shares.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from itertools import islice
from typing import TYPE_CHECKING, TypeVar, overload

if TYPE_CHECKING:
    from driverd.core.state import Sample

T = TypeVar("T")
#: Per shared buffer (by id): the buffer, its times, the index of its first encoded slot, the encoded slots from there.
EncodedMemo = dict[int, tuple[list["Sample"], list[datetime], int, list[T]]]

class History:
    """Samples oldest first, strictly increasing in time. Immutable from the outside."""

    # _times[i] is _buf[i].at: bisect without a key function (C comparisons only). The core is single-threaded
    # (the daemon steps each course on its event loop); an append checks it was the one that filled the slot.
    __slots__ = ("_buf", "_hi", "_lo", "_times")

    def __init__(self, samples: Iterable[Sample] = ()) -> None:
        self._buf: list[Sample] = list(samples)
        self._times: list[datetime] = [s.at for s in self._buf]
        self._lo = 0
        self._hi = len(self._buf)

    @classmethod
    def _view(cls, buf: list[Sample], times: list[datetime], lo: int, hi: int) -> History:
        view = object.__new__(cls)
        view._buf, view._times, view._lo, view._hi = buf, times, lo, hi
        return view

    def __len__(self) -> int:
        return self._hi - self._lo

    def __bool__(self) -> bool:
        return self._hi > self._lo

    def __iter__(self) -> Iterator[Sample]:
        return islice(self._buf, self._lo, self._hi)

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Sample, ...]: ...

    def __getitem__(self, i: int | slice) -> Sample | tuple[Sample, ...]:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._hi - self._lo)
            if step == 1:  # the common case, without copying the whole view first
                return tuple(self._buf[self._lo + start:self._lo + max(start, stop)])
            return tuple(self._buf[self._lo:self._hi][i])
        n = self._hi - self._lo
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("history index out of range")
        return self._buf[self._lo + i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History):
            return NotImplemented
        if len(self) != len(other):
            return False
        if self._buf is other._buf and self._lo == other._lo:
            return True
        return all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"History({list(self)!r})"

    def __reduce__(self) -> tuple[type[History], tuple[list[Sample]]]:
        return (History, (list(self),))

    def append(self, sample: Sample) -> History:
        """This history with `sample` (newer than every sample in it) added at the end."""
        buf, times, hi = self._buf, self._times, self._hi
        if hi == len(buf) == len(times):
            buf.append(sample)
            times.append(sample.at)
            if buf[hi] is sample and len(buf) == len(times):  # nobody else appended to this buffer in between
                return History._view(buf, times, self._lo, hi + 1)
        elif len(buf) > hi and (buf[hi] is sample or repr(buf[hi]) == repr(sample)):
            # A branch adding the very same sample (repr: same instant, zone, digits and exponents) shares it.
            return History._view(buf, times, self._lo, hi + 1)
        return History([*buf[self._lo:hi], sample])

    def since(self, horizon: datetime) -> History:
        """The samples at or after `horizon` (a bisect: the history is sorted by time)."""
        lo, hi = self._lo, self._hi
        cut = bisect_left(self._times, horizon, lo, hi)
        if cut == lo:
            return self
        if cut > hi - cut and cut > 64:
            # The dead prefix outgrew the live part: drop it (a copy of the live part, amortized O(1) per sample).
            return History(self._buf[cut:hi])
        return History._view(self._buf, self._times, cut, hi)

    def push(self, sample: Sample, horizon: datetime) -> History:
        """`self.since(horizon).append(sample)` in one step (one view made instead of two: it runs on every kept
        sample). The same branches in the same order: the trim (or the copy of a long dead prefix), then the
        append in place, the shared identical next slot of a branch, or a copy."""
        lo, hi = self._lo, self._hi
        cut = bisect_left(self._times, horizon, lo, hi)
        if cut != lo and cut > hi - cut and cut > 64:
            return History(self._buf[cut:hi]).append(sample)
        buf, times = self._buf, self._times
        if hi == len(buf) == len(times):
            buf.append(sample)
            times.append(sample.at)
            if buf[hi] is sample and len(buf) == len(times):
                return History._view(buf, times, cut, hi + 1)
        elif len(buf) > hi and (buf[hi] is sample or repr(buf[hi]) == repr(sample)):
            return History._view(buf, times, cut, hi + 1)
        return History([*buf[cut:hi], sample])

    def newest(self) -> Sample | None:
        return self._buf[self._hi - 1] if self._hi > self._lo else None

    def at_or_before(self, at: datetime) -> Sample | None:
        """The newest sample at or before `at`."""
        i = bisect_right(self._times, at, self._lo, self._hi)
        return self._buf[i - 1] if i > self._lo else None

    def bracket(self, at: datetime) -> tuple[Sample | None, Sample | None]:
        """Where `at` falls, for interpolation: (None, None) if empty; (None, first) at or before the first sample;
        (newest, None) at or after the newest; else (a, b) with a.at <= at < b.at, adjacent."""
        lo, hi = self._lo, self._hi
        if lo == hi:
            return None, None
        times, buf = self._times, self._buf
        if at <= times[lo]:
            return None, buf[lo]
        if at >= times[hi - 1]:
            return buf[hi - 1], None
        i = bisect_right(times, at, lo, hi)
        return buf[i - 1], buf[i]

    def count_before(self, at: datetime) -> int:
        """How many samples are strictly before `at` (bisect_left by time)."""
        return bisect_left(self._times, at, self._lo, self._hi) - self._lo

    def same_run(self, start: int, other: History) -> int:
        """How many of this history's samples from index `start` (>= 0) on are, one for one, the very same objects
        as `other`'s first samples. Views of one buffer at the same slots share them all (no slot is written
        twice), so that case costs nothing; else the objects are compared one by one up to the first difference."""
        if start < 0:
            raise IndexError("history index out of range")
        i, j = self._lo + start, other._lo
        n = min(self._hi - i, other._hi - j)
        if n <= 0:
            return 0
        if self._buf is other._buf and i == j:
            return n
        a, b = self._buf, other._buf
        k = 0
        while k < n and a[i + k] is b[j + k]:
            k += 1
        return k

    def index_after(self, at: datetime) -> int:
        """How many samples are at or before `at` (bisect_right by time)."""
        return bisect_right(self._times, at, self._lo, self._hi) - self._lo

    def encoded(self, encode: Callable[[Sample], T], memo: EncodedMemo[T], kept: EncodedMemo[T]) -> list[T]:
        """`[encode(s) for s in self]`, encoding each sample once across calls: the memo holds what earlier calls
        encoded, per shared buffer (a slot is never written twice, so its encoding stays valid while the buffer
        lives); a buffer that is a copy of another's live part (a trim that dropped a long dead prefix) reuses the
        encodings of the very same sample objects. The entries used are put in `kept` (the caller's memo for the
        next round, so dead buffers are dropped)."""
        buf, times, lo, hi = self._buf, self._times, self._lo, self._hi
        entry = kept.get(id(buf)) or memo.get(id(buf))
        if entry is None or entry[0] is not buf or entry[2] > lo:
            entry = (buf, times, lo, self._reuse(encode, memo))
        base, rows = entry[2], entry[3]
        if base + len(rows) < hi:
            rows.extend(encode(s) for s in buf[base + len(rows):hi])
        kept[id(buf)] = entry  # holds the buffer: its id is not reused while the entry lives
        return rows[lo - base:hi - base]

    def _reuse(self, encode: Callable[[Sample], T], memo: EncodedMemo[T]) -> list[T]:
        """The encodings of this view's leading samples found (by identity) in another buffer's memo entry."""
        buf, lo, hi = self._buf, self._lo, self._hi
        if lo == hi:
            return []
        first = buf[lo]
        for other, other_times, base, rows in memo.values():
            j = bisect_left(other_times, first.at)
            if j < len(other) and other[j] is first and base <= j:
                out: list[T] = []
                k = 0
                while lo + k < hi and j + k - base < len(rows) and j + k < len(other) and other[j + k] is buf[lo + k]:
                    out.append(rows[j + k - base])
                    k += 1
                return out
        return []
