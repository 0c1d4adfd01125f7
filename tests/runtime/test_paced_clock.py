"""PacedClock (`driverd demo --speed N`): discrete-event time shared by the daemon and the simulated pumps that
never runs ahead of N x real time. Real time is injected (frozen, then moved by hand), so nothing here is timed."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from driverd.runtime.clock import PacedClock

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


class _Frozen:
    """Real time that moves only when told to."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0.001)  # real turns of the loop: the pacing timer gets its chances to fire


def test_time_does_not_pass_the_pace_while_real_time_stands_still() -> None:
    async def body() -> None:
        real = _Frozen()
        clock = PacedClock(T0, 1_000_000.0, monotonic=real)
        clock.register()
        woke: list[datetime] = []

        async def sleeper() -> None:
            await clock.sleep_until(T0 + timedelta(seconds=60))
            woke.append(clock.now())

        task = asyncio.create_task(sleeper())
        await _turns()
        assert woke == [] and clock.now() == T0, "60 s ahead of a frozen pace: nobody wakes, time stays"
        real.t += 30 / 1_000_000  # half way: still not due
        await _turns()
        assert woke == [] and clock.now() == T0
        real.t += 30 / 1_000_000
        await task
        assert woke == [T0 + timedelta(seconds=60)], "it jumps to the wake-up exactly, not to the pace limit"
        clock.unregister()

    run(body())


def test_paced_time_still_waits_for_every_participant() -> None:
    """A participant doing real work (I/O to a pump) holds time still, whatever the pace allows."""

    async def body() -> list[str]:
        real = _Frozen()
        clock = PacedClock(T0, 10.0, monotonic=real)
        real.t += 3600  # the pace would allow ten hours
        seen: list[str] = []
        gate = asyncio.Event()
        clock.register()
        clock.register()

        async def sleeper() -> None:
            await clock.sleep_until(T0 + timedelta(hours=1))
            seen.append(f"sleeper woke at {clock.now() - T0}")
            clock.unregister()

        async def worker() -> None:
            await gate.wait()
            seen.append(f"worker done at {clock.now() - T0}")
            await clock.sleep_until(T0 + timedelta(hours=2))
            clock.unregister()

        tasks = [asyncio.create_task(sleeper()), asyncio.create_task(worker())]
        await _turns()
        gate.set()
        await asyncio.gather(*tasks)
        return seen

    assert run(body()) == ["worker done at 0:00:00", "sleeper woke at 1:00:00"]


def test_an_earlier_wake_up_replans_the_pacing_wait() -> None:
    async def body() -> list[str]:
        real = _Frozen()
        clock = PacedClock(T0, 1000.0, monotonic=real)
        order: list[str] = []
        clock.register()
        clock.register()

        async def late() -> None:
            await clock.sleep_until(T0 + timedelta(hours=1))
            order.append(f"late at {clock.now() - T0}")
            clock.unregister()

        async def early() -> None:
            await asyncio.sleep(0)
            await clock.sleep_until(T0 + timedelta(seconds=10))
            order.append(f"early at {clock.now() - T0}")
            clock.unregister()

        tasks = [asyncio.create_task(late()), asyncio.create_task(early())]
        await _turns()
        assert order == []
        real.t += 10 / 1000
        await _turns()
        assert order == ["early at 0:00:10"]
        real.t += 3600 / 1000
        await asyncio.gather(*tasks)
        return order

    assert run(body()) == ["early at 0:00:10", "late at 1:00:00"]


def test_with_real_time_the_clock_never_runs_ahead_of_the_pace() -> None:
    """The property the demo relies on, with the real monotonic clock: at every wake-up, course time is within
    speed x the real time elapsed since the clock started."""

    async def body() -> list[tuple[datetime, float]]:
        t0 = time.monotonic()
        speed = 200_000.0
        clock = PacedClock(T0, speed)
        clock.register()
        samples: list[tuple[datetime, float]] = []
        for _ in range(50):
            await clock.sleep_until(clock.now() + timedelta(seconds=60))
            samples.append((clock.now(), (time.monotonic() - t0) * speed))
        clock.unregister()
        return samples

    samples = run(body())
    assert samples[-1][0] == T0 + timedelta(minutes=50)
    for now, allowed_s in samples:
        assert (now - T0).total_seconds() <= allowed_s


def test_floor_moves_the_pace_with_the_jump() -> None:
    real = _Frozen()
    clock = PacedClock(T0, 10.0, monotonic=real)
    clock.floor(T0 + timedelta(hours=1))
    assert clock.now() == T0 + timedelta(hours=1)
    assert clock.pace_limit() == T0 + timedelta(hours=1)
    assert clock.wall() - T0 < timedelta(minutes=1), "the wall reading itself does not move"


@pytest.mark.parametrize("speed", [0.0, -1.0])
def test_speed_must_be_positive(speed: float) -> None:
    with pytest.raises(ValueError, match="speed"):
        PacedClock(T0, speed)
