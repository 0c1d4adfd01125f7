"""The pump's rate range is checked again when the daemon reconnects to a pump (docs/safety.md, SUP-19), on the real
driver path (New Era on a PTY, Modbus/TCP on loopback) against the simulated pump.

Before, the check ran at priming and at every syringe load only: a pump reconfigured while the link was down, or
while the daemon was down, ran on. Now the first status read after a lost link, and the first after a daemon start,
carries the bore the pump reads back and the driver's range for it (`link_restored`); a pump that cannot run the
course is stopped (read from the simulator), the alarm is logged, a resume is refused, and `audit replay` recomputes
the decision from the logged range. A syringe change is the clinician's retry.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.runtime.demo import CONFIG_DIR
from drivers.base import PumpState
from tests.runtime.e2e import BOUND_S, PUMP, Rig, Timing, audit_ok, events, rig, run, start_running, until_phase

# Dropped replies wait out the driver timeout: keep it short; the dead-man outlasts the outage (the pump runs on).
TIMING = Timing(poll_s=60, deadman_s=240, link_timeout_s=60, driver_timeout_s=0.25)
AFTER_POLL = timedelta(seconds=10)  # after a restart the channel polls 30 s off the rig's grid: between both
TINY = Decimal("1.91")  # under a tenth of the syringe's 21.59 mm: the fastest rate falls below the library's maximum


async def change(r: Rig) -> dict[str, Any]:
    """change_syringe, stating the syringe in the pump (the daemon's own API: the rig's control server stays with
    the daemon it started, and these tests restart it)."""
    return await asyncio.wait_for(r.daemon.change_syringe(PUMP, "22", None, "rn-1", "pump checked"), BOUND_S)


def alarm_codes(r: Rig) -> list[str]:
    return [a["code"] for a in events(r.records(), "alarm", PUMP)]


def no_rate_since(r: Rig, since: Any) -> None:
    assert r.model(PUMP).status().state is PumpState.STOPPED
    assert [rate for at, rate in r.model(PUMP).rate_history() if at >= since and rate > 0] == []


@pytest.mark.parametrize("transport", ["newera-pty", "modbus-tcp"])
def test_a_pump_reconfigured_while_the_link_was_down_is_stopped_at_reconnect(tmp_path: Path, transport: str) -> None:
    async def body() -> None:
        async with rig(transport, tmp_path, timing=TIMING) as r:
            await start_running(r)
            model, ch = r.model(PUMP), r.channel(PUMP)
            right = model.status().diameter_mm
            r.faults(PUMP).drop_next(1_000_000)  # replies lost; the pump hears the polls and runs on
            await until_phase(r, "alarm")
            assert alarm_codes(r) == ["link_lost"]
            # Meanwhile at the panel: stopped, set to another syringe's bore, and RUN again.
            model.stop()
            model.set_diameter(TINY)
            model.run()
            assert model.status().state is PumpState.INFUSING
            r.faults(PUMP).clear()
            await r.wait_until(lambda: not ch.link_lost, step=r.poll, limit=r.clock.now() + timedelta(minutes=30))
            back = r.clock.now()
            await r.advance_to(back + r.poll)
            records = r.records()
            [restored] = events(records, "link_restored", PUMP)
            url = r.config.pumps[0].url
            assert Decimal(restored["diameter_mm"]) == TINY and restored["pump_range"]["url"] == url
            codes = alarm_codes(r)
            assert codes[:2] == ["link_lost", "pump_range"] and "syringe_mismatch" in codes, codes
            [refusal] = [x for x in events(records, "refused", PUMP) if x["reason"] == "pump_range"]
            assert f"({restored['diameter_mm']} mm)" in refusal["detail"] and url in refusal["detail"], refusal
            assert ch.state.phase.value == "alarm"
            no_rate_since(r, back)
            status = (await r.status())[PUMP]
            assert "reconnect: pump_range: " in status["last_error"], status
            # A resume runs nothing: the lost link is acknowledged, the range and the bore stand.
            reply = await r.command(PUMP, "resume", reason="link back")
            assert reply["ok"] is False and [x["reason"] for x in reply["refusals"]] == ["syringe_mismatch"], reply
            assert set(ch.state.alarm_causes) == {"pump_range", "syringe_mismatch"}
            await r.advance_to(r.clock.now() + 3 * r.poll)
            no_rate_since(r, back)
            # The clinician's retry: the change loads the schedule's bore, the range is checked for it, and the
            # course resumes at its level.
            reply = await change(r)
            assert reply["ok"] is True and reply["phase"] == "titrating", reply
            status = model.status()
            assert status.diameter_mm == right and status.state is PumpState.INFUSING
            assert (await r.status())[PUMP]["last_error"] is None
            audit_ok(r)  # replay recomputes the refusal from the logged range

    run(body())


def narrow_map(tmp_path: Path) -> Path:
    """The shipped Modbus register map with a slower mechanism's plunger: its fastest rate with the demo syringe is
    below the drug library's maximum (a device swapped for another model while the daemon was down)."""
    text = (CONFIG_DIR / "drivers" / "modbus-pump.toml").read_text()
    assert 'plunger_max_mm_per_h = "3060.3"' in text
    path = tmp_path / "narrow-map.toml"
    path.write_text(text.replace('plunger_max_mm_per_h = "3060.3"', 'plunger_max_mm_per_h = "20"', 1))
    return path


def test_a_restart_with_a_pump_that_cannot_run_the_course_stops_it_at_the_first_contact(tmp_path: Path) -> None:
    """Same bore, another range: only the range check can see it (the bore check, SUP-16, passes)."""
    async def body() -> None:
        async with rig("modbus-tcp", tmp_path, timing=TIMING) as r:
            await start_running(r)
            model, config = r.model(PUMP), r.config
            assert config is not None
            honest = config.pumps
            r.config = replace(config, pumps=(replace(honest[0], url=f"{honest[0].url}&map={narrow_map(tmp_path)}"),))
            await r.restart(timedelta(minutes=2))  # the new channel polls on its own grid, 30 s off the rig's
            assert model.status().state is PumpState.INFUSING  # the dead-man outlasted the restart
            restarted = r.clock.now()
            await r.advance_to(restarted + r.poll + AFTER_POLL)
            ch = r.channel(PUMP)
            assert ch.state.phase.value == "alarm" and ch.state.alarm_causes == ("pump_range",)
            assert alarm_codes(r) == ["pump_range"]
            [restored] = events(r.records(), "link_restored", PUMP)
            assert restored["diameter_mm"] == "21.59" and Decimal(restored["pump_range"]["max_ml_per_h"]) < 10
            no_rate_since(r, restarted)
            reply = await r.command(PUMP, "resume", reason="restarted")
            assert reply["ok"] is False and [x["reason"] for x in reply["refusals"]] == ["pump_range"], reply
            # The clinician's retry, the same driver: the load's check refuses too, and the pump stays stopped.
            reply = await change(r)
            assert reply["ok"] is False and [x["reason"] for x in reply["refusals"]] == ["pump_range"], reply
            await r.advance_to(r.clock.now() + 2 * r.poll)
            no_rate_since(r, restarted)
            audit_ok(r)
            # The right map back and a restart: the first contact's check passes, but the live course's cause stays
            # until the clinician's change, whose load passes and resumes the course at its level.
            r.config = replace(r.config, pumps=honest)
            await r.restart(timedelta(minutes=1))
            await r.advance_to(r.clock.now() + r.poll + AFTER_POLL)
            ch = r.channel(PUMP)
            assert [n["code"] for n in events(r.records(), "notice", PUMP)].count("pump_range_checked") == 2
            assert ch.state.phase.value == "alarm" and ch.state.alarm_causes == ("pump_range",)
            no_rate_since(r, restarted)
            reply = await change(r)
            assert reply["ok"] is True and reply["phase"] == "titrating", reply
            assert model.status().state is PumpState.INFUSING and model.status().rate_ml_per_h == r.rate(100)
            audit_ok(r)

    run(body())
