"""The model's per-poll fast path changes nothing: the same calls, at the same times, give the same readings and
events (repr: every Decimal's exponent) as a model that checks for due events in full on every call; and
`reading()` carries exactly `status()`'s values."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from drivers.base import AlarmKind
from simulators.clock import ManualClock
from simulators.pump import ModelError, PumpModel


class FullCheck(PumpModel):
    """The model without its bound on the next event: every call checks near end, end and dead-man in full."""

    @property
    def _quiet_until(self) -> None:
        return None

    @_quiet_until.setter
    def _quiet_until(self, value: object) -> None:
        pass


RATES = st.sampled_from(["0", "0.208", "2.5", "0.4166", "12", "60", "0.01"])
OPS = st.lists(st.one_of(
    st.tuples(st.just("wait"), st.sampled_from([1, 4_999_999, 1_000_000, 5_000_000, 180_000_000, 181_000_000,
                                                3_600_000_000, 36_000_000_000])),
    st.tuples(st.just("wait"), st.integers(min_value=1, max_value=10_000_000_000)),
    st.tuples(st.sampled_from(["host_contact", "status", "reading"]), st.none()),
    st.tuples(st.just("set_rate"), RATES),
    st.tuples(st.sampled_from(["run", "stop", "clear_alarm", "host_contact", "status", "reading", "clear_delivered",
                               "power_cycle"]), st.none()),
    st.tuples(st.just("set_deadman"), st.sampled_from([0, 5, 180])),
    st.tuples(st.just("load_syringe"), st.sampled_from(["8", "0.5", "20"])),
    st.tuples(st.just("inject_alarm"), st.sampled_from([AlarmKind.OCCLUSION, AlarmKind.NEAR_END])),
), max_size=60)


def apply(pump: PumpModel, op: str, arg: Any) -> str:
    try:
        if op == "set_rate":
            pump.set_rate(Decimal(arg))
        elif op in ("set_deadman", "inject_alarm"):
            getattr(pump, op)(arg)
        elif op == "load_syringe":
            pump.load_syringe(Decimal(arg))
        elif op == "status":
            return repr(pump.status())
        elif op == "reading":
            reading = pump.reading()
            status = pump.status()
            assert reading == (status.state, status.rate_ml_per_h, status.delivered_ml, status.diameter_mm,
                               status.alarms)
            return repr(reading)
        else:
            getattr(pump, op)()
    except ModelError as exc:
        return f"refused {exc.code}"
    return "ok"


ARMED = [("set_deadman", 5), ("host_contact", None)]
RUNNING = [("set_rate", "60"), ("run", None)]


@settings(max_examples=400, deadline=None)
@given(OPS, st.sampled_from(["2", "8", "0.05"]))
# The hazards, explicitly: a dead-man armed after the bound was computed, due at exactly a whole µs; the near end
# and the end of a syringe crossed between two reads; a command between reads at one instant.
@example([*ARMED, ("wait", 5_000_000), ("status", None)], "8")
@example([*RUNNING, ("status", None), *ARMED, ("wait", 4_999_999), ("reading", None), ("wait", 1), ("reading", None)],
         "8")
@example([*RUNNING, ("status", None), ("wait", 36_000_000_000), ("reading", None), ("wait", 1_000_000),
          ("status", None)], "0.05")
@example([*RUNNING, ("reading", None), ("wait", 3_600_000_000), ("reading", None), ("clear_alarm", None),
          ("load_syringe", "2"), ("run", None), ("reading", None), ("wait", 3_600_000_000), ("status", None)], "2")
def test_the_fast_path_gives_the_same_readings_and_events(ops: list[tuple[str, Any]], fill: str) -> None:
    clocks = [ManualClock(datetime(2026, 1, 1, tzinfo=UTC)) for _ in range(2)]
    fast, full = (cls(c, fill_volume_ml=Decimal(fill), near_end_ml=Decimal("0.02"), diameter_mm=Decimal("21.59"))
                  for cls, c in zip((PumpModel, FullCheck), clocks, strict=True))
    for op, arg in ops:
        if op == "wait":
            for c in clocks:
                c.advance(Decimal(arg) / 1_000_000)
            continue
        else:
            outcome = [apply(p, op, arg) for p in (fast, full)]
        assert outcome[0] == outcome[1], (op, arg)
        assert fast.deadman_setting_s == full.deadman_setting_s
    assert repr(fast.events()) == repr(full.events())
    assert repr(fast.status()) == repr(full.status())
