"""A world of named simulated pumps sharing one clock, each with its own wire-level fault plan."""

from __future__ import annotations

import threading
from typing import Any

from drivers.base import AlarmKind
from simulators.clock import Clock
from simulators.faults import FaultPlan
from simulators.pump import PumpModel


class World:
    """Named pumps on one clock. ``pump(name, **kwargs)`` builds the model on first use; later calls return
    the same object (their keyword arguments are then ignored: the first caller configures the pump)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.RLock()
        self._pumps: dict[str, PumpModel] = {}
        self._faults: dict[str, FaultPlan] = {}

    def pump(self, name: str, **model_kwargs: Any) -> PumpModel:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: a simulated pump needs a non-empty name, got {name!r}")
        with self._lock:
            model = self._pumps.get(name)
            if model is None:
                model = self._pumps[name] = PumpModel(self.clock, **model_kwargs)
            return model

    def faults(self, name: str) -> FaultPlan:
        """The pump's wire fault plan; scenario alarms go to the pump named `name`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: a simulated pump needs a non-empty name, got {name!r}")
        with self._lock:
            plan = self._faults.get(name)
            if plan is None:
                plan = self._faults[name] = FaultPlan(alarm_hook=self._alarm_hook(name))
            return plan

    def set_faults(self, name: str, plan: FaultPlan) -> FaultPlan:
        """Install a plan (e.g. from a scenario file); its alarms go to this pump unless already hooked."""
        with self._lock:
            if plan.alarm_hook is None:
                plan.alarm_hook = self._alarm_hook(name)
            self._faults[name] = plan
            return plan

    def _alarm_hook(self, name: str) -> Any:
        def hook(kind: AlarmKind) -> None:
            # A power interruption is more than a flag: it also disarms the dead-man (see power_cycle).
            if kind is AlarmKind.POWER_INTERRUPTED:
                self.pump(name).power_cycle()
            else:
                self.pump(name).inject_alarm(kind)

        return hook

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._pumps)
