"""Course state: one frozen value per pump. The machine returns a new one for every event."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from driverd.core.history import History
from driverd.core.quantities import Resolution
from driverd.core.quick_init import quick_init
from driverd.core.schedule import Schedule

if TYPE_CHECKING:
    from driverd.core.kernel import Setpoint


class Phase(enum.Enum):
    IDLE = "idle"
    PRIMED = "primed"
    TITRATING = "titrating"
    HOLDING = "holding"
    TAPERING = "tapering"
    STOPPED = "stopped"
    PAUSED = "paused"
    ALARM = "alarm"

    # Members are singletons compared by identity: hash them by identity too (C), not Enum's hash of the name (a
    # Python call on every `phase in RUNNING`, several per pump report).
    __hash__ = object.__hash__


#: Setpoint intents that never raise the rate: re-sent until verified (an increase is never re-sent).
DECREASE_INTENTS = frozenset({"reduce", "taper", "stop"})
#: Phases in which the pump is meant to be infusing under the course.
RUNNING = frozenset({Phase.TITRATING, Phase.HOLDING, Phase.TAPERING})
#: Phases with a live course (anything between accepting a verified schedule and stopping).
ACTIVE = frozenset({Phase.PRIMED, Phase.TITRATING, Phase.HOLDING, Phase.TAPERING, Phase.PAUSED, Phase.ALARM})


@quick_init  # made once per poll: driverd.core.quick_init
@dataclass(frozen=True, slots=True)
class Sample:
    """Course-cumulative delivered volume at a time (from pump read-backs, corrected for counter resets)."""

    at: datetime
    delivered_ml: Decimal
    # Course-cumulative drug: each increment counted at the concentration of the syringe it came from, so the
    # 24-h ceiling holds in mg across syringes of different concentration.
    delivered_mg: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class SyringeChange:
    """A clinician's syringe change in progress: the pump is stopped until the new syringe is verified."""

    fill_ml: Decimal
    concentration_mg_per_ml: Decimal
    by: str
    reason: str
    at: datetime
    # False when the pump was infusing at the command: the old syringe is still in. The pump is stopped and the
    # change waits for the clinician's next change_syringe (given once the new syringe is in) before reading back.
    loaded: bool = True


@dataclass(frozen=True, slots=True)
class Pending:
    """A setpoint sent but not yet verified by read-back."""

    setpoint: Setpoint
    attempts: int  # 1 on first send, 2 after the single permitted retry
    uncertain: bool = False  # no acknowledgement: must be reconciled from a pump report
    # A decrease or stop the pump has not taken yet: re-sent on every pump report until a read-back shows it.
    resend: bool = False

    @property
    def is_decrease(self) -> bool:
        return self.setpoint.intent in DECREASE_INTENTS


#: The empty history (a value like any other: appending to it gives a new history and leaves it empty).
NO_SAMPLES = History()


# Not slots: `evolve` copies the instance dict (about 1 µs) where dataclasses.replace re-runs __init__ over all
# fields (about 20 µs); the machine makes a new state several times per pump report.
@dataclass(frozen=True)
class CourseState:
    pump_id: str
    phase: Phase = Phase.IDLE
    schedule: Schedule | None = None
    resolution: Resolution | None = None
    pump_diameter_mm: Decimal | None = None
    pump_model: str = ""
    level_mg_per_24h: Decimal = Decimal(0)  # the dose the course is at (kept while paused/alarmed)
    commanded_rate: Decimal = Decimal(0)  # last rate sent (mL/h, quantized)
    verified_rate: Decimal = Decimal(0)  # last rate the pump read back equal to what was sent
    verified_run_rate: Decimal = Decimal(0)  # last non-zero verified rate: the resume ceiling
    # Over/under-infusion baseline: the first pump report after the current rate was verified (a report,
    # not the verification time, so delivery at the previous rate is never counted against the new one).
    deviation_base: Sample | None = None
    pending: Pending | None = None
    last_change_at: datetime | None = None  # last change of the dose level
    started_at: datetime | None = None  # first setpoint of the course
    hold_started_at: datetime | None = None
    taper_started_at: datetime | None = None
    taper_index: int = 0  # next taper entry to apply
    taper_lock: bool = False
    lock_ceiling_rate: Decimal | None = None  # under taper lock no rate above this, ever
    resume_to: Phase | None = None  # where PAUSED/ALARM returns to
    alarm_code: str = ""
    link_up: bool = True
    pump_alarms: tuple[str, ...] = ()  # alarms in the last pump report
    pump_infusing: bool = False
    next_setpoint_id: int = 1
    samples: History = NO_SAMPLES  # thinned history for the rolling 24-h window (immutable, O(1) append)
    last_sample: Sample | None = None  # newest report (always kept, even between thinned samples)
    raw_delivered_ml: Decimal | None = None  # the pump's own counter at the last report (to detect resets)
    last_refusal: str = ""  # de-duplicates automatic refusals so a blocked step is logged once
    # Every active alarm cause (a second fault during an alarm is its own cause); a resume clears them all,
    # and is refused while a cause is still present at the pump or the link.
    alarm_causes: tuple[str, ...] = ()
    # Time faults (docs/safety.md, "Time"). An unacknowledged wall-clock step: no start or escalation until a
    # clinician acknowledges ("" = the clock is consistent).
    clock_fault: str = ""
    # When delivery under the course last stopped (it left a running phase for PAUSED or ALARM); None while
    # running. A resume after a long interruption restarts the step interval.
    interrupted_at: datetime | None = None
    # The syringe in the pump (issue 13). None: the schedule's first syringe (`syringe` at the drug concentration).
    syringe_concentration: Decimal | None = None
    syringe_fill_ml: Decimal | None = None
    syringe_started_ml: Decimal = Decimal(0)  # course-cumulative delivered mL when this syringe went in
    syringe_changes: int = 0
    syringe_change: SyringeChange | None = None  # a change waiting for the new syringe's read-back
    empty_warned: bool = False  # the near-empty warning was raised for the syringe in the pump
    # The commanded rates integrated (mg), for the end-of-course record: the total up to `commanded_since`, from
    # when the rate now commanded (in a running phase) began. Updated only when that rate changes.
    commanded_mg: Decimal = Decimal(0)
    commanded_since: datetime | None = None
    alarms_raised: tuple[str, ...] = ()  # every alarm cause raised during the course, in order
    summary_due: str = ""  # why the course stopped, until the end-of-course record is out (next pump report)
    stopped_at: datetime | None = None  # when the course stopped (the end of the burst, for the exposure ledger)

    def __eq__(self, other: object) -> bool:
        # The dataclass's field-tuple comparison, as a comparison of the instance dicts (each holds exactly the
        # fields; values compared with ==, identical objects short-cut): the channel compares states on every poll.
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.__dict__ == other.__dict__

    @property
    def course_id(self) -> str | None:
        return self.schedule.schedule_id if self.schedule else None

    @property
    def delivered_ml(self) -> Decimal:
        return self.last_sample.delivered_ml if self.last_sample else Decimal(0)

    @property
    def delivered_mg(self) -> Decimal:
        return self.last_sample.delivered_mg if self.last_sample else Decimal(0)

    @property
    def concentration(self) -> Decimal:
        """mg/mL of the syringe in the pump: what every rate of this course is computed with now."""
        if self.syringe_concentration is not None:
            return self.syringe_concentration
        assert self.schedule is not None
        return self.schedule.concentration_mg_per_ml

    @property
    def fill_ml(self) -> Decimal:
        if self.syringe_fill_ml is not None:
            return self.syringe_fill_ml
        assert self.schedule is not None
        return self.schedule.fill_volume_ml

    @property
    def remaining_ml(self) -> Decimal:
        """What the syringe in the pump still holds by the pump's read-backs (never below 0)."""
        return max(self.fill_ml - (self.delivered_ml - self.syringe_started_ml), Decimal(0))


_FIELDS = frozenset(CourseState.__dataclass_fields__)


def evolve(state: CourseState, **changes: Any) -> CourseState:
    """`dataclasses.replace` for the course state, without re-running __init__ (the state is frozen: nothing can
    change the copy afterwards, as with replace). Unknown field names are an error, as with replace."""
    if not changes.keys() <= _FIELDS:
        raise TypeError(f"not fields of CourseState: {sorted(changes.keys() - _FIELDS)}")
    new = object.__new__(CourseState)
    d = new.__dict__
    d.update(state.__dict__)
    d.update(changes)
    return new
