"""Runtime clocks: virtual time advances only when every participant sleeps; a wake future cuts a sleep short."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from driverd.runtime.clock import RealClock, ScaledClock, VirtualClock

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
