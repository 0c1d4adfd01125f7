"""PCD-03 orders in, end to end: an order programmer on loopback MLLP, the daemon, a simulated pump on New Era TCP.

Each test checks the wire and the pump after the reply, not only the reply: an accepted order ran at the pump at
the kernel's rate; a refused one left the pump exactly as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import hl7
from hl7.mllp import open_hl7_connection
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from driverd.hl7.settings import Address, Hl7Settings
from driverd.runtime.demo import DEMO_KEY, START, demo_schedule
from driverd.signing import sign_document
from drivers.base import AlarmKind, PumpState
from tests.hl7.order_text import rgv_o15
from tests.hl7.receiver import free_port
from tests.runtime.e2e import (
    BOUND_S,
    FIRST_STEP,
    HALF_POLL,
    RUNNING_AT,
    Rig,
    audit_ok,
    events,
    rig,
    run,
    until_phase,
)

DAY2 = FIRST_STEP + timedelta(days=1, hours=1) + HALF_POLL  # step 2 (300 mg/24h) is due, not yet given


def _manual_schedule() -> dict[str, Any]:
    """The demo course with steps 2 and 3 waiting for a clinician (here: an order) instead of escalating alone,
    and a two-step taper (50 mg/24h for a day, then stop) so the taper lock can be seen while the pump runs."""
    doc = demo_schedule("bed-1", 1, START)
    doc.pop("signature")
    for step in doc["steps"][1:]:
        step["auto"] = False
    doc["taper"] = [{"dose_mg_per_24h": "50", "after_hours": "0"}, {"dose_mg_per_24h": "0", "after_hours": "24"}]
    return sign_document(doc, DEMO_KEY)


async def exchange(port: int, text: str, replies: int = 2) -> list[str]:
    reader, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    try:
        writer.writeblock(text.encode("utf-8"))
        await writer.drain()
        return [(await asyncio.wait_for(reader.readblock(), BOUND_S)).decode("utf-8") for _ in range(replies)]
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def msa(text: str) -> tuple[str, str]:
    seg = hl7.parse(text).segment("MSA")
    return str(seg[1]), str(seg[2])


def err_code(text: str) -> str:
    """ERR-5 (application error code) identifier."""
    return str(hl7.parse(text).segment("ERR")[5][0][0])


def with_order_port(test: Callable[[Rig, int], Awaitable[None]], tmp_path: Path, *, manual: bool = True) -> None:
    async def body() -> None:
        port = free_port()
        settings = Hl7Settings(queue_dir=tmp_path / "hl7", orders_listen=Address("127.0.0.1", port))
        async with rig("newera-tcp", tmp_path, hl7=settings) as r:
            assert (await r.push("bed-1", _manual_schedule() if manual else None))["ok"] is True
            await r.advance_to(RUNNING_AT)
            await test(r, port)

    run(body(), timeout=180)


def delivering(r: Rig) -> Decimal:
    """What the simulated pump is pumping now (its programmed rate only counts while it infuses)."""
    st = r.model("bed-1").status()
    return st.rate_ml_per_h if st.state is PumpState.INFUSING else Decimal(0)


def assert_valid(text: str) -> None:
    parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)


# ---------------------------------------------------------------------------------------------- accepted


def test_an_order_is_acknowledged_then_programmed_and_verified(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2)
        ack, reply = await exchange(port, rgv_o15("ORD1", rate="300"))
        assert msa(ack) == ("CA", "ORD1") and "ACK" in str(hl7.parse(ack).segment("MSH")[9])
        assert msa(reply) == ("AA", "ORD1"), reply
        assert str(hl7.parse(reply).segment("MSH")[9]).startswith("RRG^O16")
        for text in (ack, reply):
            assert_valid(text)
        # The pump runs the kernel's rate for 300 mg/24h, verified.
        assert r.wire_rates("bed-1")[-1] == r.rate(300)
        assert r.model("bed-1").status().state is PumpState.INFUSING
        assert r.channel("bed-1").state.verified_rate == r.rate(300)
        cmds = events(r.records(), "clinician_command", "bed-1")
        assert cmds[-1]["by"] == "dr-hl7" and "ORD1" in cmds[-1]["reason"]
        rec = events(r.records(), "hl7_in")[-1]
        assert rec["control_id"] == "ORD1" and rec["outcome"] == "AA" and rec["pump_id"] == "bed-1"
        assert rec["by"] == "dr-hl7" and rec["order_control"] == "XO" and rec["sender"] == "EMR^WARD"
        audit_ok(r)

    with_order_port(t, tmp_path)


def test_an_order_in_ml_per_h_maps_to_the_step_the_kernel_runs_at_that_rate(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2)
        rate = r.rate(300)  # what the ward system sees as the step's rate on the pump
        _, reply = await exchange(port, rgv_o15("ORD2", rate=str(rate), rate_units="mL/h^mL/h^UCUM"))
        assert msa(reply)[0] == "AA", reply
        assert r.wire_rates("bed-1")[-1] == rate
        assert r.channel("bed-1").state.level_mg_per_24h == Decimal(300)

    with_order_port(t, tmp_path)


def test_discontinue_stops_the_pump(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        _, reply = await exchange(port, rgv_o15("D1", order_control="DC", rate=None))
        assert msa(reply)[0] == "AA", reply
        assert r.channel("bed-1").state.phase.value == "stopped"
        assert delivering(r) == 0 and r.model("bed-1").status().state is not PumpState.INFUSING

    with_order_port(t, tmp_path)


def test_hold_and_release_orders_are_refused_and_change_nothing(tmp_path: Path) -> None:
    """HL7 HD suspends an order, driverd's hold keeps infusing: never answered "done" while the pump runs on.
    RL would resume a pump (acknowledging its alarm) from afar: a clinician at the bedside does that."""
    async def t(r: Rig, port: int) -> None:
        before = r.wire_rates("bed-1")
        _, reply = await exchange(port, rgv_o15("H1", order_control="HD", rate=None))
        assert msa(reply)[0] == "AE" and err_code(reply) == "unsupported", reply
        assert r.channel("bed-1").state.phase.value == "titrating" and r.wire_rates("bed-1") == before
        r.model("bed-1").inject_alarm(AlarmKind.OCCLUSION)
        await until_phase(r, "alarm")
        _, reply = await exchange(port, rgv_o15("R1", order_control="RL", rate=None))
        assert msa(reply)[0] == "AE" and err_code(reply) == "unsupported", reply
        assert r.channel("bed-1").state.phase.value == "alarm" and delivering(r) == 0
        assert AlarmKind.OCCLUSION in r.model("bed-1").status().alarms  # not acknowledged from afar

    with_order_port(t, tmp_path)


# ---------------------------------------------------------------------------------------------- refused (AE)


def _unchanged(r: Rig, before: list[Decimal], rate: Decimal) -> None:
    assert r.wire_rates("bed-1") == before, "a refused order reached the pump"
    assert delivering(r) == rate


def test_kernel_refusals_answer_ae_with_the_code_and_leave_the_pump_alone(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        before, rate = r.wire_rates("bed-1"), r.rate(100)
        cases = [
            ("E1", {"rate": "300"}, "not_before"),  # day 1: step 2 is not due
            ("E2", {"rate": "500"}, "not_next_step"),  # skipping a step
            ("E3", {"drug": "morphine^Morphine^99DRUG"}, "drug_mismatch"),
            ("E4", {"strength": "50"}, "concentration_mismatch"),
            ("E5", {"patient": "SOMEONE-ELSE"}, "patient_mismatch"),
            ("E6", {"rate": "100"}, "no_change"),
        ]
        for cid, kw, code in cases:
            _, reply = await exchange(port, rgv_o15(cid, **kw))
            assert msa(reply) == ("AE", cid), (cid, reply)
            assert err_code(reply) == code, (cid, reply)
            assert_valid(reply)
            _unchanged(r, before, rate)
        outcomes = {rec["control_id"]: (rec["outcome"], rec["code"]) for rec in events(r.records(), "hl7_in")}
        assert all(outcomes[cid] == ("AE", code) for cid, _, code in cases), outcomes

    with_order_port(t, tmp_path)


def test_orders_for_a_pump_in_alarm_are_refused_and_it_stays_stopped(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2)
        r.model("bed-1").inject_alarm(AlarmKind.OCCLUSION)
        await until_phase(r, "alarm")
        before = r.wire_rates("bed-1")
        _, reply = await exchange(port, rgv_o15("A1", rate="300"))
        # The course state machine refuses before the kernel is asked: no escalation from the alarm phase.
        assert msa(reply)[0] == "AE" and err_code(reply) in ("alarm", "illegal_transition"), reply
        assert r.wire_rates("bed-1") == before
        assert delivering(r) == 0

    with_order_port(t, tmp_path)


def test_orders_during_taper_lock_cannot_raise_the_rate(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2)
        assert (await r.command("bed-1", "taper", reason="stopping early"))["phase"] == "tapering"
        before = r.wire_rates("bed-1")
        ceiling = r.channel("bed-1").state.lock_ceiling_rate
        _, reply = await exchange(port, rgv_o15("T1", rate="300"))
        assert msa(reply)[0] == "AE", reply
        assert err_code(reply) in ("taper_lock", "illegal_transition"), reply
        assert r.wire_rates("bed-1") == before
        assert ceiling is not None and delivering(r) <= ceiling

    with_order_port(t, tmp_path)


# ---------------------------------------------------------------------------------------------- rejected (AR)


def test_not_a_valid_order_or_an_unknown_pump_is_ar_and_changes_nothing(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        before = r.wire_rates("bed-1")
        no_rxg = "\r".join(s for s in rgv_o15("R1").split("\r") if not s.startswith("RXG"))
        wrong_type = rgv_o15("R2").replace("RGV^O15^RGV_O15", "ORU^R01^ORU_R01")
        for cid, text in (("R1", no_rxg), ("R2", wrong_type), ("R3", rgv_o15("R3", pump_id="bed-99"))):
            _, reply = await exchange(port, text)
            assert msa(reply) == ("AR", cid), (cid, reply)
            assert_valid(reply)
        assert r.wire_rates("bed-1") == before
        assert not events(r.records(), "clinician_command")

    with_order_port(t, tmp_path)


def test_repeated_rates_and_megagram_units_are_ar_and_the_pump_keeps_its_rate(tmp_path: Path) -> None:
    """Review 2026-12-03 item 2, over MLLP: step 2 (300 mg/24h) is due, so an order read as 300 mg/24h would raise
    the rate. `300~2.083` in `mg/(24.h)~mL/h` and `300 Mg/d` (megagram/day in UCUM) are refused (AR) naming the
    field; the pump keeps infusing at the step-1 rate; then a plain 300 mg/d order escalates as usual."""
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2)
        before = r.wire_rates("bed-1")
        running = delivering(r)
        cases = (
            ("AMB1", rgv_o15("AMB1", rate="300~2.083", rate_units="mg/(24.h)^mg/(24.h)^UCUM~mL/h^mL/h^UCUM"),
             "RXG-16", "ambiguous"),
            ("AMB2", rgv_o15("AMB2", rate="300~300"), "RXG-15", "ambiguous"),
            ("MEGA", rgv_o15("MEGA", rate="300", rate_units="Mg/d^Mg/d^UCUM"), "RXG-16", "unit"),
        )
        for cid, text, field, rule in cases:
            _, reply = await exchange(port, text)
            assert msa(reply) == ("AR", cid), (cid, reply)
            assert err_code(reply) == rule and field in reply, reply
            assert_valid(reply)
        assert r.wire_rates("bed-1") == before and delivering(r) == running > 0
        assert not events(r.records(), "clinician_command")
        _, reply = await exchange(port, rgv_o15("OK1", rate="300", rate_units="mg/d^mg/d^UCUM"))
        assert msa(reply)[0] == "AA", reply
        assert r.wire_rates("bed-1")[-1] == r.rate(300) > running

    with_order_port(t, tmp_path)


# ---------------------------------------------------------------------------------------------- idempotency


def test_a_repeated_order_gets_the_original_replies_and_is_applied_once(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2)
        text = rgv_o15("DUP1", rate="300")
        first = await exchange(port, text)
        again = await exchange(port, text)
        assert first == again and msa(first[1])[0] == "AA"
        assert len(events(r.records(), "clinician_command", "bed-1")) == 1
        # The same MSH-10 on a different message is not a resend: refused, nothing applied.
        (other,) = await exchange(port, rgv_o15("DUP1", rate="500"), replies=1)
        assert msa(other)[0] == "AR" and err_code(other) == "duplicate_control_id"
        assert len(events(r.records(), "clinician_command", "bed-1")) == 1
        # And across a restart of the daemon, the original replies still come back.
        await r.restart(silent_for=timedelta(seconds=10))
        assert await exchange(port, text) == first
        assert len(events(r.records(), "clinician_command", "bed-1")) == 1

    with_order_port(t, tmp_path)


def test_an_order_received_before_a_crash_is_never_applied_again(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2)
        text = rgv_o15("CRASH1", rate="300")
        # What the order log holds when the daemon died between receiving this order and answering it.
        gw = r.daemon.gateway
        assert gw is not None and gw.orderlog is not None
        gw.orderlog.begin("CRASH1", hashlib.sha256(text.encode()).hexdigest())
        await r.restart(silent_for=timedelta(seconds=10))
        before = r.wire_rates("bed-1")
        replies = await exchange(port, text, replies=1)
        assert msa(replies[0]) == ("AE", "CRASH1") and err_code(replies[0]) == "outcome_unknown"
        assert r.wire_rates("bed-1") == before

    with_order_port(t, tmp_path)


def test_the_same_order_on_two_connections_at_once_is_applied_once_and_both_get_its_replies(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2)
        text = rgv_o15("TWICE", rate="300")
        first, second = await asyncio.gather(exchange(port, text), exchange(port, text))
        assert first == second and msa(first[1]) == ("AA", "TWICE"), (first, second)
        assert len(events(r.records(), "clinician_command", "bed-1")) == 1
        assert r.wire_rates("bed-1")[-1] == r.rate(300)

    with_order_port(t, tmp_path)


def test_a_sender_that_drops_the_connection_gets_the_outcome_on_its_resend(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2)
        text = rgv_o15("DROP1", rate="300")
        _, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8")
        writer.writeblock(text.encode("utf-8"))
        await writer.drain()
        writer.transport.abort()  # gone before any reply
        gw = r.daemon.gateway
        assert gw is not None
        for _ in range(500):  # the order is still settled (bounded wait, not a timing assertion)
            prior = gw.orderlog.get("DROP1") if gw.orderlog else None
            if prior is not None and prior.finished:
                break
            await asyncio.sleep(0.01)
        _, reply = await exchange(port, text)  # the engine's resend
        assert msa(reply) == ("AA", "DROP1"), reply
        assert len(events(r.records(), "clinician_command", "bed-1")) == 1
        assert r.wire_rates("bed-1")[-1] == r.rate(300)

    with_order_port(t, tmp_path)


# ---------------------------------------------------------------------------------------------- hostile input


def test_hostile_senders_never_stop_the_pumps_or_the_listener(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        polls = r.channel("bed-1").polls
        writers = []
        # Garbage, a 10 MB frame, an unterminated frame, and a crowd of idle connections.
        for payload in (b"garbage\r\n" * 100, b"\x0b" + b"A" * (10 * 1024 * 1024) + b"\x1c\r", b"\x0bMSH|^~\\&|"):
            with contextlib.suppress(ConnectionError):
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(payload)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                writers.append(writer)
        for _ in range(100):
            with contextlib.suppress(ConnectionError, OSError):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                writers.append(w)
        await r.advance_to(r.clock.now() + timedelta(hours=1))
        assert r.channel("bed-1").polls > polls + 50  # every poll of that hour happened
        for w in writers:
            w.close()
        await asyncio.sleep(0)
        await r.advance_to(DAY2)
        _, reply = await exchange(port, rgv_o15("AFTER", rate="300"))
        assert msa(reply)[0] == "AA", reply

    with_order_port(t, tmp_path)


def test_an_order_inside_the_step_interval_is_refused(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        await r.advance_to(DAY2 + timedelta(hours=4))  # step 2 given 5 h after it fell due
        _, reply = await exchange(port, rgv_o15("I1", rate="300"))
        assert msa(reply)[0] == "AA", reply
        # Step 3 falls due a day after step 2 was *due*, but the interval runs from when it was *given*.
        await r.advance_to(FIRST_STEP + timedelta(days=2, hours=1) + HALF_POLL)
        before = r.wire_rates("bed-1")
        _, reply = await exchange(port, rgv_o15("I2", rate="500"))
        assert msa(reply)[0] == "AE" and err_code(reply) == "interval", reply
        assert r.wire_rates("bed-1") == before and delivering(r) == r.rate(300)

    with_order_port(t, tmp_path)


def test_an_order_after_a_clock_step_cannot_escalate(tmp_path: Path) -> None:
    async def t(r: Rig, port: int) -> None:
        r.clock.step_wall(timedelta(hours=3))
        await r.advance_to(DAY2)
        before = r.wire_rates("bed-1")
        _, reply = await exchange(port, rgv_o15("C1", rate="300"))
        assert msa(reply)[0] == "AE" and err_code(reply) == "clock_step", reply
        assert r.wire_rates("bed-1") == before and delivering(r) == r.rate(100)
        # A reduction is always allowed, clock fault or not.
        _, reply = await exchange(port, rgv_o15("C2", rate="50"))
        assert msa(reply)[0] == "AA", reply
        assert delivering(r) == r.rate(50)

    with_order_port(t, tmp_path)
