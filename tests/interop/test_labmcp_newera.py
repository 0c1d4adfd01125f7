"""Interop with labmcp-new-era (PyPI `labmcp-new-era`, an independent NE-1000 basic-mode client and simulator).

Two directions, both over a real PTY pair:
- their client (`labmcp_new_era.driver.NewEraPump` on their pyserial transport) against our simulator;
- our driver against their simulator (`labmcp_new_era.simulator.NewEraSimulator`), served on the PTY by a few
  lines of glue that only split packets at CR and write each reply followed by ETX, as their own transport does.
Each test names the NE-1000 User Manual section (firmware V3.9xx) it checks.

Findings, kept as assertions below:
- Their `start_pumping` programs a target volume (`VOL <n>`): our simulator does not model target-volume mode and
  answers `?NA` (a documented difference, docs/simulators.md); continuous infusion (`VOL 0`) works with their client.
- Their simulator has no safe mode (it answers `?` to `SAF`): our driver refuses it unless the URL says
  `without_safe_mode=allow`, and then runs it in basic mode with a warning — the path for old firmware (issue 16.7).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import threading
import tty
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from labmcp.errors import InstrumentProtocolError
from labmcp.transports.serial import SerialTransport
from labmcp_new_era.driver import NewEraPump
from labmcp_new_era.simulator import NewEraSimulator

from drivers.base import AlarmKind, DriverError, DriverOptions, PumpState
from drivers.newera.driver import NewEraDriver
from drivers.registry import open_driver
from simulators.clock import ManualClock
from simulators.newera import serve_newera
from simulators.pump import PumpModel

# ------------------------------------------------------------------------ their client, our simulator


def _their_session(device: str, clock: ManualClock) -> dict[str, object]:
    transport = SerialTransport(device, baudrate=19200, read_termination="\x03", write_termination="\r", timeout=5)
    pump = NewEraPump(transport, address=0)
    out: dict[str, object] = {}
    try:
        out["identity"] = pump.identify()  # VER (§10.4.1, Appendix B)
        out["reset_seen"] = pump.reset_alarm_seen  # the power-up A?R was acknowledged by the reply (§10.4.3)
        out["diameter"] = pump.set_diameter(19.13)
        with pytest.raises(InstrumentProtocolError, match=r"\?NA"):
            pump.start_pumping("INF", 1.0, 0.05)  # target-volume mode: not modelled by our simulator
        pump.command("VOL0")  # continuous infusion (§10.4.2 VOL)
        pump.command("RAT3.000MH")
        pump.command("DIRINF")
        pump.command("RUN")
        out["running"] = pump.status().state
        out["rate"] = pump.rate()  # while pumping: the actual rate
        clock.advance(1200)  # 20 min of virtual time at 3 mL/h = 1 mL
        out["dispensed"] = pump.dispensed()
        out["stopped"] = pump.stop().state  # STP pauses, a second STP stops (§10.4.2 STP)
        out["direction"] = pump.direction()
    finally:
        pump.close()
    return out


def test_labmcp_client_drives_our_simulator_over_a_pty() -> None:
    async def main() -> None:
        clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
        model = PumpModel(clock, fill_volume_ml=Decimal(20), diameter_mm=Decimal("10.0"))
        async with serve_newera(model, pty=True, power_up=True) as endpoint:
            assert endpoint.device is not None
            out = await asyncio.to_thread(_their_session, endpoint.device, clock)
            sent = [(c.name, c.data) for c in endpoint.protocol.requests]
        assert out["identity"] == {"manufacturer": "New Era Pump Systems", "model": "NE-1000", "firmware": "3.928",
                                   "network_address": "0"}
        assert out["reset_seen"] is True
        assert out["diameter"] == "19.13"
        assert out["running"] == "infusing"
        assert out["rate"] == (3.0, "MH")
        assert out["dispensed"] == (1.0, 0.0, "ML")  # 19.13 mm > 14.0 mm: mL (§10.4.2 DIA/VOL units)
        assert out["stopped"] == "stopped" and out["direction"] == "INF"
        assert ("VOL", "1.000") in sent  # their target-volume attempt reached the wire and was refused...
        st = model.status()  # ...and the pump ended as their session left it: stopped, 1 mL delivered
        assert st.state is PumpState.STOPPED and st.delivered_ml == Decimal(1)
        assert st.rate_ml_per_h == Decimal(3) and st.diameter_mm == Decimal("19.13")

    asyncio.run(asyncio.wait_for(main(), 30))


# ------------------------------------------------------------------------ our driver, their simulator


class _Clock:
    """Their simulator's clock (seconds, float: it is their model), advanced by the test."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@contextlib.contextmanager
def _their_pump_on_a_pty(sim: NewEraSimulator) -> Iterator[str]:
    master, slave = pty.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    stop = threading.Event()

    def serve() -> None:
        buf = b""
        while not stop.is_set():
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            buf += data
            while b"\r" in buf:
                line, _, buf = buf.partition(b"\r")
                reply = sim.handle(line.decode("latin-1"))
                for item in [] if reply is None else [reply] if isinstance(reply, str) else reply:
                    os.write(master, item.encode("latin-1") + b"\x03")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield device
    finally:
        stop.set()
        os.close(slave)
        os.close(master)
        thread.join(5)


def test_our_driver_refuses_their_pump_without_safe_mode_unless_allowed() -> None:
    """Manual §10.3 (safe mode): a pump that answers `?` to SAF has no dead-man; refused by default."""
    sim = NewEraSimulator(clock=_Clock())

    async def main(device: str) -> None:
        driver = open_driver(f"newera+serial://{device}", DriverOptions(timeout_s=0.5, retries=1, deadman_s=5))
        try:
            with pytest.raises(DriverError, match="no safe mode"):
                await driver.connect()
        finally:
            await driver.close()

    with _their_pump_on_a_pty(sim) as device:
        asyncio.run(asyncio.wait_for(main(device), 30))
    assert not sim.running  # nothing was started


def test_our_driver_runs_and_stops_their_pump_in_basic_mode() -> None:
    """§10.2 basic framing, §10.4.3 alarms (power-up A?R), §10.4.2 DIA/RAT/RUN/STP/DIS read-back."""
    clock = _Clock()
    sim = NewEraSimulator(clock=clock)

    async def main(device: str) -> None:
        driver = open_driver(f"newera+serial://{device}?without_safe_mode=allow",
                             DriverOptions(timeout_s=0.5, retries=1, deadman_s=5))
        assert isinstance(driver, NewEraDriver)
        await driver.connect()
        try:
            assert driver.has_safe_mode is False
            identity = await driver.identify()
            assert (identity.model, identity.firmware) == ("NE-1000", "V3.923")
            status = await driver.read_status()
            assert status.state is PumpState.ALARM and status.alarms == {AlarmKind.POWER_INTERRUPTED}
            await driver.clear_alarm()
            assert await driver.configure_syringe(Decimal("19.05")) == Decimal("19.05")
            assert await driver.set_rate(Decimal("4.2")) == Decimal("4.2")
            await driver.run()
            clock.t += 3600
            running = await driver.read_status()
            assert running.state is PumpState.INFUSING
            assert running.rate_ml_per_h == Decimal("4.2") and running.delivered_ml == Decimal("4.2")
            await driver.stop()
            stopped = await driver.read_status()
            assert stopped.state is PumpState.STOPPED
        finally:
            await driver.close()

    with _their_pump_on_a_pty(sim) as device:
        asyncio.run(asyncio.wait_for(main(device), 30))
    # The pump was made safe, as their model sees it: neither running nor paused (a paused pump resumes on RUN).
    assert not sim.running and not sim.paused
    assert sim.dispensed == {"INF": pytest.approx(4.2), "WDR": 0.0}
    assert sim.phases[1]["dir"] == "INF"  # never withdrawn
