"""End to end: the daemon and simulated pumps over real transports (New Era on a PTY and on loopback TCP, Modbus
on loopback TCP), a signed schedule pushed through the control socket, a whole burst course in virtual time.

The assertions are about what the simulated pump really received (its model's rate history and state), about
what the daemon reports (`status`), and about the audit log (verify + replay)."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.runtime.demo import START
from drivers.base import PumpState
from tests.runtime.e2e import (
    DOSES,
    FIRST_STEP,
    HOLD,
    TRANSPORTS,
    Rig,
    Timing,
    events,
    rig,
    run,
    setpoints,
    transitions,
    verified_setpoints,
)

POLL_S = 1200  # a coarse poll keeps a 5-day course to ~360 polls; the dead-man is covered in test_faults.py
DAY = timedelta(days=1)
MIN = timedelta(minutes=1)  # polls fall on START + k * 20 min: one minute off is between polls
POLL = timedelta(seconds=POLL_S)


def _due(i: int) -> datetime:
    """When step i (0, 1, 2) may first happen: its not_before, and 24 h (the step interval) after the previous
    step, which happened at the first poll at or after its own due time (polls at START + k * POLL_S)."""
    if i == 0:
        return FIRST_STEP
    prev = _due(i - 1)
    first_poll = START + -((START - prev) // timedelta(seconds=POLL_S)) * timedelta(seconds=POLL_S)
    return max(FIRST_STEP + i * DAY, first_poll + DAY)


async def _expect_status(r: Rig, name: str, phase: str, dose: int) -> None:
    st = (await r.status())[name]
    rate = r.rate(dose) if dose else Decimal(0)
    assert (st["phase"], Decimal(st["level_mg_per_24h"])) == (phase, Decimal(dose)), st
    assert Decimal(st["commanded_ml_per_h"]) == rate, st
    if phase != "primed":
        assert Decimal(st["verified_ml_per_h"]) == rate, st
    assert st["link"] == "up" and st["alarm"] is None, st
    pump = r.model(name).status()
    if dose and phase != "stopped":
        assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == rate
        assert Decimal(st["pump_rate_ml_per_h"]) == rate
    else:
        assert pump.state is not PumpState.INFUSING


def _check_wire(r: Rig, name: str, records: list[dict[str, Any]]) -> None:
    """What reached the pump equals what the kernel approved and the pump verified, in order, never more."""
    wire = r.model(name).rate_history()
    sent = [Decimal(s["rate_ml_per_h"]) for s in setpoints(records, name) if Decimal(s["rate_ml_per_h"]) > 0]
    assert [rate for _, rate in wire] == sent
    verified = [rate for _, rate in verified_setpoints(records, name) if rate > 0]
    assert verified == sent
    ceiling = r.rate(DOSES[-1])
    assert all(rate <= ceiling for _, rate in wire)


async def _course(tmp_path: Path, transport: str) -> None:
    async with rig(transport, tmp_path, timing=Timing(POLL_S, 0, 3 * POLL_S, 1.0), control=True) as r:
        name = "bed-1"
        reply = await r.push(name)
        assert reply["ok"] is True, reply
        await _expect_status(r, name, "primed", 0)
        for i, dose in enumerate(DOSES):
            await r.advance_to(_due(i) - MIN)  # just before the step is due: no escalation yet
            await _expect_status(r, name, "primed" if i == 0 else "titrating", int(DOSES[i - 1]) if i else 0)
            assert r.wire_rates(name) == [r.rate(d) for d in DOSES[:i]]
            # The first poll at or after the due time escalated; one poll later `status` shows the pump's reading.
            await r.advance_to(_due(i) + 2 * POLL - MIN)
            await _expect_status(r, name, "holding" if i == 2 else "titrating", int(dose))
            assert r.wire_rates(name) == [r.rate(d) for d in DOSES[: i + 1]]
            at, rate = r.model(name).rate_history()[-1]
            assert _due(i) <= at < _due(i) + POLL and rate == r.rate(dose)
            if i:
                assert at - r.model(name).rate_history()[-2][0] >= DAY  # never before the step interval
        hold_end = _due(2) + HOLD
        await r.advance_to(hold_end - MIN)
        await _expect_status(r, name, "holding", 500)
        await r.advance_to(hold_end + 2 * POLL - MIN)
        await _expect_status(r, name, "stopped", 0)
        assert r.model(name).status().state is PumpState.STOPPED
        assert r.wire_rates(name) == [r.rate(d) for d in DOSES]  # the stop did not program any rate
        delivered = r.model(name).status().delivered_ml
        assert delivered > 0
        records = r.records()
        _check_wire(r, name, records)
        stop = [s for s in setpoints(records, name) if Decimal(s["rate_ml_per_h"]) == 0]
        assert stop and datetime.fromisoformat(stop[-1]["ts"]) >= hold_end
        phases = [p for _, p in transitions(records, name)]
        assert phases == ["primed", "titrating", "holding", "stopped"], phases
        assert not events(records, "alarm", name)
        # Nothing more happens after the stop: the course is final, the pump stays stopped.
        await r.advance_to(hold_end + DAY + POLL - MIN)
        assert r.wire_rates(name) == [r.rate(d) for d in DOSES]
        assert r.model(name).status().state is PumpState.STOPPED
    report = r.verify()
    assert report.ok, report.failure
    result = r.replay()
    assert result.ok, [d.as_dict() for d in result.divergences][:3]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_whole_course_over_a_real_transport(tmp_path: Path, transport: str) -> None:
    run(_course(tmp_path, transport))


async def _one_dead(tmp_path: Path, transport: str) -> None:
    names = ["bed-1", "bed-2", "bed-3"]
    async with rig(transport, tmp_path, names, timing=Timing(POLL_S, 0, 2 * POLL_S, 1.0), dead={"bed-2"}) as r:
        for n in ("bed-1", "bed-3"):
            assert (await r.push(n))["ok"] is True
        # The dead pump's schedule is accepted (it is a configured pump), but it can never be primed.
        assert (await r.push("bed-2"))["ok"] is True
        end = _due(2) + HOLD + POLL - MIN
        await r.advance_to(end)
        st = await r.status()
        for n in ("bed-1", "bed-3"):
            assert st[n]["phase"] == "stopped", st[n]
            assert r.wire_rates(n) == [r.rate(d) for d in DOSES]
            assert r.model(n).status().state is PumpState.STOPPED
        assert st["bed-2"]["phase"] == "idle" and st["bed-2"]["link"] == "lost", st["bed-2"]
        assert r.wire_rates("bed-2") == []
        records = r.records()
        for n in ("bed-1", "bed-3"):
            _check_wire(r, n, records)
        assert events(records, "link_lost", "bed-2")
    assert r.verify().ok
    assert r.replay().ok


@pytest.mark.parametrize("transport", ["newera-tcp", "modbus-tcp"])
def test_a_dead_link_never_stalls_the_other_pumps(tmp_path: Path, transport: str) -> None:
    run(_one_dead(tmp_path, transport))


def test_rate_history_records_what_the_pump_accepted() -> None:
    from simulators.clock import ManualClock
    from simulators.pump import ModelError, PumpModel

    clock = ManualClock(START)
    pump = PumpModel(clock)
    pump.set_rate(Decimal("0.041"))
    clock.advance(60)
    with pytest.raises(ModelError):
        pump.set_rate(Decimal("0.0415"))  # not representable: refused, not recorded
    pump.set_rate(Decimal("0.125"))
    assert pump.rate_history() == ((START, Decimal("0.041")), (START + timedelta(seconds=60), Decimal("0.125")))


async def _stop_leaves_nothing(tmp_path: Path) -> None:
    import asyncio

    async with rig("newera-pty", tmp_path) as r:
        assert (await r.push("bed-1"))["ok"] is True
        await r.advance_to(FIRST_STEP + timedelta(seconds=30))
        before, tasks_before = r.clock.now(), set(asyncio.all_tasks())
        await r.daemon.stop()
        r.stopped = True
        for _ in range(20):
            await asyncio.sleep(0.01)  # real time passes; virtual time must not: the test is awake
        assert r.clock.now() == before
        leftovers = [t for t in asyncio.all_tasks() - tasks_before if not t.done()]
        assert leftovers == []
        assert r.verify().ok


def test_stopping_the_daemon_leaves_no_task_and_does_not_move_virtual_time(tmp_path: Path) -> None:
    run(_stop_leaves_nothing(tmp_path))
