"""A tiny exact pump and a loop that plays a course through the pure core (no I/O, no clock)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from driverd.core.commands import ApplySetpoint, Command, Transitioned
from driverd.core.events import Event, PumpReport, SetpointResult, Tick
from driverd.core.kernel import hours_between
from driverd.core.machine import step
from driverd.core.protocol import ProtocolSpec
from driverd.core.state import CourseState


@dataclass
class ExactPump:
    """Delivers exactly its rate while infusing; applies setpoints immediately."""

    at: datetime
    rate: Decimal = Decimal(0)
    infusing: bool = False
    delivered: Decimal = Decimal(0)
    alarms: tuple[str, ...] = ()
    history: list[tuple[datetime, Decimal]] = field(default_factory=list)  # (from, effective rate)

    def advance(self, to: datetime) -> None:
        if self.infusing:
            self.delivered += self.rate * hours_between(self.at, to)
        self.at = to

    def apply(self, rate: Decimal) -> None:
        self.rate = rate
        self.infusing = rate > 0 and not any(a not in ("near_end", "low_battery") for a in self.alarms)
        self.history.append((self.at, self.rate if self.infusing else Decimal(0)))

    def report(self) -> PumpReport:
        state = "alarm" if any(a not in ("near_end", "low_battery") for a in self.alarms) else (
            "infusing" if self.infusing else "stopped")
        return PumpReport(self.at, state, self.rate, self.delivered, self.alarms)  # type: ignore[arg-type]


@dataclass
class Player:
    state: CourseState
    protocol: ProtocolSpec
    pump: ExactPump
    log: list[tuple[datetime, Command]] = field(default_factory=list)

    def feed(self, event: Event, *, ack: bool = True) -> tuple[Command, ...]:
        self.pump.advance(event.at)
        self.state, cmds = step(self.state, event, self.protocol)
        out = list(cmds)
        for cmd in cmds:
            self.log.append((event.at, cmd))
            if isinstance(cmd, ApplySetpoint):
                self.pump.apply(cmd.setpoint.rate_ml_per_h)
                if ack:
                    out += self.feed(SetpointResult(event.at, cmd.setpoint.id, self.pump.rate))
        return tuple(out)

    def run_until(self, end: datetime, every: timedelta = timedelta(minutes=10)) -> None:
        t = self.pump.at
        while t < end:
            t = min(t + every, end)
            self.feed(Tick(t))
            self.feed(self.pump.report())

    def setpoints(self) -> list[tuple[datetime, ApplySetpoint]]:
        return [(t, c) for t, c in self.log if isinstance(c, ApplySetpoint)]

    def phases(self) -> list[str]:
        return [c.to for _, c in self.log if isinstance(c, Transitioned)]
