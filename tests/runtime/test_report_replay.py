"""The compactor's shortcut (`driverd.core.report_replay.replay_step_agrees`) against the double step it replaces.

Whenever the shortcut says yes, stepping replay's state with the report must give exactly the live result (every
field, every Decimal's exponent: compared by repr) and no command. Checked on reports drawn freely around a real
course state (counter resets, display exponents, alarms, stops, gaps that cross a history sample), and on whole
channels: a channel using the shortcut writes the same log, record for record, and reaches the same states as one
that always steps twice (the rule before the shortcut).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from driverd.core.commands import ApplySetpoint
from driverd.core.events import PumpReport, SetpointResult, Tick
from driverd.core.machine import step
from driverd.core.report_replay import SET_BY_REPORT, replay_step_agrees
from driverd.core.state import CourseState
from driverd.runtime.telemetry import ReportCompactor
from tests.core.factories import PROTOCOL, T0, primed
from tests.runtime.test_telemetry_compaction import STEPS, play, rig

D = Decimal
RATE = D("0.083")  # 100 mg/24h at 50 mg/mL, quantized down (what the first step commands)
ESCALATED_COUNTER = D("1.991")  # RATE for 24 h less 30 s

# One report after the previous: (seconds later, the counter: ("add", n) 0.001-mL steps more, or ("reset", n) back to
# n steps; the exponent it is shown with, pump state, alarms). Steady reports are the likeliest, as on a ward.
COUNTER = st.one_of(st.tuples(st.just("add"), st.integers(min_value=0, max_value=40)),
                    st.tuples(st.just("reset"), st.integers(min_value=0, max_value=60)))
REPORT = st.tuples(
    st.sampled_from([1, 1, 1, 2, 30, 59, 60, 61, 3600]),
    COUNTER,
    st.sampled_from(["0.001", "0.001", "0.001", "0.01", "0.0001", "1"]),
    st.sampled_from(["infusing", "infusing", "infusing", "infusing", "stopped", "alarm"]),
    st.sampled_from([(), (), (), (), ("near_end",), ("occlusion",), ("low_battery", "near_end")]),
)
Drawn = tuple[int, tuple[str, int], str, str, tuple[str, ...]]


def _apply(state: CourseState, at: datetime) -> CourseState:
    state, cmds = step(state, Tick(at), PROTOCOL)
    sp = next(c for c in cmds if isinstance(c, ApplySetpoint)).setpoint
    state, _ = step(state, SetpointResult(at, sp.id, sp.rate_ml_per_h), PROTOCOL)
    return state


def running(start: str = "reported") -> CourseState:
    """A course at its first step, the setpoint verified, one report in ("reported"); or none yet ("unreported":
    no history, no deviation base); or escalated to the second step a day later, verified, not reported yet
    ("escalated": a history, no deviation base). The next report is due one second after the state's time."""
    state = _apply(primed(), T0)
    if start == "unreported":
        return state
    state, _ = step(state, PumpReport(T0, "infusing", RATE, D("0.000"), ()), PROTOCOL)
    if start == "escalated":
        later = T0 + timedelta(hours=24)
        state, _ = step(state, PumpReport(later - timedelta(seconds=30), "infusing", RATE, ESCALATED_COUNTER, ()),
                        PROTOCOL)
        state = _apply(state, later)
    return state


class Counter:
    def __init__(self, at: datetime = T0, rate: Decimal = RATE, steps: int = 0) -> None:
        self.at = at
        self.steps = steps
        self.rate = rate

    def report(self, drawn: Drawn) -> PumpReport:
        dt, (how, n), exp, state, alarms = drawn
        self.at += timedelta(seconds=dt)
        self.steps = n if how == "reset" else self.steps + n
        shown = (D(self.steps) / 1000).quantize(D(exp)) if exp != "1" else D(self.steps) / 1000
        return PumpReport(self.at, state, self.rate if state == "infusing" else D(0), shown, alarms)


def counter(start: str, state: CourseState) -> Counter:
    """The pump's counter where `running(start)` left it."""
    if start == "escalated":
        return Counter(T0 + timedelta(hours=24), state.commanded_rate, int(ESCALATED_COUNTER * 1000))
    return Counter(T0, state.commanded_rate)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["reported", "unreported", "escalated"]), st.lists(REPORT, max_size=12),
       st.lists(REPORT, min_size=1, max_size=3), REPORT)
# A held report that set the deviation base (the first report at a newly verified rate): replay's would be the next.
@example("escalated", [], [(1, ("add", 1), "0.001", "infusing", ())], (1, ("add", 0), "0.001", "infusing", ()))
# A held report with a finer display exponent, and one after a counter reset.
@example("reported", [], [(1, ("add", 2), "0.0001", "infusing", ())], (1, ("add", 1), "0.001", "infusing", ()))
@example("reported", [(1, ("add", 15), "0.001", "infusing", ())], [(1, ("reset", 1), "0.001", "infusing", ())],
         (1, ("add", 20), "0.001", "infusing", ()))
def test_a_yes_means_the_second_step_gives_exactly_the_live_result(
    start: str, before: list[Drawn], held: list[Drawn], new: Drawn
) -> None:
    replayed = running(start)
    pump = counter(start, replayed)
    for drawn in before:
        replayed, _ = step(replayed, pump.report(drawn), PROTOCOL)
    live = replayed  # any state replay's reaches with more reports (the shortcut's claim does not need more)
    for drawn in held:
        live, _ = step(live, pump.report(drawn), PROTOCOL)
    report = pump.report(new)
    after, cmds = step(live, report, PROTOCOL)
    if cmds or not replay_step_agrees(replayed, live, report, after):
        return
    shadow, shadow_cmds = step(replayed, report, PROTOCOL)
    assert shadow_cmds == ()
    assert repr(shadow) == repr(after)
    assert shadow == after


def test_the_steady_case_needs_no_second_step() -> None:
    """Not vacuous: between history samples, a steady report is decided by the shortcut."""
    pump = Counter()
    replayed = running()
    live, _ = step(replayed, pump.report((1, ("add", 0), "0.001", "infusing", ())), PROTOCOL)
    report = pump.report((1, ("add", 1), "0.001", "infusing", ()))
    after, cmds = step(live, report, PROTOCOL)
    assert cmds == ()
    assert replay_step_agrees(replayed, live, report, after)
    # ... and says no when something else moved since replay's state: here a new 60-s history sample.
    moved, cmds = step(live, pump.report((61, ("add", 1), "0.001", "infusing", ())), PROTOCOL)
    assert cmds == ()
    report = pump.report((1, ("add", 1), "0.001", "infusing", ()))
    assert not replay_step_agrees(replayed, moved, report, step(moved, report, PROTOCOL)[0])


def test_a_counter_shown_with_a_finer_exponent_in_between_is_decided_by_the_second_step() -> None:
    """Replay without the held report keeps the coarser exponent: equal values, another state (repr), so the
    shortcut must say no."""
    pump = Counter()
    replayed = running()
    live, _ = step(replayed, pump.report((1, ("add", 2), "0.0001", "infusing", ())), PROTOCOL)
    report = pump.report((1, ("add", 1), "0.001", "infusing", ()))
    after, cmds = step(live, report, PROTOCOL)
    shadow, _ = step(replayed, report, PROTOCOL)
    assert cmds == () and shadow == after and repr(shadow) != repr(after)
    assert not replay_step_agrees(replayed, live, report, after)


def test_a_counter_reset_in_between_is_decided_by_the_second_step() -> None:
    pump = Counter()
    replayed = running()
    for _ in range(5):
        replayed, _ = step(replayed, pump.report((1, ("add", 3), "0.001", "infusing", ())), PROTOCOL)
    live, _ = step(replayed, pump.report((1, ("reset", 1), "0.001", "infusing", ())), PROTOCOL)
    report = pump.report((1, ("add", 20), "0.001", "infusing", ()))  # above replay's last counter again
    after, cmds = step(live, report, PROTOCOL)
    shadow, _ = step(replayed, report, PROTOCOL)
    assert cmds == () and shadow != after
    assert not replay_step_agrees(replayed, live, report, after)


class DoubleStep(ReportCompactor):
    """The rule before the shortcut: every held-back report proved by stepping replay's state too."""

    shortcut = False


@settings(max_examples=60, deadline=None)
@given(STEPS)
def test_the_shortcut_writes_the_same_log_as_the_double_step(steps: list[tuple[int, str]]) -> None:
    fast, reference = rig(timedelta(seconds=60)), rig(timedelta(seconds=60))
    old = reference.channel.telemetry
    reference.channel.telemetry = DoubleStep(old.replayed, old.protocol, old.heartbeat)
    play([fast, reference], steps)
    assert fast.fed == reference.fed
    assert fast.audit.records == reference.audit.records
    assert repr(fast.channel.state) == repr(reference.channel.state)
    assert repr(fast.channel.telemetry.replayed) == repr(reference.channel.telemetry.replayed)


class NearChecked(ReportCompactor):
    """The compactor, checking every time it skips the field-by-field identity check (`near`) that the check
    would have passed: every field of the live state but those a report sets is replay's very object."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.near_used = self.asked = 0

    def _agrees(self, live: CourseState, event: PumpReport, after: CourseState, near: bool) -> bool:
        self.asked += 1
        if near:
            self.near_used += 1
            ld, rd = live.__dict__, self.replayed.__dict__
            assert ld.keys() == rd.keys()
            assert all(ld[k] is rd[k] for k in ld if k not in SET_BY_REPORT)
        said = super()._agrees(live, event, after, near)
        assert said == replay_step_agrees(self.replayed, live, event, after)
        return said


def _near_checked(r: Any) -> NearChecked:
    old = r.channel.telemetry
    r.channel.telemetry = NearChecked(old.replayed, old.protocol, old.heartbeat)
    return r.channel.telemetry  # type: ignore[no-any-return]


@settings(max_examples=60, deadline=None)
@given(STEPS)
def test_the_near_state_holds_replays_objects_and_writes_the_same_log(steps: list[tuple[int, str]]) -> None:
    near, reference = rig(timedelta(seconds=60)), rig(timedelta(seconds=60))
    _near_checked(near)
    old = reference.channel.telemetry
    reference.channel.telemetry = DoubleStep(old.replayed, old.protocol, old.heartbeat)
    play([near, reference], steps)
    assert near.fed == reference.fed
    assert near.audit.records == reference.audit.records
    assert repr(near.channel.state) == repr(reference.channel.state)


def test_a_steady_course_skips_the_identity_check() -> None:
    """Not vacuous: at a 1-s poll nearly every held-back report is decided without the field-by-field check."""
    r = rig(timedelta(seconds=60))
    checked = _near_checked(r)
    play([r], [(1, "poll")] * 1800)
    assert checked.asked > 1500
    assert checked.near_used > 0.8 * checked.asked


class LongHeartbeatLater(NearChecked):
    """A 60-s heartbeat for the first ten minutes, then an hour's."""

    def _due(self, event: PumpReport) -> bool:
        if event.at >= T0 + timedelta(minutes=10):
            self.heartbeat = timedelta(hours=1)
        return super()._due(event)


def test_a_held_back_report_that_adds_a_history_sample_ends_the_near_state() -> None:
    """With a long heartbeat the reports that add a 60-s history sample are held back too: the state after one is
    not near replay's (its history moved), so the next report is checked field by field (NearChecked fails if
    it is not), and the log is the double step's."""
    r, reference = rig(timedelta(seconds=60)), rig(timedelta(seconds=60))
    old = r.channel.telemetry
    checked = r.channel.telemetry = LongHeartbeatLater(old.replayed, old.protocol, old.heartbeat)

    class Reference(LongHeartbeatLater):
        shortcut = False

    reference.channel.telemetry = Reference(old.replayed, old.protocol, old.heartbeat)
    play([r, reference], [(1, "poll")] * 1800)
    assert checked.near_used > 1000
    assert checked.asked >= checked.near_used + 15  # after a held-back report that added a sample: checked in full
    assert r.audit.records == reference.audit.records
    assert repr(r.channel.state) == repr(reference.channel.state)



def test_an_escalation_while_infusing_ends_the_near_state() -> None:
    """The schedule's next step a day in, the pump infusing throughout: the first report at the new rate sets a
    deviation base (not a quiet report) and keeps the history and the infusing flag; the state after it, held back,
    is not near replay's, so the next report is checked field by field (NearChecked fails if not)."""
    r, reference = rig(timedelta(seconds=60)), rig(timedelta(seconds=60))
    checked = _near_checked(r)
    old = reference.channel.telemetry
    reference.channel.telemetry = DoubleStep(old.replayed, old.protocol, old.heartbeat)
    play([r, reference], [(300, "poll")] * 289 + [(1, "poll")] * 120)
    assert any(rec["event"] == "setpoint" and rec["intent"] == "escalate" for rec in r.audit.records)
    assert checked.near_used > 50
    assert r.audit.records == reference.audit.records
    assert repr(r.channel.state) == repr(reference.channel.state)


def test_a_new_rate_ends_the_near_state() -> None:
    """An occlusion, then a resume: the first report at the newly verified rate sets a deviation base (not a quiet
    report, though the history and the infusing flag stay as they were): the state after it,
    held back, is not near replay's, so the next report is checked field by field (NearChecked fails if not)."""
    r, reference = rig(timedelta(seconds=60)), rig(timedelta(seconds=60))
    checked = _near_checked(r)
    old = reference.channel.telemetry
    reference.channel.telemetry = DoubleStep(old.replayed, old.protocol, old.heartbeat)
    steps = [(1, "poll")] * 300
    play([r, reference], [*steps, (1, "occlusion"), *steps[:30], (1, "clear_alarms"), (1, "resume"), *steps])
    assert checked.near_used > 250
    assert r.audit.records == reference.audit.records
    assert repr(r.channel.state) == repr(reference.channel.state)
