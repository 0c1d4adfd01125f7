"""A transport reopened within the link timeout is a new connection: the pump is checked again (SUP-19), on the real
driver path (New Era on a PTY, Modbus/TCP on loopback) against the simulated pump.

Before, only a lost link (`link_lost`) or a daemon start led to the range check at the pump's next answer: a serial
port or TCP connection that dropped and came back before the link timeout was taken up as if nothing had happened,
although the device answering may be another pump (a cable moved, a USB-serial adapter renumbered, a gateway routing
to another unit) or the same pump set to another syringe at its panel. Now the first answered poll on any new
connection carries the bore read back and the driver's range for it (`link_restored`), and no rate but a stop goes to
the pump on a connection it has not been checked on: a setpoint read back across a reopen is uncertain until the check
and the next report reconcile it (write-ahead).

New Era: the pump's URL names a symlink to its PTY (as /dev/serial/by-id does); `Rig.replug` hangs the PTY up and
points the link at a new one. Modbus/TCP: the gateway closes the connection at its next reply and takes the next.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.cli.main import app
from driverd.runtime.demo import DEMO_TRUST
from drivers.base import PumpState
from tests.runtime.e2e import PUMP, Rig, audit_ok, events, rig, run, start_running
from tests.runtime.test_reconnect_range import TIMING, TINY, alarm_codes, no_rate_since

TRANSPORTS = ["newera-pty", "modbus-tcp"]


def reconfigure_at_panel(r: Rig) -> None:
    """At the pump's panel: stopped, set to another syringe's bore (one the course cannot run on), and RUN again."""
    model = r.model(PUMP)
    model.stop()
    model.set_diameter(TINY)
    model.run()
    assert model.status().state is PumpState.INFUSING


async def reopen(r: Rig, *, reconfigure: bool = False) -> datetime:
    """The pump's transport drops at the next poll and is reopened at the one after, well within the link timeout
    (no `link_lost`); with `reconfigure`, the pump is reconfigured at its panel meanwhile. Returns when it answers on
    the new connection."""
    ch = r.channel(PUMP)
    opens = ch.driver.transport_opens
    if r.transport == "newera-pty":
        await r.replug(PUMP)
    else:
        r.faults(PUMP).disconnect_next()
    await r.advance_to(r.clock.now() + r.poll)
    assert not ch.connected and not ch.link_lost  # the port failed; the link is not lost
    if reconfigure:
        reconfigure_at_panel(r)
    await r.advance_to(r.clock.now() + r.poll)
    assert ch.connected and ch.driver.transport_opens > opens  # a new connection answers
    return r.clock.now()


def notices(r: Rig, code: str) -> list[dict[str, Any]]:
    return [n for n in events(r.records(), "notice", PUMP) if n["code"] == code]


def log_checks(r: Rig) -> None:
    """The log verifies and replays with no divergence (`audit_ok`), and `audit verify --full` passes."""
    audit_ok(r)
    r.records()  # group-committed records onto disk first
    out = CliRunner().invoke(app, ["audit", "verify", str(r.audit_dir), "--full", "--trust", str(DEMO_TRUST),
                                   "--key", str(r.audit_pub), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["full"]["ok"] is True


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_transport_reopened_within_the_link_timeout_checks_the_pump_again(tmp_path: Path, transport: str) -> None:
    async def body() -> None:
        async with rig(transport, tmp_path, timing=TIMING, serial_links=transport == "newera-pty") as r:
            rate = await start_running(r)
            model, ch = r.model(PUMP), r.channel(PUMP)
            url = r.config.pumps[0].url if r.config else ""

            # The same pump, nothing changed: checked on the new connection, and the course goes on.
            await reopen(r)
            [restored] = events(r.records(), "link_restored", PUMP)
            assert restored["diameter_mm"] == "21.59" and restored["pump_range"]["url"] == url, restored
            [note] = notices(r, "link_restored")
            assert note["detail"] == "pump answers on a new connection", note
            assert len(notices(r, "pump_range_checked")) == 2  # at priming, and now
            await r.advance_to(r.clock.now() + 3 * r.poll)
            assert alarm_codes(r) == [] and ch.state.phase.value == "titrating" and ch.state.pending is None
            assert model.status().state is PumpState.INFUSING and model.status().rate_ml_per_h == rate

            # Reconfigured at the panel while the transport was down: alarm at the first answer, pump stopped.
            back = await reopen(r, reconfigure=True)
            restored = events(r.records(), "link_restored", PUMP)[-1]
            assert Decimal(restored["diameter_mm"]) == TINY, restored
            codes = alarm_codes(r)
            assert codes[0] == "pump_range" and "link_lost" not in codes, codes
            [refusal] = [x for x in events(r.records(), "refused", PUMP) if x["reason"] == "pump_range"]
            assert f"({restored['diameter_mm']} mm)" in refusal["detail"] and url in refusal["detail"], refusal
            await r.advance_to(r.clock.now() + r.poll)
            assert ch.state.phase.value == "alarm" and "pump_range" in ch.state.alarm_causes
            no_rate_since(r, back)
            assert "reconnect: pump_range: " in (await r.status())[PUMP]["last_error"]
            reply = await r.command(PUMP, "resume", reason="port back")
            assert reply["ok"] is False and [x["reason"] for x in reply["refusals"]] == ["syringe_mismatch"], reply
            assert set(ch.state.alarm_causes) == {"pump_range", "syringe_mismatch"}  # the bore and the range stand
            await r.advance_to(r.clock.now() + 2 * r.poll)
            no_rate_since(r, back)
            log_checks(r)  # replay recomputes both checks from the logged ranges, with no divergence

    run(body())


@pytest.mark.parametrize("reconfigured", [False, True], ids=["same-pump", "reconfigured"])
def test_a_setpoint_across_a_port_the_driver_reopened_waits_for_the_check(tmp_path: Path, reconfigured: bool) -> None:
    """The New Era transport reopens its port by itself at the next request after an I/O error, behind the channel's
    back. A reduce sent as the line is replugged: its exchange fails on the old PTY, and the driver reads the pump
    again on the new one. That read-back (the old rate) does not reconcile the setpoint and nothing is sent again on
    the unchecked port: the next poll checks the pump first, and only then is the reduce sent again (same pump) or
    the pump stopped (reconfigured)."""
    async def body() -> None:
        async with rig("newera-pty", tmp_path, timing=TIMING, serial_links=True) as r:
            rate = await start_running(r)
            model, ch = r.model(PUMP), r.channel(PUMP)
            opens = ch.driver.transport_opens
            await r.replug(PUMP)
            if reconfigured:
                reconfigure_at_panel(r)
            sent_before = len(model.rate_history())
            reply = await r.command(PUMP, "reduce", reason="drowsy", dose="50")
            assert ch.connected and ch.driver.transport_opens > opens  # reopened by the driver, not the channel
            assert reply["ok"] is False and reply["unverified_setpoint"] is not None, reply
            [sp] = [s for s in events(r.records(), "setpoint", PUMP) if s["intent"] == "reduce"]
            [result] = [x for x in events(r.records(), "setpoint_result", PUMP)
                        if x["setpoint_id"] == sp["setpoint_id"]]
            assert result["readback_ml_per_h"] is None and "reopened transport" in result["error"], result
            assert list(model.rate_history()[sent_before:]) == [] and model.status().rate_ml_per_h == rate
            assert ch.state.pending is not None and ch.state.pending.uncertain

            await r.advance_to(r.clock.now() + r.poll)
            # The poll reconnected through connect(): the pump behind the new port got its set-up (safe mode, the
            # dead-man) again, then the check.
            assert ("SAF", "240") in [(c.name, c.data) for c in r.endpoints[PUMP].protocol.requests]
            [restored] = events(r.records(), "link_restored", PUMP)
            checked_at = datetime.fromisoformat(restored["ts"])
            if reconfigured:
                assert alarm_codes(r)[0] == "pump_range" and ch.state.phase.value == "alarm"
                no_rate_since(r, checked_at - r.poll)
                assert r.rate(50) not in [x for _, x in model.rate_history()[sent_before:]]
            else:
                assert alarm_codes(r) == [] and ch.state.pending is None
                assert ch.state.verified_rate == r.rate(50) and ch.state.level_mg_per_24h == 50
                assert model.status().state is PumpState.INFUSING and model.status().rate_ml_per_h == r.rate(50)
                assert [(at >= checked_at, x) for at, x in model.rate_history()[sent_before:]] == [(True, r.rate(50))]
            log_checks(r)

    run(body())
