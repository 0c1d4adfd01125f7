"""Faults during a course, on the real driver path: wire faults (drop, garble, delay beyond the timeout,
disconnect) on New Era over a PTY and Modbus over TCP, Modbus exception responses, and pump alarms (occlusion,
end of syringe, power interrupted, the pump's dead-man when the daemon goes silent, low battery and near-end).

For each: the course phase and alarm code, the audit record of the alarm, no setpoint above the last verified rate
after the fault (on the wire: the simulated pump's own rate history), no escalation while in alarm, a clinician
resume refused while the cause persists and accepted, at most at the last verified rate, once it is cleared.
And the taper lock at the daemon level: no clinician command raises the rate once the taper has begun."""

from __future__ import annotations

import tempfile
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from driverd.runtime.control import request
from driverd.runtime.demo import DEMO_KEY, START, demo_schedule
from driverd.signing import sign_document
from drivers.base import AlarmKind, PumpState
from simulators.faults import ScheduledFault
from tests.runtime.e2e import (
    BOUND_S,
    FIRST_STEP,
    RUNNING_AT,
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
    verified_setpoints,
)

NAME = "bed-1"
WIRE = ("newera-pty", "modbus-tcp")
HALF = timedelta(seconds=30)  # polls every 60 s on whole minutes: +30 s is between two polls
# Wire faults wait out real driver timeouts: keep them short there. Elsewhere nothing times out, so a generous
# timeout costs nothing and keeps a loaded machine from turning a slow reply into a spurious link loss.
WIRE_FAST = Timing(poll_s=60, deadman_s=180, link_timeout_s=60, driver_timeout_s=0.25)
FAST = Timing(poll_s=60, deadman_s=180, link_timeout_s=120, driver_timeout_s=1.0)
SLOW_POLL = Timing(poll_s=600, deadman_s=0, link_timeout_s=1200, driver_timeout_s=1.0)
NO_DEADLINE = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------------ helpers






def _alarm_codes(r: Rig) -> list[str]:
    return [a["code"] for a in events(r.records(), "alarm", NAME)]




def _no_escalation(r: Rig, since: datetime) -> None:
    sent = [s for s in setpoints(r.records(), NAME) if datetime.fromisoformat(s["ts"]) >= since]
    assert not [s for s in sent if s["intent"] in ("escalate", "start")], sent


async def _refused(r: Rig, action: str, reason: str, **kw: Any) -> None:
    reply = await r.command(NAME, action, **kw)
    assert reply["ok"] is False, reply
    assert [x["reason"] for x in reply["refusals"]] == [reason], reply


async def _resume_ok(r: Rig, verified: Decimal) -> None:
    """A clinician resume is accepted, at most at the last verified rate, and the pump really runs that rate."""
    before = len(r.model(NAME).rate_history())
    reply = await r.command(NAME, "resume", reason="cause cleared")
    assert reply["ok"] is True, reply
    ch = r.channel(NAME)
    running = ("titrating", "holding", "tapering")
    assert ch.state.phase.value in (running if verified else (*running, "primed")), ch.state.phase
    assert ch.state.commanded_rate <= verified and ch.state.verified_rate == ch.state.commanded_rate
    assert all(rate <= verified for _, rate in r.model(NAME).rate_history()[before:])
    pump = r.model(NAME).status()
    if ch.state.commanded_rate > 0:
        assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == ch.state.commanded_rate
    else:  # nothing was ever verified: "at most the last verified rate" is not running at all
        assert pump.state is not PumpState.INFUSING




# ------------------------------------------------------------------------------------------------ wire faults


def _inject_wire(r: Rig, kind: str) -> None:
    plan = r.faults(NAME)
    if kind == "drop":
        plan.drop_next(1_000_000)
    elif kind == "garble":
        plan.garble_next(1_000_000)
    elif kind == "delay":
        plan.delay_next(1_000_000, 0.6)  # every reply 0.6 s late: beyond the driver's 0.25 s timeout
    elif kind == "disconnect":
        if r.transport == "newera-pty":
            r.endpoints[NAME].hang_up()  # the cable is pulled: the PTY is gone for good
        else:
            for _ in range(100_000):
                plan.disconnect_next()  # every (re)connection is dropped at its first reply
    else:
        raise ValueError(kind)


async def _wire_fault(tmp_path: Path, transport: str, kind: str) -> None:
    async with rig(transport, tmp_path, timing=WIRE_FAST) as r:
        verified = await start_running(r)
        fault_at = r.clock.now()
        _inject_wire(r, kind)
        await until_phase(r, "alarm")
        ch = r.channel(NAME)
        assert ch.state.alarm_code == "link_lost" and ch.link_lost
        assert (await r.status())[NAME]["link"] == "lost"
        assert "link_lost" in _alarm_codes(r)
        alarm = events(r.records(), "alarm", NAME)[-1]
        assert alarm["code"] == "link_lost" and datetime.fromisoformat(alarm["ts"]) >= fault_at
        assert ch.state.level_mg_per_24h == 100
        await _refused(r, "resume", "link_down")  # refused while the link is down
        await _refused(r, "escalate", "illegal_transition")  # no escalation while in alarm
        permanent = kind == "disconnect" and transport == "newera-pty"
        if permanent:
            # Nobody can reach the pump any more: its own dead-man stops it (the daemon armed it at connect).
            await r.advance_to(r.clock.now() + timedelta(seconds=FAST.deadman_s))
            pump = r.model(NAME).status()
            assert pump.state is PumpState.ALARM and AlarmKind.SAFE_MODE_TIMEOUT in pump.alarms
            await _refused(r, "resume", "link_down")
        else:
            # Dropped, garbled or late replies: the pump still hears the polls, so it keeps its verified rate.
            r.faults(NAME).clear()
            await r.wait_until(lambda: not r.channel(NAME).link_lost, step=timedelta(minutes=1),
                               limit=r.clock.now() + timedelta(minutes=30))
            assert r.channel(NAME).state.phase.value == "alarm"  # link back, alarm stays until a clinician
            await r.advance_to(r.clock.now() + timedelta(minutes=2))
            _no_escalation(r, fault_at)
            await _resume_ok(r, verified)
        never_above(r, fault_at, verified)
    audit_ok(r)


@pytest.mark.parametrize("kind", ["drop", "garble", "delay", "disconnect"])
@pytest.mark.parametrize("transport", WIRE)
def test_wire_fault_ends_in_link_lost_alarm_and_no_unsafe_setpoint(tmp_path: Path, transport: str, kind: str) -> None:
    run(_wire_fault(tmp_path, transport, kind))


async def _lost_reply_at_start(tmp_path: Path, transport: str, kind: str, k: int, count: int) -> None:
    async with rig(transport, tmp_path, timing=WIRE_FAST) as r:
        assert (await r.push(NAME))["ok"] is True
        await r.advance_to(FIRST_STEP - HALF)
        # `count` replies from the k-th on are lost or corrupted: in the poll, the start's status read, its
        # set-rate or read-back, or its RUN.
        plan = r.faults(NAME)
        plan.schedule(ScheduledFault(after_requests=plan.replies_seen + k, kind=kind, count=count))  # type: ignore[arg-type]
        await r.advance_to(FIRST_STEP + timedelta(minutes=10) + HALF)
        ch = r.channel(NAME)
        pump = r.model(NAME).status()
        # Retried (or reconciled from a fresh read) and running: a lost RUN is not taken for a running pump.
        assert (ch.state.phase.value, _alarm_codes(r)) == ("titrating", []), (ch.state.phase, ch.state.alarm_code)
        assert pump.state is PumpState.INFUSING
        assert pump.rate_ml_per_h == ch.state.commanded_rate == ch.state.verified_rate == r.rate(100)
        never_above(r, FIRST_STEP - HALF, r.rate(100))
    audit_ok(r)


@NO_DEADLINE
@example(transport="newera-pty", kind="drop", k=9, count=2)  # read-back of RAT lost: RUN never sent -> "paused"
@example(transport="modbus-tcp", kind="garble", k=4, count=1)  # ditto on Modbus
@given(transport=st.sampled_from(WIRE), kind=st.sampled_from(["drop", "garble"]), k=st.integers(0, 13),
       count=st.integers(1, 2))
def test_a_reply_lost_while_starting_is_retried_not_taken_for_running(tmp_path: Path, transport: str, kind: str,
                                                                      k: int, count: int) -> None:
    run(_lost_reply_at_start(Path(tempfile.mkdtemp(dir=tmp_path)), transport, kind, k, count))


# ------------------------------------------------------------------------------------------------ Modbus exceptions


async def _modbus_exceptions(tmp_path: Path, code: int, count: int, minute: int) -> None:
    async with rig("modbus-tcp", tmp_path, timing=WIRE_FAST) as r:
        assert (await r.push(NAME))["ok"] is True
        # Strike around the first step (due 09:00): on a poll's status read or on the step's write/read-back.
        await r.advance_to(FIRST_STEP + timedelta(minutes=minute) + HALF)
        fault_at = r.clock.now()
        before = r.channel(NAME).state.verified_run_rate
        r.endpoints[NAME].exception_next(1, code, count)
        await r.advance_to(RUNNING_AT)
        ch = r.channel(NAME)
        codes = _alarm_codes(r)
        if ch.state.phase.value == "alarm":
            # Refusals that persist past the link timeout: the pump is unreadable, so the link is lost.
            assert codes == ["link_lost"], codes
            assert not ch.link_lost  # the device answers normally again
            _no_escalation(r, datetime.fromisoformat(events(r.records(), "alarm", NAME)[0]["ts"]))
            verified = ch.state.verified_run_rate
            assert verified in (before, r.rate(100))
            await _resume_ok(r, verified)
        else:
            # Transient: the course goes on (a refused step is retried once, then read back).
            assert codes == [] and ch.state.phase.value == "titrating", (codes, ch.state.phase)
            assert ch.state.verified_rate == r.rate(100)
            assert r.model(NAME).status().rate_ml_per_h == r.rate(100)
        never_above(r, fault_at, r.rate(100))
    audit_ok(r)


@NO_DEADLINE
@given(code=st.sampled_from([0x02, 0x03, 0x04, 0x06]), count=st.integers(1, 6), minute=st.integers(-3, 1))
def test_modbus_exception_responses_never_give_an_unsafe_setpoint(tmp_path: Path, code: int, count: int,
                                                                   minute: int) -> None:
    run(_modbus_exceptions(Path(tempfile.mkdtemp(dir=tmp_path)), code, count, minute))


async def _modbus_exceptions_persist(tmp_path: Path) -> None:
    async with rig("modbus-tcp", tmp_path, timing=WIRE_FAST) as r:
        verified = await start_running(r)
        fault_at = r.clock.now()
        r.endpoints[NAME].exception_next(1, 0x04, 1_000_000)
        await until_phase(r, "alarm")
        assert _alarm_codes(r) == ["link_lost"]
        await _refused(r, "resume", "link_down")
        r.endpoints[NAME].exceptions[1].__init__()  # the device answers normally again (queue emptied)
        await r.wait_until(lambda: not r.channel(NAME).link_lost, step=timedelta(minutes=1),
                           limit=r.clock.now() + timedelta(minutes=30))
        _no_escalation(r, fault_at)
        await _resume_ok(r, verified)
        never_above(r, fault_at, verified)
    audit_ok(r)


def test_persistent_modbus_exceptions_end_in_link_lost_then_resume(tmp_path: Path) -> None:
    run(_modbus_exceptions_persist(tmp_path))


# ------------------------------------------------------------------------------------------------ pump alarms


async def _occlusion(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=FAST) as r:
        verified = await start_running(r)
        fault_at = r.clock.now()
        r.model(NAME).inject_alarm(AlarmKind.OCCLUSION)
        await until_phase(r, "alarm", timedelta(minutes=5))
        ch = r.channel(NAME)
        assert ch.state.alarm_code == "pump_alarm:occlusion"
        assert _alarm_codes(r) == ["pump_alarm:occlusion"]
        assert r.model(NAME).status().state is not PumpState.INFUSING
        await _refused(r, "escalate", "illegal_transition")
        await r.advance_to(r.clock.now() + timedelta(minutes=10))
        _no_escalation(r, fault_at)
        # The clinician clears the line: resume acknowledges the pump's alarm and restarts at the verified rate.
        await _resume_ok(r, verified)
        never_above(r, fault_at, verified)
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_occlusion_alarm_then_clinician_resume(tmp_path: Path, transport: str) -> None:
    run(_occlusion(tmp_path, transport))


async def _occlusion_persists(tmp_path: Path) -> None:
    async with rig("modbus-tcp", tmp_path, timing=FAST) as r:
        verified = await start_running(r)
        fault_at = r.clock.now()
        r.model(NAME).inject_alarm(AlarmKind.OCCLUSION)
        await until_phase(r, "alarm", timedelta(minutes=5))
        # The line is still blocked: the pump stalls again as soon as it is acknowledged.
        original = r.model(NAME).clear_alarm

        def still_blocked() -> None:
            original()
            r.model(NAME).inject_alarm(AlarmKind.OCCLUSION)

        r.model(NAME).clear_alarm = still_blocked  # type: ignore[method-assign]
        await _refused(r, "resume", "alarm_active")
        assert r.model(NAME).status().state is not PumpState.INFUSING
        r.model(NAME).clear_alarm = original  # type: ignore[method-assign]
        await _resume_ok(r, verified)
        never_above(r, fault_at, verified)
    audit_ok(r)


def test_resume_refused_while_occlusion_persists(tmp_path: Path) -> None:
    run(_occlusion_persists(tmp_path))


async def _alarm_before_setpoint(tmp_path: Path, transport: str, k: int) -> None:
    async with rig(transport, tmp_path, timing=FAST) as r:
        assert (await r.push(NAME))["ok"] is True
        await r.advance_to(FIRST_STEP - HALF)
        # The occlusion strikes after the k-th reply from now: during the poll that starts the course, between
        # that poll and the start setpoint, or during the setpoint's own requests.
        plan = r.faults(NAME)
        plan.schedule(ScheduledFault(after_requests=plan.replies_seen + k, kind="alarm", alarm=AlarmKind.OCCLUSION))
        await r.advance_to(FIRST_STEP + timedelta(minutes=5) + HALF)
        ch = r.channel(NAME)
        assert (ch.state.phase.value, ch.state.alarm_code) == ("alarm", "pump_alarm:occlusion")
        assert _alarm_codes(r) == ["pump_alarm:occlusion"]
        pump = r.model(NAME).status()
        # Nobody but a clinician acknowledges a pump alarm: the pump is still stopped in alarm.
        assert pump.state is PumpState.ALARM and AlarmKind.OCCLUSION in pump.unacknowledged
        never_above(r, FIRST_STEP - HALF, r.rate(100))
        await _resume_ok(r, ch.state.verified_run_rate)
    audit_ok(r)


@NO_DEADLINE
@example(transport="newera-pty", k=4)  # struck between the poll and the setpoint: was acknowledged by the daemon
@example(transport="modbus-tcp", k=2)  # struck during the poll's status read: ditto
@given(transport=st.sampled_from(WIRE), k=st.integers(0, 15))
def test_a_pump_alarm_just_before_a_setpoint_is_reported_not_acknowledged(tmp_path: Path, transport: str,
                                                                          k: int) -> None:
    run(_alarm_before_setpoint(Path(tempfile.mkdtemp(dir=tmp_path)), transport, k))


async def _end_of_syringe(tmp_path: Path, transport: str) -> None:
    # 0.1 mL at 0.041 mL/h empties about 2.4 h into the first step.
    async with rig(transport, tmp_path, fill_ml=Decimal("0.1"), timing=FAST, control=True) as r:
        verified = await start_running(r)
        fault_at = r.clock.now()
        await until_phase(r, "alarm", timedelta(hours=3))
        pump = r.model(NAME).status()
        assert AlarmKind.END_OF_SYRINGE in pump.alarms and pump.state is not PumpState.INFUSING
        # New Era has no end-of-syringe report: a stalled plunger reads as A?S (occlusion) on the wire.
        expected = "pump_alarm:end_of_syringe" if transport.startswith("modbus") else "pump_alarm:occlusion"
        assert _alarm_codes(r) == [expected]
        if transport.startswith("modbus"):
            await _refused(r, "resume", "alarm_active")  # still empty: the pump still reports it
            assert r.channel(NAME).state.phase.value == "alarm"
        else:
            # The acknowledged stall is invisible on New Era's wire, so the core accepts the resume, but the empty
            # pump refuses to run (?NA): the setpoint is not verified (a stopped pump delivers 0), is retried
            # once, and the course is back in alarm.
            verified_before = verified_setpoints(r.records(), NAME)
            await r.command(NAME, "resume", reason="try")
            ch = r.channel(NAME)
            assert (ch.state.phase.value, ch.state.alarm_code) == ("alarm", "readback_mismatch")
            assert verified_setpoints(r.records(), NAME) == verified_before
            await r.advance_to(r.clock.now() + timedelta(minutes=5))
            assert r.model(NAME).status().state is not PumpState.INFUSING
            assert r.channel(NAME).state.phase.value == "alarm"
        _no_escalation(r, fault_at)
        r.model(NAME).load_syringe(Decimal("20"))  # a new, full syringe
        await r.advance_to(r.clock.now() + timedelta(minutes=2))
        if transport.startswith("modbus"):
            # The pump's end of syringe is ended only by a verified load (review, 2026-12-03): a syringe swapped at
            # the panel is not known to the course. A resume is refused and the pump stays stopped; the change runs.
            await _refused(r, "resume", "syringe_empty")
            assert r.model(NAME).status().state is not PumpState.INFUSING
            assert r.socket is not None
            reply = await request(r.socket, {"op": "change_syringe", "pump_id": NAME, "fill_volume_ml": "17",
                                             "by": "rn-1", "reason": "new syringe"}, timeout_s=BOUND_S)
            assert reply["ok"] is True, reply
            ch = r.channel(NAME)
            assert ch.state.phase.value == "titrating" and ch.state.commanded_rate <= verified
            assert r.model(NAME).status().state is PumpState.INFUSING
        else:
            await _resume_ok(r, verified)
        never_above(r, fault_at, verified)
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_end_of_syringe_alarm(tmp_path: Path, transport: str) -> None:
    run(_end_of_syringe(tmp_path, transport))


async def _power(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=FAST) as r:
        verified = await start_running(r)
        fault_at = r.clock.now()
        r.model(NAME).power_cycle()
        await until_phase(r, "alarm", timedelta(minutes=5))
        assert _alarm_codes(r) == ["pump_alarm:power_interrupted"]
        assert r.model(NAME).status().state is not PumpState.INFUSING
        await r.advance_to(r.clock.now() + timedelta(minutes=10))
        _no_escalation(r, fault_at)
        await _resume_ok(r, verified)
        # The dead-man is armed again after the power cycle: the next polls re-armed it.
        assert r.model(NAME).status().deadman_armed
        never_above(r, fault_at, verified)
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_power_interrupted_alarm(tmp_path: Path, transport: str) -> None:
    run(_power(tmp_path, transport))


async def _silent_daemon(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=FAST) as r:
        verified = await start_running(r)
        fault_at = r.clock.now()
        # The daemon goes silent (stopped, hung, killed) for longer than the pump's dead-man: the pump stops itself.
        await r.restart(silent_for=timedelta(seconds=FAST.deadman_s * 2))
        pump = r.model(NAME).status()
        assert AlarmKind.SAFE_MODE_TIMEOUT in pump.alarms and pump.state is not PumpState.INFUSING
        await until_phase(r, "alarm", timedelta(minutes=5))
        assert r.channel(NAME).state.alarm_code == "pump_alarm:safe_mode_timeout"
        assert "pump_alarm:safe_mode_timeout" in _alarm_codes(r)
        await _refused(r, "escalate", "illegal_transition")
        _no_escalation(r, fault_at)
        await _resume_ok(r, verified)
        never_above(r, fault_at, verified)
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_pump_deadman_fires_when_the_daemon_goes_silent(tmp_path: Path, transport: str) -> None:
    run(_silent_daemon(tmp_path, transport))


async def _warnings(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=SLOW_POLL) as r:
        assert (await r.push(NAME))["ok"] is True
        await r.advance_to(FIRST_STEP + timedelta(hours=1, minutes=1))
        r.model(NAME).set_battery(15)
        r.model(NAME).inject_alarm(AlarmKind.NEAR_END)
        # The course carries on: no alarm, the pump keeps infusing, the next step happens on time.
        await r.advance_to(FIRST_STEP + timedelta(days=1, minutes=16))
        ch = r.channel(NAME)
        assert ch.state.phase.value == "titrating" and ch.state.level_mg_per_24h == 300
        pump = r.model(NAME).status()
        assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == r.rate(300)
        assert {AlarmKind.LOW_BATTERY, AlarmKind.NEAR_END} <= pump.alarms
        records = r.records()
        assert _alarm_codes(r) == []
        notices = {n["code"] for n in events(records, "notice", NAME)}
        if transport.startswith("modbus"):
            assert {"pump_warning:low_battery", "pump_warning:near_end"} <= notices
        else:
            assert not {c for c in notices if c.startswith("pump_warning")}  # not on New Era's wire at all
        assert [rate for _, rate in verified_setpoints(records, NAME)] == [r.rate(100), r.rate(300)]
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_low_battery_and_near_end_are_warnings_that_do_not_stop_the_course(tmp_path: Path, transport: str) -> None:
    run(_warnings(tmp_path, transport))


# ------------------------------------------------------------------------------------------------ escalation + alarm


async def _alarm_over_step(tmp_path: Path, transport: str, offset_min: int) -> None:
    async with rig(transport, tmp_path, timing=SLOW_POLL) as r:
        assert (await r.push(NAME))["ok"] is True
        step_due = FIRST_STEP + timedelta(days=1, minutes=5)  # 24 h after the first step (taken at 09:05)
        strike = step_due + timedelta(minutes=offset_min)
        await r.advance_to(strike)
        verified = r.channel(NAME).state.verified_rate
        assert verified == r.rate(100)
        r.model(NAME).inject_alarm(AlarmKind.OCCLUSION)
        await r.advance_to(step_due + timedelta(hours=3, minutes=1))  # well past the step's due time
        ch = r.channel(NAME)
        assert ch.state.phase.value == "alarm" and ch.state.level_mg_per_24h == 100
        _no_escalation(r, strike)
        await _resume_ok(r, verified)
        resumed_at = r.clock.now()
        # Escalation happens again only after the clinician's resume, through the kernel, on a later poll.
        await r.advance_to(resumed_at + timedelta(minutes=20))
        sent = [s for s in setpoints(r.records(), NAME) if datetime.fromisoformat(s["ts"]) >= strike]
        assert [s["intent"] for s in sent][:1] == ["resume"]
        assert all(datetime.fromisoformat(s["ts"]) >= resumed_at for s in sent if s["intent"] == "escalate")
    audit_ok(r)


@NO_DEADLINE
@given(offset_min=st.integers(-600, -1).filter(lambda m: m % 10 != 0))
def test_no_escalation_while_in_alarm_whenever_the_alarm_strikes(tmp_path: Path, offset_min: int) -> None:
    run(_alarm_over_step(Path(tempfile.mkdtemp(dir=tmp_path)), "modbus-tcp", offset_min))


# ------------------------------------------------------------------------------------------------ taper lock


def _taper_schedule(version: int = 1) -> dict[str, Any]:
    doc = demo_schedule(NAME, 1, START)
    doc.pop("signature")
    doc["schedule_id"] = "taper-course"
    doc["version"] = version
    doc["taper"] = [{"dose_mg_per_24h": "100", "after_hours": "0"}, {"dose_mg_per_24h": "0", "after_hours": "24"}]
    return sign_document(doc, DEMO_KEY)


async def _taper_lock(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=SLOW_POLL) as r:
        assert (await r.push(NAME, _taper_schedule()))["ok"] is True
        await r.advance_to(FIRST_STEP + timedelta(days=1, hours=1, minutes=1))
        assert r.channel(NAME).state.level_mg_per_24h == 300
        taper_at = r.clock.now()
        reply = await r.command(NAME, "taper", reason="patient settled")
        assert reply["ok"] is True and reply["phase"] == "tapering", reply
        ch = r.channel(NAME)
        lock = r.rate(100)
        assert ch.state.taper_lock and ch.state.verified_rate == lock
        await _refused(r, "escalate", "illegal_transition")
        await _refused(r, "reduce", "not_a_reduction", dose="300")
        update = await r.push(NAME, _taper_schedule(version=2))  # a newer, signed version of the same course
        assert update["ok"] is False and [x["reason"] for x in update["refusals"]] == ["taper_lock"], update
        # An alarm while tapering, then a resume asking for more: never above the lock.
        r.model(NAME).inject_alarm(AlarmKind.OCCLUSION)
        await until_phase(r, "alarm", timedelta(hours=1))
        await _refused(r, "escalate", "illegal_transition")
        reply = await r.command(NAME, "resume", reason="line cleared", dose="500")
        assert reply["ok"] is True and reply["phase"] == "tapering", reply
        assert r.channel(NAME).state.commanded_rate <= lock
        await r.advance_to(taper_at + timedelta(hours=25))
        assert r.channel(NAME).state.phase.value == "stopped"
        await _refused(r, "escalate", "illegal_transition")
        await _refused(r, "resume", "illegal_transition")
        again = await r.push(NAME, _taper_schedule())  # the same course cannot restart
        assert again["ok"] is False
        never_above(r, taper_at, lock)
        assert r.model(NAME).status().state is not PumpState.INFUSING
    audit_ok(r)


@pytest.mark.parametrize("transport", WIRE)
def test_taper_lock_refuses_any_raise_at_the_daemon(tmp_path: Path, transport: str) -> None:
    run(_taper_lock(tmp_path, transport))
