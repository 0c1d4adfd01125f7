"""`driverd demo --driver modbus`: a whole burst course over the Modbus driver and simulator on loopback TCP.

The shipped register map names its product (`product_code`), and the driver refuses a device whose model register
names another. The demo made its simulated pumps with the simulator's default model (an NE-1000), so the driver
refused every connect and the course never primed; no test ran this demo (found 2026-12-03)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

from driverd.audit.reader import iter_records
from driverd.runtime.demo import DemoOptions, run_demo


def test_demo_course_over_the_modbus_driver(tmp_path: Path) -> None:
    result = asyncio.run(run_demo(DemoOptions(driver="modbus", audit_dir=tmp_path / "audit")))
    assert not result.timed_out
    [pump] = result.pumps
    assert pump["phase"] == "stopped" and pump["syringe_changes"] == 2
    # 100 -> 300 -> 500 mg/24h at 100 mg/mL; each syringe's last reading truncated to the map's 0.001 mL counter.
    assert Decimal("18.96") - 3 * Decimal("0.001") <= Decimal(pump["delivered_ml"]) <= Decimal("18.96")
    setpoints = [r for r in iter_records(result.audit_dir) if r["event"] == "setpoint"]
    assert {r["rate_ml_per_h"] for r in setpoints if Decimal(r["rate_ml_per_h"]) > 0} == {"0.041", "0.125", "0.208"}
