"""Telemetry compaction (issue 12, item 2): a channel that logs only the pump reports replay needs gives the same
decisions and the same states as one that logs every report, and replay of its log reproduces both.

Two real `Channel`s are driven with the same inputs (the channel's own `feed`; the pump and the setpoint round
trip are played synchronously, as the channel's `execute` does): one compacting (60-s heartbeat), one logging every
report (heartbeat 0). Their logs are collected by a list-backed writer that canonicalises fields exactly as the
audit writer does, and both logs are replayed through the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.audit.canonical import canonicalize
from driverd.audit.replay import ENVELOPE, Replayer, replay_records
from driverd.core.commands import ApplySetpoint, Command
from driverd.core.events import (
    ClinicianCommand,
    Event,
    PumpReport,
    PumpVerified,
    ScheduleAccepted,
    SetpointResult,
    Tick,
)
from driverd.core.kernel import hours_between
from driverd.core.machine import initial_state
from driverd.core.quantities import NEW_ERA_RESOLUTION
from driverd.core.records import INPUT_EVENTS
from driverd.runtime.channel import Channel
from tests.core.factories import PROTOCOL, PROTOCOL_TEXT, T0, schedule

D = Decimal


class ListAudit:
    """The writer's `append` contract (fields canonicalised, a seq per record), kept in a list."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = [{"seq": 1, "event": "library_loaded", "text": PROTOCOL_TEXT}]

    def append(self, event: str, *, pump_id: str | None, course_id: str | None, durable: bool = False,
               **fields: Any) -> dict[str, Any]:
        body = canonicalize(fields, "")
        assert isinstance(body, dict)
        rec = {"seq": len(self.records) + 1, "event": event, "pump_id": pump_id, "course_id": course_id, **body}
        self.records.append(rec)
        return rec

    def flush(self) -> None:
        pass


class FixedClock:
    def __init__(self) -> None:
        self.at = T0

    def now(self) -> datetime:
        return self.at

    def wall(self) -> datetime:
        return self.at


@dataclass
class Pump:
    """Delivers its rate times `drift` while infusing; the counter shows 0.01-mL steps, and can be reset."""

    at: datetime
    rate: Decimal = Decimal(0)
    infusing: bool = False
    delivered: Decimal = Decimal(0)
    drift: Decimal = Decimal(1)
    alarms: tuple[str, ...] = ()

    def advance(self, to: datetime) -> None:
        if self.infusing:
            self.delivered += self.rate * self.drift * hours_between(self.at, to)
        self.at = to

    def report(self) -> PumpReport:
        blocking = any(a not in ("near_end", "low_battery") for a in self.alarms)
        state = "alarm" if blocking else ("infusing" if self.infusing else "stopped")
        shown = self.delivered.quantize(D("0.01"), rounding=ROUND_DOWN)
        return PumpReport(self.at, state, self.rate, shown, self.alarms)


@dataclass
class Rig:
    channel: Channel
    audit: ListAudit
    fed: list[tuple[Command, ...]] = field(default_factory=list)
    replayer: Replayer = field(default_factory=Replayer)
    replayed_upto: int = 0

    def feed(self, event: Event, pump: Pump) -> None:
        cmds = self.channel.feed(event)
        self.fed.append(cmds)
        # After every input the log written so far replays to the compactor's view of it: a crash here recovers
        # exactly that state (the live state less the report held back, if any).
        for rec in self.audit.records[self.replayed_upto:]:
            self.replayer.add(rec)
        self.replayed_upto = len(self.audit.records)
        assert self.replayer.states().get("pump-1", initial_state("pump-1")) == self.channel.telemetry.replayed
        assert not self.replayer.result.divergences
        if self.channel.telemetry.pending is None:
            assert self.channel.telemetry.replayed is self.channel.state
        for cmd in cmds:  # the channel's `execute`, played synchronously against the pump
            if isinstance(cmd, ApplySetpoint):
                rate = cmd.setpoint.rate_ml_per_h
                if not any(a not in ("near_end", "low_battery") for a in pump.alarms):
                    pump.rate = rate
                    pump.infusing = rate > 0
                self.feed(SetpointResult(event.at, cmd.setpoint.id, pump.rate if pump.infusing else D(0)), pump)


def rig(heartbeat: timedelta) -> Rig:
    audit = ListAudit()
    ch = Channel("pump-1", None, initial_state("pump-1"), PROTOCOL, audit, FixedClock(),  # type: ignore[arg-type]
                 poll_period=timedelta(seconds=1), link_timeout=timedelta(seconds=10), io_timeout=1.0,
                 telemetry_heartbeat=heartbeat)
    return Rig(ch, audit)


# What happens between polls: (seconds to the next poll, what changes at the pump or who acts).
ACTIONS = st.sampled_from([
    "poll", "poll", "poll", "poll", "poll", "poll", "poll", "poll",
    "near_end", "occlusion", "clear_alarms", "counter_reset", "drift_up", "drift_down", "drift_none",
    "hold", "resume", "escalate", "reduce", "stop_at_pump", "tick_only",
])
STEPS = st.lists(st.tuples(st.sampled_from([1, 1, 1, 1, 2, 5, 61, 300]), ACTIONS), min_size=5, max_size=400)


def play(rigs: list[Rig], steps: list[tuple[int, str]]) -> None:
    pumps = [Pump(T0 - timedelta(minutes=2)) for _ in rigs]
    sched = schedule()
    start = T0 - timedelta(minutes=2)
    for r, p in zip(rigs, pumps, strict=True):
        r.feed(ScheduleAccepted(start, sched), p)
        r.feed(PumpVerified(start, D("19.13"), NEW_ERA_RESOLUTION, "NE-1000"), p)
    at = start
    for dt, action in steps:
        at += timedelta(seconds=dt)
        for r, p in zip(rigs, pumps, strict=True):
            p.advance(at)
            clinician = action in ("hold", "resume", "escalate", "reduce")
            if action == "near_end":
                p.alarms = ("near_end",)
            elif action == "occlusion":
                p.alarms = ("occlusion",)
                p.infusing = False
            elif action == "clear_alarms":
                p.alarms = ()
            elif action == "counter_reset":
                p.delivered = D(0)
            elif action.startswith("drift_"):
                p.drift = {"drift_up": D("1.5"), "drift_down": D("0.5"), "drift_none": D(1)}[action]
            elif action == "stop_at_pump":
                p.infusing = False
            if clinician:
                r.feed(ClinicianCommand(at, action, "dr-a", "test"), p)  # type: ignore[arg-type]
            if action != "tick_only":
                r.feed(p.report(), p)
            r.feed(Tick(at), p)


def outputs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The decisions in a log: every record that is not an input, without its envelope."""
    return [{k: v for k, v in rec.items() if k not in ENVELOPE or k == "event"}
            for rec in records if rec["event"] not in INPUT_EVENTS and rec["event"] != "library_loaded"]


@settings(max_examples=60, deadline=None)
@given(STEPS)
def test_compacted_log_gives_the_same_decisions_and_states(steps: list[tuple[int, str]]) -> None:
    compact, full = rig(timedelta(seconds=60)), rig(timedelta(0))
    play([compact, full], steps)
    # The live courses agree at every input: the compacting channel adopts only states equal to the full one's.
    assert compact.fed == full.fed
    assert compact.channel.state == full.channel.state
    full_replay = replay_records(full.audit.records)
    before_flush = replay_records(compact.audit.records)
    assert full_replay.ok and before_flush.ok, (full_replay.divergences, before_flush.divergences)
    assert not full_replay.interrupted and not before_flush.interrupted
    # Without the report held back, replay is where the compactor says it is ...
    replayed = _states(compact.audit.records)
    assert replayed == compact.channel.telemetry.replayed
    # ... and after the clean-stop flush, exactly at the live state (the same as the full log's).
    compact.channel.flush_telemetry()
    assert _states(compact.audit.records) == compact.channel.state == _states(full.audit.records)
    assert outputs(compact.audit.records) == outputs(full.audit.records)
    reports = [sum(1 for r in x.audit.records if r["event"] == "pump_report") for x in (compact, full)]
    assert reports[0] <= reports[1]


def _states(records: list[dict[str, Any]]) -> Any:
    r = Replayer()
    for rec in records:
        r.add(rec)
    return r.states()["pump-1"]


def test_a_steady_course_logs_about_one_report_a_minute() -> None:
    compact, full = rig(timedelta(seconds=60)), rig(timedelta(0))
    play([compact, full], [(1, "poll")] * 3600)  # an hour at a 1-s poll, course started at T0
    counts = [sum(1 for r in x.audit.records if r["event"] == "pump_report") for x in (compact, full)]
    assert counts[1] == 3600
    assert 55 <= counts[0] <= 130  # one per new 60-s history sample (+ the start's)
    compact.channel.flush_telemetry()
    assert outputs(compact.audit.records) == outputs(full.audit.records)
    assert _states(compact.audit.records) == _states(full.audit.records)
    assert compact.channel.state.phase.value == "titrating"
