"""The audit log died at run time (disk full, file-size limit, I/O error, read-only filesystem): make every
pump safe, say so everywhere, refuse whatever needs the log, and let the service exit non-zero.

The one exception to write-ahead. Every setpoint is normally fdatasync'd before it goes on the wire; here the
log cannot take anything, so the fail-safe stop goes out unlogged. That is acceptable for a stop only: a stop
is always allowed (the kernel approves it here too), it is the safe state, and after a restart the channels
read every pump back and the core reconciles the logged course with the stopped pump (docs/audit.md).

Sequence (`FailSafe.trigger`, called by the writer's `on_dead` hook the moment it dies, whoever hit the error):
1. every channel task is told to stop and cancelled, and requests still queued are answered "audit_dead";
2. every pump, in parallel, gets the kernel's stop setpoint through the driver's stop(), then a status read
   (reconnecting once if the cancelled channel left the transport mid-exchange); the read-back is kept;
3. `done` is set: the service stops the watchdog pings, sends `STATUS=` with the reason, holds for
   `failsafe_hold_s` so `status` can show what happened, and exits non-zero; systemd restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog

from driverd.core.kernel import Proposal, Setpoint, gate
from driverd.core.records import fmt_dec, fmt_time

if TYPE_CHECKING:
    from driverd.runtime.channel import Channel
    from driverd.runtime.daemon import Daemon

AUDIT_DEAD = "audit_dead"

log = structlog.get_logger("driverd.failsafe")


@dataclass(frozen=True, slots=True)
class PumpStop:
    """What the fail-safe stop did to one pump."""

    pump_id: str
    stopped: bool  # the read-back says the pump delivers nothing
    readback_ml_per_h: Decimal | None  # the rate it delivers now (None: no valid read-back)
    setpoint_id: int | None  # the kernel's stop setpoint (not logged: the log is dead)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"stopped": self.stopped, "readback_ml_per_h": _opt(self.readback_ml_per_h),
                "setpoint_id": self.setpoint_id, "error": self.error or None}


class FailSafe:
    """The daemon's fail-safe state: inactive until the audit log dies, then one run that stops every pump."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.since: datetime | None = None
        self.stops: dict[str, PumpStop] = {}
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.reason is not None

    def trigger(self, daemon: Daemon, reason: str) -> None:
        """Start the fail-safe (once). Synchronous: called from inside the writer, in whatever task failed."""
        if self.reason is not None:
            return
        self.reason = reason
        self.since = daemon.clock.now()
        self._task = asyncio.get_running_loop().create_task(self._run(daemon), name="failsafe")

    def refusal(self) -> dict[str, Any]:
        """The reply to every request that would need the audit log (not logged: it cannot be)."""
        return {"ok": False, "refusals": [{"reason": AUDIT_DEAD, "detail": self.describe()}]}

    def stopped(self) -> list[str]:
        """Pumps the fail-safe stop was read back stopped on."""
        return sorted(pid for pid, r in self.stops.items() if r.stopped)

    def unverified(self) -> list[str]:
        """Pumps whose fail-safe stop could not be verified by a read-back."""
        return sorted(pid for pid, r in self.stops.items() if not r.stopped)

    def describe(self) -> str:
        return (f"the audit log cannot be written ({self.reason}); every pump was stopped by the fail-safe and "
                "no request is accepted until driverd restarts with a writable log")

    # ------------------------------------------------------------------------------------------ the run

    async def _run(self, daemon: Daemon) -> None:
        try:
            safe_log(log, "error", "audit_log_dead", error=self.reason,
                     action="stopping every pump without write-ahead, then exiting")
            tasks = list(daemon.channel_tasks().values())
            for ch in daemon.channels.values():
                ch.stopping = True
            for task in tasks:
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ch in daemon.channels.values():
                self._answer_queued(ch)
            results = await asyncio.gather(*(self._stop(daemon, ch) for ch in daemon.channels.values()))
            self.stops = {r.pump_id: r for r in results}
            unsafe = self.unverified()
            safe_log(log, "error" if unsafe else "warning", "failsafe_pumps_stopped", stopped=self.stopped(),
                     not_verified=unsafe, errors={pid: r.error for pid, r in self.stops.items() if r.error})
        finally:
            self.done.set()

    def _answer_queued(self, ch: Channel) -> None:
        while not ch.inbox.empty():
            request = ch.inbox.get_nowait()
            if not request.reply.done():
                request.reply.set_result(self.refusal())

    async def _stop(self, daemon: Daemon, ch: Channel) -> PumpStop:
        assert daemon.protocol is not None
        proposal = Proposal(Decimal(0), "stop", "failsafe", f"audit log dead: {self.reason}"[:200])
        decision = gate(ch.state, daemon.protocol, proposal, daemon.clock.now())
        # A stop is always allowed; should the kernel ever refuse one, stopping is still the safe way out.
        setpoint_id = decision.id if isinstance(decision, Setpoint) else None
        refused = "" if isinstance(decision, Setpoint) else f"kernel refused the stop ({decision.reason}); sent anyway"
        bound = 4 * daemon.config.driver_timeout_s
        error = ""
        for attempt in range(2):
            try:
                if attempt or not ch.connected:
                    # The cancelled channel may have left a half-finished exchange on the transport: start clean.
                    with contextlib.suppress(Exception):
                        await ch.driver.close()
                    async with asyncio.timeout(bound):
                        await ch.driver.connect()
                async with asyncio.timeout(bound):
                    await ch.driver.stop()
                async with asyncio.timeout(bound):
                    status = await ch.driver.read_status()
            except Exception as exc:  # whatever a half-closed driver raises: retry once on a fresh connection
                error = f"{type(exc).__name__}: {exc}"
                continue
            ch.last_status = status
            rate = status.delivering_ml_per_h
            return PumpStop(ch.pump_id, rate == 0, rate, setpoint_id, refused)
        return PumpStop(ch.pump_id, False, None, setpoint_id, "; ".join(e for e in (refused, error) if e))

    # ------------------------------------------------------------------------------------------ status

    def annotate(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Add `health` and `audit` to a status reply. After the log died, no pump is shown as running or its
        link as up: only the fail-safe's own read-back is reported."""
        if self.reason is None:
            reply["health"] = "ok"
            reply["audit"] = {"state": "ok"}
            return reply
        reply["health"] = AUDIT_DEAD
        reply["audit"] = {"state": "dead", "error": self.reason,
                          "since": fmt_time(self.since) if self.since else None,
                          "failsafe": "done" if self.done.is_set() else "stopping pumps"}
        for p in reply.get("pumps", []):
            stop = self.stops.get(p["pump_id"])
            p["link"] = "unknown"
            if stop is None:
                p["pump_state"] = "stopping" if not self.done.is_set() else "unknown"
            else:
                p["pump_state"] = "stopped_by_failsafe" if stop.stopped else "stop_unverified"
            p["pump_rate_ml_per_h"] = _opt(stop.readback_ml_per_h) if stop else None
            p["reported_ml_per_h"] = p["pump_rate_ml_per_h"]
            p["verified_ml_per_h"] = _opt(stop.readback_ml_per_h) if stop and stop.stopped else None
            p["failsafe"] = stop.as_dict() if stop else None
        return reply


def left_running(channels: dict[str, Channel]) -> list[dict[str, str | None]]:
    """Pumps whose last read status was infusing, with that rate: for the `daemon_stop` record."""
    out: list[dict[str, str | None]] = []
    for pid, ch in channels.items():
        st = ch.last_status
        if st is not None and st.running:
            out.append({"pump_id": pid, "rate_ml_per_h": fmt_dec(st.rate_ml_per_h)})
    return out


def _opt(d: Decimal | None) -> str | None:
    return None if d is None else fmt_dec(d)


def safe_log(logger: Any, level: str, event: str, **fields: Any) -> None:
    """An operational log line that can never fail what called it (stderr may be a closed pipe)."""
    with contextlib.suppress(Exception):
        getattr(logger, level)(event, **fields)
