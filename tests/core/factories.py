"""Builders for core tests: the shipped drug library and schedules built directly as frozen values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from driverd.core.events import PumpVerified, ScheduleAccepted
from driverd.core.machine import initial_state, reduce
from driverd.core.protocol import ProtocolSpec, parse_protocol
from driverd.core.quantities import NEW_ERA_RESOLUTION
from driverd.core.schedule import Approval, Schedule, Signature, Step, TaperStep
from driverd.core.state import CourseState

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_TEXT = (ROOT / "config" / "protocols" / "ketamine-burst.toml").read_text()
PROTOCOL: ProtocolSpec = parse_protocol(PROTOCOL_TEXT)
T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
D = Decimal


def schedule(
    *,
    doses: tuple[int, ...] = (100, 300, 500),
    conc: str = "50",
    auto: bool | tuple[bool, ...] = True,
    hold_days: str = "3",
    taper: tuple[tuple[int, int], ...] = (),
    schedule_id: str = "S-1",
    version: int = 1,
    pump_id: str = "pump-1",
    start: datetime = T0,
    spacing_hours: int = 24,
) -> Schedule:
    autos = auto if isinstance(auto, tuple) else (auto,) * len(doses)
    return Schedule(
        schedule_id=schedule_id,
        version=version,
        pump_id=pump_id,
        protocol="ketamine-burst",
        patient_ref="P-1",
        drug_name="ketamine",
        concentration_mg_per_ml=D(conc),
        syringe_model="BD Plastipak 20 mL",
        inner_diameter_mm=D("19.13"),
        fill_volume_ml=D("17"),
        steps=tuple(
            Step(D(d), start + timedelta(hours=spacing_hours * i), a)
            for i, (d, a) in enumerate(zip(doses, autos, strict=True))
        ),
        hold_days=D(hold_days),
        taper=tuple(TaperStep(D(d), D(h)) for d, h in taper),
        approved_by=(Approval("prescriber", "dr-a"), Approval("pharmacist", "ph-b")),
        approved_at=start - timedelta(hours=1),
        expires_at=start + timedelta(days=30),
        signature=Signature("test", "x"),
        digest="0" * 64,
    )


def primed(sched: Schedule | None = None, at: datetime = T0 - timedelta(minutes=5)) -> CourseState:
    sched = sched or schedule()
    state = initial_state(sched.pump_id)
    state, _ = reduce(state, ScheduleAccepted(at, sched), PROTOCOL)
    state, _ = reduce(state, PumpVerified(at, D("19.13"), NEW_ERA_RESOLUTION, "NE-1000"), PROTOCOL)
    return state
