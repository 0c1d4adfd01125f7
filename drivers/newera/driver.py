"""NewEraDriver: New Era NE-500/1000/1002X/4000 syringe pumps over RS-232 (pyserial) or a TCP bridge.

URLs: ``newera+serial:///dev/ttyUSB0?address=1&baud=19200``, ``newera+socket://127.0.0.1:7001?address=0``.

Policy (see DESIGN.md and the reference file):
- Rates always go out in mL/h (``RAT <n> MH``), exactly as the safety kernel quantized them: ``format_number``
  refuses anything the pump cannot represent instead of rounding. Readings in other units are converted
  exactly. Rate units can only change while stopped: sending MH to a running pump set to other units gives
  ``PumpRejected("NA")``; a stopped pump simply switches to MH with the next ``set_rate``.
- Continuous infusion, infuse direction only: ``VOL ML``, ``VOL 0``, ``DIR INF`` at connect while stopped.
  The driver never sends WDR/REV (IEC 60601-2-24: never withdraw).
- Retries only where repeating is harmless: queries (status, RAT, DIA, DIS, VER), ``STP``, ``CLD INF`` on a
  stopped pump, and any request the pump answered ``?COM`` (it did not execute a corrupt packet). A set whose
  reply is lost is never blindly resent: the driver reads back first and resends only if the pump does not
  hold the value.
- Read-back after every set: ``set_rate``/``configure_syringe`` return what the pump reports afterwards.
- Safe mode (dead-man): with ``options.deadman_s > 0`` connect() sends ``SAF<n>`` (always in safe framing,
  which the pump accepts in either mode) and uses safe framing from then on. The runtime must call
  ``heartbeat()`` more often than the timeout: every ``deadman_s / 3`` seconds. If the daemon dies the pump
  raises ``A?T`` and stops by itself.
- ``probe()`` (``driverd pump probe``) sends queries only (SAF, VER, status, RAT, DIS, DIA, none with an
  argument) and leaves safe mode, direction and volume settings as they are.
- Alarms: the pump answers the first valid packet after an alarm with ``A?x`` instead of executing it; that
  reply acknowledges the alarm on the pump. The driver latches what it saw and reports it (``read_status``
  state ALARM) until ``clear_alarm()``; meanwhile it refuses ``set_rate``/``configure_syringe``/``run`` with
  PumpAlarm, so an alarm is never silently swallowed. ``stop()`` always works. A pump just powered up
  answers ``A?R``: reported as POWER_INTERRUPTED.
- Status mapping: I -> INFUSING, S -> STOPPED, P/T/U -> PAUSED; W (withdrawing) and X (purging) are never
  commanded by this driver, so they are reported as ALARM with AlarmKind.OTHER (the pump is moving in a way
  nobody asked for). A?R/S/T/E/O -> POWER_INTERRUPTED/OCCLUSION/SAFE_MODE_TIMEOUT/PROGRAM_ERROR/OTHER.
  A stalled plunger at the end of the syringe also reports A?S: the protocol cannot tell it from an
  occlusion, so neither can the driver (the daemon tracks the volume itself).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from decimal import Decimal
from typing import ClassVar, Final

from driverd.core.errors import Problem, QuantityError, ValidationError
from driverd.core.quantities import NEW_ERA_RESOLUTION, Resolution
from driverd.core.syringe_limits import NE1000_PLUNGER
from drivers.base import (
    AlarmKind,
    DriverError,
    DriverOptions,
    DriverTimeout,
    Identity,
    ProbeReport,
    ProtocolError,
    PumpAlarm,
    PumpDriver,
    PumpRejected,
    PumpState,
    PumpStatus,
    last_digit_step,
)
from drivers.newera.codec import (
    MAX_BASIC_PAYLOAD,
    VOLUME_TO_ML,
    AlarmCode,
    ErrorCode,
    Frame,
    Reply,
    Status,
    encode_command,
    format_number,
    parse_diameter,
    parse_dispensed,
    parse_rate,
    parse_reply,
)
from drivers.newera.transport import SerialTransport
from drivers.url import DriverURL, serial_port_url

BAUD_RATES: Final = (300, 1200, 2400, 9600, 19200)
MAX_SAFE_TIMEOUT_S: Final = 255
# Firmware without safe mode (answers ``?`` to SAF): refused unless the URL says without_safe_mode=allow.
WITHOUT_SAFE_MODE: Final = ("refuse", "allow")
BITS_PER_BYTE: Final = 10  # 8N1: start + 8 data + stop

_log = logging.getLogger(__name__)

ALARM_KIND: Final[dict[AlarmCode, AlarmKind]] = {
    AlarmCode.RESET: AlarmKind.POWER_INTERRUPTED,
    AlarmCode.STALLED: AlarmKind.OCCLUSION,
    AlarmCode.SAFE_TIMEOUT: AlarmKind.SAFE_MODE_TIMEOUT,
    AlarmCode.PROGRAM_ERROR: AlarmKind.PROGRAM_ERROR,
    AlarmCode.OUT_OF_RANGE: AlarmKind.OTHER,
}
STATE: Final[dict[Status, PumpState]] = {
    Status.INFUSING: PumpState.INFUSING,
    Status.STOPPED: PumpState.STOPPED,
    Status.PAUSED: PumpState.PAUSED,
    Status.TIMED_PAUSE: PumpState.PAUSED,
    Status.WAITING_TRIGGER: PumpState.PAUSED,
    Status.WITHDRAWING: PumpState.ALARM,
    Status.PURGING: PumpState.ALARM,
}


def _no_data(data: str) -> None:
    if data:
        raise ProtocolError(f"expected no data in this reply, got {data!r}")


def _version(data: str) -> re.Match[str]:
    m = _VERSION.fullmatch(data)
    if m is None:
        raise ProtocolError(f"VER: expected NE<model>[X[n]]V<major>.<minor>, got {data!r}")
    return m


def _direction(data: str) -> str:
    if data not in ("INF", "WDR", "REV", "STK"):
        raise ProtocolError(f"DIR: expected INF|WDR|REV|STK, got {data!r}")
    return data


def _safe_timeout(data: str) -> int:
    if not (data.isdigit() and len(data) <= 3 and int(data) <= MAX_SAFE_TIMEOUT_S):
        raise ProtocolError(f"SAF: expected the safe-mode timeout 0..{MAX_SAFE_TIMEOUT_S}, got {data!r}")
    return int(data)


def _rate_ml_per_h(data: str) -> Decimal:
    return parse_rate(data).ml_per_h


def _pump_number(value: Decimal, field: str) -> str:
    """The pump's text for a value; one it cannot represent is refused (PumpRejected "OOR"), never rounded."""
    try:
        return format_number(value, field=field)
    except QuantityError as exc:
        raise PumpRejected(f"{field}: {exc} (not sent to the pump)", code="OOR") from exc


_VERSION = re.compile(r"NE(?P<model>\d+)(?P<x>X\d*)?(?P<fw>V\d+\.\d+)")


class NewEraDriver(PumpDriver):
    scheme: ClassVar[str] = "newera"
    resolution: ClassVar[Resolution] = NEW_ERA_RESOLUTION

    def __init__(self, url: DriverURL, options: DriverOptions | None = None) -> None:
        super().__init__(url, options)
        port_url, self.address, baud = serial_port_url(
            url, "newera", {"address", "baud", "without_safe_mode"}, default_baud=19200, baud_rates=BAUD_RATES
        )
        deadman = self.options.deadman_s
        if isinstance(deadman, bool) or not isinstance(deadman, int) or not 0 <= deadman <= MAX_SAFE_TIMEOUT_S:
            raise ValidationError(
                [Problem("options.deadman_s", "range", f"New Era SAF takes 0..{MAX_SAFE_TIMEOUT_S} s, got {deadman!r}")]
            )
        self.without_safe_mode = url.params.get("without_safe_mode", "refuse")
        if self.without_safe_mode not in WITHOUT_SAFE_MODE:
            raise ValidationError(
                [Problem("url.without_safe_mode", "enum", f"must be refuse or allow, got {self.without_safe_mode!r}")]
            )
        self.baud = baud
        # The reply timeout grows with the wire time of the longest request and reply at this baud rate (at
        # 300 baud a 64-byte reply alone takes 2.1 s).
        self.timeout_s = self.options.timeout_s + (2 * MAX_BASIC_PAYLOAD + 10) * BITS_PER_BYTE / baud
        self.transport = SerialTransport(port_url, baudrate=baud)
        self.transport.on_unsolicited = self._unsolicited
        # False once connect() found firmware without safe mode: the pump has no dead-man then.
        self.has_safe_mode = True
        self._safe = False
        self._latched: set[AlarmKind] = set()
        self._lock = asyncio.Lock()

    # ---- lifecycle -----

    async def connect(self) -> None:
        await self.transport.open()
        async with self._lock:
            n = self.options.deadman_s
            # SAF always goes in safe framing: the pump accepts it in either mode; it replies in the new one.
            # Its reply comes in the pump's framing after the command (an alarm reply: before it), so accept both.
            try:
                await self._request("SAF", str(n), retry=True, send_safe=True, any_reply_framing=True)
                self._safe = n > 0
            except DriverTimeout:
                if not await self._lacks_safe_mode():
                    raise
                self._no_safe_mode(n)
            reply = await self._request("", retry=True)
            if reply.status is Status.STOPPED:
                for cmd, data in (("DIR", "INF"), ("VOL", "ML"), ("VOL", "0")):
                    await self._request(cmd, data, retry=True)  # idempotent settings: resending is harmless
            else:
                direction = await self._request("DIR", retry=True, expect=_direction)
                if direction.data != "INF":
                    self._latched.add(AlarmKind.OTHER)

    async def _lacks_safe_mode(self) -> bool:
        """After a safe-framed SAF went unanswered: does the pump answer ``?`` to a basic-mode ``SAF``?"""
        try:
            await self._request("SAF", retry=True, send_safe=False, expect=_safe_timeout)
        except PumpRejected as exc:
            return exc.code == "?"
        return False

    def _no_safe_mode(self, deadman_s: int) -> None:
        self.has_safe_mode = False
        self._safe = False
        if deadman_s > 0 and self.without_safe_mode != "allow":
            raise DriverError(
                f"{self.url.raw}: this pump's firmware has no safe mode (SAF answered '?'): it has no dead-man "
                "and keeps infusing if the daemon dies; refused (add without_safe_mode=allow to the URL to run "
                "it in basic mode anyway)"
            )
        if deadman_s > 0:
            _log.warning(
                "%s: pump firmware has no safe mode: NO DEAD-MAN, the pump keeps infusing if the daemon dies "
                "(allowed by without_safe_mode=allow)",
                self.url.raw,
            )

    async def close(self) -> None:
        await self.transport.close()

    @property
    def transport_opens(self) -> int:
        """The transport reopens its port by itself on the next request after an I/O error: counted there."""
        return self.transport.opens

    def rate_range(self, diameter_mm: Decimal) -> tuple[Decimal, Decimal]:
        """(min, max) mL/h an NE-1000/NE-500 runs with this syringe bore, at the pump's resolution (min rounded
        up, max down). The pump answers ``?OOR`` outside it; the drug library's per-syringe limits must lie
        inside (driverd.core.syringe_limits)."""
        return NE1000_PLUNGER.range_ml_per_h(diameter_mm, NEW_ERA_RESOLUTION)

    async def check_unsolicited(self) -> frozenset[AlarmKind]:
        """Read what the pump sent unprompted (safe-mode Auto-Alarm) without sending; returns latched alarms.

        A snapshot: it does not wait. A packet the pump is writing now may not have arrived yet (on a PTY the
        kernel hands bytes to the reading side later); the next call, or the next transaction's drain, sees it."""
        async with self._lock:
            await self.transport.drain(timeout_s=self.timeout_s)
        return frozenset(self._latched)

    def _unsolicited(self, frame: Frame) -> None:
        # Runs in the I/O thread between transactions; a set.add is atomic under the GIL.
        try:
            reply = parse_reply(frame.payload)
        except ProtocolError:
            return
        if reply.address == self.address and reply.alarm is not None:
            self._latched.add(ALARM_KIND[reply.alarm])

    async def probe(self) -> ProbeReport:
        """Queries only: ``SAF`` (no argument), ``VER``, status, ``RAT``, ``DIS``, ``DIA``. Never SAF<n>/DIR/VOL.

        The first valid packet after an alarm is answered ``A?x`` and that reply acknowledges the alarm on the
        pump (it cannot be avoided: any packet does it); the report lists it in ``acknowledged``.
        """
        await self.transport.open()
        try:
            async with self._lock:
                # The safe-mode query goes in safe framing, which the pump accepts in either mode (as connect's
                # SAF<n> does); its answer tells the framing of everything after it.
                try:
                    reply = await self._request(
                        "SAF", retry=True, send_safe=True, any_reply_framing=True, expect=_safe_timeout
                    )
                    deadman_s = _safe_timeout(reply.data)
                except DriverTimeout:
                    if not await self._lacks_safe_mode():
                        raise
                    self.has_safe_mode, deadman_s = False, 0
                self._safe = deadman_s > 0
            identity = await self.identify()
            status = await self.read_status()
        finally:
            await self.transport.close()
        return ProbeReport(identity, status, deadman_s, acknowledged=frozenset(self._latched))

    # ---- queries -----

    async def identify(self) -> Identity:
        async with self._lock:
            reply = await self._request("VER", retry=True, expect=_version)
        m = _version(reply.data)
        return Identity(model=f"NE-{m['model']}{m['x'] or ''}", firmware=m["fw"], address=str(self.address))

    async def read_status(self) -> PumpStatus:
        async with self._lock:
            status = await self._request("", retry=True)
            rate = parse_rate((await self._request("RAT", retry=True, expect=parse_rate)).data)
            dispensed = parse_dispensed((await self._request("DIS", retry=True, expect=parse_dispensed)).data)
            diameter = parse_diameter((await self._request("DIA", retry=True, expect=parse_diameter)).data)
            state = STATE[status.status]
            alarms = set(self._latched)
            if status.status in (Status.WITHDRAWING, Status.PURGING):
                alarms.add(AlarmKind.OTHER)
            if alarms and state is not PumpState.INFUSING:
                state = PumpState.ALARM
            return PumpStatus(
                state=state,
                rate_ml_per_h=rate.ml_per_h,
                delivered_ml=dispensed.infused_ml,
                diameter_mm=diameter,
                alarms=frozenset(alarms),
                # The display's last digit, as sent (4 digits: 0.1 mL steps from 100 mL), in mL.
                delivered_step_ml=last_digit_step(dispensed.infused) * VOLUME_TO_ML[dispensed.unit],
            )

    async def heartbeat(self) -> PumpStatus:
        """Call every ``options.deadman_s / 3`` s: any valid packet re-arms the pump's safe-mode timer."""
        return await self.read_status()

    @property
    def latched_alarms(self) -> frozenset[AlarmKind]:
        return frozenset(self._latched)

    # ---- commands -----

    async def configure_syringe(self, diameter_mm: Decimal) -> Decimal:
        text = _pump_number(diameter_mm, "diameter_mm")
        async with self._lock:
            self._refuse_if_alarm("configure_syringe")
            await self._set("DIA", text, parse=parse_diameter, want=Decimal(text))
            return parse_diameter((await self._request("DIA", retry=True, expect=parse_diameter)).data)

    async def set_rate(self, rate_ml_per_h: Decimal) -> Decimal:
        text = _pump_number(rate_ml_per_h, "rate_ml_per_h")
        async with self._lock:
            self._refuse_if_alarm("set_rate")
            try:
                await self._set("RAT", text + "MH", parse=_rate_ml_per_h, want=Decimal(text))
            except PumpRejected as exc:
                if exc.code != "OOR" or rate_ml_per_h == 0:
                    raise
                diameter = parse_diameter((await self._request("DIA", retry=True, expect=parse_diameter)).data)
                lo, hi = self.rate_range(diameter)
                raise PumpRejected(
                    f"{exc} with a {diameter} mm syringe this pump runs {lo}..{hi} mL/h", code="OOR"
                ) from exc
            return parse_rate((await self._request("RAT", retry=True, expect=parse_rate)).data).ml_per_h

    async def run(self) -> None:
        async with self._lock:
            self._refuse_if_alarm("run")
            reply = await self._command_checked("RUN", want=Status.INFUSING)
            if reply.status is not Status.INFUSING:
                raise DriverError(f"RUN accepted but the pump reports status {reply.status.value!r}")

    async def stop(self) -> None:
        async with self._lock:
            reply = await self._command_checked("STP", want=Status.STOPPED)
            if reply.status is Status.PAUSED:
                # The first STP pauses a running program (manual §STP); a second one stops it.
                reply = await self._command_checked("STP", want=Status.STOPPED)
            if reply.status is Status.INFUSING:
                raise DriverError("STP accepted but the pump still reports infusing")

    async def clear_alarm(self) -> None:
        async with self._lock:
            # A status query acknowledges any alarm the pump still holds (its reply is the A?x).
            await self._request("", retry=True)
            self._latched.clear()

    async def clear_delivered(self) -> Decimal:
        """``CLD INF`` (clear the infused volume dispensed), then ``DIS`` read back in mL. The manual's
        "Volume Dispensed" section states no running restriction for CLD; this driver sends it only to a pump
        whose status reads stopped or paused (a moving plunger can never read back a clean 0)."""
        async with self._lock:
            self._refuse_if_alarm("clear_delivered")
            status = await self._request("", retry=True)
            self._refuse_if_alarm("clear_delivered")  # an alarm the status query just acknowledged
            if status.status not in (Status.STOPPED, Status.PAUSED):
                raise PumpRejected(
                    f"clear_delivered: the pump reports status {status.status.value!r}, not stopped; stop it first",
                    code="NA",
                )
            # Clearing twice is clearing once (the pump is stopped): a lost reply may be resent. An alarm reply
            # means it was not executed: refused, never resent behind the alarm.
            await self._request("CLD", "INF", retry=True, resend_after_alarm=False)
            return parse_dispensed((await self._request("DIS", retry=True, expect=parse_dispensed)).data).infused_ml

    # ---- internals -----

    def _refuse_if_alarm(self, what: str) -> None:
        if self._latched:
            names = ", ".join(sorted(a.value for a in self._latched))
            raise PumpAlarm(
                f"{what}: pump alarm ({names}) not cleared; call clear_alarm() first", alarms=frozenset(self._latched)
            )

    async def _set(self, cmd: str, data: str, *, parse: Callable[[str], Decimal], want: Decimal) -> None:
        """Send a set once. If its reply is lost, read back and resend only if the pump lacks the value."""
        for attempt in range(2):
            try:
                await self._request(cmd, data, retry=False)
                return
            except (DriverTimeout, ProtocolError):
                if attempt == 1:
                    raise
            held = parse((await self._request(cmd, retry=True, expect=parse)).data)
            if held == want:
                return  # the pump applied it; only the reply was lost

    async def _command_checked(self, cmd: str, *, want: Status) -> Reply:
        """RUN/STP: send once; on a lost reply read the status and resend only if not yet in ``want``."""
        for attempt in range(2):
            try:
                return await self._request(cmd, retry=False, resend_after_alarm=cmd == "STP")
            except (DriverTimeout, ProtocolError):
                if attempt == 1:
                    raise
            status = await self._request("", retry=True)
            if status.status is want:
                return status
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request(
        self,
        cmd: str,
        data: str = "",
        *,
        retry: bool,
        send_safe: bool | None = None,
        any_reply_framing: bool = False,
        resend_after_alarm: bool | None = None,
        expect: Callable[[str], object] = _no_data,
    ) -> Reply:
        """One request/reply with the pump's error and alarm handling.

        ``retry``: the request is idempotent, so a lost/garbled reply may be retried (options.retries).
        ``expect``: parses a normal reply's data; a reply it rejects is a late answer to an earlier request
        (same framing, wrong shape) and is skipped, so a delayed reply is never read as this one's.
        An alarm reply is latched; queries (and STP) are then resent, since the pump did not execute them
        and the alarm is now acknowledged; other commands raise PumpAlarm.
        """
        send_safe = self._safe if send_safe is None else send_safe
        reply_framing: bool | None = None if any_reply_framing else send_safe
        resend_after_alarm = retry if resend_after_alarm is None else resend_after_alarm
        request = encode_command(self.address, cmd, data, safe=send_safe)

        def accept(frame: Frame) -> bool:
            reply = parse_reply(frame.payload)  # malformed: ProtocolError
            if reply.address != self.address:
                return False
            if reply.alarm is not None or reply.error is not None:
                return True
            try:
                expect(reply.data)
            except ProtocolError:
                return False
            return True

        attempts = 1 + max(0, self.options.retries)
        com_retries = max(1, self.options.retries)
        alarm_resends = 0
        last: Exception | None = None
        n = 0
        while n < attempts:
            n += 1
            try:
                frame = await self.transport.transact(
                    request, safe=reply_framing, timeout_s=self.timeout_s, accept=accept
                )
                reply = parse_reply(frame.payload)
            except (DriverTimeout, ProtocolError) as exc:
                last = exc
                if retry:
                    continue
                raise
            if reply.address != self.address:
                last = ProtocolError(f"reply from address {reply.address}, expected {self.address}")
                if retry:
                    continue
                raise last
            if reply.alarm is not None:
                kind = ALARM_KIND[reply.alarm]
                self._latched.add(kind)
                if resend_after_alarm and alarm_resends < 3:
                    alarm_resends += 1
                    n -= 1  # acknowledging an alarm is not a failed attempt
                    continue
                raise PumpAlarm(
                    f"{cmd or 'status'}: pump alarm {kind.value} (A?{reply.alarm.value}); not executed",
                    alarms=frozenset(self._latched),
                )
            if reply.error is ErrorCode.COMMUNICATION and com_retries > 0:
                # The pump discarded a corrupt packet without executing it: resending is safe for any command.
                com_retries -= 1
                n -= 1
                last = ProtocolError(f"{cmd}: pump reported ?COM (corrupt packet)")
                continue
            if reply.error is not None:
                code = reply.error.value or "?"
                raise PumpRejected(
                    f"{cmd or 'status'} {data}: pump replied ?{reply.error.value} "
                    f"({reply.error.name.lower().replace('_', ' ')})",
                    code=code,
                )
            return reply
        assert last is not None
        raise last
