"""The HL7 gateway: joins the daemon's courses to PCD-01/PCD-04 out and PCD-03 orders in (docs/hl7.md).

Out: every change a ward engine needs to see (phase, pump state, rates, dose level, link, alarms) becomes a
PCD-01 observation; every alarm cause raised or cleared becomes a PCD-04 alert whose id (the MSH-10 of the
message that raised it) is kept, durably, until the clear is sent; and every pump is observed again every
`observation_period_s`. Messages go into the durable outbox first (`outbox.py`), then the sender delivers them in
order until each is ACKed (at-least-once, same MSH-10 on resend).

In: an order is recorded in the order log (durable) before anything acts on it, so a repeated MSH-10 is answered
with the original reply and never applied twice, and an order the daemon crashed on is answered "outcome unknown"
instead of being applied again. It becomes a clinician command that passes the same kernel as any other; an
order never creates a course or raises a limit. Every message in and out is in the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import structlog

from driverd.core.errors import DriverdError
from driverd.core.state import Phase
from driverd.hl7 import messages, orders
from driverd.hl7.audit_events import HL7_BULK_EVENTS
from driverd.hl7.messages import MessageHeader
from driverd.hl7.model import Alert, Endpoint, Observation, Order, OrderRejected, Priority
from driverd.hl7.orderlog import OrderLog, Prior
from driverd.hl7.outbox import Outbox
from driverd.hl7.settings import Hl7Settings

if TYPE_CHECKING:
    from driverd.runtime.channel import Channel
    from driverd.runtime.daemon import Daemon

log = structlog.get_logger("driverd.hl7")

#: The application reply is due within this (Mirth's default response timeout is 5 s; keep a margin).
REPLY_WITHIN_S = 4.0

#: PCD-04 priority of each alarm cause (IEC 60601-1-8): a cause that stops the pump or means the daemon cannot
#: see it is high; a cause that leaves the course safe but needing attention is medium; warnings are low. Any
#: cause not listed is high (an unknown alarm is treated as the worst case).
_PRIORITY: dict[str, Priority] = {
    "under_infusion": "PM",
    "clock_step": "PM",
    "pump_alarm:near_end": "PL",
    "pump_alarm:low_battery": "PL",
}


def priority_of(cause: str) -> Priority:
    return _PRIORITY.get(cause, "PH")


def active_causes(channel: Channel) -> tuple[str, ...]:
    """What the receiver is told is alarming on this pump: the course's alarm causes and an unacknowledged clock
    step (a fault of its own: no escalation until a clinician checks the time)."""
    causes = tuple(channel.state.alarm_causes)
    if channel.state.clock_fault and "clock_step" not in causes:
        causes += ("clock_step",)
    return causes


def observe(channel: Channel, at: Any) -> Observation:
    s = channel.state
    st = channel.last_status
    sched = s.schedule
    known = st is not None and not channel.link_lost
    return Observation(
        at=at, pump_id=channel.pump_id, pump_model=s.pump_model, course_id=s.course_id,
        patient_ref=sched.patient_ref if sched else None, drug_name=sched.drug_name if sched else None,
        concentration_mg_per_ml=s.concentration if sched else None, phase=s.phase.value,
        pump_state=st.state.value if known and st else None,
        rate_ml_per_h=st.delivering_ml_per_h if known and st else None,
        commanded_ml_per_h=s.commanded_rate, dose_mg_per_24h=s.level_mg_per_24h,
        delivered_ml=s.delivered_ml if s.last_sample is not None else None,
        link="lost" if channel.link_lost else ("up" if channel.connected else "down"),
        alarms=active_causes(channel),
    )


def _change_key(obs: Observation) -> tuple[Any, ...]:
    """What makes a new observation worth sending at once (the delivered volume changes every poll: it travels
    with the periodic observation instead)."""
    return (obs.course_id, obs.phase, obs.pump_state, obs.rate_ml_per_h, obs.commanded_ml_per_h,
            obs.dose_mg_per_24h, obs.link, obs.alarms)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How an order was settled: the reply's MSA-1 and, for AE/AR, what its ERR says."""

    code: Literal["AA", "AE", "AR"]
    error_code: str
    error_text: str
    error_field: str
    pump_id: str | None
    order: Order | None
    condition: str | None = None  # ERR-3 (HL7 table 0357); None: 207, application internal error


def _type(header: MessageHeader) -> str:
    return "^".join(x for x in (header.message_code, header.trigger_event, header.structure) if x)[:64]


@dataclass
class _Pump:
    key: tuple[Any, ...] | None = None


class Gateway:
    def __init__(self, daemon: Daemon, settings: Hl7Settings) -> None:
        self.daemon = daemon
        self.settings = settings
        self.sender_ep = Endpoint(settings.sending_application, settings.sending_facility)
        self.receiver_ep = Endpoint(settings.receiving_application, settings.receiving_facility)
        self.outbox: Outbox | None = None
        self.orderlog: OrderLog | None = None
        self.sender: Any = None
        self.server: Any = None
        self._pumps: dict[str, _Pump] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[str, asyncio.Future[None]] = {}  # control ids of orders being worked on now
        self._instance: str | None = None  # the outbox's control-id prefix, read once
        self._alert_ids: dict[str, dict[str, str]] | None = None  # see _all_active
        self.full = False  # the last message the outbox was given was refused (alarmed in the operational log)
        self.dropped = 0  # messages the outbox refused since the start: never delivered
        self.last_refusal = ""

    @property
    def sends(self) -> bool:
        return self.settings.observations_to is not None

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        from driverd.hl7.mllp import Sender, serve_orders

        directory = self.settings.queue_dir
        self.orderlog = OrderLog.open(directory / "orders")
        if self.sends:
            self.outbox = Outbox.open(directory / "outbox")
            if not isinstance(self.outbox.state.get("instance"), str):
                # A random prefix per installation: control ids stay unique even if the queue is ever reset.
                self.outbox.set_state("instance", secrets.token_hex(3).upper())
            for ch in self.daemon.channels.values():
                self.on_change(ch)  # the state after recovery: alarms raised or cleared while we were down
            addr = self.settings.observations_to
            assert addr is not None
            self.sender = Sender(self.outbox, addr.host, addr.port, ssl_context=self.settings.client_ssl(),
                                 ack_timeout_s=self.settings.ack_timeout_s, on_outcome=self._delivered)
            self._tasks.append(asyncio.create_task(self.sender.run(), name="hl7-sender"))
            self._tasks.append(asyncio.create_task(self._periodic(), name="hl7-periodic"))
        if self.settings.orders_listen is not None:
            listen = self.settings.orders_listen
            self.server = await serve_orders(self.handle_order, listen.host, listen.port,
                                             ssl_context=self.settings.server_ssl(),
                                             max_frame_bytes=self.settings.max_frame_bytes,
                                             max_connections=self.settings.max_connections)
        self.daemon.listeners.append(self.on_change)

    def stop_observing(self) -> None:
        """No more observations or alerts (the periodic task ends); what is queued is still delivered."""
        with contextlib.suppress(ValueError):
            self.daemon.listeners.remove(self.on_change)
        for task in self._tasks:
            if task.get_name() == "hl7-periodic":
                task.cancel()

    async def stop(self) -> None:
        self.stop_observing()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        if self.sender is not None:
            self.sender.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for store in (self.outbox, self.orderlog):
            if store is not None:
                with contextlib.suppress(Exception):
                    store.close()

    def status(self) -> dict[str, Any]:
        """For `driverd status`: is the receiver reachable, how much is waiting, what went wrong last."""
        out: dict[str, Any] = {"observations_to": str(self.settings.observations_to or "") or None,
                               "orders_listen": str(self.settings.orders_listen or "") or None}
        if self.sender is not None and self.outbox is not None:
            c = self.sender.counters
            out.update(connected=self.sender.connected, queued=self.outbox.pending_count, acked=c.acked,
                       rejected=c.rejected, resent=c.resent, last_error=self.sender.last_error or None,
                       outbox_full=self.full, dropped=self.dropped, last_refusal=self.last_refusal or None)
        if self.server is not None:
            out["order_connections"] = self.server.active
        return out

    async def drain(self, timeout_s: float) -> bool:
        """Wait (real time) until every queued message is ACKed; False if some are still pending."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.outbox is not None and self.outbox.head() is not None:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # ------------------------------------------------------------------------------------------ out

    def _control_id(self) -> str:
        assert self.outbox is not None
        if self._instance is None:
            self._instance = str(self.outbox.state["instance"])
        return f"{self._instance}{self.outbox.next_number():010d}"

    def _put(self, kind: str, pump_id: str, build: Callable[[str], str], control_id: str | None = None,
             **audit: Any) -> str | None:
        """Queue one message (durable); None if the outbox refused it: counted, logged at crit, shown in status.
        Every failure (a full queue, the disk) is caught here: an observer never breaks a channel or the timer."""
        assert self.outbox is not None
        try:
            cid = control_id or self._control_id()
            self.outbox.put(cid, build(cid), kind=kind, pump_id=pump_id)
        except DriverdError as exc:  # full (receiver away too long) or the disk failed: never silently
            self.dropped += 1
            if not self.full:
                log.critical("hl7_outbox_refused", pump_id=pump_id, error=str(exc))
            self.full = True
            self.last_refusal = str(exc)[:500]
            return None
        self.full = False
        self._audit("hl7_out", pump_id, control_id=cid, message_type=kind, **audit)
        return cid

    def on_change(self, channel: Channel) -> None:
        """Called by the daemon after every course step of a channel (cheap when nothing an engine sees moved)."""
        if self.outbox is None:
            return
        now = self.daemon.clock.now()
        obs = observe(channel, now)
        self._alerts(channel, obs)
        pump = self._pumps.setdefault(channel.pump_id, _Pump())
        key = _change_key(obs)
        if key != pump.key and self._observation(obs) is not None:
            pump.key = key  # only once sent: a refused observation is tried again at the next step

    def _observation(self, obs: Observation) -> str | None:
        return self._put("ORU^R01", obs.pump_id,
                         lambda cid: messages.observation_message(obs, cid, self.sender_ep, self.receiver_ep),
                         phase=obs.phase)

    def _alerts(self, channel: Channel, obs: Observation) -> None:
        """Raise what appeared, clear what went. The active alert ids live in the outbox's durable state, kept in
        step one alert at a time so a failure half-way loses no pairing: a raise is recorded (its id) before its
        message is queued, a clear after (a crash in between can only repeat a clear, never leave a raise that is
        never cleared)."""
        assert self.outbox is not None
        active = set(obs.alarms)
        for cause, alert_id in [(c, a) for c, a in self._active(channel.pump_id).items() if c not in active]:
            alert = Alert(obs.at, alert_id, "end", channel.pump_id, obs.course_id, obs.patient_ref, cause,
                          "cleared", priority_of(cause))
            if self._send_alert(alert) is None:
                return  # refused: the alert stays active here, and the clear is tried at the next step
            self._set_active(channel.pump_id, cause, None)
        for cause in obs.alarms:
            if cause in self._active(channel.pump_id):
                continue
            try:
                control_id = self._control_id()
                self._set_active(channel.pump_id, cause, control_id)
            except DriverdError as exc:
                self.dropped += 1
                log.critical("hl7_outbox_refused", pump_id=channel.pump_id, error=str(exc))
                return
            alert = Alert(obs.at, control_id, "start", channel.pump_id, obs.course_id, obs.patient_ref, cause,
                          _detail(channel, cause), priority_of(cause))
            if self._send_alert(alert, control_id) is None:
                with contextlib.suppress(DriverdError):
                    self._set_active(channel.pump_id, cause, None)  # not raised after all: raise it next time
                return

    def _all_active(self) -> dict[str, dict[str, str]]:
        """pump -> cause -> alert id, as in the outbox's durable state. Read from it once (`Outbox.state` decodes
        every key: too dear for every poll of every pump), then kept in step by `_set_active`."""
        assert self.outbox is not None
        if self._alert_ids is None:
            self._alert_ids = dict(self.outbox.state.get("alerts") or {})
        return self._alert_ids

    def _active(self, pump_id: str) -> dict[str, str]:
        return self._all_active().get(pump_id) or {}

    def _set_active(self, pump_id: str, cause: str, alert_id: str | None) -> None:
        assert self.outbox is not None
        alerts = dict(self._all_active())
        mine = dict(alerts.get(pump_id) or {})
        if alert_id is None:
            mine.pop(cause, None)
        else:
            mine[cause] = alert_id
        alerts[pump_id] = mine
        self.outbox.set_state("alerts", alerts)
        self._alert_ids = alerts  # only once durable: a failed set_state leaves the old view

    def _send_alert(self, alert: Alert, control_id: str | None = None) -> str | None:
        return self._put("ORU^R40", alert.pump_id,
                         lambda cid: messages.alert_message(alert, cid, self.sender_ep, self.receiver_ep),
                         control_id, alert_id=alert.alert_id, alert_phase=alert.phase, cause=alert.cause,
                         priority=alert.priority)

    async def _periodic(self) -> None:
        clock = self.daemon.clock
        period = timedelta(seconds=self.settings.observation_period_s)
        clock.register()
        try:
            due = clock.now() + period
            while True:
                await clock.sleep_until(due)
                for ch in self.daemon.channels.values():
                    try:
                        obs = observe(ch, clock.now())
                        if self._observation(obs) is not None:
                            self._pumps.setdefault(ch.pump_id, _Pump()).key = _change_key(obs)
                    except Exception as exc:  # one bad moment must not end the periodic observations for good
                        log.error("hl7_periodic_failed", pump_id=ch.pump_id, error=f"{type(exc).__name__}: {exc}")
                due += period
                if due <= clock.now():
                    due = clock.now() + period
        finally:
            clock.unregister()

    def _delivered(self, item: Any, outcome: str, detail: str) -> None:
        self._audit("hl7_acked", getattr(item, "pump_id", None), control_id=item.control_id, outcome=outcome,
                    detail=detail[:500])
        if outcome not in ("AA", "CA"):
            log.error("hl7_rejected_by_receiver", control_id=item.control_id, outcome=outcome, detail=detail[:500])

    # ------------------------------------------------------------------------------------------ in

    async def handle_order(self, text: str, send: Callable[[str], Awaitable[None]]) -> None:
        """One inbound frame: accept ACK at once, the application reply (RRG^O16) when the order is settled."""
        assert self.orderlog is not None
        header = orders.read_header(text)
        if header is None:
            log.warning("hl7_unreadable_frame", chars=len(text))
            return  # no MSH to answer to: nothing a reply could name
        cid = header.control_id
        running = self._inflight.get(cid)
        if running is not None:
            # The same MSH-10 is being worked on (a resend on another connection): wait for its outcome, then
            # answer from the order log like any repeat. Never a second application, never a guess.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPLY_WITHIN_S + 1):
                    await asyncio.shield(running)
        digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
        rejected = self._reject(text)
        if isinstance(rejected, _Outcome):
            # Not an order for a pump here: answered, audited, but not in the order log. It changes nothing, so
            # answering it again is harmless, and a flood of such frames cannot push real orders out of the
            # log's idempotency window.
            await self._answer(header, rejected, send)
            return
        order = rejected
        prior = self.orderlog.begin(cid, digest)
        if prior is not None:
            await self._repeat(header, prior, digest, send)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[cid] = done
        try:
            await self._answer(header, None, send, order=order)
        finally:
            del self._inflight[cid]
            done.set_result(None)

    def _reject(self, text: str) -> _Outcome | Order:
        """The order, or why it is none (AR): undecodable text, not a valid PIV order, or a pump we do not have."""
        from driverd.hl7.mllp import undecodable

        bad = undecodable(text)
        if bad is not None:  # never act on text we cannot read exactly
            return _Outcome("AR", "encoding", bad, "", None, None, "102")
        try:
            order = orders.parse_order(text)
        except OrderRejected as exc:
            return _Outcome("AR", exc.rule, orders.rejection_text(exc), exc.field, None, None,
                            orders.rejection_condition(exc))
        if order.pump_id not in self.daemon.channels:
            return _Outcome("AR", "unknown_pump", f"no pump {order.pump_id!r} here", "OBX-18", None, order, "204")
        return order

    async def _answer(self, header: MessageHeader, outcome: _Outcome | None, send: Callable[[str], Awaitable[None]],
                      *, order: Order | None = None) -> None:
        """Accept ACK, settle (unless already settled as a rejection), record, reply. Whatever happens after the
        order log's `begin`, the order is settled and recorded: a lost connection only loses the replies (a
        resend gets them from the log), an unexpected error is an AE recorded as such."""
        logged = outcome is None  # an order for a pump here went through the order log's begin: finish it
        replies: list[str] = []
        if header.accept_ack_type != "NE":  # enhanced mode: commit accept first, then the application reply
            ack = messages.accept_ack(header, self._reply_id(header, "A"), "CA", self.sender_ep,
                                      at=self.daemon.clock.now())
            replies.append(ack)
            await self._send(send, ack)
        if outcome is None:
            assert order is not None
            try:
                outcome = await self._settle(order)
            except Exception as exc:  # must not leave the order begun and unanswered
                log.error("hl7_order_failed", control_id=header.control_id, error=f"{type(exc).__name__}: {exc}")
                outcome = _Outcome("AE", "outcome_unknown", f"internal error while applying the order "
                                   f"({type(exc).__name__}): check the pump's status", "", order.pump_id, order)
        reply = messages.order_reply(header, self._reply_id(header, "R"), outcome.code, self.sender_ep,
                                     at=self.daemon.clock.now(), error_code=outcome.error_code,
                                     error_text=outcome.error_text, error_field=outcome.error_field,
                                     condition=outcome.condition)
        replies.append(reply)
        if logged:
            # Recorded (order log and audit, both durable) before the reply leaves: what was answered is never lost
            # (a message refused before the order log has its durable hl7_in below, before its reply too).
            try:
                assert self.orderlog is not None
                self.orderlog.finish(header.control_id, replies)
            except DriverdError as exc:
                log.critical("hl7_orderlog_failed", control_id=header.control_id, error=str(exc))
        o = outcome.order
        self._audit("hl7_in", outcome.pump_id, control_id=header.control_id,
                    message_type=_type(header), sender=f"{header.sender.application}^{header.sender.facility}",
                    order_control=o.order_control if o else None, by=o.by if o else None,
                    outcome=outcome.code, code=outcome.error_code or None, detail=outcome.error_text[:500] or None)
        if header.application_ack_type != "NE":
            await self._send(send, reply)

    async def _send(self, send: Callable[[str], Awaitable[None]], text: str) -> None:
        """Send one reply; a peer that went away only loses it (the replies are in the order log for a resend)."""
        try:
            await send(text)
        except (DriverdError, OSError) as exc:
            log.warning("hl7_reply_not_sent", error=f"{type(exc).__name__}: {exc}")

    async def _settle(self, order: Order) -> _Outcome:
        channel = self.daemon.channels[order.pump_id]
        assert self.daemon.protocol is not None
        plan = orders.plan_order(order, channel.state, self.daemon.protocol)
        if isinstance(plan, orders.Refusal):
            return _Outcome("AE", plan.code, plan.detail, "", order.pump_id, order)
        try:
            async with asyncio.timeout(REPLY_WITHIN_S):
                reply = await self.daemon.command(order.pump_id, plan.action, order.by, order.reason,
                                                  plan.dose_mg_per_24h)
        except TimeoutError:
            return _Outcome("AE", "outcome_unknown", "no outcome within the reply time: check the pump's status",
                            "", order.pump_id, order)
        if reply.get("ok"):
            return _Outcome("AA", "", "", "", order.pump_id, order)
        refusals = reply.get("refusals") or []
        if refusals:
            return _Outcome("AE", str(refusals[0]["reason"]), str(refusals[0]["detail"]), "", order.pump_id, order)
        if reply.get("error"):
            return _Outcome("AE", "error", str(reply["error"]), "", order.pump_id, order)
        return _Outcome("AE", "unverified", "the pump has not confirmed the new rate (it reports "
                        f"{reply.get('pump_rate_ml_per_h')} mL/h)", "", order.pump_id, order)

    async def _repeat(self, header: MessageHeader, prior: Prior, digest: str,
                      send: Callable[[str], Awaitable[None]]) -> None:
        assert self.orderlog is not None
        now = self.daemon.clock.now()
        if prior.digest != digest:
            # Same MSH-10, different content: not a resend. Refused, and the original stays as it was.
            reply = messages.order_reply(header, self._reply_id(header, "X"), "AR", self.sender_ep, at=now,
                                         error_code="duplicate_control_id",
                                         error_text="this MSH-10 was already used for a different message",
                                         error_field="MSH-10", condition="205")
            self._audit("hl7_in", None, control_id=header.control_id, message_type=_type(header),
                        outcome="AR", code="duplicate_control_id", detail=None)
            await self._send(send, reply)
            return
        if prior.finished:
            self._audit("hl7_in", None, control_id=header.control_id, message_type=_type(header),
                        outcome="repeat", code=None, detail="answered with the original replies; not applied again")
            for text in prior.replies:
                await self._send(send, text)
            return
        # Received before a crash and never answered: it may or may not have been applied. Never apply it again.
        reply = messages.order_reply(header, self._reply_id(header, "R"), "AE", self.sender_ep, at=now,
                                     error_code="outcome_unknown",
                                     error_text="received before a restart and not applied again: check the pump's "
                                                "status and send a new order if needed")
        try:
            self.orderlog.finish(header.control_id, [reply])
        except DriverdError as exc:
            log.critical("hl7_orderlog_failed", control_id=header.control_id, error=str(exc))
        self._audit("hl7_in", None, control_id=header.control_id, message_type=_type(header),
                    outcome="AE", code="outcome_unknown", detail="received before a restart; not applied again")
        await self._send(send, reply)

    def _reply_id(self, header: MessageHeader, tag: str) -> str:
        # Replies are named after the order they answer (MSH-10 is at most 199 characters in v2.6).
        return f"{tag}{header.control_id}"[:199]

    # ------------------------------------------------------------------------------------------ audit

    def _audit(self, event: str, pump_id: str | None, **fields: Any) -> None:
        """Durable unless the event is one of HL7_BULK_EVENTS (one list: the writer's lost-page cut reads it too)."""
        durable = event not in HL7_BULK_EVENTS
        audit = self.daemon.audit
        if audit is None or audit.dead:
            return
        channel = self.daemon.channels.get(pump_id) if pump_id else None
        course = channel.state.course_id if channel else None
        try:
            audit.append(event, pump_id=pump_id, course_id=course, durable=durable, **fields)
        except DriverdError as exc:  # the writer's own death is handled by the daemon's fail-safe
            log.error("hl7_audit_failed", error=str(exc))


def _detail(channel: Channel, cause: str) -> str:
    if cause == "clock_step":
        return channel.state.clock_fault
    if channel.state.phase is Phase.ALARM and channel.state.alarm_code == cause:
        return f"course in alarm: {cause}"
    return cause
