"""`driverd demo --driver harvard`: a whole burst course over the Elite driver and simulator on a PTY."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from pathlib import Path

import pytest

from driverd.runtime.demo import DemoOptions, run_demo


@pytest.mark.slow
def test_demo_course_over_the_harvard_driver(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="drivers.harvard.driver"):
        result = asyncio.run(run_demo(DemoOptions(driver="harvard", audit_dir=tmp_path / "audit")))
    assert not result.timed_out
    [pump] = result.pumps
    assert pump["phase"] == "stopped" and pump["syringe_changes"] == 2
    # 100 -> 300 -> 500 mg/24h at 100 mg/mL, quantized down to the Elite's 4 digits (0.0416, 0.125, 0.2083 mL/h)
    # Each of the 3 syringes is counted from a cleared counter whose last reading is whole fL (truncated): at most
    # 1 fL per syringe goes uncounted.
    assert Decimal("18.996") - 3 * Decimal("1e-12") <= Decimal(pump["delivered_ml"]) <= Decimal("18.996")
    assert pump["url"].endswith("without_deadman=allow")
    assert any("NO DEAD-MAN" in r.getMessage() for r in caplog.records)  # the bench runs it, loudly
