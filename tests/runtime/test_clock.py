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
