"""A counter cleared at the panel during a syringe swap, over the real driver path (New Era on a PTY; review
2026-12-03, HIGH). The course runs a 50 mg/mL syringe; the nurse swaps in a 100 mg/mL one and clears the volume at
the panel. Before, the drop raised `counter_drop`, the change_syringe that would load and verify the new syringe
was refused, and a resume abandoned the change and ran the 50 mg/mL rate on the 100 mg/mL syringe (twice the drug).
Now the pump stays stopped until a change loads and verifies the syringe, and then runs the new syringe's rate."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from drivers.base import PumpState
from tests.runtime.e2e import FIRST_STEP, Timing, audit_ok, events, rig, run
from tests.runtime.test_syringe_change_e2e import FILL, NAME, POLL, POLL_S, H, change, rate, schedule_doc

TRANSPORT = "newera-pty"


def _alarms(records: list[dict[str, object]]) -> list[object]:
    return [a["code"] for a in events(records, "alarm", NAME)]


def test_a_panel_clear_while_a_change_waits_keeps_the_pump_stopped_until_the_load(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig(TRANSPORT, tmp_path, timing=Timing(POLL_S, 0, 3 * POLL_S, 1.0), control=True,
                       fill_ml=FILL) as r:
            assert (await r.push(NAME, schedule_doc()))["ok"] is True
            model, ch = r.model(NAME), r.channel(NAME)
            await r.advance_to(FIRST_STEP + 20 * H)
            assert model.status().rate_ml_per_h == rate(100, 50, TRANSPORT)
            first = await change(r, "100")  # asked while the pump runs: it is stopped, the change waits
            assert first["ok"] is True and model.status().state is PumpState.STOPPED
            model.load_syringe(FILL)  # the 100 mg/mL syringe in,
            model.clear_delivered()  # and the volume cleared at the panel
            await r.advance_to(r.clock.now() + 2 * POLL)
            assert _alarms(r.records()) == [] and model.status().state is PumpState.STOPPED
            reply = await r.command(NAME, "resume")  # the second change_syringe forgotten
            assert reply["ok"] is False and "syringe_change_waiting" in str(reply), reply
            since = r.clock.now()
            await r.advance_to(r.clock.now() + 3 * POLL)
            assert model.status().state is PumpState.STOPPED
            assert all(x[1] == 0 for x in model.rate_history() if x[0] >= since)
            second = await change(r, "100")
            assert second["ok"] is True and second["phase"] == "titrating", second
            status = model.status()
            assert status.state is PumpState.INFUSING and status.rate_ml_per_h == rate(100, 100, TRANSPORT)
            assert (ch.state.syringe_changes, _alarms(r.records())) == (1, [])
            audit_ok(r)

    run(body())


def test_a_swap_and_clear_after_a_stop_at_the_panel_needs_a_change(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig(TRANSPORT, tmp_path, timing=Timing(POLL_S, 0, 3 * POLL_S, 1.0), control=True,
                       fill_ml=FILL) as r:
            assert (await r.push(NAME, schedule_doc()))["ok"] is True
            model, ch = r.model(NAME), r.channel(NAME)
            await r.advance_to(FIRST_STEP + 20 * H)
            model.stop()  # at the panel, no change asked
            model.load_syringe(FILL)
            model.clear_delivered()
            await r.advance_to(r.clock.now() + POLL)
            assert _alarms(r.records()) == ["counter_drop"] and ch.state.phase.value == "alarm"
            reply = await r.command(NAME, "resume")
            assert reply["ok"] is False and "counter_drop" in str(reply), reply
            await r.advance_to(r.clock.now() + 3 * POLL)
            assert model.status().state is PumpState.STOPPED
            reply = await change(r, "100")
            assert reply["ok"] is True and reply["phase"] == "titrating", reply
            status = model.status()
            assert status.state is PumpState.INFUSING and status.rate_ml_per_h == rate(100, 100, TRANSPORT)
            assert Decimal(status.rate_ml_per_h) < rate(100, 50, TRANSPORT)
            audit_ok(r)

    run(body())
