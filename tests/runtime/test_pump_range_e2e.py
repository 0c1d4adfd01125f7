"""The daemon checks the pump's rate range before a course primes and at every syringe load (docs/safety.md,
SUP-19), on the real driver path (New Era on a PTY, Modbus/TCP on loopback) against the simulated pump.

What is asserted is the pump: a course the check refuses never sends it a non-zero rate (the simulator's rate
history) and leaves it stopped; the audit record names the syringe, the pump URL and both ranges; the log verifies
and `audit replay` recomputes every decision, the refusals included.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.runtime.control import request
from driverd.runtime.demo import CONFIG_DIR, DEMO_KEY, START, demo_schedule
from driverd.signing import sign_document
from drivers.base import PumpState
from tests.runtime.e2e import BOUND_S, FIRST_STEP, Rig, audit_ok, events, rig, run

NAME = "bed-1"
H = timedelta(hours=1)
HALF = timedelta(seconds=30)  # between two polls (every minute on the minute)
SHIPPED = CONFIG_DIR / "protocols" / "ketamine-burst.toml"
# The demo's syringe (BD Plastipak 30 mL, 21.59 mm): an NE-1000 runs 0.016..1120 mL/h with it (the shipped map's
# Modbus device the same mechanism). 0.012 below that is what a hand-edited library might hold.
SLOW_LIBRARY_LINE = 'min_rate_ml_per_h = "0.012"'


def library(tmp_path: Path) -> Path:
    """The shipped library with the 30 mL syringe's minimum below what the pump runs with it."""
    text = SHIPPED.read_text()
    head, sep, tail = text.partition('[syringes."BD Plastipak 30 mL"]')
    assert sep and 'min_rate_ml_per_h = "0.016"' in tail
    path = tmp_path / "library.toml"
    path.write_text(head + sep + tail.replace('min_rate_ml_per_h = "0.016"', SLOW_LIBRARY_LINE, 1))
    return path


def map_without_range(tmp_path: Path) -> Path:
    """The shipped Modbus register map without its plunger speed range: the driver cannot tell the rate range."""
    text = (CONFIG_DIR / "drivers" / "modbus-pump.toml").read_text()
    lines = [x for x in text.splitlines() if not x.startswith(("plunger_min_mm_per_h", "plunger_max_mm_per_h"))]
    path = tmp_path / "map.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def refused(records: list[dict[str, Any]], reason: str) -> list[dict[str, Any]]:
    return [r for r in events(records, "refused", NAME) if r["reason"] == reason]


async def never_ran(r: Rig) -> None:
    """Past the first step and an hour on: the course is idle and the pump was never told to run."""
    await r.advance_to(FIRST_STEP + H + HALF)
    ch = r.channel(NAME)
    assert ch.state.phase.value == "idle"
    assert r.model(NAME).status().state is PumpState.STOPPED
    assert [rate for rate in r.wire_rates(NAME) if rate > 0] == []
    assert r.model(NAME).status().delivered_ml == 0
    assert not events(r.records(), "setpoint", NAME)


@pytest.mark.parametrize("transport", ["newera-pty", "modbus-tcp"])
def test_a_library_range_the_pump_cannot_run_never_primes_until_fixed(tmp_path: Path, transport: str) -> None:
    async def body() -> None:
        async with rig(transport, tmp_path, protocol=library(tmp_path)) as r:
            assert (await r.push(NAME))["ok"] is True  # the schedule itself is valid and accepted
            await never_ran(r)
            records = r.records()
            [refusal] = refused(records, "pump_range")
            url = r.config.pumps[0].url
            detail = refusal["detail"]
            for part in ("'BD Plastipak 30 mL'", "21.59", url, "drug library 0.012..10 mL/h",
                         "pump's 0.016..", "minimum"):
                assert part in detail, (part, detail)
            assert [a["code"] for a in events(records, "alarm", NAME)] == ["pump_range"]  # raised once
            [verified] = events(records, "pump_verified", NAME)
            assert verified["pump_range"]["url"] == url and verified["pump_range"]["min_ml_per_h"] == "0.016"
            status = (await r.status())[NAME]
            assert "pump_range" in status["alarms"] and "prime: pump_range: " in status["last_error"], status
            audit_ok(r)  # replay recomputes the refusal from the logged range
            # The library is corrected and the daemon restarted: the course primes (the cause ends) and runs.
            r.config = replace(r.config, protocol=SHIPPED)
            await r.restart(timedelta(minutes=1))
            await r.advance_to(r.clock.now() + 2 * H)
            ch = r.channel(NAME)
            assert ch.state.phase.value == "titrating" and ch.state.alarm_causes == ()
            assert r.model(NAME).status().state is PumpState.INFUSING
            notices = [n["code"] for n in events(r.records(), "notice", NAME)]
            assert "pump_range_checked" in notices and "alarm_cleared" in notices
            audit_ok(r)

    run(body())


def test_a_modbus_map_without_a_range_never_primes(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig("modbus-tcp", tmp_path, url_params=f"&map={map_without_range(tmp_path)}") as r:
            assert (await r.push(NAME))["ok"] is True
            await never_ran(r)
            records = r.records()
            [refusal] = refused(records, "pump_range")
            assert "states no rate range" in refusal["detail"] and "plunger_min_mm_per_h" in refusal["detail"]
            assert r.config.pumps[0].url in refusal["detail"]
            [verified] = events(records, "pump_verified", NAME)
            assert verified["pump_range"]["min_ml_per_h"] is None and verified["pump_range"]["max_ml_per_h"] is None
            audit_ok(r)

    run(body())


@pytest.mark.parametrize("transport", ["newera-pty", "modbus-tcp"])
def test_a_taper_step_the_kernel_would_refuse_is_refused_before_the_course_starts(tmp_path: Path,
                                                                                 transport: str) -> None:
    """30 mg/24h at 100 mg/mL is 0.012 mL/h at the pump's resolution, below 0.016 for this syringe: without the check
    the course would run five days and then the kernel refuse its taper step."""
    doc = demo_schedule(NAME, 1, START)
    doc.pop("signature")
    doc["taper"] = [{"dose_mg_per_24h": "30", "after_hours": "12"}, {"dose_mg_per_24h": "0", "after_hours": "24"}]
    doc = sign_document(doc, DEMO_KEY)

    async def body() -> None:
        async with rig(transport, tmp_path) as r:
            assert (await r.push(NAME, doc))["ok"] is True
            await never_ran(r)
            [refusal] = refused(r.records(), "planned_rate")
            assert refusal["detail"].startswith("/taper/0/dose_mg_per_24h 30 mg/24h at 100 mg/mL is 0.012 mL/h")
            assert "rule device_min" in refusal["detail"]
            audit_ok(r)

    run(body())


async def _change(r: Rig) -> dict[str, Any]:
    assert r.socket is not None
    return await request(r.socket, {"op": "change_syringe", "pump_id": NAME, "fill_volume_ml": "22", "by": "rn-1",
                                    "reason": "daily syringe change"}, timeout_s=BOUND_S)


@pytest.mark.parametrize("transport", ["newera-pty", "modbus-tcp"])
def test_a_syringe_load_the_pump_cannot_run_is_refused_and_the_pump_stays_stopped(tmp_path: Path,
                                                                                 transport: str) -> None:
    """The driver reports a narrower range at the load than at priming (as a pump swapped for another mechanism
    would; the driver's report is replaced on the channel, everything else is the real path)."""
    async def body() -> None:
        async with rig(transport, tmp_path, control=True) as r:
            assert (await r.push(NAME))["ok"] is True
            await r.advance_to(FIRST_STEP + H + HALF)
            ch, model = r.channel(NAME), r.model(NAME)
            assert ch.state.phase.value == "titrating" and model.status().state is PumpState.INFUSING
            first = await _change(r)  # the old syringe still runs: stopped
            assert first["phase"] == "paused" and model.status().state is PumpState.STOPPED
            model.load_syringe(Decimal(22))
            honest = ch.driver.rate_range
            ch.driver.rate_range = lambda d: (Decimal("0.02"), Decimal("879.5"))  # type: ignore[method-assign]
            reply = await _change(r)
            assert reply["ok"] is False and [x["reason"] for x in reply["refusals"]] == ["pump_range"], reply
            assert "0.02..879.5 mL/h" in reply["refusals"][0]["detail"]
            assert ch.state.phase.value == "alarm" and ch.state.syringe_change is not None
            stopped_at = r.clock.now()
            await r.advance_to(stopped_at + 2 * H)
            assert model.status().state is PumpState.STOPPED
            assert [rate for at, rate in model.rate_history() if at >= stopped_at and rate > 0] == []
            # A resume runs nothing while the unverified load waits (SUP-12): the course waits paused, pump stopped.
            resumed = await r.command(NAME, "resume")
            assert [x["reason"] for x in resumed["refusals"]] == ["syringe_change_waiting"], resumed
            await r.advance_to(r.clock.now() + H)
            assert model.status().state is PumpState.STOPPED and ch.state.phase.value == "paused"
            assert [rate for at, rate in model.rate_history() if at >= stopped_at and rate > 0] == []
            # Fixed: change_syringe again retries the load, which passes and resumes.
            ch.driver.rate_range = honest  # type: ignore[method-assign]
            again = await _change(r)
            assert again["ok"] is True and again["phase"] == "titrating", again
            assert model.status().state is PumpState.INFUSING
            [loaded_bad, loaded_ok] = events(r.records(), "syringe_loaded", NAME)
            assert loaded_bad["pump_range"]["min_ml_per_h"] == "0.02"
            assert loaded_ok["pump_range"]["min_ml_per_h"] == "0.016"
            audit_ok(r)

    run(body())
