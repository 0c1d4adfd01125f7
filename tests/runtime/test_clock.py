"""Runtime clocks: virtual time advances only when every participant sleeps; a wake future cuts a sleep short."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from driverd.runtime.clock import ClockWatch, RealClock, ScaledClock, VirtualClock

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_lone_sleeper_in_a_loop_does_not_starve_the_event_loop() -> None:
    """Regression: the only participant is woken at once by its own sleep; it must still yield, or nothing else
    (a control request, a client awaiting a reply) ever runs while virtual time races ahead."""

    async def body() -> timedelta:
        clock = VirtualClock(T0)
        clock.register()

        async def participant() -> None:
            while True:
                await clock.sleep_until(clock.now() + timedelta(minutes=1))

        task = asyncio.create_task(participant())
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the other coroutine gets turns while the participant sleeps in a loop
        elapsed = clock.now() - T0
        task.cancel()
        return elapsed

    assert run(body()) <= timedelta(minutes=5)


def test_virtual_time_waits_for_every_participant() -> None:
    async def body() -> list[str]:
        clock = VirtualClock(T0)
        seen: list[str] = []
        gate = asyncio.Event()

        clock.register()  # both participants are known before either runs
        clock.register()

        async def sleeper() -> None:
            await clock.sleep_until(T0 + timedelta(hours=1))
            seen.append(f"sleeper woke at {clock.now() - T0}")
            clock.unregister()

        async def worker() -> None:
            await gate.wait()  # real work: time must not move meanwhile
            seen.append(f"worker done at {clock.now() - T0}")
            await clock.sleep_until(T0 + timedelta(hours=2))
            clock.unregister()

        tasks = [asyncio.create_task(sleeper()), asyncio.create_task(worker())]
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        return seen

    assert run(body()) == ["worker done at 0:00:00", "sleeper woke at 1:00:00"]


def test_wake_future_cuts_a_sleep_short_on_every_clock() -> None:
    async def body(clock: Any) -> tuple[object, bool]:
        clock.register()
        wake: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        marker = object()
        asyncio.get_running_loop().call_soon(wake.set_result, marker)
        # would sleep a virtual/real day without the wake-up
        await clock.sleep_until(clock.now() + timedelta(days=1), wake=wake)
        clock.unregister()
        return wake.result(), wake.result() is marker

    for clock in (RealClock(), ScaledClock(T0, 10.0)):
        assert run(body(clock))[1]


def test_wake_future_completed_by_the_timer_carries_none() -> None:
    async def body() -> Any:
        clock = VirtualClock(T0)
        clock.register()
        wake: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await clock.sleep_until(T0 + timedelta(hours=3), wake=wake)
        clock.unregister()
        return wake.result(), clock.now()

    assert run(body()) == (None, T0 + timedelta(hours=3))


# ------------------------------------------------------------------------------------------------ wall-clock steps


class _FakeHost:
    """A host's wall and boot-time clocks, stepped by hand (the wall clock may jump; the other only advances)."""

    def __init__(self) -> None:
        self.wall_t = T0
        self.elapsed_s = 100.0

    def pass_time(self, seconds: float) -> None:
        self.wall_t += timedelta(seconds=seconds)
        self.elapsed_s += seconds


def test_real_clock_course_time_does_not_follow_a_wall_clock_step() -> None:
    host = _FakeHost()
    clock = RealClock(wall=lambda: host.wall_t, elapsed=lambda: host.elapsed_s)
    watch = ClockWatch(clock, timedelta(seconds=2))
    host.pass_time(60)
    assert clock.now() == T0 + timedelta(seconds=60) and watch.check() is None
    host.wall_t -= timedelta(hours=1)  # someone sets the clock back an hour
    host.pass_time(5)
    assert clock.now() == T0 + timedelta(seconds=65), "course time runs on, it does not go back"
    step = watch.check()
    assert step is not None and step.delta == -timedelta(hours=1) and step.delta_s == Decimal(-3600)
    assert step.wall_at == T0 + timedelta(seconds=65) - timedelta(hours=1)
    assert watch.check() is None, "a step is reported once"
    host.wall_t += timedelta(days=2)  # then NTP jumps it forward two days
    assert clock.now() == T0 + timedelta(seconds=65)
    forward = watch.check()
    assert forward is not None and forward.delta == timedelta(days=2)


def test_small_wall_clock_corrections_add_up_to_a_step() -> None:
    host = _FakeHost()
    clock = RealClock(wall=lambda: host.wall_t, elapsed=lambda: host.elapsed_s)
    watch = ClockWatch(clock, timedelta(seconds=2))
    host.wall_t += timedelta(seconds=1.5)
    assert watch.check() is None  # within the tolerance
    host.wall_t += timedelta(seconds=1.5)
    step = watch.check()
    assert step is not None and step.delta == timedelta(seconds=3)


def test_floor_keeps_course_time_from_running_backward_across_a_restart() -> None:
    host = _FakeHost()
    clock = RealClock(wall=lambda: host.wall_t, elapsed=lambda: host.elapsed_s)
    clock.floor(T0 - timedelta(hours=1))  # already later: no change
    assert clock.now() == T0
    clock.floor(T0 + timedelta(hours=1))  # the log's last record is an hour ahead of this host's clock
    assert clock.now() == T0 + timedelta(hours=1)
    host.pass_time(10)
    assert clock.now() == T0 + timedelta(hours=1, seconds=10)
    for virtual in (VirtualClock(T0), ScaledClock(T0, 1.0)):
        virtual.floor(T0 + timedelta(hours=1))
        assert virtual.now() >= T0 + timedelta(hours=1)
        assert virtual.wall() - T0 < timedelta(minutes=1), "the wall reading itself does not move"


def test_step_wall_moves_the_wall_reading_only() -> None:
    for clock in (VirtualClock(T0), ScaledClock(T0, 1.0)):
        watch = ClockWatch(clock)
        before = clock.now()
        clock.step_wall(timedelta(days=2))
        assert clock.now() - before < timedelta(minutes=1)
        step = watch.check()
        assert step is not None and timedelta(days=2) - step.delta < timedelta(seconds=1)


def test_a_fast_scaled_clock_never_shows_a_phantom_wall_step() -> None:
    # At 10^12 x, the real nanoseconds between a now() and a separate wall() read are thousands of virtual
    # seconds: the watch must take both from one reading (`driverd run --speed N`, bench configs only).
    clock = ScaledClock(T0, 1e12)
    watch = ClockWatch(clock)
    assert all(watch.check() is None for _ in range(1000))
    clock.step_wall(timedelta(hours=1))  # a real step is still seen
    step = watch.check()
    assert step is not None and timedelta(minutes=59) < step.delta < timedelta(minutes=61)


# ---- wake_at_once: the channel's per-poll wait without a future (issue 12 item 4) ----

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from driverd.runtime.clock import yield_once  # noqa: E402

# Per participant, the offsets (seconds) it sleeps to from the current time, one after another: past times, 0 and
# ties included.
plans = st.lists(st.lists(st.integers(-2, 5), min_size=1, max_size=12), min_size=1, max_size=4)


def _trace(plan: list[list[int]], quick: frozenset[int], early: dict[int, int]) -> list[tuple[int, int, datetime]]:
    """Who woke when, in order: participants in `quick` wait like the channel (wake_at_once, else sleep_until);
    `early`: participant -> step at which an outsider completes its wake future before it sleeps (a request)."""
    trace: list[tuple[int, int, datetime]] = []

    async def body() -> None:
        clock = VirtualClock(T0)

        async def participant(i: int, offsets: list[int]) -> None:
            try:
                for k, off in enumerate(offsets):
                    until = clock.now() + timedelta(seconds=off)
                    if i in quick and clock.wake_at_once(until):
                        await yield_once()
                    else:
                        wake = asyncio.get_running_loop().create_future()
                        if early.get(i) == k:
                            asyncio.get_running_loop().call_soon(lambda w=wake: w.done() or w.set_result("req"))
                        await clock.sleep_until(until, wake=wake)
                    trace.append((i, k, clock.now()))
            finally:
                clock.unregister()

        for _ in plan:
            clock.register()
        await asyncio.gather(*(participant(i, p) for i, p in enumerate(plan)))

    run(body())
    return trace


@settings(max_examples=300, deadline=None)
@given(plan=plans, quick=st.frozensets(st.integers(0, 3)), early=st.dictionaries(st.integers(0, 3), st.integers(0, 11)))
def test_wake_at_once_wakes_as_sleep_until_does(plan: list[list[int]], quick: frozenset[int],
                                                early: dict[int, int]) -> None:
    """Any mix of participants waiting through `wake_at_once` gives the very same wake-ups, in the same order and
    at the same times, as all of them sleeping with `sleep_until`: ties, zero sleeps, a participant leaving, a wake
    future completed early by someone else (a done entry left in the heap)."""
    assert _trace(plan, quick, early) == _trace(plan, frozenset(), early)


def test_wake_at_once_refuses_while_someone_is_awake_or_due_first() -> None:
    async def body() -> None:
        clock = VirtualClock(T0)
        clock.register()
        clock.register()  # a second participant, awake: time holds still
        assert not clock.wake_at_once(T0 + timedelta(seconds=1))
        assert clock.now() == T0
        other = asyncio.create_task(clock.sleep_until(T0 + timedelta(seconds=5)))
        await asyncio.sleep(0)  # asleep now, its wake-up at +5 s
        assert not clock.wake_at_once(T0 + timedelta(seconds=5)), "a tie: the earlier sleeper wakes first"
        assert clock.now() == T0
        assert clock.wake_at_once(T0 + timedelta(seconds=4))
        assert clock.now() == T0 + timedelta(seconds=4)
        assert not other.done()
        assert not clock.wake_at_once(T0 + timedelta(seconds=6))
        clock.unregister()
        await other

    run(body())


class _Uncached(ClockWatch):
    """The check without its memo of the last offset found within the tolerance."""

    def check(self) -> Any:
        self._within = None
        return super().check()


ops = st.lists(st.one_of(st.tuples(st.just("step"), st.integers(-3_000_000, 3_000_000)),
                         st.tuples(st.just("tolerance"), st.integers(1, 4_000_000)),
                         st.tuples(st.just("floor"), st.integers(0, 5_000_000)),
                         st.tuples(st.just("check"), st.just(0))), max_size=40)


@given(ops=ops)
def test_clock_watch_memo_changes_no_answer(ops: list[tuple[str, int]]) -> None:
    """The virtual clock's memo (the offset and tolerance objects last found within) answers every check as the
    full comparison does, across wall steps that add up, tolerance changes (a reload) and floors."""
    clock = VirtualClock(T0)
    quick, full = ClockWatch(clock), _Uncached(clock)
    for op, n in ops:
        if op == "step":
            clock.step_wall(timedelta(microseconds=n))
        elif op == "tolerance":
            quick.tolerance = full.tolerance = timedelta(microseconds=n)
        elif op == "floor":
            clock.floor(clock.now() + timedelta(microseconds=n))
        a, b = quick.check(), full.check()
        assert a == b
