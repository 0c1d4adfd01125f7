"""Setpoint latency end to end vs the wire time of the same bytes (goal <= 1.5x).

One setpoint, exactly as the channel applies it (driverd/runtime/channel.py), timed from the proposal to the
logged result:
  1. safety kernel: `gate()` on a primed course state (decrease path: quantize toward less drug, concentration,
     syringe, device min/max and ceiling checks; the state's commanded rate is set above both test rates so
     every proposal is a decrease and is approved);
  2. write-ahead: `AuditWriter.append("setpoint", durable=True)` with the fields `command_to_record` gives
     (write + fdatasync before any byte goes on the wire), on the real disk;
  3. `Channel._apply`: read_status (status, RAT, DIS, DIA queries), set_rate (RAT set + RAT read-back), and
     RUN when the pump is not infusing (first setpoint only), over the real New Era driver and pyserial on a
     PTY to the New Era simulator, which delays every reply by the wire time of request + reply at 19200 baud
     (FaultPlan.set_baud: 10 bits per byte, 8N1);
  4. the result: `AuditWriter.append("setpoint_result", durable=True)` (the channel logs it durably too).
Not included: the core `step()` that produced the ApplySetpoint and the step that folds the result (pure,
microseconds; see course_speed.py).

Reference: the wire time of the bytes actually exchanged for that setpoint, counted on the driver's serial
port (every byte written and read) * 10 / 19200 s.

usage: python bench/setpoint_latency.py [--n 200] [--baud 19200]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, percentile, say, table
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.core.commands import ApplySetpoint
from driverd.core.events import PumpVerified, ScheduleAccepted
from driverd.core.kernel import Proposal, Setpoint, gate
from driverd.core.machine import initial_state, reduce
from driverd.core.protocol import parse_protocol
from driverd.core.quantities import NEW_ERA_RESOLUTION
from driverd.core.records import command_to_record, event_to_record
from driverd.core.schedule import Approval, Schedule, Signature, Step
from driverd.core.state import CourseState, Phase
from driverd.runtime.channel import Channel
from driverd.runtime.clock import RealClock
from drivers.base import DriverOptions
from drivers.registry import open_driver
from simulators.clock import SystemClock
from simulators.newera import serve_newera
from simulators.world import World

ROOT = Path(__file__).resolve().parent.parent
D = Decimal


def primed_state(protocol_text: str) -> tuple[CourseState, Any]:
    """A course state after ScheduleAccepted + PumpVerified (20 mL syringe, 50 mg/mL), built by the core."""
    protocol = parse_protocol(protocol_text)
    now = datetime.now(UTC)
    sched = Schedule(
        schedule_id="bench-1", version=1, pump_id="bed-1", protocol="ketamine-burst", patient_ref="BENCH",
        drug_name="ketamine", concentration_mg_per_ml=D("50"), syringe_model="BD Plastipak 20 mL",
        inner_diameter_mm=D("19.13"), fill_volume_ml=D("17"),
        steps=(Step(D(100), now, True), Step(D(300), now + timedelta(days=1), True)),
        hold_days=D(3), taper=(), approved_by=(Approval("prescriber", "a"), Approval("pharmacist", "b")),
        approved_at=now - timedelta(hours=1), expires_at=now + timedelta(days=30),
        signature=Signature("bench", "x"), digest="0" * 64)
    state = initial_state("bed-1")
    state, _ = reduce(state, ScheduleAccepted(now, sched), protocol)
    state, _ = reduce(state, PumpVerified(now, D("19.13"), NEW_ERA_RESOLUTION, "NE-1000"), protocol)
    # Every proposal below is a decrease from this commanded rate: always allowed, still fully quantized/checked.
    state = dataclasses.replace(state, phase=Phase.TITRATING, commanded_rate=D("1.000"))
    return state, protocol


class ByteCounter:
    """Wraps the pyserial port's read/write to count the bytes the driver actually exchanges."""

    def __init__(self, ser: Any) -> None:
        self.n = 0
        read, write = ser.read, ser.write

        def counted_read(size: int = 1) -> bytes:
            data: bytes = read(size)
            self.n += len(data)
            return data

        def counted_write(data: bytes) -> int | None:
            self.n += len(data)
            return write(data)  # type: ignore[no-any-return]

        ser.read, ser.write = counted_read, counted_write


async def run(n: int, baud: int | None, work: Path) -> dict[str, Any]:
    world = World(SystemClock())
    model = world.pump("bed-1", diameter_mm=D("19.13"))
    plan = world.faults("bed-1")
    if baud is not None:
        plan.set_baud(baud)
    per_byte = 10 / (baud or 19200)  # the reference is always the real line's wire time
    state, protocol = primed_state((ROOT / "config" / "protocols" / "ketamine-burst.toml").read_text())
    audit = AuditWriter.open(work / "audit", AuditConfig(checkpoint_every_s=3600), Ed25519PrivateKey.generate(),
                             lambda: datetime.now(UTC))
    rows: list[dict[str, float]] = []
    try:
        async with serve_newera(model, plan, pty=True) as ep:
            driver = open_driver(ep.url, DriverOptions(timeout_s=1.0, retries=1, deadman_s=180))
            channel = Channel("bed-1", driver, state, protocol, audit, RealClock(),
                              poll_period=timedelta(seconds=60), link_timeout=timedelta(seconds=120), io_timeout=1.0)
            await channel.connect()
            assert channel.connected, channel.last_error
            await driver.configure_syringe(D("19.13"))
            counter = ByteCounter(driver.transport._serial)  # type: ignore[attr-defined]
            doses = (D(100), D(300))  # 0.083 and 0.250 mL/h at 50 mg/mL: alternate
            for i in range(n):
                proposal = Proposal(doses[i % 2], "reduce", "bench", "alternating setpoint bench")
                b0 = counter.n
                t0 = time.perf_counter()
                sp = gate(state, protocol, proposal, datetime.now(UTC))
                assert isinstance(sp, Setpoint), sp
                t1 = time.perf_counter()
                cmd = ApplySetpoint(sp)
                name, fields = command_to_record(cmd)
                audit.append(name, pump_id="bed-1", course_id="bench-1", durable=True, **fields)
                t2 = time.perf_counter()
                result = await channel._apply(cmd)
                t3 = time.perf_counter()
                rname, rfields = event_to_record(result)
                audit.append(rname, pump_id="bed-1", course_id="bench-1", durable=True, **rfields)
                t4 = time.perf_counter()
                assert result.readback_ml_per_h == sp.rate_ml_per_h, (result, sp)
                nbytes = counter.n - b0
                rows.append({"total": t4 - t0, "gate": t1 - t0, "wa": t2 - t1, "apply": t3 - t2, "result": t4 - t3,
                             "bytes": nbytes, "wire": nbytes * per_byte})
                state = dataclasses.replace(state, next_setpoint_id=state.next_setpoint_id + 1)
            await driver.close()
    finally:
        audit.close()
    return {"rows": rows, "per_byte": per_byte}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--baud", type=int, default=19200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-setpoint-"))
    try:
        say("machine:", machine(work))
        out = asyncio.run(run(args.n, args.baud, work))
        # The same path with the wire-time emulation off: the software's own share (PTY, threads, asyncio, audit).
        floor = asyncio.run(run(max(20, args.n // 4), None, work / "floor"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = out["rows"][1:]  # the first setpoint also sends RUN: reported separately
    first = out["rows"][0]
    ratios = [r["total"] / r["wire"] for r in rows]

    def ms(key: str, p: float) -> str:
        return f"{percentile([r[key] for r in rows], p) * 1e3:.2f}"

    say(f"\n{len(rows)} setpoints (alternating 100/300 mg/24h = 0.083/0.250 mL/h) at {args.baud} baud; "
        f"bytes per setpoint: {sorted({int(r['bytes']) for r in rows})}; "
        f"first setpoint (adds RUN): {first['bytes']:.0f} B, {first['total'] * 1e3:.1f} ms\n")
    say(table(["component", "p50 ms", "p99 ms"], [
        ["kernel gate()", ms("gate", 50), ms("gate", 99)],
        ["write-ahead append(durable) incl. fdatasync", ms("wa", 50), ms("wa", 99)],
        ["Channel._apply (wire: status + set + read-back)", ms("apply", 50), ms("apply", 99)],
        ["result append(durable) incl. fdatasync", ms("result", 50), ms("result", 99)],
        ["**end to end**", ms("total", 50), ms("total", 99)],
        ["wire time of the same bytes (reference)", ms("wire", 50), ms("wire", 99)],
    ]))
    f_rows = floor["rows"][1:]
    say(f"\nsame path without wire-time emulation ({len(f_rows)} setpoints): end to end p50 "
        f"{percentile([r['total'] for r in f_rows], 50) * 1e3:.2f} ms, p99 "
        f"{percentile([r['total'] for r in f_rows], 99) * 1e3:.2f} ms; Channel._apply p50 "
        f"{percentile([r['apply'] for r in f_rows], 50) * 1e3:.2f} ms for "
        f"{sorted({int(r['bytes']) for r in f_rows})} bytes")
    say(f"\nratio end-to-end / wire time: p50 {percentile(ratios, 50):.3f}x, p99 {percentile(ratios, 99):.3f}x "
        f"(goal <= 1.5x)")
    say("load at end:", machine())


if __name__ == "__main__":
    main()
