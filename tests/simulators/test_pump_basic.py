"""PumpModel behaviour: commands, refusals, alarms, dead-man, on a ManualClock (virtual time)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Context, localcontext
from decimal import Decimal as D

import pytest

from drivers.base import AlarmKind, PumpState
from simulators.clock import ManualClock, SystemClock
from simulators.pump import ModelError, PumpModel
from simulators.world import World

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make(**kw: object) -> tuple[ManualClock, PumpModel]:
    clock = ManualClock(T0)
    return clock, PumpModel(clock, **kw)  # type: ignore[arg-type]


def test_defaults_and_identity() -> None:
    _, p = make()
    s = p.status()
    assert p.identity == ("NE-1000", "V3.928")
    assert s.state is PumpState.STOPPED
    assert (s.rate_ml_per_h, s.delivered_ml, s.remaining_ml) == (0, 0, D(17))
    assert s.diameter_mm == D("19.13") and s.alarms == frozenset() and s.battery_pct == 100 and s.deadman_s == 0


def test_delivered_is_rate_times_time_exactly() -> None:
    clock, p = make()
    p.set_rate(D("2.083"))
    p.run()
    clock.advance(3600)
    s = p.status()
    assert s.state is PumpState.INFUSING
    assert s.delivered_ml == D("2.083") and s.remaining_ml == D(17) - D("2.083")
    clock.advance(D("0.000001"))
    with localcontext(Context(prec=34)):  # the model reports volumes to 34 significant digits
        expected = D("2.083") * D(3_600_000_001) / D(3_600_000_000)
    assert p.status().delivered_ml == expected


def test_rate_change_while_infusing_integrates_each_segment() -> None:
    clock, p = make()
    p.set_rate(D(1))
    p.run()
    clock.advance(1800)
    p.set_rate(D(3))
    clock.advance(1800)
    assert p.status().delivered_ml == D(2)


@pytest.mark.parametrize(
    "bad", [D("-1"), D("1000.1"), D("2.0833"), D("12345"), D("NaN"), D("Infinity"), 1.5, "2", True, None]
)
def test_set_rate_rejects_what_the_pump_cannot_hold(bad: object) -> None:
    _, p = make()
    p.set_rate(D("1.5"))
    with pytest.raises(ModelError) as exc:
        p.set_rate(bad)  # type: ignore[arg-type]
    assert exc.value.code == "OOR" and "rate_ml_per_h" in str(exc.value)
    assert p.status().rate_ml_per_h == D("1.5")  # unchanged


def test_set_rate_not_rounded_but_equal_representations_accepted() -> None:
    _, p = make()
    p.set_rate(D("1.2500"))  # same value as 1.25; the pump can hold it
    assert p.status().rate_ml_per_h == D("1.25")
    with pytest.raises(ModelError, match="not representable"):
        p.set_rate(D("0.00001"))


def test_run_needs_a_rate_and_a_syringe() -> None:
    clock, p = make(fill_volume_ml=D(1), near_end_ml=D(0))
    with pytest.raises(ModelError) as exc:
        p.run()
    assert exc.value.code == "NA"
    p.set_rate(D(1))
    p.run()
    p.run()  # idempotent
    clock.advance(7200)
    p.clear_alarm()
    with pytest.raises(ModelError) as exc:
        p.run()
    assert exc.value.code == "NA" and "empty" in str(exc.value)


def test_diameter_rules() -> None:
    _, p = make()
    for bad in (D("0.09"), D("50.001"), D("-3"), D("19.1234"), 20.0):
        with pytest.raises(ModelError) as exc:
            p.set_diameter(bad)  # type: ignore[arg-type]
        assert exc.value.code == "OOR" and "diameter_mm" in str(exc.value)
    p.set_diameter(D("26.7"))
    assert p.status().diameter_mm == D("26.7")
    p.set_rate(D(1))
    p.run()
    with pytest.raises(ModelError) as exc:
        p.set_diameter(D("19.13"))
    assert exc.value.code == "NA"
    assert p.status().diameter_mm == D("26.7")


def test_stop_idempotent_and_always_allowed() -> None:
    _, p = make()
    p.stop()
    p.set_rate(D(1))
    p.run()
    p.inject_alarm(AlarmKind.OCCLUSION)
    p.stop()
    p.stop()
    assert p.status().state is PumpState.ALARM


@pytest.mark.parametrize(
    "kind",
    [
        AlarmKind.OCCLUSION,
        AlarmKind.END_OF_SYRINGE,
        AlarmKind.POWER_INTERRUPTED,
        AlarmKind.SAFE_MODE_TIMEOUT,
        AlarmKind.PROGRAM_ERROR,
        AlarmKind.OTHER,
    ],
)
def test_stopping_alarm_blocks_data_until_acknowledged(kind: AlarmKind) -> None:
    clock, p = make()
    p.set_rate(D(1))
    p.run()
    clock.advance(60)
    p.inject_alarm(kind)
    s = p.status()
    assert s.state is PumpState.ALARM and kind in s.alarms
    for call in (lambda: p.set_rate(D(2)), p.run, lambda: p.set_diameter(D(20)), lambda: p.load_syringe(D(10))):
        with pytest.raises(ModelError) as exc:
            call()
        assert exc.value.code == "ALARM"
    delivered = s.delivered_ml
    clock.advance(600)
    assert p.status().delivered_ml == delivered  # stopped
    p.clear_alarm()
    s = p.status()
    assert s.state is PumpState.STOPPED and kind not in s.alarms
    p.set_rate(D(2))
    p.run()
    assert p.status().state is PumpState.INFUSING


@pytest.mark.parametrize("kind", [AlarmKind.NEAR_END, AlarmKind.LOW_BATTERY])
def test_warnings_keep_infusing_and_never_block(kind: AlarmKind) -> None:
    clock, p = make()
    p.set_rate(D(1))
    p.run()
    p.inject_alarm(kind)
    clock.advance(3600)
    s = p.status()
    assert s.state is PumpState.INFUSING and kind in s.alarms and s.delivered_ml == D(1)
    p.set_rate(D(2))  # not blocked
    p.clear_alarm()
    assert kind not in p.status().alarms  # injected, condition does not hold


def test_low_battery_from_level_persists_until_recharged() -> None:
    _, p = make()
    p.set_battery(21)
    assert AlarmKind.LOW_BATTERY not in p.status().alarms
    p.set_battery(20)
    p.clear_alarm()
    assert AlarmKind.LOW_BATTERY in p.status().alarms  # still holds
    p.set_battery(80)
    p.clear_alarm()
    assert AlarmKind.LOW_BATTERY not in p.status().alarms
    for bad in (-1, 101, True, 50.0):
        with pytest.raises(ModelError):
            p.set_battery(bad)  # type: ignore[arg-type]
    assert p.status().battery_pct == 80


def test_near_end_and_end_of_syringe_at_exact_times() -> None:
    clock, p = make(fill_volume_ml=D(10), near_end_ml=D(1))
    p.set_rate(D(1))
    p.run()
    clock.advance(9 * 3600 - 1)
    assert AlarmKind.NEAR_END not in p.status().alarms
    clock.advance(1)
    s = p.status()
    assert AlarmKind.NEAR_END in s.alarms and s.state is PumpState.INFUSING and s.remaining_ml == 1
    clock.advance(3600 - 1)
    assert p.status().state is PumpState.INFUSING
    clock.advance(3600 * 100)
    s = p.status()
    assert s.state is PumpState.ALARM and AlarmKind.END_OF_SYRINGE in s.alarms
    assert s.remaining_ml == 0 and s.delivered_ml == 10
    ends = [e for e in p.events() if e.kind == "end_of_syringe"]
    assert len(ends) == 1 and ends[0].at_us == 10 * 3600 * 10**6
    near = [e for e in p.events() if e.kind == "near_end"]
    assert near[0].at_us == 9 * 3600 * 10**6 and near[0].delivered_ml == 9


def test_empty_syringe_then_new_syringe() -> None:
    clock, p = make(fill_volume_ml=D(1), near_end_ml=D("0.5"))
    p.set_rate(D(1))
    p.run()
    clock.advance(86400)
    p.clear_alarm()
    s = p.status()
    assert s.state is PumpState.STOPPED and {AlarmKind.END_OF_SYRINGE, AlarmKind.NEAR_END} <= s.alarms
    p.load_syringe(D(5), D("26.7"))
    s = p.status()
    assert s.alarms == frozenset() and s.remaining_ml == 5 and s.diameter_mm == D("26.7") and s.delivered_ml == 1
    p.clear_delivered()
    assert p.status().delivered_ml == 0
    for bad in (D(0), D(-1), D(1001), 3.0):
        with pytest.raises(ModelError) as exc:
            p.load_syringe(bad)  # type: ignore[arg-type]
        assert "fill_volume_ml" in str(exc.value)


def test_deadman_armed_by_first_contact_and_fires_exactly() -> None:
    clock, p = make()
    p.set_rate(D(36))
    p.set_deadman(10)
    p.run()
    clock.advance(100)
    assert p.status().state is PumpState.INFUSING  # not armed yet: no contact since set
    p.host_contact()
    clock.advance(9)
    p.host_contact()  # re-arms
    clock.advance(10)
    s = p.status()
    assert s.state is PumpState.ALARM and AlarmKind.SAFE_MODE_TIMEOUT in s.alarms
    # 119 s at 36 mL/h = 1.19 mL: stopped exactly at the expiry, not at the read
    assert s.delivered_ml == D("1.19")
    clock.advance(50)
    assert p.status().delivered_ml == D("1.19")
    p.set_deadman(0)
    p.clear_alarm()
    p.host_contact()
    clock.advance(1000)
    assert p.status().alarms == frozenset()
    for bad in (-1, 256, 1.0):
        with pytest.raises(ModelError):
            p.set_deadman(bad)  # type: ignore[arg-type]


def test_power_cycle_keeps_settings_and_disarms_deadman() -> None:
    clock, p = make()
    p.set_rate(D(2))
    p.set_deadman(5)
    p.host_contact()
    p.run()
    clock.advance(1)
    p.power_cycle()
    s = p.status()
    assert s.state is PumpState.ALARM and AlarmKind.POWER_INTERRUPTED in s.alarms
    assert s.rate_ml_per_h == 2 and s.deadman_s == 5 and not s.deadman_armed
    clock.advance(1000)
    assert AlarmKind.SAFE_MODE_TIMEOUT not in p.status().alarms


def test_system_clock_and_world() -> None:
    w = World(SystemClock())
    a = w.pump("bed-1", fill_volume_ml=D(20))
    assert w.pump("bed-1") is a and w.pump("bed-2") is not a
    assert a.status().fill_volume_ml == 20 and w.names() == ["bed-1", "bed-2"]
    assert w.faults("bed-1") is w.faults("bed-1")
    with pytest.raises(ValueError):
        w.pump("")


def test_manual_clock_rules() -> None:
    c = ManualClock(T0)
    c.advance(D("1.5"))
    assert c.now() == datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)
    for bad in (-1, D("0.0000001"), D("NaN")):
        with pytest.raises(ValueError):
            c.advance(bad)
    with pytest.raises(TypeError):
        c.advance(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backwards"):
        c.set(T0)
    with pytest.raises(ValueError, match="naive"):
        ManualClock(datetime(2026, 1, 1))
    assert c.now() == datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)


def test_plunger_travel_follows_volume_and_diameter() -> None:
    clock, p = make(diameter_mm=D("20"), fill_volume_ml=D(50))
    p.set_rate(D("31.42"))
    p.run()
    clock.advance(3600)  # 31.42 mL through a 20 mm bore (314.159 mm^2): ~100 mm
    travel = p.status().plunger_travel_mm
    assert D("100.01") < travel < D("100.02")
    p.stop()
    p.load_syringe(D(50))
    assert p.status().plunger_travel_mm == 0
