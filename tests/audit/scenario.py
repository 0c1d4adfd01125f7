"""A scripted course log for the auditors' report: the real pure core folds every input, the audit writer logs
inputs and outputs tagged as the daemon's channel tags them (an input with the pump's course before it is folded,
its outputs with the course after), and a small pump model delivers what it runs, hour by hour.

Story (START = 2026-03-02 09:00 UTC; 50 mg/mL; 100 -> 300 mg/24h):
  -5 min  ward push S-1 v1 (prescriber dr-a, pharmacist ph-b); pump verified
  h0      the schedule starts 100 mg/24h (0.083 mL/h)
  h3      clinician dr-a asks to escalate: refused (the step interval)
  h5-h6   occlusion: the pump stops and alarms; h6 the alarm is gone, nurse-1 resumes
  h10-h11 the link is lost (the pump keeps infusing); h11 restored, nurse-1 resumes
  h20     ward push S-1 v2 (prescriber dr-c, pharmacist ph-d); h21 v1 pushed again: refused (version)
  h22     a push of another course S-2: refused (course S-1 still active)
  h23     a daemon-level refusal (malformed request, logged without a course)
  h24     the schedule escalates to 300 mg/24h (0.250 mL/h)
  h26     nurse-1 changes the syringe to 100 mg/mL (pump stopped, loaded, resumed at 0.125 mL/h)
  h30     dr-a stops the course; the next report gives the handover record
(Interruptions are kept under 2 h: a longer one restarts the step interval, and the h24 step would move.)
Commanded (counted): 0.083 mL/h x (5 + 18) h + 0.250 x 2 h at 50 mg/mL + 0.125 x 4 h at 100 mg/mL
  = 2.909 mL = 95.45 + 25 + 50 = 170.45 mg; not counted: 0.083 x 1 h (the pump stopped in alarm) = 0.083 mL
  = 4.15 mg. The pump delivers exactly that, so its counter says the same.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.core.commands import ApplySetpoint
from driverd.core.events import (
    ClinicianCommand,
    Event,
    LinkLost,
    LinkRestored,
    PumpReport,
    PumpVerified,
    ScheduleAccepted,
    SetpointResult,
    SyringeLoaded,
    Tick,
)
from driverd.core.machine import initial_state, step
from driverd.core.quantities import NEW_ERA_RESOLUTION
from driverd.core.records import command_to_record, event_to_record
from driverd.core.schedule import Approval, SyringeFill, SyringeSupply

from .conftest import StepClock
from .course import PROTOCOL, PROTOCOL_TEXT, PUMP, START, schedule

D = Decimal
H = timedelta(hours=1)
COMMANDED_ML = D("2.909")
COMMANDED_MG = D("170.450")
NOT_COUNTED_ML = D("0.083")
NOT_COUNTED_MG = D("4.150")


class Rig:
    def __init__(self, directory: Path, key: Ed25519PrivateKey | None) -> None:
        self.w = AuditWriter.open(
            directory,
            AuditConfig(segment_max_records=60, checkpoint_every_records=20, group_commit_records=16),
            key,
            StepClock(start=START - timedelta(minutes=10)),
        )
        self.w.append("library_loaded", pump_id=None, course_id=None, durable=True, text=PROTOCOL_TEXT,
                      version=PROTOCOL.library_version)
        self.state = initial_state(PUMP)
        self.rate = D(0)  # what the pump runs
        self.running = True  # False: stopped at the pump (occlusion, syringe out)
        self.delivered = D(0)
        self.link = True

    def feed(self, ev: Event) -> None:
        name, fields = event_to_record(ev)
        self.w.append(name, pump_id=PUMP, course_id=self.state.course_id, durable=True, **fields)
        self.state, cmds = step(self.state, ev, PROTOCOL)
        for cmd in cmds:
            cname, cfields = command_to_record(cmd)
            self.w.append(cname, pump_id=PUMP, course_id=self.state.course_id, durable=True, **cfields)
        for cmd in cmds:
            if isinstance(cmd, ApplySetpoint):
                self.rate = cmd.setpoint.rate_ml_per_h
                self.running = True
                self.feed(SetpointResult(ev.at, cmd.setpoint.id, self.rate))

    def run_to(self, t: datetime, since: datetime) -> None:
        if self.running:
            self.delivered += self.rate * D((t - since) // timedelta(seconds=1)) / D(3600)

    def report(self, t: datetime, state: str | None = None, alarms: tuple[str, ...] = ()) -> None:
        st = state or ("infusing" if self.running and self.rate > 0 else "stopped")
        self.feed(PumpReport(t, st, self.rate, self.delivered, alarms))  # type: ignore[arg-type]


def write_scenario_log(directory: Path, key: Ed25519PrivateKey | None) -> Path:
    s1 = replace(schedule(), syringes=SyringeSupply(fills=(SyringeFill(D("10"), D("100")),)))
    r = Rig(directory, key)
    t0 = START - timedelta(minutes=5)
    r.report(t0)  # the pump before any course: its own bucket
    r.feed(ScheduleAccepted(t0, s1))
    r.feed(PumpVerified(t0, D("19.13"), NEW_ERA_RESOLUTION, "NE-1000"))
    prev = START
    for h in range(0, 31):
        t = START + h * H
        r.run_to(t, prev)
        prev = t
        if h == 5:
            r.running = False
            r.report(t, "alarm", ("occlusion",))
        elif h == 6:
            r.report(t, "stopped")
            r.feed(ClinicianCommand(t, "resume", "nurse-1", "line flushed"))
        elif h == 10:
            r.report(t)
            r.feed(LinkLost(t, "no reply"))  # no report while the link is down; the pump keeps infusing
        elif h == 11:
            r.feed(LinkRestored(t))
            r.report(t)
            r.feed(ClinicianCommand(t, "resume", "nurse-1", "link back, pump checked"))
        elif h == 26:
            r.report(t)
            r.feed(ClinicianCommand(t, "change_syringe", "nurse-1", "stronger syringe", None, D("10"), D("100")))
            r.running = False
            r.report(t)
            r.feed(ClinicianCommand(t, "change_syringe", "nurse-1", "new syringe in", None, D("10"), D("100")))
            r.feed(SyringeLoaded(t, D("19.13"), r.delivered))
        else:
            r.report(t)
        r.feed(Tick(t))
        if h == 3:
            r.feed(ClinicianCommand(t, "escalate", "dr-a", "pain score 8"))
        elif h == 20:
            v2 = replace(s1, version=2, digest="2" * 64,
                         approved_by=(Approval("prescriber", "dr-c"), Approval("pharmacist", "ph-d")))
            r.feed(ScheduleAccepted(t, v2))
        elif h == 21:
            r.feed(ScheduleAccepted(t, s1))
        elif h == 22:
            r.feed(ScheduleAccepted(t, replace(s1, schedule_id="S-2", digest="3" * 64)))
        elif h == 23:
            r.w.append("request_refused", pump_id=PUMP, course_id=None, durable=True, source="clinician",
                       reason="malformed", detail="dose_mg_per_24h: a non-negative decimal string")
        elif h == 30:
            r.feed(ClinicianCommand(t, "stop", "dr-a", "patient comfortable"))
    t = START + 30 * H + timedelta(minutes=1)
    r.report(t)  # the stopped pump's report: the handover record follows
    r.w.close()
    return directory
