"""Runtime clocks: real time, scaled time (N x real), virtual time (as fast as the CPU allows) and paced time
(virtual time that never runs ahead of N x real time: the demo's `--speed N`).

Every clock offers `now()` (what the core, the simulators and the audit log see) and `sleep_until(t)`.
The virtual clock advances only when every registered participant is asleep in `sleep_until`, jumping to the
earliest wake-up: real I/O (a PTY, a TCP socket) still completes in real time, so the driver path is real.

`now()` is step-free on every clock: it advances with a monotonic clock and never follows a step of the
host's wall clock (NTP correcting a wrong RTC, an operator's `date -s`). `wall()` is the wall-clock reading;
`ClockWatch` compares the two and reports a step beyond a tolerance, which the channel feeds to the core as a
`ClockStepped` fault (docs/safety.md, "Time"). The scaled and virtual clocks cannot step on their own:
`step_wall()` makes their wall reading jump, so tests (and demos) can drive the fault over a real channel.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import types
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol


class RuntimeClock(Protocol):
    def now(self) -> datetime:
        """Course time: step-free and never earlier than a previous reading."""
        ...

    def wall(self) -> datetime:
        """The host's wall clock (may step): only for detecting steps, never for course time."""
        ...

    def floor(self, at_least: datetime) -> None:
        """Make `now()` no earlier than `at_least` (a restart whose wall clock is behind its own audit log)."""
        ...

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


@types.coroutine
def yield_once() -> Generator[None, None, None]:
    """One turn of the event loop: what `asyncio.sleep(0)` does, without its coroutine around it."""
    yield


def _settle(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


class _FreeRunning:
    """A clock that runs on its own: nobody needs to be counted (unlike VirtualClock's participants)."""

    def register(self) -> None:
        pass

    def unregister(self) -> None:
        pass


def _elapsed_clock() -> float:
    # CLOCK_BOOTTIME also counts a host suspend: the pump keeps infusing while the host sleeps, so that is time
    # passing for the course. Elsewhere time.monotonic (which stops during suspend) is the best there is.
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


def _wall_utc() -> datetime:
    return datetime.now(UTC)


class RealClock(_FreeRunning):
    """Course time = the wall clock when the clock was made, advanced by the monotonic (boot-time) clock.

    `wall` and `elapsed` are injectable so tests can step the wall clock of a real clock.
    """

    def __init__(self, *, wall: Callable[[], datetime] = _wall_utc,
                 elapsed: Callable[[], float] = _elapsed_clock) -> None:
        self._wall = wall
        self._elapsed = elapsed
        self._base = wall()
        self._e0 = elapsed()

    def now(self) -> datetime:
        return self._base + timedelta(seconds=self._elapsed() - self._e0)

    def wall(self) -> datetime:
        return self._wall()

    def floor(self, at_least: datetime) -> None:
        behind = at_least - self.now()
        if behind > timedelta(0):
            self._base += behind

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
        self._wall_offset = timedelta(0)

    @property
    def speed(self) -> float:
        return self._speed

    def now(self) -> datetime:
        return self._start + timedelta(seconds=(time.monotonic() - self._t0) * self._speed)

    def wall(self) -> datetime:
        return self.now() + self._wall_offset

    def readings(self) -> tuple[datetime, datetime]:
        """(now, wall) from ONE reading of the monotonic clock. Two separate reads differ by the real time between
        them times the speed (55 us at 36000x is 2 s): ClockWatch would see that as a wall-clock step."""
        now = self.now()
        return now, now + self._wall_offset

    def step_wall(self, delta: timedelta) -> None:
        """Make the wall reading jump by `delta` (a simulated NTP or operator step); `now()` does not move."""
        self._wall_offset += delta

    def floor(self, at_least: datetime) -> None:
        behind = at_least - self.now()
        if behind > timedelta(0):
            self._start += behind
            self._wall_offset -= behind  # the wall reading itself does not move

    async def sleep_until(self, when: datetime, *, wake: asyncio.Future[Any] | None = None) -> None:
        await _sleep_real((when - self.now()).total_seconds() / self._speed, wake)


class VirtualClock:
    """Discrete-event time: jumps to the next wake-up once all participants sleep. Single event loop only."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self._now = start
        self._wall_offset = timedelta(0)
        self._participants = 0
        self._waiters: list[tuple[datetime, int, asyncio.Future[Any]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    def wall(self) -> datetime:
        return self._now + self._wall_offset

    def step_wall(self, delta: timedelta) -> None:
        """Make the wall reading jump by `delta` (a simulated NTP or operator step); `now()` does not move."""
        self._wall_offset += delta

    @property
    def wall_offset(self) -> timedelta:
        """wall() - now(), exactly."""
        return self._wall_offset

    def floor(self, at_least: datetime) -> None:
        behind = at_least - self._now
        if behind > timedelta(0):
            self._now = at_least  # virtual time may jump forward; it never runs backward
            self._wall_offset -= behind

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
                await yield_once()
            await fut
        finally:
            if not fut.done():  # cancelled: forget the wake-up
                fut.cancel()
            # Woken by the clock, its entry is already popped. Woken otherwise (a request, a cancel), the entry stays
            # until it reaches the heap's top: a done entry never counts as asleep and _maybe_advance drops it
            # there (no rebuild of the heap per wake-up, once per poll per pump).

    def wake_at_once(self, when: datetime) -> bool:
        """Whether `sleep_until(when)` by a participant would be woken at once and alone by its own wake-up: every
        other participant asleep, and the earliest other wake-up (not yet woken) strictly later. Then time moves as
        that sleep would move it and True is returned; the caller must still yield once to the event loop, as that
        sleep does, and then counts as woken. Else nothing changes (the caller sleeps as usual). The channel's
        per-poll wait: no future, heap entry or wake-up for the usual case of a virtual clock."""
        at = when if when > self._now else self._now  # the time its heap entry would carry (max(when, now))
        waiters = self._waiters
        if waiters and not at < waiters[0][0]:
            return False  # another wake-up at or before it (a tie: the earlier entry wakes first)
        if self._sleeping() + 1 < self._participants:
            return False  # someone is awake: time holds still, the caller would really sleep
        self._now = at
        return True

    def _sleeping(self) -> int:
        n = 0
        for w in self._waiters:  # a loop, not sum() over a generator: a few entries, once per poll
            if not w[2].done():
                n += 1
        return n

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


class PacedClock(VirtualClock):
    """Discrete-event time like `VirtualClock`, paced: it never runs ahead of `speed` x the real time elapsed.

    Time still moves only when every participant sleeps, jumping to the earliest wake-up; when that wake-up lies
    beyond `start + speed x real elapsed`, the jump waits (real time) until the pace allows it. So a daemon and
    the simulated pumps it drives read one clock that cannot drift apart (no dead-man from a late poll, unlike
    `ScaledClock`), while a run that cannot keep up simply runs slower than `speed`, never skipping a wake-up.
    `monotonic` is injectable so tests can freeze real time.
    """

    def __init__(self, start: datetime, speed: float, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        if not speed > 0:
            raise ValueError("speed must be > 0")
        super().__init__(start)
        self._speed = speed
        self._monotonic = monotonic
        self._t0 = monotonic()
        self._pace_origin = start
        self._timer: asyncio.TimerHandle | None = None

    @property
    def speed(self) -> float:
        return self._speed

    def pace_limit(self) -> datetime:
        """The latest course time the pace allows now."""
        return self._pace_origin + timedelta(seconds=(self._monotonic() - self._t0) * self._speed)

    def floor(self, at_least: datetime) -> None:
        behind = at_least - self._now
        super().floor(at_least)
        if behind > timedelta(0):
            self._pace_origin += behind  # a restart's jump forward is not time run ahead of the pace

    def _maybe_advance(self) -> None:
        if self._waiters and self._sleeping() >= self._participants:
            due = min((w[0] for w in self._waiters if not w[2].done()), default=None)
            if due is not None and due > self._now:
                ahead = (due - self.pace_limit()).total_seconds()
                if ahead > 0:
                    self._wait_for_pace(ahead / self._speed)
                    return
        super()._maybe_advance()

    def wake_at_once(self, when: datetime) -> bool:
        return False  # the pace may hold the jump: always the general path

    def _wait_for_pace(self, delay_s: float) -> None:
        # One timer at a time: an earlier wake-up that arrives meanwhile re-plans it.
        if self._timer is not None:
            self._timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a participant unregistering at shutdown): nobody left to wake
            self._timer = None
            return
        self._timer = loop.call_later(delay_s, self._paced)

    def _paced(self) -> None:
        self._timer = None
        self._maybe_advance()


#: Default tolerance before a disagreement between the wall clock and course time counts as a step.
DEFAULT_STEP_TOLERANCE = timedelta(seconds=2)


@dataclass(frozen=True, slots=True)
class WallStep:
    at: datetime  # course time when it was seen
    delta: timedelta  # positive: the wall clock jumped forward
    wall_at: datetime  # the wall reading that revealed it

    @property
    def delta_s(self) -> Decimal:
        """The step in seconds, exactly (microseconds), for the core and the audit log."""
        micro = (self.delta.days * 86_400 + self.delta.seconds) * 1_000_000 + self.delta.microseconds
        return Decimal(micro).scaleb(-6)


def _readings(clock: RuntimeClock) -> tuple[datetime, datetime]:
    """(now, wall) as close together as the clock allows: a scaled clock gives both from one reading."""
    both = getattr(clock, "readings", None)
    if both is not None:
        return both()  # type: ignore[no-any-return]
    return clock.now(), clock.wall()


class ClockWatch:
    """Detects wall-clock steps: the offset wall - now() is constant while neither steps (NTP slewing moves
    both), so a change of it beyond the tolerance is a step. Small changes add up until they exceed it."""

    def __init__(self, clock: RuntimeClock, tolerance: timedelta = DEFAULT_STEP_TOLERANCE) -> None:
        if tolerance <= timedelta(0):
            raise ValueError("clock step tolerance must be > 0")
        self.clock = clock
        self.tolerance = tolerance
        now, wall = _readings(clock)
        self._offset = wall - now
        # A virtual clock's offset object and the tolerance object last found within the tolerance: the very same
        # objects give the same answer while `_offset` stays (it moves only with a step found, which clears this).
        self._within: tuple[timedelta, timedelta] | None = None

    def check(self) -> WallStep | None:
        # Once per poll. A virtual clock's wall reading is course time plus its wall offset: compare the offsets.
        clock = self.clock
        if isinstance(clock, VirtualClock):
            offset, within = clock.wall_offset, self._within
            if within is not None and within[0] is offset and within[1] is self.tolerance:
                return None
            delta = offset - self._offset
            if abs(delta) <= self.tolerance:
                self._within = (offset, self.tolerance)
                return None
        now, wall = _readings(clock)
        delta = (wall - now) - self._offset
        if abs(delta) <= self.tolerance:
            return None
        self._offset = wall - now  # the next step is measured from here
        self._within = None
        return WallStep(now, delta, wall)
