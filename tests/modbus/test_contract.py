"""The shared driver contract suite, against the Modbus simulator over loopback TCP and RTU on a real PTY."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from pymodbus.pdu import ModbusPDU

from drivers.registry import open_driver
from drivers.testing.contract import DriverContract, Harness, ProbeContract, RequestLog, WireFaultContract
from simulators.clock import ManualClock
from simulators.modbus import serve_modbus
from simulators.world import World

READ_FUNCTION_CODES = frozenset({1, 2, 3, 4})  # coils, discrete inputs, holding and input registers; all else writes


def record_pdu(log: RequestLog) -> Callable[[ModbusPDU], None]:
    def on_request(pdu: ModbusPDU) -> None:
        fc = pdu.function_code
        log.record(f"unit {pdu.dev_id} fc {fc} @{getattr(pdu, 'address', '?')}", query=fc in READ_FUNCTION_CODES)

    return on_request


class _ModbusHarness:
    pty = False

    @contextlib.asynccontextmanager
    async def harness(self) -> AsyncIterator[Harness]:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        where = {"pty": True} if self.pty else {"tcp_port": 0}
        log = RequestLog()
        # two pumps behind one gateway: the contract drives unit 2, unit 1 must not be disturbed
        async with serve_modbus(world, {1: "bed-1", 2: "bed-2"}, on_request=record_pdu(log), **where) as endpoint:
            driver = open_driver(endpoint.url(2), self.driver_options())  # type: ignore[attr-defined]
            await driver.connect()
            try:
                yield Harness(
                    driver,
                    world.pump("bed-2"),
                    world.clock,
                    world.faults("bed-2"),
                    reopen=lambda o: open_driver(endpoint.url(2), o),
                    requests=log,
                )
                assert world.pump("bed-1").status().rate_ml_per_h == 0
            finally:
                await driver.close()


class TestModbusTcpContract(_ModbusHarness, WireFaultContract, ProbeContract, DriverContract):
    pty = False


class TestModbusRtuPtyContract(_ModbusHarness, WireFaultContract, ProbeContract, DriverContract):
    pty = True
