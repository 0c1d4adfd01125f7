"""The shared driver contract suite, against the Modbus simulator over loopback TCP and RTU on a real PTY."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from drivers.registry import open_driver
from drivers.testing.contract import DriverContract, Harness, WireFaultContract
from simulators.clock import ManualClock
from simulators.modbus import serve_modbus
from simulators.world import World


class _ModbusHarness:
    pty = False

    @contextlib.asynccontextmanager
    async def harness(self) -> AsyncIterator[Harness]:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        where = {"pty": True} if self.pty else {"tcp_port": 0}
        # two pumps behind one gateway: the contract drives unit 2, unit 1 must not be disturbed
        async with serve_modbus(world, {1: "bed-1", 2: "bed-2"}, **where) as endpoint:
            driver = open_driver(endpoint.url(2), self.driver_options())  # type: ignore[attr-defined]
            await driver.connect()
            try:
                yield Harness(driver, world.pump("bed-2"), world.clock, world.faults("bed-2"))
                assert world.pump("bed-1").status().rate_ml_per_h == 0
            finally:
                await driver.close()


class TestModbusTcpContract(_ModbusHarness, WireFaultContract, DriverContract):
    pty = False


class TestModbusRtuPtyContract(_ModbusHarness, WireFaultContract, DriverContract):
    pty = True
