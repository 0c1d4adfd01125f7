"""Shared fixtures for driver tests: a virtual-time world of simulated pumps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from simulators.clock import ManualClock
from simulators.world import World

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def world(manual_clock: ManualClock) -> World:
    return World(manual_clock)
