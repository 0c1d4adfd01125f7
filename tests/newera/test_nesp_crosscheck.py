"""Cross-check: the published nesp-lib client (independent of our codec) drives our simulator over a real PTY.

Findings from reading nesp-lib (nesp_lib/pump.py) against the reference file (NE-1000 manual §10.2-10.4):
- Both agree on safe-mode framing (LEN = data + 4, CRC-16/XMODEM big-endian, ETX) and on sending ``SAF``
  in safe framing whatever the current mode; the reply comes in the mode the pump is in afterwards.
- nesp-lib expects every number in a reply to contain a decimal point (``\\d+\\.\\d*``): the pump shows
  fixed-point values such as ``19.13``/``120.0``. Our simulator does the same (``format_display``).
- nesp-lib TRUNCATES a number to its first 5 characters before sending (``2.08333`` -> ``2.083``) and
  chooses units by magnitude (UM/MH/...). The manual's rule is "at most 4 digits, at most 3 decimals", and
  a value the pump cannot represent is out of range: our simulator answers ``?OOR`` instead of guessing, and
  our driver refuses before sending (a silent truncation is a dose change: nesp-lib is not wrong about the
  wire format, but its truncation policy is unsuitable for a drug pump).
- nesp-lib resends a command once when the reply is an alarm (initial SAF only): consistent with the manual's
  "the alarm is acknowledged by the reply to any valid command", which is what the simulator implements.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import nesp_lib  # type: ignore[import-untyped]

from drivers.base import PumpState
from simulators.clock import ManualClock
from simulators.newera import serve_newera
from simulators.pump import PumpModel


def _nesp_session(device: str, clock: ManualClock) -> dict[str, object]:
    port = nesp_lib.Port(device, baud_rate=19200)
    # nesp-lib reads with no timeout; bound it so a simulator bug fails the test instead of hanging it.
    port._Port__serial.timeout = 5
    try:
        pump = nesp_lib.Pump(port, address=0)
        out: dict[str, object] = {"model": pump.model_number, "firmware": pump.firmware_version}
        pump.syringe_diameter_mm = 19.13
        out["diameter"] = pump.syringe_diameter_mm
        pump.pumping_rate_ml_per_min = 2.0  # nesp-lib sends this as "RAT120MH"
        out["rate_ml_per_min"] = pump.pumping_rate_ml_per_min
        pump.run(wait_while_running=False)
        out["running"] = pump.running
        clock.advance(1800)  # half an hour of virtual time at 120 mL/h
        out["infused_ml"] = pump.volume_infused_ml
        pump.stop(wait_while_running=False)
        out["running_after_stop"] = pump.running
        pump.pumping_rate_ml_per_min = 0.5  # nesp-lib switches to "RAT500UM" while stopped
        out["rate_after_units"] = pump.pumping_rate_ml_per_min
        return out
    finally:
        port.close()


def test_nesp_lib_drives_the_simulator() -> None:
    async def main() -> None:
        clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
        model = PumpModel(clock, fill_volume_ml=Decimal(100), diameter_mm=Decimal("10.0"))
        async with serve_newera(model, pty=True, power_up=True) as endpoint:
            assert endpoint.device is not None
            out = await asyncio.to_thread(_nesp_session, endpoint.device, clock)
        assert out["model"] == 1000 and out["firmware"] == (3, 928)
        assert out["diameter"] == 19.13
        assert out["rate_ml_per_min"] == 2.0
        assert out["running"] is True
        assert out["infused_ml"] == 60.0  # 120 mL/h for 0.5 h, exactly
        assert out["running_after_stop"] is False
        assert out["rate_after_units"] == 0.5
        st = model.status()
        assert st.state is PumpState.STOPPED and st.delivered_ml == Decimal(60)
        assert st.rate_ml_per_h == Decimal(30) and st.diameter_mm == Decimal("19.13")

    asyncio.run(asyncio.wait_for(main(), 30))


def _nesp_safe_mode(device: str) -> int:
    port = nesp_lib.Port(device)
    port._Port__serial.timeout = 5
    try:
        pump = nesp_lib.Pump(port, address=0, safe_mode_timeout_s=20)
        try:
            return int(pump.safe_mode_timeout_s)
        finally:
            pump.safe_mode_timeout_s = 0  # back to basic mode (stops nesp-lib's heartbeat thread)
    finally:
        port.close()


def test_nesp_lib_safe_mode_round_trip() -> None:
    async def main() -> None:
        model = PumpModel(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        async with serve_newera(model, pty=True) as endpoint:
            assert endpoint.device is not None
            assert await asyncio.to_thread(_nesp_safe_mode, endpoint.device) == 20
        assert model.status().deadman_s == 0

    asyncio.run(asyncio.wait_for(main(), 30))
