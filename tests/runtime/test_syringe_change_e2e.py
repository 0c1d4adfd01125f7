"""Syringe changes end to end (issue 13): the daemon on the real driver path (New Era on a PTY, Modbus/TCP on
loopback) runs a whole burst course with a syringe change every day, one of them to a new concentration, each
requested over the control socket. What the pump reports delivered (mg, each syringe at its concentration) equals
what was commanded, within the counter's resolution; the log verifies and replays."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.audit.report import build_report, report_lines
from driverd.core.quantities import dose_to_rate, quantize_down
from driverd.runtime.control import ChangeSyringeRequest, RequestError, parse_request, request
from driverd.runtime.demo import DEMO_KEY, START, demo_schedule
from driverd.signing import sign_document
from drivers.base import PumpState
from tests.runtime.e2e import BOUND_S, FIRST_STEP, Rig, Timing, audit_ok, events, resolution_for, rig, run, setpoints

POLL_S = 1200
POLL = timedelta(seconds=POLL_S)
H = timedelta(hours=1)
NAME = "bed-1"
FILL = Decimal(22)


def schedule_doc(first_fill: str = "22") -> dict[str, Any]:
    """The demo course at 50 mg/mL, with replacement syringes approved at 50 and 100 mg/mL."""
    doc = demo_schedule(NAME, 1, START)
    doc.pop("signature")
    doc["drug"] = {"name": "ketamine", "concentration_mg_per_ml": "50"}
    doc["syringe"]["fill_volume_ml"] = first_fill
    doc["syringes"] = [{"fill_volume_ml": "22"}] + [{"fill_volume_ml": "22", "concentration_mg_per_ml": "100"}] * 3
    doc["handover_note"] = "oral ketamine prescribed by the GP from day 7"
    return sign_document(doc, DEMO_KEY)


def rate(dose: int, conc: int, transport: str) -> Decimal:
    return quantize_down(dose_to_rate(Decimal(dose), Decimal(conc)), resolution_for(transport))


async def change(r: Rig, conc: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"op": "change_syringe", "pump_id": NAME, "fill_volume_ml": "22", "by": "rn-1",
                               "reason": "daily syringe change"}
    if conc is not None:
        payload["concentration_mg_per_ml"] = conc
    assert r.socket is not None
    return await request(r.socket, payload, timeout_s=BOUND_S)


async def change_while_running(r: Rig, conc: str | None = None) -> dict[str, Any]:
    """The nurse asks first: the pump is stopped (old syringe in); swaps the syringe; confirms: resumed."""
    first = await change(r, conc)
    assert first["ok"] is True and first["phase"] == "paused", first
    assert r.model(NAME).status().state is PumpState.STOPPED
    r.model(NAME).load_syringe(FILL)
    return await change(r, conc)


def commanded_mg(records: list[dict[str, Any]]) -> Decimal:
    """mg the verified setpoints command over the course: each rate from its verification to the next, at the
    concentration of the syringe in the pump then (the `syringe_changed` notices say when it changed)."""
    sent = {r["setpoint_id"]: Decimal(r["rate_ml_per_h"]) for r in setpoints(records, NAME)}
    marks: list[tuple[datetime, str, Decimal]] = []
    for rec in records:
        if rec.get("pump_id") != NAME:
            continue
        if rec["event"] == "setpoint_result" and rec.get("readback_ml_per_h") is not None \
                and sent.get(rec["setpoint_id"]) == Decimal(rec["readback_ml_per_h"]):
            marks.append((datetime.fromisoformat(rec["at"]), "rate", Decimal(rec["readback_ml_per_h"])))
        if rec["event"] == "clinician_command" and rec["action"] == "change_syringe" \
                and rec.get("concentration_mg_per_ml") is not None:
            marks.append((datetime.fromisoformat(rec["at"]), "conc_next", Decimal(rec["concentration_mg_per_ml"])))
        if rec["event"] == "syringe_loaded":
            marks.append((datetime.fromisoformat(rec["at"]), "loaded", Decimal(0)))
    total = Decimal(0)
    conc, next_conc = Decimal(50), Decimal(50)
    current, since = Decimal(0), None
    for at, kind, value in marks:
        if since is not None:
            total += current * conc * Decimal((at - since) // timedelta(microseconds=1)) / Decimal(3_600_000_000)
        since = at
        if kind == "rate":
            current = value
        elif kind == "conc_next":
            next_conc = value
        else:
            conc = next_conc
    return total


async def _course(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=Timing(POLL_S, 0, 3 * POLL_S, 1.0), control=True,
                   fill_ml=FILL) as r:
        reply = await r.push(NAME, schedule_doc())
        assert reply["ok"] is True, reply
        ch = r.channel(NAME)
        # day 1, titrating at 100 mg/24h: a change while the pump runs (two steps: stop, then confirm the swap)
        await r.advance_to(FIRST_STEP + 20 * H)
        assert ch.state.phase.value == "titrating"
        second = await change_while_running(r)
        assert second["ok"] is True and second["phase"] == "titrating", second
        assert r.model(NAME).status().rate_ml_per_h == rate(100, 50, transport)
        # day 2, at 300 mg/24h: the nurse stops at the pump, loads a 100 mg/mL syringe, one command
        await r.advance_to(FIRST_STEP + 44 * H)
        r.model(NAME).stop()
        r.model(NAME).load_syringe(FILL)
        reply = await change(r, "100")
        assert reply["ok"] is True and reply["phase"] == "titrating", str(reply)
        assert r.model(NAME).status().rate_ml_per_h == rate(300, 100, transport)  # 0.125: recomputed, down
        assert reply["syringe"]["concentration_mg_per_ml"] == "100"
        # the 500 mg/24h step still comes 24 h after the 300 one: the change did not restart the interval
        await r.advance_to(FIRST_STEP + 48 * H + 2 * POLL)
        assert ch.state.level_mg_per_24h == 500
        assert r.model(NAME).status().rate_ml_per_h == rate(500, 100, transport)
        for day in (3, 4):  # holding: daily changes at 100 mg/mL
            await r.advance_to(FIRST_STEP + (24 * day - 4) * H)
            reply = await change_while_running(r, "100")
            assert reply["ok"] is True and reply["phase"] == "holding", str(reply)
        status = (await r.status())[NAME]
        assert status["syringe_changes"] == 4 and status["syringe"]["number"] == 5
        await r.wait_until(lambda: ch.state.phase.value == "stopped", step=H, limit=FIRST_STEP + 7 * 24 * H)
        await r.advance_to(r.clock.now() + POLL)  # the handover record follows the stopped pump's next report
        records = r.records()
        summary = events(records, "course_summary", NAME)
        assert len(summary) == 1 and summary[0]["syringes"] == 5 and summary[0]["alarms"] == []
        assert summary[0]["handover_note"] == "oral ketamine prescribed by the GP from day 7"
        assert Decimal(summary[0]["delivered_mg"]) == ch.state.delivered_mg
        lines = report_lines(build_report(records))
        assert any(line.startswith("  handover @") and "5 syringe(s); alarms: none" in line for line in lines), lines
        assert "  handover note: oral ketamine prescribed by the GP from day 7" in lines
        assert not events(records, "alarm", NAME)
        assert [n["code"] for n in events(records, "notice", NAME)].count("syringe_changed") == 4
        # never more drug than the approved top dose, whatever the concentration
        for at, wire_rate in r.model(NAME).rate_history():
            conc = Decimal(100) if at >= FIRST_STEP + 44 * H else Decimal(50)
            assert wire_rate * 24 * conc <= 500
        # what the pump reported delivered (mg) equals what was commanded, within the counter's resolution: its
        # display step (0.01 mL here) read at both ends, at the highest concentration (measured: New Era 0.65 mg,
        # Modbus 0.05 mg under the 1897.2 mg commanded)
        reported = ch.state.delivered_mg
        expected = commanded_mg(records)
        slack = 2 * Decimal("0.01") * 100
        assert abs(reported - expected) <= slack, (reported, expected)
        assert reported > 1500  # 100 + 300 + 3 x 500 mg, less rounding toward less drug
        audit_ok(r)


@pytest.mark.parametrize("transport", ["newera-pty", "modbus-tcp"])
def test_full_course_with_daily_syringe_changes(tmp_path: Path, transport: str) -> None:
    run(_course(tmp_path, transport), timeout=300)


async def _empty(tmp_path: Path) -> None:
    """The syringe runs empty: an alarm; after the swap a change acknowledges it and the course resumes."""
    async with rig("newera-pty", tmp_path, timing=Timing(600, 0, 1800, 1.0), control=True,
                   fill_ml=Decimal(1)) as r:
        assert (await r.push(NAME, schedule_doc("1")))["ok"] is True
        ch = r.channel(NAME)
        # 1 mL at 0.083 mL/h lasts about 12 h: status predicts it, and warns an hour before (logged as a notice)
        await r.advance_to(FIRST_STEP + 10 * H + timedelta(minutes=1))
        syringe = (await r.status())[NAME]["syringe"]
        empty_at = datetime.fromisoformat(syringe["predicted_empty_at"])
        assert FIRST_STEP + 11 * H < empty_at < FIRST_STEP + 13 * H and syringe["near_empty_warning"] is False
        await r.advance_to(empty_at - 30 * timedelta(minutes=1) + timedelta(seconds=7))
        assert (await r.status())[NAME]["syringe"]["near_empty_warning"] is True
        assert [n["code"] for n in events(r.records(), "notice", NAME)].count("syringe_near_empty") == 1
        await r.wait_until(lambda: ch.state.phase.value == "alarm", step=H, limit=FIRST_STEP + 20 * H)
        # a New Era pump reports a motor stall; the read-backs say the syringe is used up: that is the cause
        assert ch.state.alarm_causes == ("syringe_empty",), ch.state.alarm_causes
        refused = await r.command(NAME, "resume", reason="try")  # a resume cannot fix an empty syringe
        assert [x["reason"] for x in refused["refusals"]] == ["syringe_empty"], refused
        model = r.model(NAME)
        model.clear_alarm()
        model.load_syringe(FILL)
        reply = await change(r)
        assert reply["ok"] is True and reply["phase"] == "titrating", str(reply)
        assert model.status().state is PumpState.INFUSING and model.status().rate_ml_per_h == Decimal("0.083")
        audit_ok(r)


def test_end_of_syringe_alarm_then_change(tmp_path: Path) -> None:
    run(_empty(tmp_path))


def test_control_request_shape() -> None:
    req = parse_request(b'{"op":"change_syringe","pump_id":"bed-1","fill_volume_ml":"17","by":"rn","reason":"x"}')
    assert isinstance(req, ChangeSyringeRequest) and req.fill_volume_ml == 17 and req.concentration_mg_per_ml is None
    for bad, field in ((b'{"op":"change_syringe","pump_id":"bed-1","by":"rn","reason":"x"}', "fill_volume_ml"),
                       (b'{"op":"change_syringe","pump_id":"bed-1","fill_volume_ml":true,"by":"rn","reason":"x"}',
                        "fill_volume_ml"),
                       (b'{"op":"change_syringe","pump_id":"bed-1","fill_volume_ml":"17","by":"rn","reason":"x",'
                        b'"dose_mg_per_24h":"1"}', "dose_mg_per_24h"),
                       (b'{"op":"change_syringe","pump_id":"bed-1","fill_volume_ml":"17","by":"","reason":"x"}',
                        "by")):
        with pytest.raises(RequestError) as info:
            parse_request(bad)
        assert info.value.field == field


@pytest.mark.parametrize("transport", ["newera-pty", "modbus-tcp"])
def test_a_resume_after_a_refused_load_of_a_stronger_syringe_runs_nothing(tmp_path: Path, transport: str) -> None:
    """Review finding (2026-12-03), over the real driver path: the nurse puts in an approved 100 mg/mL syringe, the
    pump ignores the counter clear at the load (counter_not_cleared, the load refused), and a clinician resumes
    "on the syringe in the pump". That used to run the 50 mg/mL rate from the 100 mg/mL syringe (600, then 998
    mg/24h). Now the resume is refused (`syringe_change_waiting`) with the alarm acknowledged, the course waits
    paused and the pump stays STOPPED through the hours that follow, whatever the schedule says; the load retried
    once the pump clears resumes at the 100 mg/mL rate."""
    async def body() -> None:
        async with rig(transport, tmp_path, timing=Timing(POLL_S, 0, 3 * POLL_S, 1.0), control=True,
                       fill_ml=FILL) as r:
            assert (await r.push(NAME, schedule_doc()))["ok"] is True
            ch, model = r.channel(NAME), r.model(NAME)
            await r.advance_to(FIRST_STEP + 44 * H)
            assert ch.state.level_mg_per_24h == 300 and ch.state.phase.value == "titrating"
            assert (await change(r, "100"))["phase"] == "paused"
            model.load_syringe(FILL)  # the 100 mg/mL syringe goes in
            model.clear_delivered = lambda: None  # type: ignore[method-assign]  # firmware ignores the clear
            reply = await change(r, "100")
            assert reply["ok"] is False and reply["phase"] == "alarm", reply
            assert r.socket is not None
            reply = await request(r.socket, {"op": "command", "pump_id": NAME, "action": "resume", "by": "dr-a",
                                             "reason": "resume on the syringe in the pump"}, timeout_s=BOUND_S)
            assert reply["ok"] is False and reply["phase"] == "paused", reply
            assert [x["reason"] for x in reply["refusals"]] == ["syringe_change_waiting"], reply
            since = r.clock.now()
            await r.advance_to(FIRST_STEP + 52 * H)  # the 500 step would have been due at +48 h
            assert model.status().state is PumpState.STOPPED and ch.state.phase.value == "paused"
            assert all(x[1] == 0 for x in model.rate_history() if x[0] >= since)  # nothing ran meanwhile
            del model.clear_delivered
            reply = await change(r, "100")
            assert reply["ok"] is True and reply["phase"] == "titrating", reply
            running = model.status()
            assert running.state is PumpState.INFUSING and ch.state.concentration == 100
            assert running.rate_ml_per_h == rate(300, 100, transport)  # 300 mg/24h from the 100 mg/mL syringe
            audit_ok(r)

    run(body(), timeout=300)
