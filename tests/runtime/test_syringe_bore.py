"""A syringe bore changed at the pump's panel (review finding, 2026-12-03), over the real driver path: New Era on a
PTY and Modbus/TCP, against the simulated pump. The pump computes its rate and counter read-backs with the bore it
is set to, so before this check every read-back looked right while a 14.43 mm setting on a 21.59 mm syringe
delivered 2.24x the drug. Now each poll's bore reaches the core: the pump is stopped within one poll (it is read
from the simulator, not from the log), the alarm is `syringe_mismatch`, a resume is refused and leaves the pump
stopped, and a syringe change loads the schedule's bore again, reads it back and resumes."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.runtime.control import request
from drivers.base import PumpState
from tests.runtime.e2e import BOUND_S, PUMP, Rig, audit_ok, events, rig, run, start_running

WRONG = Decimal("14.43")  # a 10 mL syringe picked in the pump's menu


async def change(r: Rig) -> dict[str, Any]:
    assert r.socket is not None
    return await request(r.socket, {"op": "change_syringe", "pump_id": PUMP, "fill_volume_ml": "22", "by": "rn-1",
                                    "reason": "bore set wrong at the panel"}, timeout_s=BOUND_S)


@pytest.mark.parametrize("transport", ["newera-pty", "modbus-tcp"])
@pytest.mark.parametrize("infusing", [True, False])
def test_a_bore_changed_at_the_panel_stops_the_pump_until_a_syringe_change(tmp_path: Path, transport: str,
                                                                          infusing: bool) -> None:
    async def body() -> None:
        async with rig(transport, tmp_path, control=True) as r:
            rate = await start_running(r)
            model, ch = r.model(PUMP), r.channel(PUMP)
            right = model.status().diameter_mm
            assert right == ch.state.schedule.inner_diameter_mm != WRONG
            # The pump takes a new bore only stopped (as a real one: DIA is ?NA while infusing). The nurse stops it
            # at the panel (between two polls), picks the other syringe, and with `infusing` presses RUN again.
            model.stop()
            model.set_diameter(WRONG)
            if infusing:
                model.run()
            else:
                await r.advance_to(r.clock.now() + r.poll)
                assert ch.state.phase.value in ("paused", "alarm")
            await r.advance_to(r.clock.now() + r.poll)
            assert model.status().state is PumpState.STOPPED and ch.state.phase.value == "alarm"
            assert [a["code"] for a in events(r.records(), "alarm", PUMP)] == ["syringe_mismatch"]
            reply = await r.command(PUMP, "resume")
            assert reply["ok"] is False and [x["reason"] for x in reply["refusals"]] == ["syringe_mismatch"], reply
            since = r.clock.now()
            await r.advance_to(r.clock.now() + 3 * r.poll)
            assert model.status().state is PumpState.STOPPED
            assert all(x[1] == 0 for x in model.rate_history() if x[0] >= since)
            reply = await change(r)  # the pump is stopped: this is the command after the swap; it loads the bore
            assert reply["ok"] is True and reply["phase"] == "titrating", reply
            status = model.status()
            assert status.diameter_mm == right and status.state is PumpState.INFUSING and status.rate_ml_per_h == rate
            assert [a["code"] for a in events(r.records(), "alarm", PUMP)] == ["syringe_mismatch"]
            audit_ok(r)

    run(body())
