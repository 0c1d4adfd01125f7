"""Wall-clock steps over the real driver path (docs/safety.md, "Time"): the channel detects the step, logs it,
feeds it to the core as a clock fault, and course time does not follow it. Checked on the simulated pump itself:
a 2-day forward step right after a step lets no escalation reach the pump, and a backward step neither stops
the polls nor shows the core time running backward."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from driverd.runtime.clock import VirtualClock
from driverd.runtime.config import PumpConfig
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import SYRINGE
from simulators.world import World
from tests.runtime.e2e import FIRST_STEP, Rig, Timing, audit_ok, events, rig, run, setpoints

NAME = "bed-1"
WIRE = ("newera-pty", "modbus-tcp")
SLOW_POLL = Timing(poll_s=600, deadman_s=0, link_timeout_s=1200, driver_timeout_s=1.0)
AFTER_FIRST_STEP = FIRST_STEP + timedelta(hours=1, minutes=1)  # off the 10-min poll grid; 100 mg/24h verified
CORE_INPUTS = ("schedule_accepted", "pump_verified", "tick", "pump_report", "setpoint_result", "clinician_command",
               "link_lost", "link_restored", "clock_stepped")


def _pump_rates_since(r: Rig, since: datetime) -> list[Decimal]:
    return [rate for at, rate in r.model(NAME).rate_history() if at >= since]


def _input_times(r: Rig) -> list[datetime]:
    return [datetime.fromisoformat(x["at"]) for x in r.records()
            if x["event"] in CORE_INPUTS and x.get("pump_id") == NAME]


def _refusals(r: Rig, reason: str) -> list[dict[str, object]]:
    return [x for x in events(r.records(), "refused", NAME) if x["reason"] == reason]


async def _start(r: Rig) -> datetime:
    assert (await r.push(NAME))["ok"] is True
    await r.advance_to(AFTER_FIRST_STEP)
    ch = r.channel(NAME)
    assert ch.state.phase.value == "titrating" and ch.state.verified_rate == r.rate(100)
    assert r.model(NAME).status().rate_ml_per_h == r.rate(100)
    return r.clock.now()




async def _forward(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=SLOW_POLL) as r:
        stepped_at = await _start(r)
        r.clock.step_wall(timedelta(days=2))  # right after the first step: the wall clock says it is 2 days later
        await r.advance_to(stepped_at + timedelta(minutes=10))
        [record] = events(r.records(), "clock_stepped", NAME)
        assert record["direction"] == "forward" and Decimal(record["delta_s"]) == 2 * 86_400
        assert [a["code"] for a in events(r.records(), "alarm", NAME)] == ["clock_step"]
        assert (await r.status())[NAME]["clock_fault"]
        # Course time did not follow the wall clock: no input is stamped anywhere near "2 days later".
        assert max(_input_times(r)) < stepped_at + timedelta(hours=1)
        assert r.model(NAME).status().rate_ml_per_h == r.rate(100)

        # The 300 step falls due in course time a day later: the clock fault still holds it back.
        await r.advance_to(FIRST_STEP + timedelta(days=1, minutes=16))
        assert r.channel(NAME).state.level_mg_per_24h == 100
        assert r.model(NAME).status().rate_ml_per_h == r.rate(100)
        assert _pump_rates_since(r, stepped_at) == [], "no setpoint reached the pump after the clock step"
        assert len(_refusals(r, "clock_step")) == 1
        reply = await r.command(NAME, "escalate", reason="pain")
        assert [x["reason"] for x in reply["refusals"]] == ["clock_step"]
        assert not [s for s in setpoints(r.records(), NAME) if s["intent"] == "escalate"]

        # A clinician checks the time and acknowledges: the due step goes out through the kernel on the next poll.
        assert (await r.command(NAME, "ack_clock", reason="time checked against the ward clock"))["ok"] is True
        await r.advance_to(r.clock.now() + timedelta(minutes=10))
        assert r.model(NAME).status().rate_ml_per_h == r.rate(300)
        assert (await r.status())[NAME]["clock_fault"] is None
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_a_forward_step_lets_no_escalation_reach_the_pump(tmp_path: Path, transport: str) -> None:
    run(_forward(tmp_path, transport))


async def _backward(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=SLOW_POLL) as r:
        stepped_at = await _start(r)
        r.clock.step_wall(-timedelta(hours=1))
        await r.advance_to(stepped_at + timedelta(minutes=35))
        [record] = events(r.records(), "clock_stepped", NAME)
        assert record["direction"] == "backward" and Decimal(record["delta_s"]) == -3600
        times = _input_times(r)
        assert times == sorted(times), "the core saw time run backward"
        # The channel kept polling on course time (it did not sleep an hour waiting for the wall clock).
        reports = [x for x in events(r.records(), "pump_report", NAME)
                   if datetime.fromisoformat(x["at"]) > stepped_at]
        assert len(reports) >= 3
        # Escalation is refused, a decrease reaches the pump.
        reply = await r.command(NAME, "escalate", reason="pain")
        assert [x["reason"] for x in reply["refusals"]] == ["clock_step"]
        assert (await r.command(NAME, "reduce", reason="drowsy", dose="50"))["ok"] is True
        assert r.model(NAME).status().rate_ml_per_h == r.rate(50)
        assert _pump_rates_since(r, stepped_at) == [r.rate(50)]
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_a_backward_step_does_not_run_core_time_backward(tmp_path: Path, transport: str) -> None:
    run(_backward(tmp_path, transport))


async def _restart_behind(tmp_path: Path) -> None:
    async with rig("modbus-tcp", tmp_path, timing=SLOW_POLL) as r:
        await _start(r)
        config = r.config
    assert config is not None
    last = max(datetime.fromisoformat(x["ts"]) for x in r.records())
    # The host comes back with its clock 40 minutes behind the log (a backward step while the daemon was down).
    clock = VirtualClock(last - timedelta(minutes=40))
    clock.register()  # hold virtual time still while the test looks
    world = World(clock)
    world.pump(NAME, diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]), fill_volume_ml=Decimal("20"))
    daemon = Daemon(replace(config, pumps=(PumpConfig(NAME, f"sim://{NAME}"),)), clock, world=world)
    try:
        await asyncio.wait_for(daemon.start(), timeout=60)
        assert clock.now() >= last, "course time starts no earlier than the log's last record"
        state = daemon.channels[NAME].state
        assert "backward" in state.clock_fault
        reply = await asyncio.wait_for(daemon.command(NAME, "ack_clock", "dr-a", "time checked"), timeout=60)
        assert reply["ok"] is True and not daemon.channels[NAME].state.clock_fault
    finally:
        clock.unregister()
        await asyncio.wait_for(daemon.stop(), timeout=60)
    times = _input_times(r)
    assert times == sorted(times), "the core saw time run backward across the restart"
    [record] = events(r.records(), "clock_stepped", NAME)
    assert record["direction"] == "backward" and Decimal(record["delta_s"]) <= -40 * 60
    audit_ok(r)


def test_a_restart_with_the_clock_behind_the_log_starts_from_the_log(tmp_path: Path) -> None:
    run(_restart_behind(tmp_path))
