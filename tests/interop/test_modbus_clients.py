"""Independent Modbus implementations against our simulator, and our driver against an independent responder.

- minimalmodbus (its own RTU framing and CRC, over a real PTY pair) and uModbus (its own Modbus/TCP client,
  plain sockets) read and write the simulator by the register map: Modbus Application Protocol V1.1b3 §6.2
  FC02, §6.4 FC04, §6.5 FC05, §6.12 FC16, §7 exception 02; Modbus over Serial Line V1.02 §2.5.1 RTU framing and
  CRC; Modbus/TCP Implementation Guide V1.0b §3.1 MBAP header.
- Our ModbusDriver against a uModbus server that holds the map as plain data (no pymodbus, no physics on the
  other side): the driver's requests are what the map says, readable by a foreign server.
Both libraries are synchronous: they run in a worker thread while the simulator runs in the event loop.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from socketserver import ThreadingTCPServer
from typing import Any, ClassVar

import minimalmodbus  # type: ignore[import-untyped]
import pytest
from umodbus.client import tcp as umodbus_tcp  # type: ignore[import-untyped]
from umodbus.exceptions import IllegalDataAddressError  # type: ignore[import-untyped]
from umodbus.server.tcp import RequestHandler, get_server  # type: ignore[import-untyped]

from drivers.base import DriverOptions, ProtocolError, PumpState
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.regmap import load_map
from drivers.registry import open_driver
from simulators.clock import ManualClock
from simulators.modbus import SIM_FIRMWARE, SIM_MODEL, serve_modbus
from simulators.world import World

D = Decimal
MAP = load_map()


def _with_simulator(*, pty: bool, client: Callable[[Any, World], dict[str, Any]]) -> tuple[dict[str, Any], World]:
    async def main() -> tuple[dict[str, Any], World]:
        world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        where: dict[str, Any] = {"pty": True} if pty else {"tcp_port": 0}
        async with serve_modbus(world, {1: "a"}, **where) as ep:
            out = await asyncio.to_thread(client, ep, world)
        return out, world

    return asyncio.run(asyncio.wait_for(main(), 60))


def _minimalmodbus_session(ep: Any, world: World) -> dict[str, Any]:
    inst = minimalmodbus.Instrument(ep.path, 1, mode=minimalmodbus.MODE_RTU)
    inst.serial.timeout = 2
    inst.close_port_after_each_call = False
    try:
        out: dict[str, Any] = {}
        out["map_version"] = inst.read_register(MAP["map_version"].address, functioncode=4)
        out["model"] = inst.read_string(MAP["model"].address, MAP["model"].width, functioncode=4)
        # 32-bit rate, big-endian words (BYTEORDER_BIG is minimalmodbus's default), scale 0.001 mL/h
        inst.write_long(MAP["rate_setpoint"].address, 2083, signed=False)
        out["rate_raw"] = inst.read_long(MAP["rate_readback"].address, functioncode=4, signed=False)
        inst.write_bit(MAP["run"].address, 1, functioncode=5)
        out["running"] = inst.read_bit(MAP["running"].address, functioncode=2)
        out["state_after_run"] = world.pump("a").status().state
        try:
            inst.read_bit(9, functioncode=2)  # unmapped discrete input
        except minimalmodbus.IllegalRequestError as exc:
            out["unmapped"] = str(exc)
        inst.write_bit(MAP["run"].address, 0, functioncode=5)
        out["running_after_stop"] = inst.read_bit(MAP["running"].address, functioncode=2)
        return out
    finally:
        inst.serial.close()


def test_minimalmodbus_rtu_over_a_pty_drives_the_simulator() -> None:
    out, world = _with_simulator(pty=True, client=_minimalmodbus_session)
    assert out["map_version"] == MAP.map_version
    assert out["model"].rstrip("\x00") == SIM_MODEL
    assert out["rate_raw"] == 2083
    assert out["running"] == 1 and out["state_after_run"] is PumpState.INFUSING
    assert "unmapped" in out  # exception 02 surfaced as minimalmodbus's IllegalRequestError
    assert out["running_after_stop"] == 0
    st = world.pump("a").status()
    assert st.rate_ml_per_h == D("2.083") and st.state is PumpState.STOPPED


def _umodbus_session(ep: Any, world: World) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with socket.create_connection((ep.host, ep.port), timeout=5) as sock:

        def call(adu: bytes) -> Any:
            return umodbus_tcp.send_message(adu, sock)

        out["firmware_regs"] = call(umodbus_tcp.read_input_registers(1, MAP["firmware"].address, MAP["firmware"].width))
        out["write"] = call(umodbus_tcp.write_multiple_registers(1, MAP["rate_setpoint"].address, [0, 500]))
        out["readback"] = call(umodbus_tcp.read_input_registers(1, MAP["rate_readback"].address, 2))
        out["diameter"] = call(umodbus_tcp.read_holding_registers(1, MAP["diameter_setpoint"].address, 1))
        out["coil"] = call(umodbus_tcp.write_single_coil(1, MAP["run"].address, 1))
        out["bits"] = call(umodbus_tcp.read_discrete_inputs(1, 0, 9))
        out["state"] = world.pump("a").status().state
        try:
            call(umodbus_tcp.read_coils(1, 1, 1))
        except IllegalDataAddressError:
            out["unmapped_coil"] = True
        call(umodbus_tcp.write_single_coil(1, MAP["run"].address, 0))
    return out


def test_umodbus_tcp_client_drives_the_simulator() -> None:
    out, world = _with_simulator(pty=False, client=_umodbus_session)
    firmware = b"".join(r.to_bytes(2, "big") for r in out["firmware_regs"]).rstrip(b"\x00").decode()
    assert firmware == SIM_FIRMWARE
    assert out["write"] == 2  # FC16 reply: quantity written
    assert out["readback"] == [0, 500]
    assert out["diameter"] == [1913]  # 19.13 mm at scale 0.01
    assert out["state"] is PumpState.INFUSING
    assert out["bits"][MAP["running"].address] == 1
    assert out["unmapped_coil"] is True
    st = world.pump("a").status()
    assert st.rate_ml_per_h == D("0.5") and st.state is PumpState.STOPPED


# ---- our driver against an independent responder ---------------------------------------------------------


class PlainMap:
    """The register map as plain data behind a uModbus server: setpoints are mirrored to their read-backs."""

    MIRROR: ClassVar[dict[str, str]] = {"rate_setpoint": "rate_readback", "diameter_setpoint": "diameter_readback"}

    def __init__(self, model: str = MAP.product_code) -> None:
        self.tables: dict[str, dict[int, int]] = {t: {} for t in ("coils", "di", "hr", "ir")}
        table_of = {"coils": "coils", "discrete_inputs": "di", "holding_registers": "hr", "input_registers": "ir"}
        for name, p in MAP.points.items():
            for a in range(p.address, p.address + p.width):
                self.tables[table_of[p.table]][a] = 0
            del name
        self.tables["ir"][MAP["map_version"].address] = MAP.map_version
        self._ascii("model", model)  # the driver refuses a device whose model is not the map's product_code
        self._ascii("firmware", "umodbus")
        self.tables["hr"][MAP["diameter_setpoint"].address] = 1913
        self.tables["ir"][MAP["diameter_readback"].address] = 1913
        self.writes: list[tuple[int, int, int]] = []

    def _ascii(self, point: str, text: str) -> None:
        p = MAP[point]
        raw = text.encode().ljust(2 * p.width, b"\x00")
        for i in range(p.width):
            self.tables["ir"][p.address + i] = int.from_bytes(raw[2 * i : 2 * i + 2], "big")

    def write(self, fc: int, address: int, value: int) -> None:
        self.writes.append((fc, address, value))
        if fc in (5, 15):
            self.tables["coils"][address] = value
            if address == MAP["run"].address:
                self.tables["di"][MAP["running"].address] = value
            return
        self.tables["hr"][address] = value
        for src, dst in self.MIRROR.items():
            s, d = MAP[src], MAP[dst]
            if s.address <= address < s.address + s.width:
                self.tables["ir"][d.address + address - s.address] = value


@contextmanager
def umodbus_responder(data: PlainMap) -> Iterator[int]:
    # One thread per connection (daemon): shutting down never waits for a connection the client still holds.
    server_class = type("Responder", (ThreadingTCPServer,), {"daemon_threads": True, "allow_reuse_address": True})
    app = get_server(server_class, ("127.0.0.1", 0), RequestHandler)
    for fc, table in ((1, "coils"), (2, "di"), (3, "hr"), (4, "ir")):

        def read(slave_id: int, function_code: int, address: int, _t: str = table) -> int:
            return data.tables[_t][address]

        app.route(slave_ids=[1], function_codes=[fc], addresses=list(data.tables[table]))(read)
    for fc, table in ((5, "coils"), (15, "coils"), (6, "hr"), (16, "hr")):

        def write(slave_id: int, function_code: int, address: int, value: int) -> None:
            data.write(function_code, address, int(value))

        app.route(slave_ids=[1], function_codes=[fc], addresses=list(data.tables[table]))(write)
    thread = threading.Thread(target=app.serve_forever, daemon=True)
    thread.start()
    try:
        yield app.server_address[1]
    finally:
        app.shutdown()
        app.server_close()
        thread.join(5)


def test_our_modbus_driver_against_a_umodbus_responder() -> None:
    data = PlainMap()

    async def main() -> None:
        with umodbus_responder(data) as port:
            driver = open_driver(f"modbus+tcp://127.0.0.1:{port}?unit=1", DriverOptions(timeout_s=2, deadman_s=9))
            assert isinstance(driver, ModbusDriver)
            await driver.connect()
            try:
                ident = await driver.identify()
                assert (ident.model, ident.firmware) == ("DRV-MB1", "umodbus")
                assert await driver.set_rate(D("2.083")) == D("2.083")
                await driver.run()
                status = await driver.read_status()
                assert status.state is PumpState.INFUSING and status.rate_ml_per_h == D("2.083")
                await driver.stop()
            finally:
                await driver.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    rate = MAP["rate_setpoint"].address
    assert (16, MAP["watchdog_timeout"].address, 9) in data.writes or (
        6,
        MAP["watchdog_timeout"].address,
        9,
    ) in data.writes
    assert [(fc, a, v) for fc, a, v in data.writes if a in (rate, rate + 1) and fc == 16] == [
        (16, rate, 0),
        (16, rate + 1, 2083),
    ]
    assert [(fc, v) for fc, a, v in data.writes if a == MAP["run"].address and fc == 5] == [(5, 1), (5, 0)]


def test_our_driver_refuses_an_independent_responder_of_another_model() -> None:
    """The map declares product_code DRV-MB1; a device whose model register reads PLAIN-MAP is refused at
    connect, before the watchdog or anything else is written."""
    data = PlainMap(model="PLAIN-MAP")

    async def main() -> None:
        with umodbus_responder(data) as port:
            driver = open_driver(f"modbus+tcp://127.0.0.1:{port}?unit=1", DriverOptions(timeout_s=2, deadman_s=9))
            try:
                with pytest.raises(ProtocolError, match="PLAIN-MAP"):
                    await driver.connect()
            finally:
                await driver.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert data.writes == []
