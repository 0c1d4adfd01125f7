"""A pump that does its own thing, against the real core (hypothesis RuleBasedStateMachine).

The reference pump here obeys the core only as a real one does: it is RUN and STOPPED at its panel, runs fast or
slow by a factor while reporting the programmed rate, loses its volume counter, occludes during a link loss,
ignores a command now and then, and the daemon restarts at any point. The channel is modelled as it works: a
setpoint goes on the wire at once while the link is up and its read-back (or its loss) is fed back straight away;
time passes in polls, each with a tick and a pump report. After every step the model checks what the pump does:

- SUP-1: the pump is never left infusing uncommanded for more than one poll after it is seen (two when it ignored
  the first stop);
- SUP-3: the volume it really delivered in any 24-h window never exceeds the drug-library ceiling by more than the
  counter allowance plus what a poll or two at the highest rate it ran allows;
- SUP-2: a decrease or stop the core accepts is on the wire at once while the link is up (the pump then runs at
  most the new rate), unless the pump ignored it, and then after the next poll;
- SUP-15: the pump's counter may be shown like a display (truncated to a fixed 0.001 mL, or to 4 significant digits
  as a New Era shows it, from a counter earlier use left at up to 99.9 mL; the report carries the reading's step,
  as drivers do); while the pump has done exactly what it was told (no drift, no counter reset, no
  panel use, no ignored command, no lost link or crash), no `under_infusion`, `over_infusion` or `dose_ceiling` is
  ever raised; the ceiling's allowance is two steps of the coarsest reading (never finer than the library's);
- SUP-21: a counter that reads lower than the last report (the `counter_reset` rule: no clear driverd ordered), in a
  live course, is the alarm `counter_drop` after that very report, and the pump is not left infusing (unless it
  ignored the stop);
- RESTART: a restart rebuilds the state through the snapshot encoding (`state_records`, whose decoder re-mints a
  pending setpoint through `kernel.restore_setpoint`, the kernel's one door besides its gate), and from a restart
  with a setpoint unverified until a clinician resumes, nothing goes on the wire above the last verified run rate
  (or a rate the pump has since been read back running): a restored setpoint is never re-sent as an increase.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import ROUND_DOWN, Decimal

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from driverd.core.commands import ApplySetpoint, Command, Refused
from driverd.core.events import (
    ClinicianCommand,
    Event,
    LinkLost,
    LinkRestored,
    PumpReport,
    SetpointResult,
    Tick,
)
from driverd.core.kernel import hours_between, pump_rate
from driverd.core.machine import step
from driverd.core.state import ACTIVE, Phase
from driverd.core.state_records import state_from_fields, state_to_fields
from tests.core.factories import PROTOCOL, T0, primed, schedule

POLL = timedelta(minutes=10)
CONC = Decimal(50)
CEILING_ML = PROTOCOL.ceiling_mg_per_24h / CONC
NO_INFUSION = (Phase.IDLE, Phase.PRIMED, Phase.PAUSED, Phase.STOPPED)


class PumpOfItsOwn(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = primed(schedule(taper=((250, 0), (100, 12), (0, 24))), at=T0 - timedelta(minutes=1))
        self.now = T0 - timedelta(minutes=1)
        self.programmed = Decimal(0)
        self.infusing = False
        self.factor = Decimal(1)  # true delivery / programmed rate
        self.true_ml = Decimal(0)
        self.counter = Decimal(0)  # what the pump reports (can reset)
        self.display = "exact"  # how the counter is shown (the_counters_display)
        self.faithful = True  # the pump did exactly what it was told so far (SUP-15 applies)
        self.alarms: tuple[str, ...] = ()
        self.link = True
        self.deaf = False  # ignores the next command
        self.ignored = False  # it ignored a command since the last poll
        self.history: list[tuple[object, Decimal]] = [(self.now, Decimal(0))]  # (time, true cumulative mL)
        self.max_true_rate = Decimal(0)
        self.max_step = PROTOCOL.counter_resolution_ml  # the coarsest counter step the core was told (never finer)
        self.uncommanded_polls = 0
        self.unobserved_until = self.now  # the pump ran unobserved (link down) until here: no supervision then
        self.restart_cap: Decimal | None = None  # after a restart with a setpoint open: the highest rate allowed
        self.crash_after_send: bool | None = None  # the daemon dies right after the next send (the pump took it?)
        self.dead = False  # the daemon died mid-step: nothing more is processed until it restarts
        self.depth = 0

    # ------------------------------------------------------------------ the pump and the channel

    def _advance(self, to: object) -> None:
        assert isinstance(to, type(self.now))
        if self.infusing:
            vol = self.programmed * self.factor * hours_between(self.now, to)
            self.true_ml += vol
            self.counter += vol
        self.now = to

    def _report(self) -> PumpReport:
        state = "alarm" if self.alarms else ("infusing" if self.infusing else "stopped")
        if self.display == "exact":
            shown, step = self.counter, None
        else:
            places = 3 if self.display == "fixed" else min(3, 4 - max(self.counter.adjusted() + 1, 0))
            step = Decimal(1).scaleb(-places)
            shown = (self.counter / step).to_integral_value(ROUND_DOWN) * step
            self.max_step = max(self.max_step, step)
        return PumpReport(self.now, state, self.programmed, shown, self.alarms, step)  # type: ignore[arg-type]

    def _feed(self, event: Event) -> tuple[Command, ...]:
        if self.dead:
            return ()
        self.depth += 1
        try:
            return self._step(event)
        finally:
            self.depth -= 1
            if self.depth == 0 and self.dead:
                self.dead = False
                self.daemon_restarts()

    def _step(self, event: Event) -> tuple[Command, ...]:
        self.state, cmds = step(self.state, event, PROTOCOL)
        out = list(cmds)
        for cmd in cmds:
            if isinstance(cmd, ApplySetpoint):
                if self.restart_cap is not None:  # RESTART
                    assert cmd.setpoint.rate_ml_per_h <= self.restart_cap, (
                        f"after a restart {cmd.setpoint.rate_ml_per_h} mL/h sent, last verified {self.restart_cap}")
                out += self._apply(cmd)
            if self.dead:
                break
            if self.restart_cap is not None:  # the pump read back running a rate: that rate is verified now
                self.restart_cap = max(self.restart_cap, self.state.verified_rate)
        return tuple(out)

    def _apply(self, cmd: ApplySetpoint) -> tuple[Command, ...]:
        sp = cmd.setpoint
        if not self.link:
            return self._feed(SetpointResult(self.now, sp.id, None, "timeout"))
        if self.crash_after_send is not None:  # on the wire, then the daemon dies before the read-back
            taken, self.crash_after_send, self.dead = self.crash_after_send, None, True
            self.ignored = self.ignored or not taken  # on the wire but not taken: as a pump that ignored it
            if taken and sp.is_stop:
                self.infusing = False
            elif taken:
                self.programmed, self.infusing = sp.rate_ml_per_h, not self.alarms
                if self.infusing:
                    self.max_true_rate = max(self.max_true_rate, self.programmed * self.factor)
            return ()
        if self.deaf:
            self.deaf, self.ignored = False, True
        elif sp.is_stop:
            self.infusing = False
        else:
            self.programmed = sp.rate_ml_per_h
            self.infusing = not self.alarms
        if self.infusing:
            self.max_true_rate = max(self.max_true_rate, self.programmed * self.factor)
        readback = (self.programmed if self.infusing else Decimal(0)) if sp.is_stop else self.programmed
        if not sp.is_stop and not self.infusing:
            readback = Decimal(0)  # a refused RUN: the channel reads back what the pump delivers
        return self._feed(SetpointResult(self.now, sp.id, readback))

    def _uncommanded(self) -> bool:
        if not self.infusing:
            return False
        if self.state.phase in NO_INFUSION:
            return True
        return self.state.phase is Phase.ALARM and self.programmed > self.state.commanded_rate

    # ------------------------------------------------------------------ rules

    @rule(polls=st.integers(min_value=1, max_value=18))
    def time_passes(self, polls: int) -> None:
        for _ in range(polls):
            self._advance(self.now + POLL)
            self.history.append((self.now, self.true_ml))
            self._feed(Tick(self.now))
            if not self.link:
                continue
            self.ignored = False
            report, before = self._report(), self.state
            self._feed(report)
            if (before.phase in ACTIVE and before.raw_delivered_ml is not None
                    and report.delivered_ml < before.raw_delivered_ml and not self.dead):
                # SUP-21 (no syringe change happens here: no exemption applies).
                assert "counter_drop" in self.state.alarm_causes, "a counter drop raised no alarm"
                assert not self.infusing or self.ignored or not self.link, "pump left infusing after a counter drop"
            if self._uncommanded():
                self.uncommanded_polls += 1
                # SUP-1: stopped within one poll of being seen (one more if the pump ignored that stop).
                assert self.uncommanded_polls <= 1 or self.ignored, "pump left infusing uncommanded"
                assert self.uncommanded_polls <= 2, "pump left infusing uncommanded for more than two polls"
            else:
                self.uncommanded_polls = 0

    @rule(rate=st.sampled_from([None, Decimal("0.083"), Decimal("0.5"), Decimal("1.0")]))
    def panel_run(self, rate: Decimal | None) -> None:
        self.faithful = False
        if self.alarms:
            return
        if rate is not None:
            self.programmed = rate
        if self.programmed > 0:
            self.infusing = True
            self.max_true_rate = max(self.max_true_rate, self.programmed * self.factor)

    @rule()
    def panel_stop(self) -> None:
        self.faithful = False
        self.infusing = False

    @rule(factor=st.sampled_from([Decimal("0.5"), Decimal("0.8"), Decimal(1), Decimal("1.3"), Decimal(2)]))
    def runs_off(self, factor: Decimal) -> None:
        self.faithful = self.faithful and factor == 1
        self.factor = factor
        if self.infusing:
            self.max_true_rate = max(self.max_true_rate, self.programmed * factor)

    @rule()
    def counter_reset(self) -> None:
        self.faithful = False
        self.counter = Decimal(0)

    @rule()
    def occlusion(self) -> None:
        self.faithful = False
        self.alarms = ("occlusion",)
        self.infusing = False

    @rule()
    def alarm_cleared_at_pump(self) -> None:
        self.alarms = ()

    @rule()
    def ignores_next_command(self) -> None:
        self.faithful = False
        self.deaf = True

    @rule()
    def link_lost(self) -> None:
        self.faithful = False
        self.link = False
        self._feed(LinkLost(self.now, "no reply"))

    @precondition(lambda self: not self.link)
    @rule()
    def link_restored(self) -> None:
        self.link = True
        self.unobserved_until = self.now
        self._feed(LinkRestored(self.now))

    @rule(taken=st.booleans())
    def crash_after_next_send(self, taken: bool) -> None:
        self.faithful = False
        self.crash_after_send = taken

    @rule()
    def daemon_restarts(self) -> None:
        # Recovery rebuilds exactly the live state from a snapshot and the records after it
        # (tests/runtime/test_crash_points.py); here the state goes through the snapshot encoding, so a pending
        # setpoint is re-minted by kernel.restore_setpoint. Start-up then treats a setpoint still open as
        # uncertain, as after a lost link.
        restored = state_from_fields(state_to_fields(self.state))
        assert restored == self.state
        self.state = restored
        if self.state.pending is not None:
            self.faithful = False  # restarted with a setpoint open: the link counts as lost
            self.restart_cap = max(self.state.verified_run_rate, self.state.verified_rate)
            self._feed(LinkLost(self.now, "restart with a setpoint unverified"))
            self.link = False

    @rule(
        action=st.sampled_from(["resume", "escalate", "reduce", "stop", "taper", "hold"]),
        dose=st.none() | st.sampled_from([Decimal(100), Decimal(300)]),
    )
    def clinician(self, action: str, dose: Decimal | None) -> None:
        self.ignored = False
        cmds = self._feed(ClinicianCommand(self.now, action, "dr", "t", dose))  # type: ignore[arg-type]
        accepted = not any(isinstance(c, Refused) for c in cmds)
        if accepted and action in ("resume", "escalate"):
            self.restart_cap = None  # a clinician has decided (a resume was itself held to the cap above)
        if not (accepted and self.link and not self.ignored and self.state.pending is None):
            return
        # SUP-2: an accepted decrease or stop is on the wire at once: the pump runs at most the new rate.
        if action == "stop":
            assert not self.infusing, "accepted stop did not reach the pump"
        elif action == "reduce" and self.infusing and self.state.schedule is not None:
            assert self.programmed <= pump_rate(self.state, self.state.level_mg_per_24h) or (
                self.state.phase is Phase.ALARM and self.programmed <= self.state.commanded_rate
            ), "accepted reduce did not reach the pump"

    # Weighted toward the coarse case (a 4-digit display about to pass 100 mL), which needs hours of faithful running.
    @initialize(display=st.sampled_from(["digits", "digits", "fixed", "exact"]),
                used=st.sampled_from([Decimal(0), Decimal("9.99"), Decimal("99.9"), Decimal("99.9")]))
    def the_counters_display(self, display: str, used: Decimal) -> None:
        """How the pump shows its counter, and what it holds from earlier use (nobody cleared it): exact with no
        step reported, a fixed 0.001 mL step, or 4 significant digits (New Era: 0.01 mL from 10 mL, 0.1 mL from
        100 mL), each reading with its step."""
        self.display, self.counter = display, used

    # ------------------------------------------------------------------ invariants

    @invariant()
    def no_false_accuracy_alarm(self) -> None:
        """SUP-15: a pump that delivers exactly what it was told is never reported off by the accuracy check, however
        coarse its counter's display, as long as the report says how coarse."""
        if self.faithful:
            wrong = [a for a in self.state.alarms_raised if a in ("under_infusion", "over_infusion", "dose_ceiling")]
            assert not wrong, f"{wrong} raised on a faithful pump ({self.display} display, counter {self.counter})"

    @invariant()
    def delivered_24h_within_the_ceiling(self) -> None:
        """SUP-3, on what the pump really delivered (its own fault included), not on what was commanded."""
        start = self.now - timedelta(hours=24)
        if not self.link or start < self.unobserved_until:
            return  # nobody can see (or stop) a pump without a link: its own dead-man is the control then
        before = [ml for t, ml in self.history if t <= start]  # type: ignore[operator]
        window = self.true_ml - (before[-1] if before else Decimal(0))
        # Two counter steps (the coarsest reading's, never finer than the library's: SUP-15), plus the polls.
        allowance = 2 * self.max_step + 3 * self.max_true_rate * hours_between(start, start + POLL)
        assert window <= CEILING_ML + allowance, f"{window} mL in 24 h"


TestPumpOfItsOwn = PumpOfItsOwn.TestCase
