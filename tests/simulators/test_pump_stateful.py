"""Stateful property test: any sequence of commands, faults and elapsed time keeps the model's invariants.

A tiny reference model (the rules from the shared contract, written independently) predicts refusals, state
and volume; the pump model must agree at every step.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Context, Decimal, localcontext

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from drivers.base import WARNING_ALARMS, AlarmKind, PumpState
from simulators.clock import ManualClock
from simulators.pump import ModelError, PumpModel

US_PER_H = Decimal(3_600_000_000)
FILL = Decimal(5)
STOPPING = [k for k in AlarmKind if k not in WARNING_ALARMS]
rates = st.builds(lambda n, k: Decimal(n).scaleb(-k), st.integers(0, 9999), st.integers(0, 3)).filter(
    lambda r: r <= 20
)


class PumpMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
        # No plunger speed range here (plunger=None): this machine checks alarms and volumes for any rate; the
        # range is tested on its own (tests/newera/test_wire_fidelity.py, drivers/testing/contract.py).
        self.pump = PumpModel(self.clock, fill_volume_ml=FILL, near_end_ml=Decimal("0.5"), plunger=None)
        self.delivered = Decimal(0)  # last observed
        self.rate = Decimal(0)
        self.blocked = False  # an unacknowledged stopping alarm (reference model)
        self.empty = False

    def _call(self, fn: object) -> str | None:
        try:
            fn()  # type: ignore[operator]
        except ModelError as exc:
            return exc.code
        return None

    @rule(rate=rates)
    def set_rate(self, rate: Decimal) -> None:
        code = self._call(lambda: self.pump.set_rate(rate))
        assert code == ("ALARM" if self.blocked else None)
        if code is None:
            self.rate = rate

    @rule()
    def run(self) -> None:
        running = self.pump.status().state is PumpState.INFUSING
        code = self._call(self.pump.run)
        if self.blocked:
            assert code == "ALARM"
        elif running:
            assert code is None
        elif self.rate == 0 or self.empty:
            assert code == "NA"
        else:
            assert code is None

    @rule()
    def stop(self) -> None:
        assert self._call(self.pump.stop) is None
        assert self.pump.status().state is not PumpState.INFUSING

    @rule(kind=st.sampled_from(list(AlarmKind)))
    def inject(self, kind: AlarmKind) -> None:
        running = self.pump.status().state is PumpState.INFUSING
        self.pump.inject_alarm(kind)
        s = self.pump.status()
        assert kind in s.alarms
        if kind in WARNING_ALARMS:
            assert (s.state is PumpState.INFUSING) == running
        else:
            self.blocked = True
            assert s.state is PumpState.ALARM

    @rule()
    def power_cycle(self) -> None:
        self.pump.power_cycle()
        self.blocked = True

    @rule()
    def clear_alarm(self) -> None:
        self.pump.clear_alarm()
        self.blocked = False

    @rule(fill=st.sampled_from([Decimal(1), Decimal(5), Decimal("0.25")]))
    def load(self, fill: Decimal) -> None:
        running = self.pump.status().state is PumpState.INFUSING
        code = self._call(lambda: self.pump.load_syringe(fill))
        assert code == ("ALARM" if self.blocked else "NA" if running else None)
        if code is None:
            self.empty = False
            assert self.pump.status().remaining_ml == fill

    @rule()
    def clear_delivered(self) -> None:
        self.pump.clear_delivered()
        self.delivered = Decimal(0)

    @rule(seconds=st.integers(0, 4 * 3600))
    def wait(self, seconds: int) -> None:
        before = self.pump.status()
        self.clock.advance(seconds)
        after = self.pump.status()
        if before.state is PumpState.INFUSING:
            with localcontext(Context(prec=80)):
                expected_used = min(before.rate_ml_per_h * seconds / 3600, before.remaining_ml)
            with localcontext(Context(prec=30)):
                assert abs((after.delivered_ml - before.delivered_ml) - expected_used) < Decimal("1e-20")
            if after.remaining_ml == 0:
                self.empty = True
                self.blocked = True
                assert AlarmKind.END_OF_SYRINGE in after.alarms and after.state is PumpState.ALARM
        else:
            assert after.delivered_ml == before.delivered_ml

    @invariant()
    def volumes_are_sane(self) -> None:
        s = self.pump.status()
        assert s.delivered_ml >= 0 and s.remaining_ml >= 0
        assert s.delivered_ml >= self.delivered
        assert s.remaining_ml <= s.fill_volume_ml
        self.delivered = s.delivered_ml
        self.empty = s.remaining_ml == 0

    @invariant()
    def state_follows_alarms(self) -> None:
        s = self.pump.status()
        blocking = {a for a in s.unacknowledged if a not in WARNING_ALARMS}
        assert bool(blocking) == self.blocked
        if blocking:
            assert s.state is PumpState.ALARM
        assert s.unacknowledged <= s.alarms
        if s.remaining_ml <= Decimal("0.5") and s.state is PumpState.INFUSING:
            assert AlarmKind.NEAR_END in s.alarms


PumpMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestPumpMachine = PumpMachine.TestCase
