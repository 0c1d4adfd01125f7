"""A decrease the pump refuses becomes a stop (review finding, 2026-12-03), over the real New Era path on a PTY.

The case: the rate units are changed at the keypad while the pump infuses (here to µL/h); every `RAT ... MH` is then
answered `?NA`. A reduce was re-sent on every poll, for ever, and the pump ran on above the commanded rate (while a
decrease is pending, the report path does not look for unexpected infusion). Now after the second miss the course
alarms and the decrease becomes a stop (`STP`, which every pump takes): the simulator's pump is stopped, and nothing
is re-sent after that."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from drivers.base import PumpState
from drivers.newera.codec import RateUnit
from tests.runtime.e2e import Timing, audit_ok, events, rig, run, setpoints, start_running

NAME = "bed-1"
FAST = Timing(poll_s=60, deadman_s=180, link_timeout_s=120, driver_timeout_s=1.0)


def test_a_reduce_the_pump_refuses_stops_it(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig("newera-pty", tmp_path, timing=FAST) as r:
            await start_running(r)
            ne = r.endpoints[NAME].protocol
            ne.rate_unit = RateUnit.UL_PER_H  # keypad: the pump now shows and takes rates in µL/h
            model, ch = r.model(NAME), r.channel(NAME)
            await r.command(NAME, "reduce", dose="50")
            assert model.status().state is PumpState.STOPPED  # the stop went out at once, after the second miss
            assert ch.state.phase.value == "alarm" and ch.state.commanded_rate == 0 and ch.state.pending is None
            assert [a["code"] for a in events(r.records(), "alarm", NAME)] == ["readback_mismatch"]
            sent = [(s["intent"], Decimal(s["rate_ml_per_h"])) for s in setpoints(r.records(), NAME)][-2:]
            assert sent == [("reduce", r.rate(50)), ("stop", Decimal(0))]
            requests = len(ne.requests)
            await r.advance_to(r.clock.now() + timedelta(hours=2))
            assert model.status().state is PumpState.STOPPED
            later = list(ne.requests)[requests:]
            assert later and not [c for c in later if c.name == "RUN" or (c.name == "RAT" and c.data)]  # polls only
            audit_ok(r)

    run(body())
