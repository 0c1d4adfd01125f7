"""sim:// runs the whole driver contract in-process, in virtual time (no wire, so no wire-fault mixin)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from drivers.registry import open_driver
from drivers.testing.contract import DriverContract, Harness, ProbeContract, RequestLog
from simulators.clock import ManualClock
from simulators.pump import PumpModel
from simulators.world import World

# What only reads the pump model: sim://'s "queries". host_contact is the packet's arrival (re-arms the dead-man,
# as any valid packet does on a real pump); contact_reading is that arrival and a status read. Any other model call
# acts on the pump.
QUERIES = frozenset({"status", "reading", "contact_reading", "identity", "host_contact", "events", "rate_history"})


class _RecordingModel:
    """sim://'s wire: the driver's calls on the pump model, each recorded before it reaches the real model."""

    def __init__(self, model: PumpModel, log: RequestLog) -> None:
        self._model = model
        self._log = log

    def __getattr__(self, name: str) -> Any:
        self._log.record(name, query=name in QUERIES)
        return getattr(self._model, name)


class _RecordingWorld(World):
    """Hands drivers a recording view of each pump; the harness and tests use ``model()`` (not recorded)."""

    def __init__(self, clock: ManualClock, log: RequestLog) -> None:
        super().__init__(clock)
        self.log = log

    def pump(self, name: str, **model_kwargs: Any) -> Any:
        return _RecordingModel(self.model(name, **model_kwargs), self.log)

    def model(self, name: str, **model_kwargs: Any) -> PumpModel:
        return super().pump(name, **model_kwargs)


class TestSimDriverContract(ProbeContract, DriverContract):
    @contextlib.asynccontextmanager
    async def harness(self) -> AsyncIterator[Harness]:
        log = RequestLog()
        world = _RecordingWorld(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)), log)
        driver = open_driver("sim://contract-1", self.driver_options(world=world))
        await driver.connect()
        try:
            yield Harness(
                driver,
                world.model("contract-1"),
                world.clock,
                world.faults("contract-1"),
                reopen=lambda o: open_driver("sim://contract-1", dataclasses.replace(o, world=world)),
                requests=log,
            )
        finally:
            await driver.close()
