"""The pump's delivered-volume counter judged over the real driver path (docs/safety.md, SUP-20 and SUP-21): New Era
on a PTY and Modbus/TCP against the simulated pump, whose state is read from the simulator, not from the log.

- SUP-21: the counter cleared at the pump's panel while it infuses (no clear driverd ordered) is the alarm
  `counter_drop`, and the pump is stopped within one poll; it stays stopped, a resume is refused (the syringe may
  have been swapped), and a syringe change (stating the syringe in the pump) loads and verifies it and resumes the
  course without another alarm. Before, only the Harvard driver noticed.
- SUP-20: a reading in 1 mL steps (a New Era display from 1000 mL: `DIS` answers `1000.`) is coarser than the drug
  library's `max_counter_step_ml` (0.1 mL): the alarm `counter_step`, and the pump is stopped. Before, the 1 mL
  step widened the 24-h ceiling's allowance by 2 mL of drug. (A counter cleared per course and per syringe cannot
  reach 1000 mL by infusing, so the test sets it there at the pump; that jump alone would also have been stopped,
  as `dose_ceiling`: what this test adds is that the reading's step is judged first, over the wire, and the
  step is logged and replayed.)

Both logs verify and replay: the core recomputes each alarm and stop from the logged reports.

- SUP-20 and the log: a driver stating a counter step of 0 or NaN (or a NaN bore, SUP-16) is doubt: the pump is
  stopped. The report is logged as read ("0", "NaN"), and the log replays from it: before (review, 2026-12-03),
  the record decoder refused such a step, so `audit verify --full` and `audit replay` failed on the log for good and
  a start-up after a crash (before the next state delta) refused to start.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.audit.reader import iter_records
from driverd.audit.segments import list_segments
from driverd.audit.writer import AuditConfig
from driverd.cli.main import app
from driverd.core.state import Phase
from driverd.runtime import daemon as daemon_module
from driverd.runtime.control import request
from driverd.runtime.demo import DEMO_TRUST, START
from driverd.runtime.recovery import open_log
from driverd.signing import TrustStore, load_private_key
from drivers.base import PumpState
from tests.runtime.e2e import BOUND_S, PUMP, audit_ok, events, rig, run, setpoints, start_running


def _alarms(records: list[dict[str, object]]) -> list[object]:
    return [a["code"] for a in events(records, "alarm", PUMP)]


@pytest.mark.parametrize("transport", ["newera-pty", "modbus-tcp"])
def test_a_counter_cleared_at_the_panel_stops_the_pump_until_a_syringe_load(tmp_path: Path,
                                                                                 transport: str) -> None:
    async def body() -> None:
        async with rig(transport, tmp_path, control=True) as r:
            rate = await start_running(r)
            model, ch = r.model(PUMP), r.channel(PUMP)
            await r.advance_to(r.clock.now() + 30 * r.poll)
            assert model.status().delivered_ml > 0 and model.status().state is PumpState.INFUSING
            model.clear_delivered()  # the nurse's "clear volume" at the panel, between two polls: the pump runs on
            assert model.status().state is PumpState.INFUSING
            await r.advance_to(r.clock.now() + r.poll)
            assert model.status().state is PumpState.STOPPED and ch.state.phase.value == "alarm"
            assert _alarms(r.records()) == ["counter_drop"]
            assert [s["reason"] for s in setpoints(r.records(), PUMP)][-1] == "counter_drop"
            since = r.clock.now()
            await r.advance_to(r.clock.now() + 5 * r.poll)
            assert model.status().state is PumpState.STOPPED
            assert all(x[1] == 0 for x in model.rate_history() if x[0] >= since)
            # A resume would run the old syringe's rate on whatever is in (a swap between two polls is possible):
            # refused; change_syringe, stating the syringe in the pump, loads and verifies it (review 2026-12-03).
            reply = await r.command(PUMP, "resume")
            assert reply["ok"] is False and "counter_drop" in str(reply), reply
            assert model.status().state is PumpState.STOPPED
            assert r.socket is not None
            reply = await request(r.socket, {"op": "change_syringe", "pump_id": PUMP, "fill_volume_ml": "10",
                                             "by": "rn-1", "reason": "the syringe in the pump"}, timeout_s=BOUND_S)
            assert reply["ok"] is True, reply
            await r.advance_to(r.clock.now() + 60 * r.poll)
            status = model.status()
            assert status.state is PumpState.INFUSING and status.rate_ml_per_h == rate
            assert _alarms(r.records()) == ["counter_drop"] and ch.state.phase.value == "titrating"
            audit_ok(r)

    run(body())


def test_a_reading_in_1_ml_steps_stops_the_pump(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig("newera-pty", tmp_path, control=True) as r:
            await start_running(r)
            model, ch = r.model(PUMP), r.channel(PUMP)
            await r.advance_to(r.clock.now() + 5 * r.poll)
            model.preset_delivered(Decimal("1000.5"))  # the display now reads "1000." (4 digits): 1 mL steps
            await r.advance_to(r.clock.now() + r.poll)
            assert model.status().state is PumpState.STOPPED and ch.state.phase.value == "alarm"
            reports = events(r.records(), "pump_report", PUMP)
            assert reports[-1]["delivered_step_ml"] == "1"
            assert _alarms(r.records()) == ["counter_step"]
            assert [s["reason"] for s in setpoints(r.records(), PUMP)][-1] == "counter_step"
            since = r.clock.now()
            await r.advance_to(r.clock.now() + 5 * r.poll)
            assert model.status().state is PumpState.STOPPED
            assert all(x[1] == 0 for x in model.rate_history() if x[0] >= since)
            audit_ok(r)

    run(body())


@pytest.mark.parametrize(("field", "value", "code"), [
    ("delivered_step_ml", "0", "counter_step"),
    ("delivered_step_ml", "NaN", "counter_step"),
    ("diameter_mm", "NaN", "syringe_mismatch"),
    # A rate or counter that is no number: the report cannot be judged at all (report_unreadable, review
    # 2026-12-03: it was refused with the state unchanged, and the pump ran on unsupervised).
    ("rate_ml_per_h", "NaN", "report_unreadable"),
    ("rate_ml_per_h", "sNaN", "report_unreadable"),
    ("delivered_ml", "Infinity", "report_unreadable"),
])
def test_a_reading_that_is_no_positive_number_stops_the_pump_and_the_log_still_replays_and_starts(
        tmp_path: Path, monkeypatch: Any, field: str, value: str, code: str) -> None:
    # The crash comes before the next state delta (up to an hour later in production): start-up replays the report.
    monkeypatch.setattr(daemon_module, "DELTA_EVERY", timedelta(days=30))

    async def body() -> None:
        async with rig("newera-pty", tmp_path, control=True) as r:
            await start_running(r)
            model, ch = r.model(PUMP), r.channel(PUMP)
            read = ch.driver.read_status

            async def doubtful() -> Any:  # a plug-in driver, or a corrupt reading, over the real wire otherwise
                return dataclasses.replace(await read(), **{field: Decimal(value)})

            ch.driver.read_status = doubtful
            await r.advance_to(r.clock.now() + r.poll)
            assert model.status().state is PumpState.STOPPED and ch.state.phase is Phase.ALARM
            assert events(r.records(), "pump_report", PUMP)[-1][field] == value  # logged as read
            assert _alarms(r.records()) == [code]
            assert [s["reason"] for s in setpoints(r.records(), PUMP)][-1] == code
            await r.advance_to(r.clock.now() + 5 * r.poll)  # still reading it: raised once, the pump stays stopped
            assert model.status().state is PumpState.STOPPED and _alarms(r.records()) == [code]
            audit_ok(r)  # verifies, and `replay` folds the doubtful reports to the same alarm and stop
            out = CliRunner().invoke(app, ["audit", "verify", str(tmp_path / "audit"), "--full", "--trust",
                                           str(DEMO_TRUST), "--key", str(r.audit_pub), "--json"])
            assert out.exit_code == 0, out.output
            assert json.loads(out.output)["full"]["ok"] is True
            shutil.copytree(tmp_path / "audit", tmp_path / "crashed")  # a power cut here

    run(body())
    key = load_private_key(tmp_path / "keys" / "audit.key")
    writer, recovered = open_log(tmp_path / "crashed", AuditConfig(), key, lambda: START + timedelta(days=5),
                                 TrustStore.load(DEMO_TRUST))
    writer.close()
    assert recovered.snapshot_seq is None or recovered.snapshot_seq < min(
        x["seq"] for x in events(_crashed(tmp_path), "alarm", PUMP))  # the alarm itself came from the replay
    assert [s.phase for s in recovered.states.values()] == [Phase.ALARM]
    assert code in next(iter(recovered.states.values())).alarm_causes


def _crashed(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for _, p in list_segments(tmp_path / "crashed") for r in iter_records(p)]
