"""One channel per pump: poll, feed the core, write ahead, apply setpoints, read back, reconcile.

The channel is the only code that calls a driver's setters, and it only ever sends a `Setpoint` that came out of
the core's `ApplySetpoint` command — which only the safety kernel can construct. Every input is logged before
the core sees it; every command is logged (setpoints fdatasync'd) before any byte goes on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from driverd.audit.writer import AuditWriter
from driverd.core.commands import ApplySetpoint, Command, Refused
from driverd.core.errors import DriverdError
from driverd.core.events import (
    ClinicianCommand,
    ClockStepped,
    CounterCleared,
    Event,
    LinkLost,
    LinkRestored,
    PumpReport,
    PumpStateName,
    PumpVerified,
    SetpointResult,
    SyringeLoaded,
    Tick,
)
from driverd.core.kernel import Setpoint
from driverd.core.machine import RANGE_CAUSES, predicted_empty_at, step, tick_changes_nothing
from driverd.core.protocol import ProtocolSpec
from driverd.core.pump_range import PumpRange
from driverd.core.quantities import rate_to_dose
from driverd.core.records import command_to_record, event_to_record, fmt_dec, fmt_time
from driverd.core.state import ACTIVE, CourseState, Phase
from driverd.runtime import telemetry
from driverd.runtime.clock import DEFAULT_STEP_TOLERANCE, ClockWatch, RuntimeClock, yield_once
from driverd.runtime.telemetry import ReportCompactor
from drivers.base import DriverError, DriverTimeout, PumpAlarm, PumpDriver, PumpRejected, PumpState, PumpStatus

_REQUEST = object()  # what `submit` completes a waiting channel's wake future with (the clock uses None)
# A status's state as the core names it (`PumpState.value`; a dict lookup: the enum's value property is Python code,
# and this runs once per poll).
_STATE_NAMES: dict[PumpState, PumpStateName] = {s: s.value for s in PumpState}

#: After a counter clear that did not read back 0 the channel tries again this much later (course time), not on
#: every poll: each attempt is two durable records, and the alarm is already raised.
CLEAR_RETRY = timedelta(minutes=1)

# Inputs that must survive a crash the moment they are acted on; telemetry and ticks use group commit.
BULK_INPUTS: Final = frozenset({"tick", "pump_report"})
# The core's outputs written without fdatasync: all but a setpoint (write-ahead of the wire) and an alarm. They are
# recomputed by replay from their input, so one lost with an unsynced page is only an interrupted output.
BULK_OUTPUTS: Final = frozenset({"transition", "notice", "refused", "course_summary"})
# Every record the channel only ever appends with durable=False. The daemon gives the writer this set
# (AuditConfig.bulk_events): the only records a lost-page cut at open may remove.
BULK_EVENTS: Final = BULK_INPUTS | BULK_OUTPUTS


@dataclass
class Request:
    """Something from outside (control API, demo script) for this pump, processed in the channel's task."""

    make_event: Callable[[datetime], Event]
    # A clinician resume: the clinician has dealt with the cause, so acknowledge the pump's latched alarm and
    # read it again first. If the condition persists the pump reports it again and the core refuses.
    acknowledge_alarm: bool = False
    what: str = ""  # what the request is, for the audit record if it expires
    # Cancelled (or already done) = the caller gave up: the request has expired and is never applied.
    reply: asyncio.Future[dict[str, Any]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Channel:
    def __init__(
        self,
        pump_id: str,
        driver: PumpDriver,
        state: CourseState,
        protocol: ProtocolSpec,
        audit: AuditWriter,
        clock: RuntimeClock,
        *,
        poll_period: timedelta,
        link_timeout: timedelta,
        io_timeout: float,
        on_change: Callable[[Channel], None] | None = None,
        clock_step_tolerance: timedelta = DEFAULT_STEP_TOLERANCE,
        telemetry_heartbeat: timedelta | None = None,
    ) -> None:
        self.pump_id = pump_id
        self.driver = driver
        self.state = state
        self.protocol = protocol
        self.audit = audit
        self.clock = clock
        self.poll_period = poll_period
        self.link_timeout = link_timeout
        self.io_timeout = io_timeout
        self.inbox: asyncio.Queue[Request] = asyncio.Queue()
        self.connected = False
        self.failing_since: datetime | None = None
        self.last_status: PumpStatus | None = None
        self.last_error = ""  # the newest unresolved error (status shows it; cleared once what failed works again)
        self.last_error_at: datetime | None = None
        self._error_kind = ""  # which operation set last_error: "link" (connect/poll/setpoint), "prime", "syringe",
        # "range" (a reconnect's range check)
        self.polls = 0
        self.stopping = False
        self._primed_for: str | None = None
        # Which connection the pump last answered on (`_connection`); None: it has not answered since the daemon
        # started. A read on another one (the first since the start, or after any reopen of the transport, by the
        # channel or inside the driver) is checked as a reconnect (`_restored`): the device answering may be another
        # pump, or the same one reconfigured, whether or not the link was declared lost meanwhile.
        self._answered_on: int | None = None
        self._connects = 0  # successful `connect()` calls
        self._opens_at_connect = 0  # the driver's `transport_opens` after the last of them
        self._loaded_for: object = None  # the syringe change whose new syringe was read back already
        self._clear_retry_at: datetime | None = None  # no new priming clear before this (the last one failed)
        self.last_input_seq = 0  # seq of the last input record logged (a reply names its request's record)
        self.last_result: tuple[Setpoint, SetpointResult] | None = None  # the last setpoint applied, its outcome
        self._wake: asyncio.Future[Any] | None = None  # the channel's current wait, if it is waiting
        self._on_change = on_change
        self.on_poll_latency: Callable[[float], None] | None = None  # real seconds of each status read (metrics)
        self._clock_watch = ClockWatch(clock, clock_step_tolerance)
        # None: the module's HEARTBEAT, read now (bench/log_growth.py sets it to 0 for the uncompacted reference).
        self.telemetry = ReportCompactor(state, protocol, telemetry.HEARTBEAT if telemetry_heartbeat is None
                                         else telemetry_heartbeat)

    def set_clock_step_tolerance(self, tolerance: timedelta) -> None:
        """A reload (SIGHUP) changed clock_step_tolerance_s: steps from now on are judged by the new value."""
        self._clock_watch.tolerance = tolerance

    def _error(self, kind: str, text: str) -> None:
        self.last_error, self.last_error_at, self._error_kind = text, self.clock.now(), kind

    def _resolved(self, kind: str) -> None:
        """What failed works again: its error no longer shows in `status`."""
        if self._error_kind == kind:
            self.last_error, self.last_error_at, self._error_kind = "", None, ""

    @property
    def link_lost(self) -> bool:
        """The course's own view (`CourseState.link_up`), so channel and core never disagree: a course recovered
        during an outage, or put there by the restart itself, counts its link as lost until the pump answers
        (LinkRestored is fed then), and `status` never shows it up while resume is refused link_down."""
        return not self.state.link_up

    # ------------------------------------------------------------------------------------------ the core

    def feed(self, event: Event) -> tuple[Command, ...]:
        """Log the input, step the core, log its commands (setpoints durably). No I/O to the pump here.

        A tick that changes nothing (same state, no command) is not logged: it decides nothing, and replay folds
        to the same states without it. That is most ticks. A pump report is always stepped, but logged only when
        replay needs it to reach the same state (`telemetry.ReportCompactor`), and at least every heartbeat.
        """
        before = self.state
        if isinstance(event, PumpReport):
            try:
                self.state, cmds, to_log = self.telemetry.report(before, event)
            except BaseException:
                self.flush_telemetry()
                self._log_input(event)  # what the core choked on
                raise
            for report in to_log:
                self._log_input(report)
        elif isinstance(event, Tick):
            try:
                after, cmds = step(before, event, self.protocol)
            except BaseException:
                self.flush_telemetry()
                self._log_input(event)
                raise
            if after is before and not cmds:
                return ()
            self.flush_telemetry()
            self._log_input(event)
            self.state = after
            self.telemetry.input_logged(after)
        else:
            self.flush_telemetry()
            self._log_input(event)
            self.state, cmds = step(before, event, self.protocol)
            self.telemetry.input_logged(self.state)
        for cmd in cmds:
            cname, cfields = command_to_record(cmd)
            # Write-ahead: a setpoint is on disk (fdatasync) before the driver is called.
            self.audit.append(cname, pump_id=self.pump_id, course_id=self.state.course_id,
                              durable=cname not in BULK_OUTPUTS, **cfields)
        if self._on_change is not None:
            self._on_change(self)
        return cmds

    def flush_telemetry(self) -> None:
        """Log the pump report held back, if any (before another input, and at a clean stop)."""
        held = self.telemetry.before_input(self.state)
        if held is not None:
            self._log_input(held)

    def _log_input(self, event: Event) -> None:
        name, fields = event_to_record(event)
        record = self.audit.append(name, pump_id=self.pump_id, course_id=self.state.course_id,
                                   durable=name not in BULK_INPUTS, **fields)
        self.last_input_seq = int(record["seq"])

    async def handle(self, event: Event) -> tuple[Command, ...]:
        cmds = self.feed(event)
        if cmds:  # most inputs command nothing: no coroutine for an empty execute (several per poll)
            await self.execute(cmds)
        return cmds

    async def execute(self, cmds: tuple[Command, ...]) -> None:
        for cmd in cmds:
            if isinstance(cmd, ApplySetpoint):
                result = await self._apply(cmd)
                self.last_result = (cmd.setpoint, result)
                await self.execute(self.feed(result))

    # ------------------------------------------------------------------------------------------ I/O

    async def _io(self, op: Awaitable[Any]) -> Any:
        if getattr(self.driver, "never_suspends", False):
            # An in-process driver (sim://): its operation never yields to the event loop, so no timer could
            # fire during it. Not arming one saves a timer per poll in virtual time.
            return await op
        # A backstop above the driver's own timeouts. asyncio.timeout, not wait_for: no extra task per call.
        async with asyncio.timeout(self.io_timeout * 4):
            return await op

    async def _apply(self, cmd: ApplySetpoint) -> SetpointResult:
        result = await self._apply_once(cmd)
        if result.readback_ml_per_h is not None and self._unchecked():
            # Read back over a transport reopened during the exchange (or before it, not yet checked): it may be
            # another pump's answer. Uncertain (write-ahead: unacknowledged until reconciled): the next poll checks
            # the pump on this connection (`_restored`) before its report reconciles the setpoint.
            return SetpointResult(result.at, result.setpoint_id, None,
                                  f"read back {result.readback_ml_per_h} mL/h on a reopened transport, not yet "
                                  f"checked{'; ' + result.error if result.error else ''}"[:512])
        return result

    async def _apply_once(self, cmd: ApplySetpoint) -> SetpointResult:
        sp = cmd.setpoint
        try:
            if sp.is_stop:
                # Sent whatever answers (a stop is always allowed, and on a pump the course cannot run on it is
                # what the check would do); its read-back is judged above.
                await self._io(self.driver.stop())
                readback = (await self._io(self.driver.read_status())).delivering_ml_per_h
            else:
                status = await self._io(self.driver.read_status())
                if self._unchecked():
                    # The transport was reopened since the pump last answered a poll (the driver reopens its port
                    # by itself after an I/O error): the device may be another pump. No rate goes to it before the
                    # next poll has checked it; the setpoint is uncertain until then and reconciled from that
                    # poll's report (sent again if the check passes). Not its report either: the check comes first.
                    return SetpointResult(self.clock.now(), sp.id, None,
                                          "transport reopened since the pump was last checked: not sent")
                if status.state is PumpState.ALARM:
                    # Never acknowledge a pump alarm on the way to a setpoint: one that struck since the last poll
                    # (an occlusion) would be swallowed and the pump restarted. Report it to the core instead
                    # (-> alarm); only a clinician's resume acknowledges it. The setpoint is not sent.
                    self.last_status = status
                    await self.handle(self._report(status))
                    # What it delivers (0), not its programmed rate: a setpoint not sent must never read back
                    # as verified.
                    return SetpointResult(self.clock.now(), sp.id, status.delivering_ml_per_h,
                                          f"pump in alarm ({', '.join(sorted(a.value for a in status.alarms))}): "
                                          "not sent")
                readback = await self._io(self.driver.set_rate(sp.rate_ml_per_h))
                if readback == sp.rate_ml_per_h and status.state is not PumpState.INFUSING:
                    await self._io(self.driver.run())
            return SetpointResult(self.clock.now(), sp.id, readback)
        except (PumpRejected, PumpAlarm) as exc:
            # The pump refused: what it delivers now decides (retry once, then alarm).
            return await self._delivering(sp, f"rejected: {exc}")
        except (DriverError, TimeoutError) as exc:
            # No (valid) answer somewhere on the way: the setpoint may or may not have landed, and a RUN may never
            # have gone out. Read the pump once more; only if that fails too is the result left uncertain.
            self._error("link", f"{type(exc).__name__}: {exc}")
            return await self._delivering(sp, self.last_error)

    async def _delivering(self, sp: Setpoint, error: str) -> SetpointResult:
        """The read-back after a failed or refused setpoint: the rate the pump delivers now. A stopped pump
        delivers nothing, whatever rate it has programmed: a refused or lost RUN must not read back as the new
        rate, or a rate that never ran would count as verified (and the course would then look paused)."""
        try:
            status = await self._io(self.driver.read_status())
        except (DriverError, TimeoutError) as exc:
            return SetpointResult(self.clock.now(), sp.id, None, f"{error}; then {type(exc).__name__}: {exc}")
        return SetpointResult(self.clock.now(), sp.id, status.delivering_ml_per_h, error)

    def _connection(self) -> int:
        """Which transport connection the driver talks on now: changes with every (re)open, whether the channel
        reconnected or the driver reopened its port by itself after an I/O error (`PumpDriver.transport_opens`)."""
        return self._connects + self.driver.transport_opens

    def _unchecked(self) -> bool:
        """The driver talks on a connection the pump has not been checked on (no answered poll on it yet)."""
        return self._connection() != self._answered_on

    async def connect(self) -> None:
        try:
            await self._io(self.driver.connect())
            self._connects += 1
            self._opens_at_connect = self.driver.transport_opens
            self.connected = True
        except (DriverError, TimeoutError) as exc:
            self.connected = False
            self._error("link", f"connect: {type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                await self.driver.close()

    async def poll(self) -> None:
        now = self.clock.now()
        if self.connected and self.driver.transport_opens != self._opens_at_connect:
            # The driver reopened its port by itself after an I/O error (New Era, Harvard): the device behind it may
            # be another pump, which never got `connect()`'s set-up (its dead-man). A new connection goes through it.
            self.connected = False
            with contextlib.suppress(Exception):
                await self.driver.close()
        if not self.connected:
            await self.connect()
        status: PumpStatus | None = None
        if self.connected:
            latency = self.on_poll_latency
            started = time.perf_counter() if latency is not None else 0.0
            try:
                if getattr(self.driver, "never_suspends", False):
                    status = await self.driver.read_status()  # `_io` without its coroutine (see there)
                else:
                    status = await self._io(self.driver.read_status())
            except (DriverError, TimeoutError) as exc:
                self._error("link", f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, (TimeoutError, DriverTimeout)):
                    # A broken transport (not merely a late reply): reopen it on the next poll.
                    self.connected = False
                    with contextlib.suppress(Exception):
                        await self.driver.close()
            if latency is not None:
                with contextlib.suppress(Exception):  # metrics never break a channel
                    latency(time.perf_counter() - started)
        self.polls += 1
        if status is None:
            self.failing_since = self.failing_since or now
            if not self.link_lost and now - self.failing_since >= self.link_timeout:
                await self.handle(LinkLost(now, self.last_error or "no valid reply"))
            return
        self.failing_since = None
        self.last_status = status
        if self._error_kind == "link":
            self._resolved("link")  # the pump answers again
        connection = self._connection()
        if self.link_lost or connection != self._answered_on:
            self._answered_on = connection
            restored = self._restored(status)
            if restored is not None and any(isinstance(c, ApplySetpoint) for c in await self._reconnected(restored)):
                return  # the pump was stopped after this read: the next poll reports it
        cmds = self.feed(self._report(status))  # `handle`, without its coroutine for the usual empty execute
        if cmds:
            await self.execute(cmds)

    def _restored(self, status: PumpStatus) -> LinkRestored | None:
        """The input for a pump answering after a lost link, for the first time since the daemon started, or on a
        reopened transport (within the link timeout too: a reopen is a new connection; None: nothing to tell the
        core). A primed course gets the bore the pump reads back now (else the one verified) and the range its
        driver reports for it: the pump may have been swapped or reconfigured meanwhile, and the core checks the
        range again (SUP-19), from the logged range as at priming and at a syringe load."""
        s, now = self.state, self.clock.now()
        if s.phase is Phase.IDLE and RANGE_CAUSES.intersection(s.alarm_causes):
            self._primed_for = None  # refused priming on this pump: prime again, the pump may be another one now
        sched = s.schedule
        if sched is None or s.phase not in ACTIVE or s.resolution is None:
            return LinkRestored(now) if self.link_lost else None
        bore = status.diameter_mm
        if bore is None or not bore.is_finite() or bore <= 0:
            bore = s.pump_diameter_mm or sched.inner_diameter_mm  # not read: the bore verified (a wrong one alarms)
        return LinkRestored(now, bore, self.pump_range(bore))

    async def _reconnected(self, event: LinkRestored) -> tuple[Command, ...]:
        cmds = await self.handle(event)
        failed = [c for c in cmds if isinstance(c, Refused) and c.reason in RANGE_CAUSES]
        if failed:  # `status` says why the course stopped
            self._error("range", f"reconnect: {failed[0].reason}: {failed[0].detail}")
        elif event.pump_range is not None:
            self._resolved("range")
        return cmds

    def _report(self, status: PumpStatus) -> PumpReport:
        alarms = tuple(sorted(a.value for a in status.alarms)) if status.alarms else ()
        return PumpReport(self.clock.now(), _STATE_NAMES[status.state], status.rate_ml_per_h, status.delivered_ml,
                          alarms, status.delivered_step_ml, status.diameter_mm)

    async def prime(self) -> None:
        """A newly accepted schedule: stop the pump, load the syringe diameter, read it back, tell the core."""
        sched = self.state.schedule
        if self.state.phase is not Phase.IDLE or sched is None or self._primed_for == sched.digest:
            return
        if not self.connected:
            return
        if self._clear_retry_at is not None and self.clock.now() < self._clear_retry_at:
            return
        self._primed_for = sched.digest
        try:
            await self._io(self.driver.stop())
            status = await self._io(self.driver.read_status())
            if status.state is PumpState.ALARM:
                await self._io(self.driver.clear_alarm())
            diameter = await self._io(self.driver.configure_syringe(sched.inner_diameter_mm))
            identity = await self._io(self.driver.identify())
            before = (await self._io(self.driver.read_status())).delivered_ml
        except (DriverError, TimeoutError) as exc:
            self._primed_for = None  # try again on the next poll
            self._error("prime", f"prime: {type(exc).__name__}: {exc}")
            return
        # The course's delivered volume is read off this counter: it starts from a verified 0 (a counter run on
        # from earlier courses past 100 mL reads in 0.1 mL steps on a 4-digit display).
        if not (await self.clear_counter(before, "prime"))[0]:
            self._primed_for = None
            self._clear_retry_at = self.clock.now() + CLEAR_RETRY
            return
        self._clear_retry_at = None
        self._resolved("prime")
        cmds = await self.handle(PumpVerified(self.clock.now(), diameter, self.driver.resolution, identity.model,
                                              self.pump_range(diameter)))
        for cmd in cmds:  # the course did not prime on this pump: `status` says why (not retried: a restart does)
            if isinstance(cmd, Refused) and cmd.reason in RANGE_CAUSES:
                self._error("prime", f"prime: {cmd.reason}: {cmd.detail}")

    def pump_range(self, diameter: Decimal) -> PumpRange:
        """What the driver says the pump runs with this bore, for the core's check (core/pump_range.py). A driver
        that cannot tell, or fails to, reports no range: the core then refuses, naming why."""
        try:
            got = self.driver.rate_range(diameter)
        except (DriverdError, ArithmeticError):
            got = None
        lo, hi = got if got is not None else (None, None)
        return PumpRange(self.driver.url.raw, lo, hi)

    async def clear_counter(self, before: Decimal | None, why: str) -> tuple[bool, tuple[Command, ...]]:
        """Clear the stopped pump's delivered-volume counter and read it back: (it reads 0, the core's commands).

        Write-ahead, as a setpoint: the intent (`counter_clear`) is on disk before the command goes on the wire, and
        the outcome is the core input `counter_cleared` (before, read-back, error), which raises the alarm
        `counter_not_cleared` if the counter does not read 0. A clear whose reply is lost or malformed is judged by
        a fresh read of the counter."""
        self.audit.append("counter_clear", pump_id=self.pump_id, course_id=self.state.course_id, durable=True,
                          reason=why, before_ml=None if before is None else fmt_dec(before))
        after: Decimal | None
        error = ""
        try:
            after = await self._io(self.driver.clear_delivered())
        except (DriverError, TimeoutError) as exc:
            after, error = None, f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(DriverError, TimeoutError):
                after = (await self._io(self.driver.read_status())).delivered_ml
        event = CounterCleared(self.clock.now(), before, after, error[:512])
        cmds = await self.handle(event)
        if not event.verified:
            shown = "nothing" if after is None else f"{after} mL"
            text = f"{why}: delivered-volume counter not cleared (reads {shown})" + (f": {error}" if error else "")
            self._error("prime" if why == "prime" else "syringe", text)
        return event.verified, cmds

    async def load_syringe(self) -> tuple[Command, ...]:
        """A syringe change in progress, once the core's stop is verified: load the schedule's diameter into the
        pump, read it back with the delivered counter, tell the core (which verifies and resumes). Once per change:
        a refused read-back waits for the clinician; a failed exchange is tried again on the next poll."""
        change = self.state.syringe_change
        sched = self.state.schedule
        if change is None or not change.loaded or sched is None or self._loaded_for is change \
                or not self.connected or self.state.pending is not None \
                or self.state.phase not in (Phase.PAUSED, Phase.PRIMED):
            return ()  # the core takes a load only paused or primed: in alarm, a clinician's resume comes first
        self._loaded_for = change
        try:
            diameter = await self._io(self.driver.configure_syringe(sched.inner_diameter_mm))
            status = await self._io(self.driver.read_status())
        except (DriverError, TimeoutError) as exc:
            self._loaded_for = None
            self._error("syringe", f"syringe change: {type(exc).__name__}: {exc}")
            return ()
        # The new syringe's volume is counted from a verified 0 (the pump is stopped: the core's stop is verified).
        # Not cleared: the course alarms (counter_not_cleared) with the change waiting; a new change_syringe retries.
        cleared, cmds = await self.clear_counter(status.delivered_ml, "syringe_load")
        if not cleared:
            return cmds  # the alarm and the refused load answer the clinician's change_syringe
        try:
            status = await self._io(self.driver.read_status())
        except (DriverError, TimeoutError) as exc:
            self._loaded_for = None
            self._error("syringe", f"syringe change: {type(exc).__name__}: {exc}")
            return ()
        self._resolved("syringe")
        self.last_status = status
        cmds = await self.handle(SyringeLoaded(self.clock.now(), diameter, status.delivered_ml,
                                               self.pump_range(diameter)))
        if not any(isinstance(c, Refused) and c.reason in RANGE_CAUSES for c in cmds):
            self._resolved("range")  # checked again by this load (a reconnect's refusal is retried so)
        return cmds

    async def check_clock(self) -> None:
        """A wall-clock step is a fault for the core (audit record `clock_stepped` with its size and direction).
        Course time (`clock.now()`) never follows the step, so the core never sees time run backward or jump."""
        stepped = self._clock_step()
        if stepped is not None:
            await self.handle(stepped)

    def _clock_step(self) -> ClockStepped | None:
        stepped = self._clock_watch.check()
        return None if stepped is None else ClockStepped(stepped.at, stepped.delta_s, stepped.wall_at)

    # ------------------------------------------------------------------------------------------ loop

    async def cycle(self) -> None:
        """One poll period's work (`run` does it every `poll_period`; bench/synth_log.py calls it directly to write
        a long log without the event loop's timers)."""
        # Once per poll: a step that has nothing to do is skipped without entering its coroutine (its own first
        # check: a wall-clock step seen, a course IDLE to prime, a syringe change to load).
        stepped = self._clock_step()
        if stepped is not None:
            await self.handle(stepped)
        await self.poll()
        now = self.clock.now()
        try:  # the usual quiet tick changes nothing and is not logged: not even built (the core says so)
            quiet = tick_changes_nothing(self.state, now, self.protocol)
        except Exception:
            quiet = False  # the tick's step below decides, and logs what it choked on
        if not quiet:
            cmds = self.feed(Tick(now))  # `handle`, without its coroutine for the usual empty execute
            if cmds:
                await self.execute(cmds)
        if self.state.phase is Phase.IDLE:
            await self.prime()
        if self.state.syringe_change is not None:
            await self.load_syringe()

    async def run(self) -> None:
        self.clock.register()
        try:
            await self.connect()
            next_poll = self.clock.now()
            # A virtual clock that would wake this channel's sleep at once (every other participant asleep until
            # later): `_wait` without its future, heap entry and wake-up, the same turn of the event loop.
            wake_at_once = getattr(self.clock, "wake_at_once", None)
            while not self.stopping:
                await self.cycle()
                next_poll += self.poll_period
                if next_poll <= self.clock.now():
                    next_poll = self.clock.now() + self.poll_period
                if (wake_at_once is not None and not self.stopping and self.inbox.empty()
                        and wake_at_once(next_poll)):
                    await yield_once()
                    continue
                await self._wait(next_poll)
        finally:
            self.clock.unregister()

    async def _wait(self, until: datetime) -> None:
        """Serve requests until `until`. One future per wait, completed by the clock's timer or by `submit`
        (no helper tasks: with hundreds of pumps the per-poll wait is a measurable share of the CPU)."""
        while not self.stopping:
            while not self.inbox.empty():
                await self._serve(self.inbox.get_nowait())
            wake: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._wake = wake
            try:
                await self.clock.sleep_until(until, wake=wake)
            finally:
                self._wake = None
                if not wake.done():  # cancelled (daemon stop): the clock must not count us asleep any more
                    wake.cancel()
            if wake.cancelled() or wake.result() is not _REQUEST:
                return

    async def _serve(self, request: Request) -> None:
        if self._expired(request):
            return
        try:
            if request.acknowledge_alarm and self.connected:
                with contextlib.suppress(DriverError, TimeoutError):
                    await self._io(self.driver.clear_alarm())
                await self.poll()
                if self._expired(request):  # the acknowledgement and read took real time: check again
                    return
            await self.check_clock()  # a command right after a step is judged with the clock fault known
            event = request.make_event(self.clock.now())
            self.last_result = None
            cmds = self.feed(event)
            seq = self.last_input_seq  # the request's own record
            await self.execute(cmds)
            await self.prime()
            cmds += await self.load_syringe()  # a syringe change is answered with its outcome
            if self.last_result is None:
                await self._read_back()
            # Nothing acknowledged may be lost: every record the reply depends on is on disk before it is sent.
            self.audit.flush()
        except Exception as exc:  # a bad request must never kill the channel
            result: dict[str, Any] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            refusals = [{"reason": c.reason, "detail": c.detail} for c in cmds if isinstance(c, Refused)]
            view = self.pump_view()
            # "OK" only if nothing was refused and whatever was sent is verified at the pump.
            result = {"ok": not refusals and view["verified"], "refusals": refusals, "phase": self.state.phase.value,
                      "seq": seq, "durable_seq": self.audit.seq,
                      "level_mg_per_24h": fmt_dec(self.state.level_mg_per_24h), **view}
            if isinstance(event, ClinicianCommand) and event.action == "change_syringe":
                result.update(syringe_view(self.state))
        if not request.reply.done():
            request.reply.set_result(result)

    async def _read_back(self) -> None:
        """A fresh read of the pump for a reply that sent no setpoint (hold, a refusal): the clinician is told what
        it runs now, not what the last poll saw (a setpoint applied since would be missing). Read only: the core
        gets the pump's reports from the polls."""
        if not self.connected:
            return
        with contextlib.suppress(DriverError, TimeoutError):  # if it fails, the reply shows the last poll's
            self.last_status = await self._io(self.driver.read_status())

    def pump_view(self) -> dict[str, Any]:
        """What the pump runs now, for a reply: a clinician is told the rate the pump read back for the setpoint
        this request sent (or, if it sent none, the last poll), and whether that is what was commanded; never a
        bare "OK"."""
        pending = self.state.pending
        view: dict[str, Any] = {"commanded_ml_per_h": fmt_dec(self.state.commanded_rate),
                                "unverified_setpoint": None if pending is None else pending.setpoint.id}
        if self.last_result is not None:
            sp, res = self.last_result
            delivered = res.readback_ml_per_h
            view["pump_state"] = None if delivered is None else ("infusing" if delivered > 0 else "stopped")
            view["pump_rate_ml_per_h"] = None if delivered is None else fmt_dec(delivered)
            view["verified"] = pending is None and delivered == sp.rate_ml_per_h
            return self._with_dose(view, delivered)
        st = self.last_status
        view["pump_state"] = st.state.value if st else None
        view["pump_rate_ml_per_h"] = fmt_dec(st.delivering_ml_per_h) if st else None
        view["verified"] = pending is None
        return self._with_dose(view, st.delivering_ml_per_h if st else None)

    def _with_dose(self, view: dict[str, Any], rate: Decimal | None) -> dict[str, Any]:
        """The dose the pump's read-back rate delivers, at the syringe's concentration (None while unknown)."""
        known = rate is not None and self.state.schedule is not None
        view["pump_dose_mg_per_24h"] = fmt_dec(rate_to_dose(rate, self.state.concentration).normalize()) \
            if known and rate is not None else None
        return view

    def _expired(self, request: Request) -> bool:
        """A request whose caller gave up (its reply cancelled or already settled) is never applied late:
        a clinician command acted on minutes after the clinician was told "outcome unknown" is a hazard."""
        if not request.reply.done():
            return False
        self.audit.append("request_expired", pump_id=self.pump_id, course_id=self.state.course_id, durable=True,
                          request=request.what[:512] or "unnamed request",
                          detail="the caller gave up before the channel reached it; not applied")
        return True

    async def submit(
        self,
        make_event: Callable[[datetime], Event],
        *,
        acknowledge_alarm: bool = False,
        what: str = "",
    ) -> dict[str, Any]:
        """Queue a request for this channel's task and wait for its outcome. Cancelling the wait withdraws the
        request if the channel has not started it yet (it is then logged as `request_expired`)."""
        request = Request(make_event, acknowledge_alarm=acknowledge_alarm, what=what)
        self.inbox.put_nowait(request)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(_REQUEST)
        return await request.reply


def syringe_view(s: CourseState) -> dict[str, Any]:
    """The syringe in the pump, for `status` (issue 13)."""
    if s.schedule is None:
        return {"syringe": None}
    change = s.syringe_change
    empty_at = predicted_empty_at(s)
    return {"syringe": {
        "number": s.syringe_changes + 1,
        "fill_ml": fmt_dec(s.fill_ml),
        "concentration_mg_per_ml": fmt_dec(s.concentration),
        "remaining_ml": fmt_dec(s.remaining_ml.quantize(Decimal("0.001"))),
        # at the commanded rate, from the pump's read-backs; the warning is the core's (logged as a notice)
        "predicted_empty_at": None if empty_at is None else fmt_time(empty_at),
        "near_empty_warning": s.empty_warned,
        "change_in_progress": None if change is None else {"fill_ml": fmt_dec(change.fill_ml),
                                                           "concentration_mg_per_ml": fmt_dec(
                                                               change.concentration_mg_per_ml),
                                                           "by": change.by, "at": fmt_time(change.at)},
    }, "delivered_mg": fmt_dec(s.delivered_mg.quantize(Decimal("0.001"))), "syringe_changes": s.syringe_changes}
