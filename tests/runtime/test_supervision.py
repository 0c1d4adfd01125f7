"""The daemon supervises what the pump really does (issue #10), on the real driver path (New Era over a PTY,
Modbus over loopback TCP).

Each test checks that the pump was made safe on the simulated pump itself (its state, rate and rate history),
not only that the daemon logged it: infusion nobody commanded (RUN pressed at the panel while primed, paused or
stopped) is stopped within one poll; a clinician decrease or stop reaches a pump still infusing in alarm; every
alarm cause is recorded, listed and acknowledged; a restart during a link outage never shows the link "up" before
the pump answers and resumes at most at the last verified rate."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.core.records import fmt_dec
from driverd.runtime.demo import START
from drivers.base import AlarmKind, PumpState
from tests.runtime.e2e import (
    FIRST_STEP,
    Rig,
    Timing,
    audit_ok,
    events,
    never_above,
    rig,
    run,
    setpoints,
    start_running,
    until_phase,
)

NAME = "bed-1"
WIRE = ("newera-pty", "modbus-tcp")
HALF = timedelta(seconds=30)  # polls every 60 s on whole minutes: +30 s is between two polls
FAST = Timing(poll_s=60, deadman_s=180, link_timeout_s=120, driver_timeout_s=1.0)
# Dropped replies wait out the driver timeout: keep it short. The pump's dead-man is longer than any silence
# below (a restart), so the pump keeps infusing on its own and the daemon has to deal with it.
WIRE_FAST = Timing(poll_s=60, deadman_s=240, link_timeout_s=60, driver_timeout_s=0.25)
# A day of course time (to the 300 mg/24h step) in few polls; no dead-man, so the pump keeps infusing in alarm.
SLOW_WIRE = Timing(poll_s=600, deadman_s=0, link_timeout_s=600, driver_timeout_s=0.25)
AT_300 = FIRST_STEP + timedelta(days=1, hours=1) + HALF  # titrating at 300 mg/24h (second step at +24 h)


# ------------------------------------------------------------------------------------------------ helpers






async def _until_link_back(r: Rig) -> None:
    await r.wait_until(lambda: not r.channel(NAME).link_lost, step=timedelta(minutes=1),
                       limit=r.clock.now() + timedelta(minutes=30))


def _since(records: list[dict[str, Any]], since: datetime) -> list[dict[str, Any]]:
    return [x for x in records if datetime.fromisoformat(x["ts"]) >= since]


def _alarm_codes(r: Rig, since: datetime = START) -> list[str]:
    return [a["code"] for a in _since(events(r.records(), "alarm", NAME), since)]






def _stopped(r: Rig) -> None:
    pump = r.model(NAME).status()
    assert pump.state is not PumpState.INFUSING, pump


def _panel_run(r: Rig, rate: Decimal) -> None:
    """A nurse programs a rate and presses RUN at the pump's panel (no host involved)."""
    r.model(NAME).set_rate(rate)
    r.model(NAME).run()
    assert r.model(NAME).status().state is PumpState.INFUSING


async def _stopped_within_one_poll(r: Rig, panel_at: datetime, phase: str = "alarm") -> None:
    """Within one poll of infusion nobody commanded: an unexpected_infusion alarm, a stop (setpoint 0) and the
    simulated pump stopped. A stopped course stays stopped (terminal), with the cause kept."""
    await r.advance_to(panel_at + r.poll)
    assert "unexpected_infusion" in _alarm_codes(r, panel_at), _alarm_codes(r)
    stops = [s for s in _since(setpoints(r.records(), NAME), panel_at) if Decimal(s["rate_ml_per_h"]) == 0]
    assert stops, _since(setpoints(r.records(), NAME), panel_at)
    _stopped(r)
    ch = r.channel(NAME)
    assert ch.state.phase.value == phase and "unexpected_infusion" in ch.state.alarm_causes, ch.state
    assert "unexpected_infusion" in (await r.status())[NAME]["alarms"]
    # It stays stopped: nothing restarts it on the following polls.
    await r.advance_to(r.clock.now() + 3 * r.poll)
    _stopped(r)


# ---------------------------------------------------------------------------------------- 1. unexpected infusion


async def _unexpected_primed(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=FAST) as r:
        assert (await r.push(NAME))["ok"] is True
        await r.advance_to(START + timedelta(minutes=2) + HALF)  # before the first step (due START + 5 min)
        assert r.channel(NAME).state.phase.value == "primed"
        _stopped(r)
        panel_at = r.clock.now()
        _panel_run(r, r.rate(100))
        await _stopped_within_one_poll(r, panel_at)
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_run_at_the_panel_while_primed_is_stopped_within_one_poll(tmp_path: Path, transport: str) -> None:
    run(_unexpected_primed(tmp_path, transport))


async def _unexpected_paused(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=FAST) as r:
        verified = await start_running(r)
        r.model(NAME).stop()  # STOP pressed at the panel
        await r.advance_to(r.clock.now() + r.poll)
        assert r.channel(NAME).state.phase.value == "paused"
        _stopped(r)
        panel_at = r.clock.now()
        r.model(NAME).run()  # RUN pressed again at the panel: the programmed rate restarts
        assert r.model(NAME).status().state is PumpState.INFUSING
        await _stopped_within_one_poll(r, panel_at)
        never_above(r, panel_at, verified)
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_restart_at_the_panel_while_paused_is_stopped_within_one_poll(tmp_path: Path, transport: str) -> None:
    run(_unexpected_paused(tmp_path, transport))


async def _unexpected_stopped(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=FAST) as r:
        await start_running(r)
        reply = await r.command(NAME, "stop", reason="course ended")
        assert reply["ok"] is True, reply
        assert r.channel(NAME).state.phase.value == "stopped"
        _stopped(r)
        await r.advance_to(r.clock.now() + r.poll)
        panel_at = r.clock.now()
        _panel_run(r, r.rate(100))
        await _stopped_within_one_poll(r, panel_at, phase="stopped")
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_run_at_the_panel_after_a_clinician_stop_is_stopped_within_one_poll(tmp_path: Path, transport: str) -> None:
    run(_unexpected_stopped(tmp_path, transport))


# ---------------------------------------------------------------------------------------- 2. decrease in alarm


async def _in_alarm_still_infusing_at_300(r: Rig) -> datetime:
    """Titrating at 300 mg/24h, then the link is lost (replies dropped, the pump still hears and keeps running):
    the course is in alarm, the pump still infuses at the 300 rate. The link is then restored."""
    assert (await r.push(NAME))["ok"] is True
    await r.advance_to(AT_300)
    ch = r.channel(NAME)
    assert ch.state.phase.value == "titrating" and ch.state.verified_rate == r.rate(300), ch.state
    cut_at = r.clock.now()
    r.faults(NAME).drop_next(1_000_000)
    await r.wait_until(lambda: r.channel(NAME).state.phase.value == "alarm", step=timedelta(minutes=10),
                       limit=cut_at + timedelta(hours=2))
    assert r.channel(NAME).state.alarm_code == "link_lost"
    pump = r.model(NAME).status()
    assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == r.rate(300), pump
    r.faults(NAME).clear()
    await r.wait_until(lambda: not r.channel(NAME).link_lost, step=timedelta(minutes=10),
                       limit=r.clock.now() + timedelta(hours=2))
    assert r.channel(NAME).state.phase.value == "alarm"
    pump = r.model(NAME).status()
    assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == r.rate(300), pump
    return cut_at


async def _reduce_in_alarm(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=SLOW_WIRE) as r:
        cut_at = await _in_alarm_still_infusing_at_300(r)
        reply = await r.command(NAME, "reduce", reason="too much", dose="100")
        assert reply["ok"] is True, reply
        assert reply["verified"] is True, reply
        pump = r.model(NAME).status()
        assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == r.rate(100), pump
        assert r.wire_rates(NAME)[-1] == r.rate(100)
        # The clinician is told what the pump runs now, not what it ran before the reduce.
        assert reply["pump_rate_ml_per_h"] == fmt_dec(r.rate(100)), reply
        assert r.channel(NAME).state.phase.value == "alarm"  # the decrease does not clear the alarm
        # The reduced rate holds on the following polls (nobody raises it again).
        await r.advance_to(r.clock.now() + 3 * r.poll)
        pump = r.model(NAME).status()
        assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == r.rate(100), pump
        never_above(r, cut_at, r.rate(300))
        # And a stop in alarm stops the pump too.
        reply = await r.command(NAME, "stop", reason="enough")
        assert reply["ok"] is True, reply
        _stopped(r)
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_a_reduce_in_alarm_reaches_the_still_infusing_pump(tmp_path: Path, transport: str) -> None:
    run(_reduce_in_alarm(tmp_path, transport))


async def _stop_in_alarm(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=SLOW_WIRE) as r:
        cut_at = await _in_alarm_still_infusing_at_300(r)
        reply = await r.command(NAME, "stop", reason="stop it")
        assert reply["ok"] is True, reply
        assert reply["verified"] is True, reply
        _stopped(r)
        await r.advance_to(r.clock.now() + r.poll)
        assert (await r.status())[NAME]["pump_state"] != "infusing"
        await r.advance_to(r.clock.now() + 3 * r.poll)
        _stopped(r)
        never_above(r, cut_at, r.rate(300))
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_a_stop_in_alarm_stops_the_still_infusing_pump(tmp_path: Path, transport: str) -> None:
    run(_stop_in_alarm(tmp_path, transport))


# ---------------------------------------------------------------------------------------- 3. every alarm visible


async def _two_causes(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=WIRE_FAST) as r:
        verified = await start_running(r)
        cut_at = r.clock.now()
        r.faults(NAME).drop_next(1_000_000)
        await until_phase(r, "alarm")
        assert r.channel(NAME).state.alarm_code == "link_lost"
        r.faults(NAME).clear()
        await _until_link_back(r)
        occluded_at = r.clock.now()
        r.model(NAME).inject_alarm(AlarmKind.OCCLUSION)
        await r.advance_to(occluded_at + r.poll)
        assert _alarm_codes(r, cut_at) == ["link_lost", "pump_alarm:occlusion"]
        status = (await r.status())[NAME]
        assert set(status["alarms"]) == {"link_lost", "pump_alarm:occlusion"}, status
        _stopped(r)
        # The line is still blocked: the pump stalls again as soon as it is acknowledged.
        original = r.model(NAME).clear_alarm

        def still_blocked() -> None:
            original()
            r.model(NAME).inject_alarm(AlarmKind.OCCLUSION)

        r.model(NAME).clear_alarm = still_blocked  # type: ignore[method-assign]
        reply = await r.command(NAME, "resume", reason="try")
        assert reply["ok"] is False, reply
        _stopped(r)
        assert r.channel(NAME).state.phase.value == "alarm"
        if transport.startswith("modbus"):
            assert [x["reason"] for x in reply["refusals"]] == ["alarm_active"], reply
            assert set((await r.status())[NAME]["alarms"]) == {"link_lost", "pump_alarm:occlusion"}
        else:
            # New Era shows a latched alarm once: the status read after the acknowledgement does not see it, so
            # the resume is accepted, not sent (the pre-send read finds the pump in alarm) and not verified; the
            # link cause was acknowledged, the occlusion is raised again on its own.
            assert reply["verified"] is False and reply["pump_state"] == "stopped", reply
            assert (await r.status())[NAME]["alarms"] == ["pump_alarm:occlusion"]
        # Cleared: the acknowledgement now removes the occlusion, and the resume is accepted.
        r.model(NAME).clear_alarm = original  # type: ignore[method-assign]
        before = len(r.model(NAME).rate_history())
        resumed_at = r.clock.now()
        reply = await r.command(NAME, "resume", reason="line cleared")
        assert reply["ok"] is True, reply
        cleared = [n for n in _since(events(r.records(), "notice", NAME), resumed_at) if n["code"] == "alarm_cleared"]
        # Every cause is acknowledged by name (on New Era the link cause went with the first, failed resume).
        assert len(cleared) == (1 if transport.startswith("modbus") else 2), cleared
        named = " ".join(c["detail"] for c in cleared)
        assert "link_lost" in named and "pump_alarm:occlusion" in cleared[-1]["detail"], cleared
        ch = r.channel(NAME)
        assert ch.state.phase.value == "titrating" and ch.state.verified_rate == ch.state.commanded_rate <= verified
        pump = r.model(NAME).status()
        assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == ch.state.commanded_rate
        assert all(rate <= verified for _, rate in r.model(NAME).rate_history()[before:])
        assert (await r.status())[NAME]["alarms"] == []
        never_above(r, cut_at, verified)
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_a_pump_alarm_during_a_link_alarm_is_its_own_record_and_both_are_acknowledged(tmp_path: Path,
                                                                                     transport: str) -> None:
    run(_two_causes(tmp_path, transport))


# ---------------------------------------------------------------------------------------- 4. restart in outage


async def _restart_in_outage(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=WIRE_FAST) as r:
        verified = await start_running(r)
        cut_at = r.clock.now()
        r.faults(NAME).drop_next(1_000_000)
        await until_phase(r, "alarm")
        assert r.channel(NAME).state.alarm_code == "link_lost"
        await r.restart(silent_for=timedelta(minutes=2))  # still cut: the new daemon gets no reply
        # Before the pump answers, the link is "lost", never "up", on every poll.
        for _ in range(4):
            status = (await r.status())[NAME]
            assert status["link"] == "lost", status
            assert status["phase"] == "alarm", status
            reply = await r.command(NAME, "resume", reason="too early")
            assert reply["ok"] is False and [x["reason"] for x in reply["refusals"]] == ["link_down"], reply
            await r.advance_to(r.clock.now() + r.poll)
        r.faults(NAME).clear()
        await _until_link_back(r)
        assert (await r.status())[NAME]["link"] == "up"
        before = len(r.model(NAME).rate_history())
        reply = await r.command(NAME, "resume", reason="link back")
        assert reply["ok"] is True, reply
        ch = r.channel(NAME)
        assert ch.state.phase.value == "titrating", ch.state
        assert ch.state.commanded_rate <= verified and ch.state.verified_rate == ch.state.commanded_rate
        pump = r.model(NAME).status()
        assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == ch.state.commanded_rate <= verified
        assert all(rate <= verified for _, rate in r.model(NAME).rate_history()[before:])
        never_above(r, cut_at, verified)
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_a_restart_during_a_link_outage_keeps_the_link_lost_until_the_pump_answers(tmp_path: Path,
                                                                                  transport: str) -> None:
    run(_restart_in_outage(tmp_path, transport))
