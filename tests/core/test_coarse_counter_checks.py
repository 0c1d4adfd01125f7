"""The 24-h ceiling's counter allowance, the empty-syringe test and the near-empty warning use the counter reading's
own step when it is coarser than the drug library's `counter_resolution_ml` (never finer), as the accuracy check
does (docs/safety.md, SUP-3, SUP-13, SUP-15; docs/drivers.md "Resolution of a reading").

A 4-significant-digit display (New Era, the simulators) above 100 mL reads in 0.1 mL steps, ten times the library's
0.01 mL. The checks are judged on the reference pump: what it delivered and whether it was stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal as D

import pytest

from driverd.core.commands import Notice
from driverd.core.events import ClinicianCommand, Tick
from driverd.core.kernel import hours_between
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule
from tests.core.harness import Player
from tests.core.test_counter_clear import DisplayPump, raised

H = timedelta(hours=1)
M = timedelta(minutes=1)


@dataclass
class FaultyDisplayPump(DisplayPump):
    """A display pump that delivers `factor` times its rate (reporting the programmed rate), and stalls (alarm
    `occlusion`, as a New Era shows the plunger at the end) once it has delivered `stall_at` mL."""

    factor: D = D(1)
    stall_at: D | None = None

    def advance(self, to: datetime) -> None:
        if self.infusing:
            self.delivered += self.rate * self.factor * hours_between(self.at, to)
            if self.stall_at is not None and self.delivered >= self.stall_at:
                self.delivered, self.alarms, self.infusing = self.stall_at, ("occlusion",), False
        self.at = to


def play(pump: DisplayPump, conc: str, **kw: object) -> Player:
    return Player(primed(schedule(conc=conc, **kw)), PROTOCOL, pump)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- the 24-h ceiling


@pytest.mark.parametrize("offset", ["99.9", "150", "312.34"])
def test_a_correct_pump_at_the_ceiling_on_a_coarse_display_is_not_stopped(offset: str) -> None:
    """500 mg/24h at 10 mg/mL: 2.083 mL/h, 49.992 mL in 24 h against 50 mL. Read in 0.1 mL steps, the window plus
    the hour ahead reads up to ~50.08 mL: above 50 mL + two library steps (0.02 mL, the old allowance, which stopped
    this correct pump with a false `dose_ceiling`), within two of the reading's steps."""
    pump = DisplayPump(T0 - 10 * M, offset=D(offset), step=D("0.1"))
    p = play(pump, "10")
    p.run_until(T0 + 121 * H, M)  # through the hold at the top dose, to the course's end
    assert raised(p) == [] and p.state.phase is Phase.STOPPED
    assert p.state.alarms_raised == ()


def test_a_pump_running_fast_is_still_stopped_at_the_ceiling_on_a_coarse_display() -> None:
    """2.5 % fast (within the accuracy check's 10 %): only the ceiling can stop it. It does, before the pump's true
    24-h delivery passes the ceiling by more than two of the reading's steps and a poll at its rate."""
    pump = FaultyDisplayPump(T0 - 10 * M, offset=D("150"), step=D("0.1"), factor=D("1.025"))
    p = play(pump, "10")
    history: list[tuple[datetime, D]] = []
    t = pump.at
    while "dose_ceiling" not in raised(p) and t < T0 + 120 * H:
        t += M
        p.feed(Tick(t))
        p.feed(pump.report())
        history.append((t, pump.delivered))
    assert "dose_ceiling" in raised(p) and not pump.infusing and p.state.phase is Phase.ALARM
    stop = history[-1][0]
    before = [ml for at, ml in history if at <= stop - 24 * H]
    window = pump.delivered - (before[-1] if before else D(0))
    ceiling_ml = PROTOCOL.ceiling_mg_per_24h / 10
    assert window <= ceiling_ml + 2 * D("0.1") + pump.rate * pump.factor * hours_between(T0, T0 + M), window


# ------------------------------------------------------------------------------------------- the empty syringe


def test_a_syringe_run_empty_on_a_coarse_display_is_an_empty_syringe() -> None:
    """The pump stalls at the plunger's end after 16.99 of the 17 mL: read in 0.1 mL steps the syringe shows 16.9
    used, 0.1 mL left, more than two library steps. With the reading's step it is `syringe_empty`, which a syringe
    change acknowledges; judged at the library's step it looked like an occlusion (`pump_alarm:occlusion`), and the
    nurse's syringe change was refused (a change acknowledges only an end of syringe)."""
    pump = FaultyDisplayPump(T0 - 10 * M, offset=D("150"), step=D("0.1"), stall_at=D("16.99"))
    p = play(pump, "50", doses=(100, 300, 500), hold_days="3")
    p.run_until(T0 + 80 * H, M)  # 17 mL: 2 mL at 100 mg/24h, 6 mL at 300, the rest at 500 by ~70 h
    assert not pump.infusing and p.state.phase is Phase.ALARM
    assert p.state.alarm_causes == ("syringe_empty",), p.state.alarm_causes
    left_by_readings = p.state.fill_ml - (p.state.delivered_ml - p.state.syringe_started_ml)
    assert left_by_readings > 2 * PROTOCOL.counter_resolution_ml  # the library's step alone: not "empty"
    pump.alarms = ()  # the nurse clears the stall and puts a new syringe in
    p.feed(ClinicianCommand(pump.at, "change_syringe", "rn", "empty", None, D(17)))
    assert p.state.syringe_change is not None and not pump.infusing


# ------------------------------------------------------------------------------------------- the near-empty warning


@pytest.mark.parametrize("offset", ["100", "100.03", "100.06", "100.09", "250.05"])
@pytest.mark.parametrize("step", ["0.1", "0.001"])
def test_the_near_empty_warning_comes_before_the_syringe_really_runs_empty(offset: str, step: str) -> None:
    """100 mg/24h at 50 mg/mL (0.083 mL/h): a reading under-reads what was used by up to its step, so the predicted
    empty time can be late by step / rate (72 min for 0.1 mL, more than the 60-min warning). The warning comes at
    least `syringe_warning_minutes` before the true empty time, less what the library's own step takes (as for a
    fine counter); before, on a 0.1 mL display, it could come after the syringe ran empty."""
    pump = DisplayPump(T0 - 10 * M, offset=D(offset), step=D(step))
    p = play(pump, "50", doses=(100,), hold_days="10")
    rate = D("0.083")
    true_empty = T0 + timedelta(hours=float(D(17) / rate))  # the pump starts at T0 (the first step)
    p.run_until(true_empty - 3 * H, 10 * M)
    p.run_until(true_empty + H, M)
    warned = [t for t, c in p.log if isinstance(c, Notice) and c.code == "syringe_near_empty"]
    assert len(warned) == 1
    slack = timedelta(hours=float(PROTOCOL.counter_resolution_ml / rate)) + M  # the library's step, one poll
    margin = true_empty - warned[0]
    assert margin >= timedelta(minutes=float(PROTOCOL.syringe_warning_minutes)) - slack, margin


def test_a_syringe_called_empty_on_a_coarse_reading_is_not_resumed() -> None:
    """Review (2026-12-03): the alarm `syringe_empty` was raised with the reading's 0.1 mL step, but the resume
    re-judged it at the library's 0.01 mL and went ahead (0.083 mL/h on an empty syringe, the SUP-13 hazard). The
    cause alone now refuses; a syringe change ends it."""
    from dataclasses import replace as _replace
    from datetime import timedelta as _td
    from decimal import Decimal as _D

    from driverd.core import machine as _m
    from driverd.core.commands import ApplySetpoint as _Apply
    from driverd.core.commands import Refused as _Refused
    from driverd.core.events import ClinicianCommand as _Cmd
    from driverd.core.events import PumpReport as _Report
    from driverd.core.state import evolve as _evolve
    from tests.core.factories import PROTOCOL as _P
    from tests.core.test_quiet_report import running_state

    state, _ = running_state()
    used = state.delivered_ml - state.syringe_started_ml
    state = _evolve(state, syringe_fill_ml=used + _D("0.1"), empty_warned=True)  # 0.1 mL left by the read-backs
    ev = _Report(state.last_sample.at + _td(seconds=60), "stopped", state.commanded_rate, state.raw_delivered_ml,
                 ("occlusion",), _D("0.1"), state.schedule.inner_diameter_mm)
    state, _ = _m.step(state, ev, _P)
    assert "syringe_empty" in state.alarm_causes
    state, _ = _m.step(state, _replace(ev, at=ev.at + _td(seconds=60), alarms=()), _P)  # the stall cleared
    state, cmds = _m.step(state, _Cmd(ev.at + _td(seconds=65), "resume", "dr", "try"), _P)
    assert [c.reason for c in cmds if isinstance(c, _Refused)] == ["syringe_empty"]
    assert not [c for c in cmds if isinstance(c, _Apply)] and "syringe_empty" in state.alarm_causes
