"""Runtime clocks: real time, scaled time (N x real) and virtual time (as fast as the CPU allows).

Every clock offers `now()` (what the core, the simulators and the audit log see) and `sleep_until(t)`.
The virtual clock advances only when every registered participant is asleep in `sleep_until`, jumping to the
earliest wake-up: real I/O (a PTY, a TCP socket) still completes in real time, so the driver path is real.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol


class RuntimeClock(Protocol):
    def now(self) -> datetime: ...

    async def sleep_until(self, when: datetime, *, wake: asyncio.Future[Any] | None = None) -> None:
        """Return at `when`, or earlier once `wake` is done (someone else completes it: a request arrived)."""
        ...

    def register(self) -> None: ...

    def unregister(self) -> None: ...


async def _sleep_real(delay_s: float, wake: asyncio.Future[Any] | None) -> None:
    if wake is None:
        await asyncio.sleep(max(delay_s, 0.0))
        return
    # One timer on the caller's own future: no task and no asyncio.wait per sleep (one per pump per poll).
    timer = asyncio.get_running_loop().call_later(max(delay_s, 0.0), _settle, wake)
    try:
        await wake
    finally:
        timer.cancel()


def _settle(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


class _FreeRunning:
    """A clock that runs on its own: nobody needs to be counted (unlike VirtualClock's participants)."""

    def register(self) -> None:
        pass

    def unregister(self) -> None:
        pass


class RealClock(_FreeRunning):
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime, *, wake: asyncio.Future[Any] | None = None) -> None:
        await _sleep_real((when - self.now()).total_seconds(), wake)


class ScaledClock(_FreeRunning):
    """Virtual time running `speed` times faster than real time, from `start`."""

    def __init__(self, start: datetime, speed: float) -> None:
        if not speed > 0:
            raise ValueError("speed must be > 0")
        self._start = start
        self._t0 = time.monotonic()
        self._speed = speed

    def now(self) -> datetime:
        return self._start + timedelta(seconds=(time.monotonic() - self._t0) * self._speed)

    async def sleep_until(self, when: datetime, *, wake: asyncio.Future[Any] | None = None) -> None:
        await _sleep_real((when - self.now()).total_seconds() / self._speed, wake)


class VirtualClock:
    """Discrete-event time: jumps to the next wake-up once all participants sleep. Single event loop only."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self._now = start
        self._participants = 0
        self._waiters: list[tuple[datetime, int, asyncio.Future[Any]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    def register(self) -> None:
        self._participants += 1

    def unregister(self) -> None:
        self._participants -= 1
        self._maybe_advance()

    async def sleep_until(self, when: datetime, *, wake: asyncio.Future[Any] | None = None) -> None:
        # A participant counts as asleep while its future is pending; completing `wake` early wakes it (awake
        # participants hold time still).
        fut: asyncio.Future[Any] = wake if wake is not None else asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (max(when, self._now), next(self._seq), fut))
        self._maybe_advance()
        try:
            if fut.done():
                # Woken at once (a lone participant): still yield, or this task would starve the event loop.
                await asyncio.sleep(0)
            await fut
        finally:
            if not fut.done():  # cancelled: forget the wake-up
                fut.cancel()
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)

    def _sleeping(self) -> int:
        return sum(1 for w in self._waiters if not w[2].done())

    def _maybe_advance(self) -> None:
        # Time jumps only when nobody is doing real work: every participant waits on the clock.
        if not self._waiters or self._sleeping() < self._participants:
            return
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)
        if not self._waiters:
            return
        when = self._waiters[0][0]
        self._now = max(self._now, when)
        while self._waiters and self._waiters[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
