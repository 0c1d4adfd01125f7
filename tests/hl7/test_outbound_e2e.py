"""PCD-01/PCD-04 out, end to end: daemon + simulated pumps on a real transport + an MLLP receiver on loopback.

The receiver goes away mid-course and comes back, swallows messages without ACKing them (so the daemon resends
them), and the daemon itself restarts. After all that, every message the daemon queued (its audit log's
`hl7_out` records) arrives: exactly once after the receiver's dedupe on MSH-10, in the order it was queued per
pump, and each alert's raise is paired with its clear by the alert id.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import hl7
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from driverd.hl7.settings import Address, Hl7Settings
from drivers.base import AlarmKind
from tests.hl7.receiver import Receiver, control_id, message_type
from tests.runtime.e2e import BOUND_S, RUNNING_AT, audit_ok, events, rig, run, until_phase

PUMPS = ("bed-1", "bed-2")


def _settings(work: Path, receiver: Receiver) -> Hl7Settings:
    return Hl7Settings(queue_dir=work / "hl7", observations_to=Address("127.0.0.1", receiver.port),
                       observation_period_s=3600, ack_timeout_s=1.0)


def _obx(text: str) -> dict[str, str]:
    """OBX-3 identifier text -> OBX-5 value, for one message."""
    out = {}
    for seg in hl7.parse(text).segments("OBX"):
        out[str(seg[3][0][1]) if len(seg[3][0]) > 1 else str(seg[3])] = str(seg[5])
    return out


async def _drain(r: Any) -> None:
    gw = r.daemon.gateway
    assert gw is not None
    assert await gw.drain(BOUND_S), f"still queued: {len(gw.outbox.pending())}"


def test_every_message_arrives_once_in_order_across_outages_and_a_restart(tmp_path: Path) -> None:
    async def body() -> None:
        receiver = Receiver()
        await receiver.start()
        async with rig("newera-tcp", tmp_path, PUMPS, hl7=_settings(tmp_path, receiver)) as r:
            for p in PUMPS:
                assert (await r.push(p))["ok"] is True
            await r.advance_to(RUNNING_AT)
            # An engine that reads two messages and dies before answering: both are sent again.
            receiver.swallow = 2
            r.model("bed-1").inject_alarm(AlarmKind.OCCLUSION)
            await until_phase(r, "alarm")
            # The engine goes away for a few hours of course time; the daemon queues meanwhile.
            await r.advance_to(RUNNING_AT + timedelta(minutes=30))
            await receiver.stop()
            await r.advance_to(RUNNING_AT + timedelta(hours=3))
            reply = await r.command("bed-1", "resume", reason="line checked")
            assert reply["ok"] is True, reply
            await r.advance_to(RUNNING_AT + timedelta(hours=4))
            assert r.daemon.gateway is not None and len(r.daemon.gateway.outbox.pending()) > 0
            await receiver.start()
            # And the daemon restarts with messages possibly still queued.
            await r.restart(silent_for=timedelta(minutes=2))
            await r.advance_to(RUNNING_AT + timedelta(hours=34))
            await _drain(r)
            records = r.records()
            audit_ok(r)  # the HL7 records sit in the chain and replay is not disturbed by them
        await receiver.stop()

        queued = events(records, "hl7_out")
        assert queued, "the daemon queued nothing"
        assert len(receiver.received) > len(receiver.unique()), "no message was ever resent"
        unique = receiver.unique()
        got = [control_id(t) for t in unique]
        assert sorted(got) == sorted(q["control_id"] for q in queued)  # every one, exactly once after dedupe
        for pump in PUMPS:
            want = [q["control_id"] for q in queued if q["pump_id"] == pump]
            assert [c for c in got if c in set(want)] == want, f"out of order for {pump}"
        # Every resend was byte-identical (same MSH-10, same content).
        first: dict[str, str] = {}
        for t in receiver.received:
            assert first.setdefault(control_id(t), t) == t
        # Alerts: the occlusion was raised and cleared under one alert id, on bed-1 only.
        acm = [t for t in unique if message_type(t).startswith("ORU^R40")]
        assert acm
        # IHE PCD-04: the raise carries the alert id in OBR-3; the clear carries "<id>.end" in OBR-3 and the id of
        # the raise in OBR-29 (parent), which is how a receiver pairs them.
        by_id: dict[str, list[str]] = {}
        for t in acm:
            obr = hl7.parse(t).segment("OBR")
            alert_id = str(obr[3]).split("^")[0]
            if alert_id.endswith(".end"):
                parent = str(obr[29])
                assert alert_id.removesuffix(".end") in parent, (alert_id, parent)
                alert_id = alert_id.removesuffix(".end")
            by_id.setdefault(alert_id, []).append(t)
        occlusion = [ts for ts in by_id.values() if any("occlusion" in t.lower() for t in ts)]
        assert len(occlusion) == 1 and len(occlusion[0]) == 2, by_id.keys()
        for t in unique:  # and everything that arrived is a valid v2.6 message
            parse_message(t, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)

    run(body(), timeout=300)


def test_changes_are_observed_with_the_pump_id_patient_and_rates(tmp_path: Path) -> None:
    async def body() -> None:
        receiver = Receiver()
        await receiver.start()
        async with rig("modbus-tcp", tmp_path, ("bed-1",), hl7=_settings(tmp_path, receiver)) as r:
            assert (await r.push("bed-1"))["ok"] is True
            await r.advance_to(RUNNING_AT)
            await _drain(r)
            rate = r.rate(100)
        await receiver.stop()
        dec = [t for t in receiver.unique() if message_type(t).startswith("ORU^R01")]
        assert dec
        last = hl7.parse(dec[-1])
        assert str(last.segment("PID")[3]).split("^")[0] == "DEMO-PATIENT-0001"
        ids = {str(s[18]).split("^")[0] for s in last.segments("OBX") if len(s) > 18 and str(s[18])}
        assert ids == {"bed-1"}
        text = dec[-1]
        assert str(rate) in text  # the verified rate at 100 mg/24h, exactly as the kernel quantized it

    run(body(), timeout=120)


def test_nothing_is_queued_without_a_receiver_configured(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig("newera-tcp", tmp_path) as r:
            assert (await r.push("bed-1"))["ok"] is True
            await r.advance_to(RUNNING_AT)
            assert r.daemon.gateway is None
            assert not events(r.records(), "hl7_out")
        assert not (tmp_path / "hl7").exists()

    run(body())


async def _settled(coro: Any) -> Any:
    return await asyncio.wait_for(coro, BOUND_S)
