"""A real course log for tests: a tiny runtime loop that drives the real pure core and logs every input and
every command through the audit writer, as the daemon does (inputs carry their event time in `at`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.core.commands import ApplySetpoint
from driverd.core.events import (
    ClinicianCommand,
    Event,
    PumpReport,
    PumpVerified,
    ScheduleAccepted,
    SetpointResult,
    Tick,
)
from driverd.core.machine import initial_state, step
from driverd.core.protocol import parse_protocol
from driverd.core.quantities import NEW_ERA_RESOLUTION
from driverd.core.records import command_to_record, event_to_record
from driverd.core.schedule import Approval, Schedule, Signature, Step

from .conftest import StepClock

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_TEXT = (ROOT / "config" / "protocols" / "ketamine-burst.toml").read_text(encoding="utf-8")
PROTOCOL = parse_protocol(PROTOCOL_TEXT)
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
PUMP = "bed-1"
D = Decimal


def schedule() -> Schedule:
    return Schedule(
        schedule_id="S-1",
        version=1,
        pump_id=PUMP,
        protocol="ketamine-burst",
        patient_ref="P-1",
        drug_name="ketamine",
        concentration_mg_per_ml=D("50"),
        syringe_model="BD Plastipak 20 mL",
        inner_diameter_mm=D("19.13"),
        fill_volume_ml=D("17"),
        steps=tuple(Step(D(d), START + timedelta(hours=24 * i), True) for i, d in enumerate(("100", "300", "500"))),
        hold_days=D("1"),
        taper=(),
        approved_by=(Approval("prescriber", "dr-a"), Approval("pharmacist", "ph-b")),
        approved_at=START - timedelta(hours=1),
        expires_at=START + timedelta(days=30),
        signature=Signature("test", "x"),
        digest="0" * 64,
    )


def write_course_log(directory: Path, key: Ed25519PrivateKey | None, hours: int = 110) -> Path:
    sched = schedule()
    w = AuditWriter.open(
        directory,
        AuditConfig(segment_max_records=400, checkpoint_every_records=50, group_commit_records=16),
        key,
        StepClock(start=START - timedelta(minutes=10)),
    )
    w.append("library_loaded", pump_id=None, course_id=None, durable=True, text=PROTOCOL_TEXT,
             version=PROTOCOL.library_version)
    state = initial_state(PUMP)
    pump = {"rate": D(0), "delivered": D(0)}

    def feed(ev: Event, durable: bool = True) -> None:
        nonlocal state
        name, fields = event_to_record(ev)
        w.append(name, pump_id=PUMP, course_id=sched.schedule_id, durable=durable, **fields)
        state, cmds = step(state, ev, PROTOCOL)
        for cmd in cmds:
            cname, cfields = command_to_record(cmd)
            w.append(cname, pump_id=PUMP, course_id=sched.schedule_id, durable=True, **cfields)
        for cmd in cmds:
            if isinstance(cmd, ApplySetpoint):
                pump["rate"] = cmd.setpoint.rate_ml_per_h
                feed(SetpointResult(ev.at, cmd.setpoint.id, pump["rate"]))

    t = START - timedelta(minutes=5)
    feed(ScheduleAccepted(t, sched))
    feed(PumpVerified(t, D("19.13"), NEW_ERA_RESOLUTION, "NE-1000"))
    for h in range(hours):
        t = START + timedelta(hours=h)
        pump["delivered"] += pump["rate"]  # exactly one hour at the current rate
        infusing = pump["rate"] > 0
        feed(PumpReport(t, "infusing" if infusing else "stopped", pump["rate"], pump["delivered"]), durable=False)
        feed(Tick(t))
        if h == 3:
            # Too early for the next step: the core refuses; the refusal is part of the log.
            feed(ClinicianCommand(t, "escalate", "dr-a", "pain score 8"))
    w.close()
    return directory
