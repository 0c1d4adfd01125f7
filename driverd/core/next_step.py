"""The course's next scheduled change, for `driverd status`: when it is due and to which dose.

Pure: derived from the state and the drug library exactly as the machine's tick decides (`machine._on_tick`,
`_taper_steps`), so what status announces is what the course will do if nothing else happens first. The kernel
still judges the step when it comes (a refusal then is logged as usual).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from driverd.core.protocol import ProtocolSpec
from driverd.core.state import CourseState, Phase

StepKind = Literal["start", "escalate", "taper", "stop"]


@dataclass(frozen=True, slots=True)
class NextStep:
    at: datetime  # due at (not before) this time
    dose_mg_per_24h: Decimal  # the dose level it moves to (0 for a stop)
    kind: StepKind
    auto: bool  # False: applied only when a clinician confirms it (`driverd course escalate`)

    def awaiting_confirmation(self, now: datetime) -> bool:
        """Due now but waiting for a clinician's confirmation."""
        return not self.auto and now >= self.at


def next_step(state: CourseState, protocol: ProtocolSpec) -> NextStep | None:
    """The next change the schedule makes on its own (or offers for confirmation); None if none is scheduled
    (no course, stopped, or paused/in alarm until a clinician resumes)."""
    sch = state.schedule
    if sch is None:
        return None
    if state.phase is Phase.PRIMED:
        first = sch.steps[0]
        return NextStep(first.not_before, first.dose_mg_per_24h, "start", first.auto)
    if state.phase is Phase.TITRATING:
        i = sch.next_step_index(state.level_mg_per_24h)
        if i is None:
            return None  # the next tick begins the hold: no dose change
        step = sch.steps[i]
        at = step.not_before
        if state.last_change_at is not None:
            at = max(at, state.last_change_at + timedelta(hours=float(protocol.step_interval_hours)))
        return NextStep(at, step.dose_mg_per_24h, "escalate", step.auto)
    if state.phase is Phase.HOLDING:
        if state.hold_started_at is None:
            return None
        taper_start = state.hold_started_at + timedelta(days=float(sch.hold_days))
        return _taper_entry(state, taper_start, 0)
    if state.phase is Phase.TAPERING:
        if state.taper_started_at is None:
            return None
        return _taper_entry(state, state.taper_started_at, state.taper_index)
    return None


def _taper_entry(state: CourseState, taper_start: datetime, index: int) -> NextStep | None:
    """The first taper entry from `index` that changes the dose (entries not below the level are skipped)."""
    assert state.schedule is not None
    taper = state.schedule.taper
    if not taper:
        return NextStep(taper_start, Decimal(0), "stop", True)
    for entry in taper[index:]:
        at = taper_start + timedelta(hours=float(entry.after_hours))
        if entry.dose_mg_per_24h == 0:
            return NextStep(at, Decimal(0), "stop", True)
        if entry.dose_mg_per_24h < state.level_mg_per_24h:
            return NextStep(at, entry.dose_mg_per_24h, "taper", True)
    return None
