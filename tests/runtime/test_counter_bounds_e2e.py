"""The pump's delivered-volume counter judged over the real driver path (docs/safety.md, SUP-20 and SUP-21): New Era
on a PTY and Modbus/TCP against the simulated pump, whose state is read from the simulator, not from the log.

- SUP-21: the counter cleared at the pump's panel while it infuses (no clear driverd ordered) is the alarm
  `counter_drop`, and the pump is stopped within one poll; it stays stopped until a clinician resumes, and the
  resumed course counts on from the lower reading without another alarm. Before, only the Harvard driver noticed.
- SUP-20: a reading in 1 mL steps (a New Era display from 1000 mL: `DIS` answers `1000.`) is coarser than the drug
  library's `max_counter_step_ml` (0.1 mL): the alarm `counter_step`, and the pump is stopped. Before, the 1 mL
  step widened the 24-h ceiling's allowance by 2 mL of drug. (A counter cleared per course and per syringe cannot
  reach 1000 mL by infusing, so the test sets it there at the pump; that jump alone would also have been stopped,
  as `dose_ceiling`: what this test adds is that the reading's step is judged first, over the wire, and the
  step is logged and replayed.)

Both logs verify and replay: the core recomputes each alarm and stop from the logged reports.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from drivers.base import PumpState
from tests.runtime.e2e import PUMP, audit_ok, events, rig, run, setpoints, start_running


def _alarms(records: list[dict[str, object]]) -> list[object]:
    return [a["code"] for a in events(records, "alarm", PUMP)]


@pytest.mark.parametrize("transport", ["newera-pty", "modbus-tcp"])
def test_a_counter_cleared_at_the_panel_stops_the_pump_until_a_clinician_resumes(tmp_path: Path,
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
            reply = await r.command(PUMP, "resume")
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
