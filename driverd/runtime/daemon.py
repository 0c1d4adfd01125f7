"""The daemon: drug library, trust store, audit log, crash recovery, one channel per pump, the request API.

It holds no course logic: every decision is the core's (through the channels). It is the imperative shell
that checks signatures, replay protection and validation of pushed schedules before the core sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

import driverd
from driverd.audit.canonical import parse_ts
from driverd.audit.exposure import LedgerBuilder
from driverd.audit.segments import segment_names
from driverd.audit.snapshot import DELTA_EVENT, SNAPSHOT_EVENT, SnapshotChain, full_fields, schedules_in
from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.core.canonical import canonical_bytes
from driverd.core.errors import DriverdError, SignatureError, ValidationError
from driverd.core.events import CLINICIAN_ACTIONS, ClinicianCommand, ClockStepped, Event, LinkLost, ScheduleAccepted
from driverd.core.exposure import Breach, Burst, check_course
from driverd.core.machine import initial_state
from driverd.core.next_step import next_step
from driverd.core.protocol import ProtocolSpec, parse_protocol
from driverd.core.records import fmt_dec, fmt_time
from driverd.core.rules import RULES_VERSION
from driverd.core.schedule import Schedule
from driverd.core.schedule_parse import parse_schedule
from driverd.core.state import CourseState, Phase
from driverd.core.volume_plan import UPPER_BOUND_RESOLUTION, plan_course
from driverd.hl7.audit_events import HL7_BULK_EVENTS
from driverd.runtime.channel import BULK_EVENTS, Channel, syringe_view
from driverd.runtime.clock import RuntimeClock, ScaledClock, WallStep
from driverd.runtime.config import DaemonConfig
from driverd.runtime.failsafe import FailSafe, left_running, safe_log
from driverd.runtime.oplog import OpLog
from driverd.runtime.recovery import open_log
from driverd.signing import TrustStore, load_private_key
from drivers.base import DriverOptions
from drivers.registry import open_driver

if TYPE_CHECKING:
    from driverd.hl7.gateway import Gateway

MAX_TEXT = 256
#: A full state snapshot at least this often (daemon clock), besides the one at every start and clean stop.
SNAPSHOT_EVERY = timedelta(hours=24)
#: A state delta (what changed since the last snapshot or delta: docs/audit.md) after this many records or this
#: long, whichever comes first: a restart after a crash replays at most about DELTA_RECORDS records.
DELTA_RECORDS = 1_000
DELTA_EVERY = timedelta(hours=1)

log = structlog.get_logger("driverd.daemon")


@dataclass
class Reply:
    ok: bool
    body: dict[str, Any]


class Daemon:
    def __init__(self, config: DaemonConfig, clock: RuntimeClock, *, world: Any = None) -> None:
        self.config = config
        self.clock = clock
        self.world = world
        self.protocol: ProtocolSpec | None = None
        self.protocol_text = ""
        self.trust: TrustStore | None = None
        self.audit: AuditWriter | None = None
        self.channels: dict[str, Channel] = {}
        self.versions: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()  # set whenever any course state changes (demo progress, status)
        # Called with the channel after each of its course steps (the HL7 gateway's observations and alerts).
        self.listeners: list[Callable[[Channel], None]] = []
        self.gateway: Gateway | None = None
        self.gateway_error = ""  # why the configured HL7 gateway is not running ("" = running or not configured)
        self.failsafe = FailSafe()  # active once the audit log has died (see failsafe.py)
        # Installed by the control server: False when the requesting client is over its budget of individually
        # logged refusals (it counts them and logs a summary record instead). None: log every refusal.
        self.refusal_gate: Callable[[str], bool] | None = None
        self.ledger: dict[str, Burst] = {}
        self._ledger = LedgerBuilder()
        self._seen_versions: dict[str, int] = {}
        # schedule digest -> its schedule_accepted record, for the snapshots' `schedules_in` (its one reader): only
        # the schedules of the courses a snapshot encodes, and one just logged (`_prune_accepted`).
        self._accepted: dict[str, dict[str, Any]] = {}
        self._other_states: dict[str, CourseState] = {}
        self._last_snapshot_at: datetime | None = None  # the last full snapshot
        self._last_delta_at: datetime | None = None  # the last snapshot or delta
        self._last_delta_seq = 0
        self._chain = SnapshotChain()
        # The journald op log, derived from each audit record as appended (the service turns it on; the demo
        # and tests that build a Daemon directly print nothing).
        self.oplog: OpLog | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        self.protocol_text = cfg.protocol.read_text(encoding="utf-8")
        self.protocol = parse_protocol(self.protocol_text)  # refuse to start on an unknown/invalid library
        self.trust = TrustStore.load(cfg.trust_dir)
        key = load_private_key(cfg.audit_key) if cfg.audit_key else None
        behind = self._floor_clock(cfg.audit_dir)  # before the writer stamps anything with the clock
        a = cfg.audit
        # The writer opens first: it repairs a torn tail (logged) before recovery reads the log.
        self.audit, recovered = open_log(
            cfg.audit_dir,
            AuditConfig(segment_max_records=a.segment_max_records, checkpoint_every_records=a.checkpoint_every_records,
                        checkpoint_every_s=a.checkpoint_every_s, group_commit_ms=a.group_commit_ms,
                        group_commit_records=a.group_commit_records,
                        bulk_events=BULK_EVENTS | HL7_BULK_EVENTS),
            key,
            self.clock.now,
            self.trust,  # adopted schedules are re-verified against the trust store
        )
        self.versions = dict(recovered.versions)
        # The per-patient exposure ledger (issue 13): derived from the log (from the state snapshot start-up began
        # with, and every record after it), kept up to date with every record appended from here on.
        self._ledger = recovered.ledger
        self._seen_versions = dict(recovered.versions)  # what recovery would compute at this point of the log
        self._accepted = dict(recovered.accepted)  # schedule digest -> its schedule_accepted record
        self._other_states = {p: st for p, st in recovered.states.items() if p not in {c.id for c in cfg.pumps}}
        self.audit.on_append = self._appended
        self.ledger = self._ledger.ledger()
        # Drivers are built (no I/O: URL and data files) before daemon_start, which records the files that define
        # how each driver reads its pump (a Modbus register map: path and sha256) next to the config's sha256.
        drivers = {pump.id: open_driver(pump.url, DriverOptions(timeout_s=cfg.driver_timeout_s, retries=1,
                                                                deadman_s=cfg.deadman_s, world=self.world))
                   for pump in cfg.pumps}
        driver_files = {pid: d.definition_files() for pid, d in drivers.items() if d.definition_files()}
        self.audit.append("daemon_start", pump_id=None, course_id=None, durable=True, version=driverd.__version__,
                          rules=RULES_VERSION, config_sha256=cfg.sha256, pumps=[p.id for p in cfg.pumps],
                          **({"driver_files": driver_files} if driver_files else {}),
                          recovered_records=recovered.records, trust_keys=sorted(self.trust.keys),
                          interrupted=[{"pump_id": i.pump_id, "input_seq": i.input_seq,
                                        "outputs": [str(o.get("event")) for o in i.outputs]}
                                       for i in recovered.interrupted],
                          # A scaled clock (a bench's `run --speed`): the log's times are course times.
                          **({"clock_speed": f"{self.clock.speed:g}"} if isinstance(self.clock, ScaledClock) else {}))
        self.audit.append("library_loaded", pump_id=None, course_id=None, durable=True,
                          version=self.protocol.library_version, text=self.protocol_text)
        for pump in cfg.pumps:
            driver = drivers[pump.id]
            state = recovered.states.get(pump.id) or initial_state(pump.id)
            channel = Channel(pump.id, driver, state, self.protocol, self.audit, self.clock,
                              poll_period=timedelta(seconds=cfg.poll_period_s),
                              link_timeout=timedelta(seconds=cfg.link_timeout_s),
                              io_timeout=cfg.driver_timeout_s, on_change=self._on_change,
                              clock_step_tolerance=timedelta(seconds=cfg.clock_step_tolerance_s))
            if state.pending is not None:
                # Crashed between sending a setpoint and its read-back: that setpoint is uncertain. Treat the
                # restart like a lost link (alarm; a clinician resumes at most at the last verified rate).
                detail = f"restart with setpoint {state.pending.setpoint.id} unverified"
                channel.feed(LinkLost(self.clock.now(), detail))
            if behind is not None:
                channel.feed(ClockStepped(behind.at, behind.delta_s, behind.wall_at))
            self.channels[pump.id] = channel
        self._prune_accepted()  # recovery read every schedule since its snapshot
        self.write_snapshot()  # a restart from here replays nothing before this point
        self.audit.flush()
        if cfg.hl7 is not None:
            from driverd.hl7.gateway import Gateway  # only when configured: HL7 is off by default

            gateway = Gateway(self, cfg.hl7)
            try:
                await gateway.start()
                self.gateway = gateway
            except (DriverdError, OSError) as exc:
                # The ward link is an integration, not the pumps' supervision: a damaged queue or a port in use
                # must not keep every pump unsupervised (their dead-man would stop them). Loud instead: a crit
                # log line, an audit record, and `status` shows it until the daemon is restarted fixed.
                await gateway.stop()
                self.gateway_error = f"{type(exc).__name__}: {exc}"
                safe_log(log, "critical", "hl7_gateway_failed", error=self.gateway_error)
                self.audit.append("hl7_gateway_failed", pump_id=None, course_id=None, durable=True,
                                  error=self.gateway_error[:1000])
        self._tasks = [asyncio.create_task(ch.run(), name=f"channel-{pid}") for pid, ch in self.channels.items()]
        self.audit.on_dead = lambda err: self.fail_safe(str(err))

    def _on_change(self, channel: Channel) -> None:
        self.changed.set()
        for listener in self.listeners:
            try:
                listener(channel)
            except Exception as exc:  # an observer must never break a pump's channel
                safe_log(log, "error", "listener_failed", pump_id=channel.pump_id, error=f"{type(exc).__name__}: {exc}")

    def fail_safe(self, reason: str) -> None:
        """The audit log died: stop every pump (without write-ahead), refuse requests (driverd.runtime.failsafe)."""
        self.failsafe.trigger(self, reason)

    def _floor_clock(self, audit_dir: Path) -> WallStep | None:
        """Course time never runs backward across a restart either: a wall clock behind the log's last record
        (a backward step while the daemon was down, or one it never followed) starts course time at that record.
        Returns the step when it exceeds the tolerance: then it is a clock fault for every course."""
        last = _last_logged_ts(audit_dir)
        if last is None:
            return None
        behind = last - self.clock.now()
        if behind <= timedelta(0):
            return None
        wall = self.clock.wall()
        self.clock.floor(last)
        if behind <= timedelta(seconds=self.config.clock_step_tolerance_s):
            return None
        return WallStep(self.clock.now(), -behind, wall)

    def channel_tasks(self) -> dict[str, asyncio.Task[None]]:
        """pump id -> the task running that pump's channel (the service's watchdog checks they are alive)."""
        return dict(zip(self.channels, self._tasks, strict=True)) if self._tasks else {}

    async def stop_channels(self) -> None:
        """Stop polling every pump (nothing more is decided or sent to a pump); the log stays open."""
        for ch in self.channels.values():
            ch.stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.audit is not None and not self.audit.dead:
            for ch in self.channels.values():  # the last polls' state is what a restart recovers
                with contextlib.suppress(Exception):
                    ch.flush_telemetry()

    async def stop(self) -> None:
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                await self.gateway.stop()
        await self.stop_channels()
        for ch in self.channels.values():
            with contextlib.suppress(Exception):
                await ch.driver.close()
        if self.audit is not None and self.audit.dead:
            with contextlib.suppress(Exception):  # releases its files; the error was reported when it died
                self.audit.close()
        elif self.audit is not None:
            self.write_snapshot()  # the next start replays nothing
            self.audit.append("daemon_stop", pump_id=None, course_id=None, durable=True,
                              left_running=left_running(self.channels))
            self.audit.close()

    def tick_audit(self) -> None:
        """Called on a timer: bounded group-commit delay for telemetry, and a state snapshot when one is due."""
        if self.audit is not None:
            self.maybe_snapshot()
            self.audit.flush()

    def maybe_snapshot(self) -> None:
        """A full state snapshot if SNAPSHOT_EVERY has passed since the last (daemon clock), else a state delta if
        DELTA_RECORDS records or DELTA_EVERY have passed since the last snapshot or delta."""
        if self.audit is None or self.audit.dead or self._last_snapshot_at is None or self._last_delta_at is None:
            return
        now = self.clock.now()
        if now - self._last_snapshot_at >= SNAPSHOT_EVERY:
            self.write_snapshot()
        elif self.audit.seq - self._last_delta_seq >= DELTA_RECORDS or (
                now - self._last_delta_at >= DELTA_EVERY and self.audit.seq - self._last_delta_seq > 3):
            self.write_snapshot(delta=True)

    def write_snapshot(self, *, delta: bool = False) -> None:
        """A signed state snapshot (issue 12): every course as replay of the log up to here gives it (a channel's
        `telemetry.replayed`: the live state less a pump report held back), the schedule versions seen, the drug
        library, the exposure ledger; then a checkpoint, which signs it. Start-up carries on from the newest.
        `delta`: only what changed since the last snapshot or delta (a full one when there is none)."""
        assert self.audit is not None
        states = dict(self._other_states)
        states.update({p: ch.telemetry.replayed for p, ch in self.channels.items()})
        # Bursts that can never count again leave the ledger (in memory too): replay prunes at the same points.
        self._ledger.prune(s.schedule.schedule_id for s in states.values() if s.schedule is not None)
        enc = self._chain.encode(states, self._seen_versions, self.protocol_text, self._ledger.to_fields(),
                                 schedules_in(states, self._accepted))
        fields = self._chain.delta_fields(enc) if delta else None
        self.audit.rotate()  # a snapshot or delta opens its segment: start-up verifies from there
        if fields is None:
            rec = self.audit.append(SNAPSHOT_EVENT, pump_id=None, course_id=None, durable=True, **full_fields(enc))
            self._last_snapshot_at = self.clock.now()
        else:
            rec = self.audit.append(DELTA_EVENT, pump_id=None, course_id=None, durable=True, **fields)
        # Its own line's hash: the append may have written a checkpoint after it (every N records or every interval).
        self._chain.mark(enc, {"seq": rec["seq"], "segment": self.audit.segment,
                               "line_sha256": self.audit.appended_head}, full=fields is None)
        self.audit.checkpoint("snapshot")
        self._last_delta_at = self.clock.now()
        self._last_delta_seq = self.audit.seq

    def _appended(self, rec: dict[str, Any]) -> None:
        if self.oplog is not None:
            self.oplog.record(rec)  # never raises
        self._ledger.add(rec)
        if rec.get("event") == "schedule_accepted" and isinstance(rec.get("schedule"), dict):
            digest = str(rec["schedule"].get("digest"))
            self._accepted[digest] = rec
            self._prune_accepted(keep=digest)
            sid, ver = rec["schedule"].get("schedule_id"), rec["schedule"].get("version")
            if isinstance(sid, str) and isinstance(ver, int):
                self._seen_versions[sid] = max(self._seen_versions.get(sid, 0), ver)

    def _prune_accepted(self, keep: str | None = None) -> None:
        """Bound `_accepted` (it grew by every schedule ever accepted) to what a snapshot can still read: the schedule
        of each course it encodes (each channel's live and replay-side state, and the recovered courses of pumps no
        longer configured) and `keep`, the one just logged, which reaches its course next (the core steps it right
        after it is logged, with no await between). A schedule no course holds is never read again: a course takes a
        schedule only from its own `schedule_accepted` record, which re-enters it here."""
        live = {st.schedule.digest for st in self._other_states.values() if st.schedule is not None}
        for ch in self.channels.values():
            for st in (ch.state, ch.telemetry.replayed):
                if st.schedule is not None:
                    live.add(st.schedule.digest)
        if keep is not None:
            live.add(keep)
        if not live.issuperset(self._accepted):
            self._accepted = {d: rec for d, rec in self._accepted.items() if d in live}

    # ------------------------------------------------------------------------------------------ requests

    def _refuse(self, pump_id: str | None, source: str, reason: str, detail: str) -> dict[str, Any]:
        assert self.audit is not None
        if self.refusal_gate is not None and not self.refusal_gate(reason):
            # Over the client's budget: answered, counted into a summary record instead of one record each.
            return {"ok": False, "refusals": [{"reason": reason, "detail": detail}], "seq": None}
        record = self.audit.append("request_refused", pump_id=pump_id, course_id=None, durable=True, source=source,
                                   reason=reason, detail=detail[:1000])
        return {"ok": False, "refusals": [{"reason": reason, "detail": detail}], "seq": record["seq"],
                "durable_seq": self.audit.seq}

    async def push_schedule(self, doc: Any) -> dict[str, Any]:
        """Signed, trusted, unexpired, version-increasing, for a configured pump, valid: or refused, logged."""
        if self.failsafe.active:
            return self.failsafe.refusal()
        assert self.trust is not None and self.protocol is not None
        if not isinstance(doc, Mapping):
            return self._refuse(None, "push", "malformed", "schedule must be a JSON object")
        pump_id = doc.get("pump_id") if isinstance(doc.get("pump_id"), str) else None
        try:
            key_id = self.trust.verify(doc)
        except SignatureError as exc:
            return self._refuse(pump_id, "push", getattr(exc, "reason", "signature"), str(exc))
        try:
            schedule = parse_schedule(doc, self.protocol, now=self.clock.now())
        except ValidationError as exc:
            detail = "; ".join(str(p) for p in exc.problems)
            return self._refuse(pump_id, "push", "invalid", detail)
        breaches = self._exposure(schedule)
        if breaches and schedule.exposure_override is None:
            detail = "; ".join(f"[{b.code}] {b.detail}" for b in breaches)
            return self._refuse(schedule.pump_id, "push", breaches[0].code, detail)
        if breaches:
            assert self.audit is not None and schedule.exposure_override is not None
            ov = schedule.exposure_override
            self.audit.append("exposure_override", pump_id=schedule.pump_id, course_id=schedule.schedule_id,
                              durable=True, patient_ref=schedule.patient_ref, reason=ov.reason,
                              approved_by=[{"role": a.role, "id": a.id} for a in ov.approved_by],
                              breaches=[{"code": b.code, "detail": b.detail} for b in breaches])
        # What recovery re-verifies after a restart: the whole signed document in canonical form (its signed
        # content has the same canonical bytes as what was verified just above, so the signature still holds).
        document = canonical_bytes(doc).decode("utf-8")
        channel = self.channels.get(schedule.pump_id)
        if channel is None:
            return self._refuse(schedule.pump_id, "push", "unknown_pump", f"no pump {schedule.pump_id!r} configured")
        seen = self.versions.get(schedule.schedule_id, 0)
        if schedule.version <= seen:
            return self._refuse(schedule.pump_id, "push", "replay",
                                f"version {schedule.version} of {schedule.schedule_id} is not above {seen}")
        # The accepted schedule reaches the log (fdatasync) inside the channel before we reply: that durable
        # record is the replay protection, rebuilt from the log on restart.
        def accepted_at(at: datetime) -> ScheduleAccepted:
            # A version is used once it reaches the course (the channel logs it next), whatever the core then
            # decides: the same rule recovery applies to the logged `schedule_accepted` records after a restart.
            self.versions[schedule.schedule_id] = max(self.versions.get(schedule.schedule_id, 0), schedule.version)
            return ScheduleAccepted(at, schedule, document)

        reply = await channel.submit(accepted_at, what=f"push {schedule.schedule_id} v{schedule.version}")
        return {**reply, "key_id": key_id, "schedule_id": schedule.schedule_id, "version": schedule.version}

    def _exposure(self, schedule: Schedule) -> list[Breach]:
        """The patient-level limits a pushed course would break (drug library [exposure]), against the ledger from
        the log and the live courses (their own delivered totals and stop times)."""
        limits = self.protocol.exposure if self.protocol is not None else None
        if limits is None:
            return []
        self.ledger = self._ledger.ledger()
        now = self.clock.now()
        pending: list[Burst] = []
        for ch in self.channels.values():
            s = ch.state
            if s.schedule is not None and s.started_at is not None:
                self.ledger[s.schedule.schedule_id] = Burst(s.schedule.patient_ref, s.schedule.schedule_id,
                                                            s.started_at, s.stopped_at, s.delivered_mg)
            elif s.schedule is not None and s.phase is not Phase.STOPPED:
                # Accepted on a pump but not started yet: it will be a burst. Counted at its plan (start, whole
                # dose, not ended), so two courses for one patient cannot both be pushed before either starts.
                # Only for this check: it enters the ledger when it really starts.
                other = plan_course(s.schedule, UPPER_BOUND_RESOLUTION)
                pending.append(Burst(s.schedule.patient_ref, s.schedule.schedule_id, max(other.start, now), None,
                                     other.total_mg))
        # Planned at the finest rate grid, not at New Era's: on a pump with a finer resolution (Harvard, Modbus)
        # a New Era plan under-states the drug by up to 4 % (30 mg/24h at 100 mg/mL: 0.012 vs 0.0125 mL/h).
        plan = plan_course(schedule, UPPER_BOUND_RESOLUTION)
        shift = max(now - plan.start, timedelta(0))  # a course pushed after its first step starts now
        return check_course(schedule.patient_ref, schedule.schedule_id, plan.start + shift, plan.end + shift,
                            plan.total_mg, [*self.ledger.values(), *pending], limits, now)

    async def command(self, pump_id: Any, action: Any, by: Any, reason: Any, dose: Any = None) -> dict[str, Any]:
        if self.failsafe.active:
            return self.failsafe.refusal()
        problems = []
        if not isinstance(pump_id, str) or pump_id not in self.channels:
            problems.append(f"pump: unknown pump {str(pump_id)[:64]!r}")
        if action not in CLINICIAN_ACTIONS:
            problems.append(f"action: must be one of {', '.join(CLINICIAN_ACTIONS)}")
        for name, value in (("by", by), ("reason", reason)):
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
                problems.append(f"{name}: required text of 1..{MAX_TEXT} characters")
        dose_d: Decimal | None = None
        if dose is not None:
            try:
                dose_d = Decimal(str(dose))
                if not dose_d.is_finite() or dose_d < 0 or dose_d > 100_000 or isinstance(dose, bool | float):
                    raise ValueError
                # At most micro-mg/24h: also turns 0E-999999999 (a valid zero whose plain text is a gigabyte of
                # zeros) into a plain 0 before anything formats it.
                exact = dose_d.quantize(Decimal("0.000001"))
                if exact != dose_d:
                    raise ValueError
                dose_d = Decimal(fmt_dec(exact.normalize()))  # plain text as logged: replay sees the same value
            except (ArithmeticError, ValueError):
                problems.append("dose_mg_per_24h: a non-negative decimal string")
        if problems:
            pid = pump_id if isinstance(pump_id, str) else None
            return self._refuse(pid, "clinician", "invalid", "; ".join(problems))
        channel = self.channels[pump_id]
        what = f"clinician {action}" + (f" {dose_d} mg/24h" if dose_d is not None else "") + f" by {by}: {reason}"
        return await channel.submit(lambda at: ClinicianCommand(at, action, by, reason, dose_d),
                                    acknowledge_alarm=action == "resume", what=what)

    async def change_syringe(self, pump_id: Any, fill: Any, concentration: Any, by: Any, reason: Any) -> dict[str, Any]:
        """A clinician's syringe change (issue 13): the channel stops the pump, reads the new syringe back, and the
        core verifies it and resumes at the same level (the rate recomputed for the new concentration)."""
        if self.failsafe.active:
            return self.failsafe.refusal()
        problems = []
        if not isinstance(pump_id, str) or pump_id not in self.channels:
            problems.append(f"pump: unknown pump {str(pump_id)[:64]!r}")
        for name, value in (("by", by), ("reason", reason)):
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
                problems.append(f"{name}: required text of 1..{MAX_TEXT} characters")
        fill_d = _quantity(fill, "fill_volume_ml", problems, required=True)
        conc_d = _quantity(concentration, "concentration_mg_per_ml", problems, required=False)
        if problems:
            pid = pump_id if isinstance(pump_id, str) else None
            return self._refuse(pid, "clinician", "invalid", "; ".join(problems))
        what = f"clinician change_syringe {fill_d} mL" + (f" at {conc_d} mg/mL" if conc_d is not None else "") \
            + f" by {by}: {reason}"
        # The pump's latched end-of-syringe alarm is acknowledged and the pump read first (as for a resume).
        return await self.channels[pump_id].submit(
            lambda at: ClinicianCommand(at, "change_syringe", by, reason, None, fill_d, conc_d),
            acknowledge_alarm=True, what=what)

    async def submit_event(self, pump_id: str, make_event: Callable[[datetime], Event]) -> dict[str, Any]:
        return await self.channels[pump_id].submit(make_event)

    def status(self) -> dict[str, Any]:
        pumps = []
        now = self.clock.now()
        for pid, ch in self.channels.items():
            s = ch.state
            st = ch.last_status
            upcoming = next_step(s, ch.protocol)
            pumps.append({
                "pump_id": pid,
                "phase": s.phase.value,
                "course_id": s.course_id,
                "schedule_id": s.course_id,
                "schedule_version": s.schedule.version if s.schedule else None,
                "level_mg_per_24h": fmt_dec(s.level_mg_per_24h),
                "commanded_ml_per_h": fmt_dec(s.commanded_rate),
                "verified_ml_per_h": fmt_dec(s.verified_rate),
                "delivered_ml": fmt_dec(s.delivered_ml),
                "taper_lock": s.taper_lock,
                "alarm": s.alarm_code or None,
                "alarms": list(s.alarm_causes),  # every active cause, in the order raised
                "link": "lost" if ch.link_lost else ("up" if ch.connected else "down"),
                "pump_state": st.state.value if st else None,
                "pump_rate_ml_per_h": fmt_dec(st.rate_ml_per_h) if st else None,
                # what the pump itself reports it delivers now (0 unless infusing), next to the commanded rate
                "reported_ml_per_h": fmt_dec(st.delivering_ml_per_h) if st else None,
                "unverified_setpoint": s.pending.setpoint.id if s.pending else None,
                "next_step": None if upcoming is None else {
                    "at": fmt_time(upcoming.at), "dose_mg_per_24h": fmt_dec(upcoming.dose_mg_per_24h),
                    "kind": upcoming.kind, "auto": upcoming.auto},
                # the schedule's next step is due but waits for a clinician (`driverd course escalate`)
                "pending_confirmation": None if upcoming is None or not upcoming.awaiting_confirmation(now) else {
                    "since": fmt_time(upcoming.at), "dose_mg_per_24h": fmt_dec(upcoming.dose_mg_per_24h)},
                "started_at": fmt_time(s.started_at) if s.started_at else None,
                "last_error": ch.last_error or None,
                "last_error_at": fmt_time(ch.last_error_at) if ch.last_error and ch.last_error_at else None,
                "clock_fault": s.clock_fault or None,
                **syringe_view(s),
            })
        assert self.protocol is not None
        body: dict[str, Any] = {"ok": True, "now": fmt_time(now),
                                "library": self.protocol.library_version, "pumps": pumps}
        if self.gateway is not None:
            body["hl7"] = self.gateway.status()
        elif self.gateway_error:
            body["hl7"] = {"error": self.gateway_error}
        return self.failsafe.annotate(body)


def _quantity(value: Any, name: str, problems: list[str], *, required: bool) -> Decimal | None:
    """A positive decimal (string or integer) of at most 6 places, as plain text, or a problem naming the field."""
    if value is None:
        if required:
            problems.append(f"{name}: required")
        return None
    try:
        if isinstance(value, bool | float):
            raise ValueError
        d = Decimal(str(value))
        if not d.is_finite() or d <= 0 or d > 100_000 or d.quantize(Decimal("0.000001")) != d:
            raise ValueError
        return Decimal(fmt_dec(d.normalize()))
    except (ArithmeticError, ValueError):
        problems.append(f"{name}: a positive decimal of at most 6 places")
        return None


def _last_logged_ts(audit_dir: Path) -> datetime | None:
    """The `ts` of the log's last whole record (the log verified during recovery; a torn tail is skipped)."""
    segments = segment_names(audit_dir) if audit_dir.is_dir() else []
    for _, name in reversed(segments):
        for line in reversed((audit_dir / name).read_bytes().splitlines()):
            try:
                return parse_ts(json.loads(line)["ts"])
            except (ValueError, KeyError, TypeError):
                continue
    return None


__all__ = ["Daemon", "DriverdError"]
