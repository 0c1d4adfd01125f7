"""The safety properties as a hypothesis RuleBasedStateMachine against a simple reference model.

Arbitrary interleavings of time passing, pump reports, acknowledgements (good, wrong, missing), clinician
commands, pump alarms, link loss and schedule updates drive the real core. After every step the reference model,
which knows nothing of the machine's internals, checks that what was *commanded* is safe:

- no rate above the ceiling (on the quantized value), no negative rate, nothing above the approved schedule;
- no increase once the taper has begun (taper lock);
- no escalation sooner than the step interval after the last change of dose;
- the rolling 24-h dose commanded stays within the ceiling;
- no resume above the last rate the pump verified;
- the course never runs past the course-length cap;
- no start or escalation between a wall-clock step and a clinician's acknowledgement of it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from driverd.core.commands import ApplySetpoint
from driverd.core.events import (
    ClinicianCommand,
    ClockStepped,
    Event,
    LinkLost,
    LinkRestored,
    PumpReport,
    ScheduleAccepted,
    SetpointResult,
    SyringeLoaded,
    Tick,
)
from driverd.core.kernel import hours_between
from driverd.core.machine import step
from driverd.core.quantities import NEW_ERA_RESOLUTION, dose_to_rate, quantize_down, rate_to_dose
from driverd.core.state import Phase
from tests.core.factories import PROTOCOL, T0, primed, schedule

CEILING = PROTOCOL.ceiling_mg_per_24h
INTERVAL = timedelta(hours=float(PROTOCOL.step_interval_hours))
CAP = timedelta(days=float(PROTOCOL.max_course_days))
STOPPING = ("occlusion", "end_of_syringe", "power_interrupted", "safe_mode_timeout")


class CourseSafety(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.conc = Decimal(50)
        # All steps "due" at once: the schedule does not space them, so only the core can enforce the interval
        # (schedule validation would refuse this; the core must stay safe without it — defence in depth).
        self.sched = schedule(taper=((250, 0), (100, 12), (0, 24)), spacing_hours=0)
        self.state = primed(self.sched, at=T0 - timedelta(minutes=1))
        self.now = T0 - timedelta(minutes=1)
        # reference pump: exact; rate applied at once, unless the link is down or it "rejects" a setpoint
        self.rate = Decimal(0)
        self.prev_rate = Decimal(0)
        self.infusing = False
        self.delivered = Decimal(0)
        self.alarms: tuple[str, ...] = ()
        self.link = True
        self.unacked: list[int] = []
        self.last_sent: int | None = None  # the setpoint the pump received last
        self.disobeyed_stop = False  # the pump refused a stop: it infuses on; software can only retry and alarm
        # After a link comes back the core learns what the pump does from its next report (this model has no
        # dead-man, so the pump may have infused on through the outage); until then the core cannot act.
        self.reported_since_restore = True
        # reference bookkeeping
        self.segments: list[tuple[datetime, Decimal]] = [(self.now, Decimal(0))]  # (from, commanded mL/h running)
        self.last_nonzero: Decimal | None = None
        self.last_level_change: datetime | None = None
        self.lock_rate: Decimal | None = None  # set once the taper (or stop) begins
        self.verified_run: Decimal = Decimal(0)
        self.started: datetime | None = None
        self.max_sched_rate = self._rate(self.sched.max_dose_mg_per_24h)
        self.clock_suspect = False  # a wall-clock step not yet acknowledged by a clinician

    def _rate(self, dose: Decimal) -> Decimal:
        return quantize_down(dose_to_rate(dose, self.conc), NEW_ERA_RESOLUTION)

    # ------------------------------------------------------------------ plumbing

    def _advance(self, to: datetime) -> None:
        if self.infusing:
            self.delivered += self.rate * hours_between(self.now, to)
        self.now = to

    def _feed(self, event: Event) -> None:
        self._advance(event.at)
        before_phase = self.state.phase
        change = self.state.syringe_change
        # A change whose new syringe is (said to be) in the pump and not yet verified: nothing may raise the rate
        # but the verified load itself (SyringeLoaded); the syringe in the pump is unknown (review, 2026-12-03).
        loaded_waiting = change is not None and change.loaded and not isinstance(event, SyringeLoaded)
        self.state, cmds = step(self.state, event, PROTOCOL)
        for cmd in cmds:
            if isinstance(cmd, ApplySetpoint) and cmd.attempt == 1 and cmd.setpoint.rate_ml_per_h > 0:
                assert not (loaded_waiting and cmd.setpoint.intent in ("start", "escalate", "resume")), \
                    f"{cmd.setpoint.intent} while a loaded syringe change waits for its read-back"
        if self.state.phase is Phase.TAPERING and before_phase is not Phase.TAPERING and self.lock_rate is None:
            self.lock_rate = min(self.rate, self._rate(self.state.level_mg_per_24h)) if before_phase in (
                Phase.TITRATING, Phase.HOLDING) else self._rate(self.state.level_mg_per_24h)
        for cmd in cmds:
            if isinstance(cmd, ApplySetpoint):
                self._check_setpoint(cmd)
                if self.link:
                    self.last_sent = cmd.setpoint.id
                    self.disobeyed_stop = False
                    self.prev_rate = self.rate
                    self.rate = cmd.setpoint.rate_ml_per_h
                    blocked = any(a in STOPPING for a in self.alarms)
                    self.infusing = self.rate > 0 and not blocked
                    self.segments.append((self.now, self.rate if self.infusing else Decimal(0)))
                self.unacked.append(cmd.setpoint.id)
        if self.state.phase is Phase.STOPPED and self.lock_rate is None:
            self.lock_rate = Decimal(0)

    def _check_setpoint(self, cmd: ApplySetpoint) -> None:
        sp = cmd.setpoint
        rate = sp.rate_ml_per_h
        assert rate >= 0, "negative rate"
        assert quantize_down(rate, NEW_ERA_RESOLUTION) == rate, "not representable on the pump"
        assert rate_to_dose(rate, self.conc) <= CEILING, "above the ceiling"
        assert rate <= self.max_sched_rate, "above the approved schedule"
        if self.lock_rate is not None:
            assert rate <= self.lock_rate, f"taper lock broken: {rate} > {self.lock_rate}"
            self.lock_rate = min(self.lock_rate, rate) if rate > 0 else self.lock_rate
        if self.clock_suspect and cmd.attempt == 1:
            # (A retry re-sends the same setpoint, approved before the step: not a new escalation.)
            assert sp.intent not in ("start", "escalate"), "escalation while the clock is suspect"
        if rate > 0:
            if self.started is None:
                self.started = self.now
            assert self.now < self.started + CAP, "setpoint after the course cap"
            if self.last_nonzero is not None and rate > self.last_nonzero and sp.intent != "resume":
                assert self.last_level_change is None or self.now >= self.last_level_change + INTERVAL, (
                    "escalation before the step interval"
                )
            if sp.intent == "resume":
                assert rate <= self.verified_run, "resume above the last verified rate"
            if self.last_nonzero is None or rate != self.last_nonzero:
                self.last_level_change = self.now
            self.last_nonzero = rate

    # ------------------------------------------------------------------ rules

    @rule(minutes=st.integers(min_value=1, max_value=36 * 60))
    def time_passes(self, minutes: int) -> None:
        self._feed(Tick(self.now + timedelta(minutes=minutes)))

    @rule()
    def pump_reports(self) -> None:
        if not self.link:
            return
        state = "alarm" if any(a in STOPPING for a in self.alarms) else ("infusing" if self.infusing else "stopped")
        self.reported_since_restore = True
        if self.rate > 0 and self.infusing:
            self.verified_run = self.rate  # the pump delivers this rate (reconciles uncertain ones)
        self._feed(PumpReport(self.now, state, self.rate, self.delivered, self.alarms))  # type: ignore[arg-type]

    @rule(mode=st.sampled_from(["ok", "ok", "ok", "wrong", "rejected", "none"]))
    def acknowledge(self, mode: str) -> None:
        if not self.unacked:
            return
        sid = self.unacked.pop(0)
        if mode == "ok" and self.link:
            if self.state.pending is not None and self.state.pending.setpoint.id == sid and self.rate > 0:
                self.verified_run = self.rate
            self._feed(SetpointResult(self.now, sid, self.rate))
        elif mode == "wrong" and self.link:
            self._feed(SetpointResult(self.now, sid, self.rate + Decimal("0.001")))
        elif mode == "rejected" and self.link and sid == self.last_sent:
            # the pump refused the rate it was just sent and kept the old one (only the latest can be refused: the
            # channel sends one setpoint at a time and waits for its read-back)
            self.disobeyed_stop = self.rate == 0 and self.prev_rate > 0
            self.rate = self.prev_rate
            self.infusing = self.rate > 0 and not any(a in STOPPING for a in self.alarms)
            self.segments.append((self.now, self.rate if self.infusing else Decimal(0)))
            self._feed(SetpointResult(self.now, sid, self.rate))
        else:
            self._feed(SetpointResult(self.now, sid, None, "timeout"))

    @rule(
        action=st.sampled_from(["hold", "resume", "escalate", "reduce", "taper", "stop"]),
        dose=st.none() | st.sampled_from([Decimal(d) for d in (50, 100, 150, 250, 300, 500, 600)]),
    )
    def clinician(self, action: str, dose: Decimal | None) -> None:
        self._feed(ClinicianCommand(self.now, action, "dr-a", "test", dose))  # type: ignore[arg-type]

    @rule(forward=st.booleans(), minutes=st.integers(min_value=1, max_value=3 * 24 * 60))
    def wall_clock_steps(self, forward: bool, minutes: int) -> None:
        delta = timedelta(minutes=minutes) if forward else -timedelta(minutes=minutes)
        self._feed(ClockStepped(self.now, Decimal(int(delta.total_seconds())), self.now + delta))
        self.clock_suspect = True

    @rule()
    def clock_acknowledged(self) -> None:
        self._feed(ClinicianCommand(self.now, "ack_clock", "dr-a", "checked the time"))
        self.clock_suspect = False

    @rule(kind=st.sampled_from((*STOPPING, "near_end", "low_battery")))
    def pump_alarm(self, kind: str) -> None:
        self.alarms = (*self.alarms, kind)
        if kind in STOPPING and self.infusing:
            self.infusing = False
            self.segments.append((self.now, Decimal(0)))

    @rule()
    def alarm_cleared_at_pump(self) -> None:
        self.alarms = ()

    @rule()
    def link_lost(self) -> None:
        self.link = False
        self._feed(LinkLost(self.now, "no reply"))

    @precondition(lambda self: not self.link)
    @rule()
    def link_restored(self) -> None:
        self.link = True
        self.reported_since_restore = False
        self._feed(LinkRestored(self.now))

    @rule(kind=st.sampled_from(["lower", "same", "evil"]), auto=st.booleans())
    def schedule_update(self, kind: str, auto: bool) -> None:
        # "evil": a step above the ceiling that validation would refuse; the core must refuse it on its own.
        lower = kind == "lower"
        doses = {"lower": (100, 300), "same": (100, 300, 500), "evil": (100, 300, 500, 700)}[kind]
        new = schedule(doses=doses, auto=auto, version=self.sched.version + 1, spacing_hours=0,
                       taper=((250 if not lower else 200, 0), (100, 12), (0, 24)))
        self._feed(ScheduleAccepted(self.now, new))
        if self.state.schedule is new:
            self.sched = new
            self.max_sched_rate = min(self._rate(CEILING), self._rate(new.max_dose_mg_per_24h))

    @rule()
    def syringe_change(self) -> None:
        """A clinician changes the syringe (same concentration: the reference model's rates stay valid)."""
        self._feed(ClinicianCommand(self.now, "change_syringe", "nurse-1", "daily change", None, Decimal(17)))

    @precondition(lambda self: self.link)
    @rule(right=st.booleans())
    def syringe_loaded(self, right: bool) -> None:
        """The pump's read-back of the new syringe: the right diameter, or a wrong syringe."""
        self._feed(SyringeLoaded(self.now, Decimal("19.13") if right else Decimal("21.59"), self.delivered))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def rolling_24h_commanded_dose_within_ceiling(self) -> None:
        start = self.now - timedelta(hours=24)
        total = Decimal(0)
        for i, (frm, rate) in enumerate(self.segments):
            to = self.segments[i + 1][0] if i + 1 < len(self.segments) else self.now
            lo, hi = max(frm, start), min(to, self.now)
            if hi > lo:
                total += rate * hours_between(lo, hi)
        assert rate_to_dose(total / 24, self.conc) <= CEILING

    @invariant()
    def course_never_longer_than_cap(self) -> None:
        if self.started is not None and self.now >= self.started + CAP:
            assert self.state.phase is Phase.STOPPED
            if self.link and self.reported_since_restore and not self.disobeyed_stop:
                assert not self.infusing, "pump still infusing past the cap"

    @invariant()
    def stopped_means_locked(self) -> None:
        if self.state.phase in (Phase.TAPERING, Phase.STOPPED):
            assert self.state.taper_lock


TestCourseSafety = CourseSafety.TestCase
