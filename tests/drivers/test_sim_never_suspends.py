"""sim:// does no I/O: every operation completes on its first step, whatever its outcome (a reply, a refusal, a
fault plan's drop, delay, garble, disconnect or cut). The channel relies on it (`SimDriver.never_suspends`): it arms
no backstop timer for sim:// operations, since none could fire while one runs."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any

import pytest

from drivers.base import AlarmKind, DriverError, DriverOptions
from drivers.registry import open_driver
from drivers.sim import SimDriver
from simulators.world import World

OPS: list[Callable[[SimDriver], Coroutine[Any, Any, Any]]] = [
    lambda d: d.connect(),
    lambda d: d.read_status(),
    lambda d: d.identify(),
    lambda d: d.configure_syringe(Decimal("21.59")),
    lambda d: d.set_rate(Decimal("0.208")),
    lambda d: d.set_rate(Decimal("0.2085")),  # refused: not representable
    lambda d: d.run(),
    lambda d: d.stop(),
    lambda d: d.clear_alarm(),
    lambda d: d.probe(),
    lambda d: d.close(),
]
FAULTS: dict[str, Callable[[World], None]] = {
    "none": lambda w: None,
    "drop": lambda w: w.faults("bed-1").drop_next(50),
    "delay": lambda w: w.faults("bed-1").delay_next(50, 0.5),
    "long delay": lambda w: w.faults("bed-1").delay_next(50, 5),
    "garble": lambda w: w.faults("bed-1").garble_next(50),
    "disconnect": lambda w: w.faults("bed-1").disconnect_next(),
    "cut": lambda w: w.faults("bed-1").cut(),
    "alarm": lambda w: w.pump("bed-1").inject_alarm(AlarmKind.OCCLUSION),
}


def finish_in_one_step(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        coro.send(None)
    except StopIteration:
        return
    except DriverError:
        return  # refused or failed, at once
    coro.close()
    pytest.fail("a sim:// operation yielded to the event loop")


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_operation_completes_without_suspending(fault: str, world: World) -> None:
    driver = open_driver("sim://bed-1", DriverOptions(world=world, timeout_s=1.0, deadman_s=30))
    assert isinstance(driver, SimDriver) and driver.never_suspends
    finish_in_one_step(driver.connect())
    FAULTS[fault](world)
    for op in OPS:
        finish_in_one_step(op(driver))
        finish_in_one_step(driver.connect())  # after a disconnect or a close, on again
