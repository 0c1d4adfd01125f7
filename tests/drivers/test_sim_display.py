"""sim://'s counter display shortcut (`SimDriver._display`) always shows exactly `quantize_down` (value and
exponent), whatever readings come in, in any order: rising, falling, across powers of ten, zero; and the step it
reports with each reading (`SimDriver._reading_step`, cached per counter shown) is always `reading_step`'s."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from driverd.core.errors import QuantityError
from driverd.core.quantities import NEW_ERA_RESOLUTION, Resolution, quantize_down
from drivers.base import DriverOptions, reading_step
from drivers.registry import open_driver
from drivers.sim import SimDriver
from simulators.clock import ManualClock
from simulators.world import World
from tests.drivers.conftest import T0

READING = st.one_of(
    st.decimals(min_value=0, max_value=9999, allow_nan=False, allow_infinity=False, places=7),
    st.decimals(min_value=0, max_value=12, allow_nan=False, allow_infinity=False, places=34),
    st.sampled_from([Decimal("0"), Decimal("0.0009999"), Decimal("0.001"), Decimal("0.999999"), Decimal("1"),
                     Decimal("1.0000"), Decimal("9.9999"), Decimal("10"), Decimal("99.99"), Decimal("100.0"),
                     Decimal("999.95"), Decimal("1000"), Decimal("9999.5")]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(READING, min_size=1, max_size=40), st.sampled_from([NEW_ERA_RESOLUTION, Resolution(2),
                                                                   Resolution(4, 6), Resolution(1, 3)]))
@example(readings=[Decimal("0.0123"), Decimal("0.01239"), Decimal("0.0124"), Decimal("0.1"), Decimal("0.0999")],
         resolution=NEW_ERA_RESOLUTION)
@example(readings=[Decimal("9.9991"), Decimal("9.9999"), Decimal("10.0001"), Decimal("9.9995")],
         resolution=NEW_ERA_RESOLUTION)
def test_the_shown_counter_is_quantize_down(readings: list[Decimal], resolution: Resolution) -> None:
    driver = open_driver("sim://bed-1", DriverOptions(world=World(ManualClock(T0))))
    assert isinstance(driver, SimDriver)
    driver.resolution = resolution  # type: ignore[misc]
    for reading in readings:
        try:
            expected = repr(quantize_down(reading, resolution))
        except QuantityError as exc:  # more integer digits than the display has: refused the same way
            with pytest.raises(QuantityError) as raised:
                driver._display(reading)
            assert str(raised.value) == str(exc)
            continue
        shown = driver._display(reading)
        assert repr(shown) == expected, reading
        # The step of each reading shown, cached per shown counter: always reading_step's (value and exponent).
        assert repr(driver._reading_step(shown)) == repr(reading_step(shown, resolution)), reading
