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
        self.full = False  # the outbox refused a message: alarmed in the operational log, counted
        self.dropped = 0

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
                       outbox_full=self.full)
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
        return f"{self.outbox.state['instance']}{self.outbox.next_number():010d}"

    def _enqueue(self, kind: str, pump_id: str, build: Callable[[str], str], **audit: Any) -> str | None:
        assert self.outbox is not None
        control_id = self._control_id()
        try:
            self.outbox.put(control_id, build(control_id), kind=kind, pump_id=pump_id)
        except DriverdError as exc:  # full (receiver away too long) or the disk failed: never silently
            self.dropped += 1
            if not self.full:
                log.error("hl7_outbox_refused", pump_id=pump_id, error=str(exc), priority="crit")
            self.full = True
            return None
        self.full = False
        self._audit("hl7_out", pump_id, control_id=control_id, message_type=kind, **audit)
        return control_id

    def on_change(self, channel: Channel) -> None:
        """Called by the daemon after every course step of a channel (cheap when nothing an engine sees moved)."""
        if self.outbox is None:
            return
        now = self.daemon.clock.now()
        obs = observe(channel, now)
        self._alerts(channel, obs)
        pump = self._pumps.setdefault(channel.pump_id, _Pump())
        key = _change_key(obs)
        if key != pump.key:
            pump.key = key
            self._observation(obs)

    def _observation(self, obs: Observation) -> None:
        self._enqueue("ORU^R01", obs.pump_id,
                      lambda cid: messages.observation_message(obs, cid, self.sender_ep, self.receiver_ep),
                      phase=obs.phase)

    def _alerts(self, channel: Channel, obs: Observation) -> None:
        assert self.outbox is not None
        alerts: dict[str, dict[str, str]] = dict(self.outbox.state.get("alerts") or {})
        mine = dict(alerts.get(channel.pump_id) or {})
        now_active = set(obs.alarms)
        changed = False
        for cause in [c for c in mine if c not in now_active]:
            alert = Alert(obs.at, mine[cause], "end", channel.pump_id, obs.course_id, obs.patient_ref, cause,
                          "cleared", priority_of(cause))
            if self._send_alert(alert) is None:
                return  # outbox refused: try again on the next change, with the state unchanged
            del mine[cause]
            changed = True
        for cause in obs.alarms:
            if cause in mine:
                continue
            control_id = self._control_id()
            alert = Alert(obs.at, control_id, "start", channel.pump_id, obs.course_id, obs.patient_ref, cause,
                          _detail(channel, cause), priority_of(cause))
            if self._send_alert(alert, control_id) is None:
                return
            mine[cause] = control_id
            changed = True
        if changed:
            alerts[channel.pump_id] = mine
            self.outbox.set_state("alerts", alerts)

    def _send_alert(self, alert: Alert, control_id: str | None = None) -> str | None:
        assert self.outbox is not None
        cid = control_id or self._control_id()
        try:
            self.outbox.put(cid, messages.alert_message(alert, cid, self.sender_ep, self.receiver_ep),
                            kind="ORU^R40", pump_id=alert.pump_id)
        except DriverdError as exc:
            self.dropped += 1
            log.error("hl7_outbox_refused", pump_id=alert.pump_id, error=str(exc), priority="crit")
            self.full = True
            return None
        self._audit("hl7_out", alert.pump_id, control_id=cid, message_type="ORU^R40", alert_id=alert.alert_id,
                    alert_phase=alert.phase, cause=alert.cause, priority=alert.priority)
        return cid

    async def _periodic(self) -> None:
        clock = self.daemon.clock
        period = timedelta(seconds=self.settings.observation_period_s)
        clock.register()
        try:
            due = clock.now() + period
            while True:
                await clock.sleep_until(due)
                for ch in self.daemon.channels.values():
                    obs = observe(ch, clock.now())
                    self._pumps.setdefault(ch.pump_id, _Pump()).key = _change_key(obs)
                    self._observation(obs)
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
        digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
        prior = self.orderlog.begin(header.control_id, digest)
        if prior is not None:
            await self._repeat(header, prior, digest, send)
            return
        replies: list[str] = []
        if header.accept_ack_type != "NE":  # enhanced mode: commit accept first, then the application reply
            ack = messages.accept_ack(header, self._reply_id(header, "A"), "CA", self.sender_ep,
                                      at=self.daemon.clock.now())
            replies.append(ack)
            await send(ack)
        out = await self._settle(text)
        reply = messages.order_reply(header, self._reply_id(header, "R"), out.code, self.sender_ep,
                                     at=self.daemon.clock.now(), error_code=out.error_code,
                                     error_text=out.error_text, error_field=out.error_field,
                                     condition=out.condition)
        replies.append(reply)
        # Recorded (order log and audit, both durable) before the reply leaves: what was answered is never lost.
        self.orderlog.finish(header.control_id, replies)
        order = out.order
        self._audit("hl7_in", out.pump_id, durable=True, control_id=header.control_id,
                    message_type=_type(header), sender=f"{header.sender.application}^{header.sender.facility}",
                    order_control=order.order_control if order else None, by=order.by if order else None,
                    outcome=out.code, code=out.error_code or None, detail=out.error_text[:500] or None)
        if header.application_ack_type != "NE":
            await send(reply)

    async def _settle(self, text: str) -> _Outcome:
        from driverd.hl7.mllp import undecodable

        bad = undecodable(text)
        if bad is not None:  # never act on text we cannot read exactly
            return _Outcome("AR", "encoding", bad, "", None, None, "102")
        try:
            order = orders.parse_order(text)
        except OrderRejected as exc:
            return _Outcome("AR", "invalid", orders.rejection_text(exc), exc.field, None, None,
                            orders.rejection_condition(exc))
        channel = self.daemon.channels.get(order.pump_id)
        if channel is None:
            return _Outcome("AR", "unknown_pump", f"no pump {order.pump_id!r} here", "OBX-18", None, order, "204")
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
            self._audit("hl7_in", None, durable=True, control_id=header.control_id, message_type=_type(header),
                        outcome="AR", code="duplicate_control_id", detail=None)
            await send(reply)
            return
        if prior.finished:
            self._audit("hl7_in", None, durable=True, control_id=header.control_id, message_type=_type(header),
                        outcome="repeat", code=None, detail="answered with the original replies; not applied again")
            for text in prior.replies:
                await send(text)
            return
        # Received before a crash and never answered: it may or may not have been applied. Never apply it again.
        reply = messages.order_reply(header, self._reply_id(header, "R"), "AE", self.sender_ep, at=now,
                                     error_code="outcome_unknown",
                                     error_text="received before a restart and not applied again: check the pump's "
                                                "status and send a new order if needed")
        self.orderlog.finish(header.control_id, [reply])
        self._audit("hl7_in", None, durable=True, control_id=header.control_id, message_type=_type(header),
                    outcome="AE", code="outcome_unknown", detail="received before a restart; not applied again")
        await send(reply)

    def _reply_id(self, header: MessageHeader, tag: str) -> str:
        # Replies are named after the order they answer (MSH-10 is at most 199 characters in v2.6).
        return f"{tag}{header.control_id}"[:199]

    # ------------------------------------------------------------------------------------------ audit

    def _audit(self, event: str, pump_id: str | None, *, durable: bool = False, **fields: Any) -> None:
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
