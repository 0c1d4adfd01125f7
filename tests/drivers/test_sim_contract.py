"""sim:// runs the whole driver contract in-process, in virtual time (no wire, so no wire-fault mixin)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from drivers.registry import open_driver
from drivers.testing.contract import DriverContract, Harness
from simulators.clock import ManualClock
from simulators.world import World


class TestSimDriverContract(DriverContract):
    @contextlib.asynccontextmanager
    async def harness(self) -> AsyncIterator[Harness]:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        driver = open_driver("sim://contract-1", self.driver_options(world=world))
        await driver.connect()
        try:
            yield Harness(driver, world.pump("contract-1"), world.clock, world.faults("contract-1"))
        finally:
            await driver.close()
