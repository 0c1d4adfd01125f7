"""Whether replay, stepping a pump report from its own state, reaches exactly the live result: decided without
stepping the core a second time (issue 12: at a 1 s poll the telemetry compactor's second step was a third of
the core's CPU per poll).

The compactor (`driverd.runtime.telemetry`) holds a report back from the log only if replay without it reaches the
same state. Replay is at `replayed` (the state after the last logged input); the live course is at `live`
(`replayed` stepped with the reports held back since). A new report R gave `after = step(live, R)` with no command.
The exact test is `step(replayed, R) == after` with no command, which costs a second step. This module gives a
cheap *sufficient* test for it, for the steady case:

1. `live` and `replayed` hold the very same objects in every field except the ones a pump report sets from the
   report itself before anything reads them (`machine._accumulate`): the newest sample, the pump's raw counter,
   and the pump's alarms (equal values are required for those, since the warning check compares with them).
   So both steps run the same code on the same values from there on; any other field that differs (a new history
   sample, a deviation base, a phase, an alarm ...) makes this test say no, and the exact test decides.
2. The newest sample replay computes from `replayed` (the counter's increment since `replayed`'s raw counter, at
   the syringe's concentration; a counter reset counts the raw value, as the machine does) is the one in `after`,
   to the last digit and exponent (`compare_total`), at the report's time.

Then `step(replayed, R)` makes the same decisions on the same values: its state equals `after` field by field
(each Decimal with the same exponent) and it has no command. A `False` says nothing: the caller steps replay's
state as before. The property test `tests/runtime/test_report_replay.py` checks the implication against the
double step on generated courses.
"""

from __future__ import annotations

from decimal import Decimal
from operator import is_not, itemgetter

from driverd.core.events import PumpReport
from driverd.core.state import CourseState

_FIELDS: tuple[str, ...] = tuple(CourseState.__dataclass_fields__)
#: What a pump report overwrites from the report alone before the machine reads it (machine._accumulate).
SET_BY_REPORT = frozenset({"last_sample", "raw_delivered_ml", "pump_alarms"})
_others = itemgetter(*(f for f in _FIELDS if f not in SET_BY_REPORT))


def replay_step_agrees(replayed: CourseState, live: CourseState, report: PumpReport, after: CourseState) -> bool:
    """True only if stepping `replayed` with `report` gives exactly `after` and no command, where `after` is
    `live` stepped with `report` with no command. Pure; a few microseconds (no step of the core)."""
    rd, ld = replayed.__dict__, live.__dict__
    if len(rd) != len(_FIELDS) or len(ld) != len(_FIELDS):
        return False
    try:  # every other field the very same object (C iteration: this runs once per poll)
        if any(map(is_not, _others(ld), _others(rd))):
            return False
    except KeyError:
        return False
    return replay_sample_agrees(replayed, live, report, after)


def replay_sample_agrees(replayed: CourseState, live: CourseState, report: PumpReport, after: CourseState) -> bool:
    """`replay_step_agrees` without its first check, for a caller that knows it holds already: every field of `live`
    but `SET_BY_REPORT` is the very same object as in `replayed` (the compactor knows it when `live` came from
    `replayed` by quiet reports that kept the history and the infusing flag: `driverd.core.machine.report_step`).
    The rest of the proof (equal alarms, replay's own newest sample) is checked here."""
    if live.pump_alarms != replayed.pump_alarms:
        return False
    last, prev, new = replayed.last_sample, replayed.raw_delivered_ml, after.last_sample
    raw = report.delivered_ml
    if last is None or prev is None or new is None or new.at is not report.at \
            or after.raw_delivered_ml is not raw:
        return False
    # machine._accumulate and _counted, from replay's state: the same operations in the same (current) context.
    increment = raw - prev if raw >= prev else raw
    conc = replayed.concentration if replayed.schedule is not None else Decimal(0)
    ml = last.delivered_ml + increment
    mg = last.delivered_mg + increment * conc
    return not ml.compare_total(new.delivered_ml) and not mg.compare_total(new.delivered_mg)
