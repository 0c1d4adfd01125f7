"""The log replays and starts after any read-back the pump gave, over New Era on a PTY (review, 2026-12-03).

The core judges what a pump reads back; the channel logs it as read; the replay and the start-up after a crash
fold the same records. Before, a bore read back as NaN at prime (a plug-in driver, a corrupt reply) was refused
live (`syringe_mismatch`: nothing starts) but its `pump_verified` record could not be decoded, so the log never
replayed again and the daemon refused to start on it, even from a later state delta; the same for a setpoint
read back as NaN. The pump's own state is read from the simulator.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.audit.writer import AuditConfig
from driverd.runtime import daemon as daemon_module
from driverd.runtime.demo import DEMO_TRUST, START
from driverd.runtime.recovery import open_log
from driverd.signing import TrustStore, load_private_key
from drivers.base import PumpState
from tests.runtime.e2e import PUMP, RUNNING_AT, audit_ok, events, rig, run


@pytest.mark.parametrize(("operation", "field"), [("configure_syringe", "diameter_mm"),
                                                  ("set_rate", "readback_ml_per_h")])
def test_a_nan_read_back_starts_nothing_and_the_log_replays_and_starts(tmp_path: Path, monkeypatch: Any,
                                                                       operation: str, field: str) -> None:
    monkeypatch.setattr(daemon_module, "DELTA_EVERY", timedelta(0))  # deltas too: start-up begins from the last

    async def body() -> None:
        async with rig("newera-pty", tmp_path, control=True) as r:
            driver, model = r.channel(PUMP).driver, r.model(PUMP)
            real = getattr(driver, operation)

            async def nan_back(value: Decimal) -> Decimal:  # the pump does it; its reply reads NaN
                await real(value)
                return Decimal("NaN")

            setattr(driver, operation, nan_back)
            assert (await r.push(PUMP))["ok"] is True
            await r.advance_to(RUNNING_AT + 10 * r.poll)
            assert model.status().state is not PumpState.INFUSING
            assert model.status().delivered_ml == 0  # it never ran
            logged = [x[field] for x in r.records() if x["event"] in ("pump_verified", "setpoint_result")
                      and field in x]
            assert logged and set(logged) == {"NaN"}
            assert events(r.records(), "state_delta")
            audit_ok(r)
            shutil.copytree(tmp_path / "audit", tmp_path / "crashed")  # a power cut here

    run(body())
    key = load_private_key(tmp_path / "keys" / "audit.key")
    writer, recovered = open_log(tmp_path / "crashed", AuditConfig(), key, lambda: START + timedelta(days=5),
                                 TrustStore.load(DEMO_TRUST))
    writer.close()
    assert len(recovered.states) == 1
