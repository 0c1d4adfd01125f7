"""Injectable clocks: the real one, and a manual one so a 5-day course can run in virtual time.

Times are timezone-aware UTC datetimes. Datetimes carry microseconds, so the manual clock only moves by
whole microseconds: it refuses a step it cannot represent exactly rather than rounding it.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Protocol, runtime_checkable

_US_PER_S = Decimal(1_000_000)


@runtime_checkable
class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    """Wall-clock time."""

    def now(self) -> datetime:
        return datetime.now(UTC)


def _require_aware(t: datetime, name: str) -> datetime:
    if not isinstance(t, datetime):
        raise TypeError(f"{name}: expected a datetime, got {type(t).__name__}")
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{name}: must be timezone-aware (UTC), got a naive datetime {t.isoformat()}")
    return t.astimezone(UTC)


def seconds_to_timedelta(seconds: int | Decimal, name: str = "seconds") -> timedelta:
    """Exact conversion; a value finer than a microsecond, negative, or not a number is a ValueError."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, Decimal)):
        raise TypeError(f"{name}: expected int or Decimal seconds, got {type(seconds).__name__}")
    d = Decimal(seconds)
    if not d.is_finite():
        raise ValueError(f"{name}: must be finite, got {seconds!r}")
    if d < 0:
        raise ValueError(f"{name}: must not be negative (clocks never go backwards), got {seconds}")
    us = d * _US_PER_S
    if us != us.to_integral_value():
        raise ValueError(f"{name}: {seconds} is finer than the clock's 1 µs resolution")
    return timedelta(microseconds=int(us))


class ManualClock:
    """A clock that only moves when told to. Thread-safe; never goes backwards."""

    def __init__(self, start: datetime) -> None:
        self._now = _require_aware(start, "start")
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: int | Decimal) -> datetime:
        """Move forward by `seconds` (int or Decimal, >= 0, whole microseconds); returns the new time."""
        step = seconds_to_timedelta(seconds)
        with self._lock:
            self._now += step
            return self._now

    def set(self, t: datetime) -> None:
        """Jump to `t`; moving backwards is a ValueError (and changes nothing)."""
        t = _require_aware(t, "t")
        with self._lock:
            if t < self._now:
                raise ValueError(f"t: clock cannot go backwards ({t.isoformat()} < {self._now.isoformat()})")
            self._now = t
