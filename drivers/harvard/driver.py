"""HarvardDriver: Harvard Apparatus Pump 11 Elite over USB/RS-232 or a TCP bridge (not the PHD ULTRA: see codec).

URLs: ``harvard+serial:///dev/ttyACM0?address=0&baud=115200``, ``harvard+socket://127.0.0.1:7002?address=1``.

Policy (facts in drivers/harvard/codec.py and docs/simulators.md):
- **No dead-man.** The Elite has no host watchdog: if the daemon dies, the pump keeps infusing. With
  ``options.deadman_s > 0`` the driver refuses to be built (ValidationError on ``url.without_deadman``: the daemon
  does not start, ``driverd config check`` names it) unless the URL says ``without_deadman=allow``; then it runs
  with a loud warning on every connect. ``has_deadman`` is always False.
- connect() switches the pump to poll mode (``poll on``): replies then end with an XON, so they frame exactly, and
  the pump sends nothing it was not asked for. It clears any target volume (``ctvolume``) while stopped: a
  continuous infusion never ends at a target.
- Rates always go out in mL/h (``irate 2.083 m/h``), at most 4 digits and 4 decimals (the pump keeps 4 significant
  digits, so such a value reads back unchanged); anything finer is refused here, never rounded. Infuse only: the
  driver never sends ``wrun``/``rrun``/``run``.
- Read-back after every set; a set whose reply is lost is resent only if the read-back shows the pump lacks it.
- Every set and ``irun`` is preceded by a ``status`` read: the pump's own refusal rules while stalled are not
  documented, so the driver refuses itself (PumpAlarm) while an alarm is latched.
- Alarms from the wire: a stall (prompt ``*``, status flag ``S``: occlusion or the plunger at the end of the
  syringe; the protocol cannot tell them apart) latches OCCLUSION. The pump keeps the stall until someone touches
  its screen: ``clear_alarm()`` refuses (PumpAlarm) while the pump still reports it. A pump that stopped without
  being told (a power cut: the Elite resets its infused volume and timers at power-up, manual p. 27; a stop at the
  touch screen; a target reached) latches POWER_INTERRUPTED when the infused-volume counter went backwards, else
  OTHER. Withdrawing latches OTHER. Near end and low battery do not exist on this wire.
- ``probe()`` sends queries only (``poll``, ``ver``, ``status``, ``irate``, ``diameter``) and leaves poll mode as
  it found it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import ClassVar, Final

from driverd.core.errors import Problem, QuantityError, ValidationError
from driverd.core.quantities import Resolution
from driverd.core.syringe_limits import ELITE11_DIAMETER_RESOLUTION, ELITE11_PLUNGER
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
)
from drivers.harvard.codec import (
    ELITE_RATE_RESOLUTION,
    FL_PER_ML,
    MAX_COMMAND,
    MAX_REPLY,
    Prompt,
    RawStatus,
    Reply,
    encode_command,
    format_diameter,
    format_rate,
    parse_diameter,
    parse_rate,
    parse_status,
    parse_version,
)
from drivers.harvard.transport import SerialTransport
from drivers.url import DriverURL, serial_port_url

BAUD_RATES: Final = (9600, 19200, 38400, 57600, 115200, 128000, 230400, 256000, 460800, 921600)
WITHOUT_DEADMAN: Final = ("refuse", "allow")
BITS_PER_BYTE: Final = 10  # 8N1
# Queries (no argument): what probe() may send, and what the contract's request log counts as a read.
QUERIES: Final = frozenset({"", "poll", "ver", "version", "status", "irate", "diameter", "address", "ivolume"})

_log = logging.getLogger(__name__)
_ONE_FL_IN_ML: Final = Decimal(1) / FL_PER_ML


def _pump_text(fmt: Callable[[], str], field: str) -> str:
    try:
        return fmt()
    except QuantityError as exc:
        raise PumpRejected(f"{field}: {exc} (not sent to the pump)", code="OOR") from exc


def _one_line(parse: Callable[[str], object]) -> Callable[[tuple[str, ...]], None]:
    def check(lines: tuple[str, ...]) -> None:
        parse(lines[0])

    return check


def _poll_state(text: str) -> bool:
    if text == "Polling mode is ON":
        return True
    if text == "Polling mode is OFF":
        return False
    raise ProtocolError(f"poll: expected 'Polling mode is ON|OFF', got {text!r}")


class HarvardDriver(PumpDriver):
    scheme: ClassVar[str] = "harvard"
    resolution: ClassVar[Resolution] = ELITE_RATE_RESOLUTION

    def __init__(self, url: DriverURL, options: DriverOptions | None = None) -> None:
        super().__init__(url, options)
        port_url, self.address, baud = serial_port_url(
            url, "harvard", {"address", "baud", "without_deadman"}, default_baud=115200, baud_rates=BAUD_RATES
        )
        self.without_deadman = url.params.get("without_deadman", "refuse")
        if self.without_deadman not in WITHOUT_DEADMAN:
            raise ValidationError(
                [Problem("url.without_deadman", "enum", f"must be refuse or allow, got {self.without_deadman!r}")]
            )
        deadman = self.options.deadman_s
        if isinstance(deadman, bool) or not isinstance(deadman, int) or deadman < 0:
            raise ValidationError([Problem("options.deadman_s", "range", f"must be an int >= 0, got {deadman!r}")])
        if deadman > 0 and self.without_deadman != "allow":
            # Refused when the driver is built (daemon start, `driverd config check`), before any byte is sent.
            raise ValidationError([Problem(
                "url.without_deadman", "deadman",
                f"a Harvard Pump 11 Elite has no dead-man (no host watchdog): it keeps infusing if the daemon dies, "
                f"but the daemon asks for one (deadman_s = {deadman}); refused (add without_deadman=allow to the URL "
                "to run it anyway)",
            )])
        self.baud = baud
        self.timeout_s = self.options.timeout_s + (MAX_COMMAND + MAX_REPLY // 16) * BITS_PER_BYTE / baud
        self.transport = SerialTransport(port_url, baudrate=baud)
        self.has_deadman = False  # the Elite has no host watchdog (see the module docstring)
        self._poll = False
        self._latched: set[AlarmKind] = set()
        # Whether the pump should be infusing as far as this driver knows (None: not known yet). A pump found idle
        # when it should infuse stopped on its own: that is reported, never silently accepted.
        self._expect_running: bool | None = None
        self._last_volume_fl: int | None = None
        self._lock = asyncio.Lock()

    # ---- lifecycle -----

    async def connect(self) -> None:
        if self.options.deadman_s > 0:  # only with without_deadman=allow: refused in __init__ otherwise
            _log.warning(
                "%s: Harvard Pump 11 Elite: NO DEAD-MAN, the pump keeps infusing if the daemon dies "
                "(allowed by without_deadman=allow)",
                self.url.raw,
            )
        await self.transport.open()
        async with self._lock:
            self._poll = False
            await self._request("poll", "on", body_lines=0, retry=True)  # a setting: resending is harmless
            self._poll = True
            reply = await self._request("poll", body_lines=1, retry=True, expect=_one_line(_poll_state))
            if not _poll_state(reply.lines[0]):
                raise DriverError(f"{self.url.raw}: 'poll on' accepted but the pump reports polling mode OFF")
            raw = await self._status()
            if self._expect_running is None:
                self._expect_running = raw.running
            if not raw.running:
                await self._request("ctvolume", body_lines=0, retry=True)

    async def close(self) -> None:
        await self.transport.close()

    @property
    def transport_opens(self) -> int:
        """The transport reopens its port by itself on the next request after an I/O error: counted there."""
        return self.transport.opens

    def rate_range(self, diameter_mm: Decimal) -> tuple[Decimal, Decimal]:
        """(min, max) mL/h a Pump 11 Elite runs with this bore, at the driver's resolution (min up, max down)."""
        return ELITE11_PLUNGER.range_ml_per_h(diameter_mm, ELITE_RATE_RESOLUTION)

    async def probe(self) -> ProbeReport:
        """Queries only; poll mode is read (``poll``) and left as it is. The Elite has no dead-man: 0."""
        await self.transport.open()
        try:
            async with self._lock:
                self._poll = False
                reply = await self._request("poll", body_lines=1, retry=True, expect=_one_line(_poll_state))
                self._poll = _poll_state(reply.lines[0])
            identity = await self.identify()
            status = await self.read_status()
        finally:
            await self.transport.close()
        return ProbeReport(identity, status, 0)

    # ---- queries -----

    async def identify(self) -> Identity:
        async with self._lock:
            reply = await self._request("ver", body_lines=1, retry=True, expect=_one_line(parse_version))
        model, firmware = parse_version(reply.lines[0])
        return Identity(model=model, firmware=firmware, address=str(self.address))

    async def read_status(self) -> PumpStatus:
        async with self._lock:
            raw = await self._status()
            rate = parse_rate((await self._request("irate", body_lines=1, retry=True,
                                                   expect=_one_line(parse_rate))).lines[0])
            diameter = parse_diameter((await self._request("diameter", body_lines=1, retry=True,
                                                           expect=_one_line(parse_diameter))).lines[0])
            alarms = frozenset(self._latched)
            running = raw.running and not raw.withdraw
            state = PumpState.INFUSING if running else PumpState.STOPPED
            if (alarms and not running) or (raw.withdraw and raw.running):
                state = PumpState.ALARM
            # The status line's volume is an integer in fL: its step is 1 fL.
            return PumpStatus(state, rate, raw.infused_ml, diameter, alarms, delivered_step_ml=_ONE_FL_IN_ML)

    @property
    def latched_alarms(self) -> frozenset[AlarmKind]:
        return frozenset(self._latched)

    # ---- commands -----

    async def configure_syringe(self, diameter_mm: Decimal) -> Decimal:
        text = _pump_text(lambda: format_diameter(diameter_mm, ELITE11_DIAMETER_RESOLUTION), "diameter_mm")
        async with self._lock:
            await self._check("configure_syringe")
            await self._set("diameter", text, parse=parse_diameter, want=Decimal(text))
            return parse_diameter((await self._request("diameter", body_lines=1, retry=True,
                                                       expect=_one_line(parse_diameter))).lines[0])

    async def set_rate(self, rate_ml_per_h: Decimal) -> Decimal:
        text = _pump_text(lambda: format_rate(rate_ml_per_h), "rate_ml_per_h")
        async with self._lock:
            await self._check("set_rate")
            try:
                await self._set("irate", f"{text} m/h", parse=parse_rate, want=Decimal(text), query="irate")
            except PumpRejected as exc:
                if exc.code != "OOR":
                    raise
                diameter = parse_diameter((await self._request("diameter", body_lines=1, retry=True,
                                                               expect=_one_line(parse_diameter))).lines[0])
                lo, hi = self.rate_range(diameter)
                raise PumpRejected(
                    f"{exc}; with a {diameter} mm syringe this pump runs {lo}..{hi} mL/h", code="OOR"
                ) from exc
            return parse_rate((await self._request("irate", body_lines=1, retry=True,
                                                   expect=_one_line(parse_rate))).lines[0])

    async def run(self) -> None:
        async with self._lock:
            raw = await self._check("run")
            if raw.running:
                self._expect_running = True
                return
            for attempt in range(2):
                try:
                    reply = await self._request("irun", body_lines=0, retry=False)
                    break
                except (DriverTimeout, ProtocolError):
                    if attempt == 1:
                        raise
                    if (await self._status()).running:  # it started; only the reply was lost
                        self._expect_running = True
                        return
            if reply.prompt is not Prompt.INFUSING:
                raise DriverError(f"irun accepted but the pump answers with prompt {reply.prompt.value!r}")
            self._expect_running = True

    async def stop(self) -> None:
        async with self._lock:
            self._expect_running = False
            reply = await self._request("stp", body_lines=0, retry=True)  # stopping twice is harmless
            if reply.prompt in (Prompt.INFUSING, Prompt.WITHDRAWING):
                raise DriverError(f"stp accepted but the pump answers with prompt {reply.prompt.value!r}")

    async def clear_alarm(self) -> None:
        async with self._lock:
            raw = await self._status()
            if raw.stalled:
                raise PumpAlarm(
                    "the pump still reports a stall: it is acknowledged on the pump's touch screen, not over the wire",
                    alarms=frozenset(self._latched),
                )
            self._latched.clear()
            self._expect_running = raw.running

    async def clear_delivered(self) -> Decimal:
        """``civolume`` (clear the infused volume), then ``status`` read back. Sent only to a stopped pump with no
        alarm latched. The counter going back after this ordered clear is not a power-up: the driver forgets the
        previous reading first, so only a drop it did not order latches POWER_INTERRUPTED."""
        async with self._lock:
            raw = await self._check("clear_delivered")
            if raw.running:
                raise PumpRejected("clear_delivered: the pump is infusing; stop it first", code="NA")
            # Forgotten before sending: a civolume whose reply is lost may still have cleared the counter.
            self._last_volume_fl = None
            await self._request("civolume", body_lines=0, retry=True)  # clearing twice is clearing once
            return (await self._status()).infused_ml

    # ---- internals -----

    async def _check(self, what: str) -> RawStatus:
        """Read the pump before acting on it; refuse while an alarm is latched."""
        raw = await self._status()
        if self._latched:
            names = ", ".join(sorted(a.value for a in self._latched))
            raise PumpAlarm(
                f"{what}: pump alarm ({names}) not cleared; call clear_alarm() first", alarms=frozenset(self._latched)
            )
        return raw

    async def _status(self) -> RawStatus:
        raw = parse_status((await self._request("status", body_lines=1, retry=True,
                                                expect=_one_line(parse_status))).lines[0])
        self._observe(raw)
        return raw

    def _observe(self, raw: RawStatus) -> None:
        new: set[AlarmKind] = set()
        if self._last_volume_fl is not None and raw.volume_fl < self._last_volume_fl:
            new.add(AlarmKind.POWER_INTERRUPTED)  # the counters reset only at power-up (or an ordered clear)
        self._last_volume_fl = raw.volume_fl
        if raw.stalled:
            new.add(AlarmKind.OCCLUSION)
        if raw.target_reached or raw.withdraw:
            new.add(AlarmKind.OTHER)
        if self._expect_running and not raw.running:
            if not new:
                new.add(AlarmKind.OTHER)  # stopped on its own, for no reason the wire gives
            self._expect_running = False
        self._latched |= new

    def _observe_prompt(self, prompt: Prompt) -> None:
        if prompt is Prompt.STALLED:
            self._latched.add(AlarmKind.OCCLUSION)
        elif prompt in (Prompt.TARGET_REACHED, Prompt.WITHDRAWING):
            self._latched.add(AlarmKind.OTHER)

    async def _set(
        self, cmd: str, data: str, *, parse: Callable[[str], Decimal], want: Decimal, query: str | None = None
    ) -> None:
        """Send a set once. If its reply is lost, read back and resend only if the pump lacks the value."""
        for attempt in range(2):
            try:
                await self._request(cmd, data, body_lines=0, retry=False)
                return
            except (DriverTimeout, ProtocolError):
                if attempt == 1:
                    raise
            held = parse((await self._request(query or cmd, body_lines=1, retry=True,
                                              expect=_one_line(parse))).lines[0])
            if held == want:
                return

    async def _request(
        self,
        cmd: str,
        data: str = "",
        *,
        body_lines: int,
        retry: bool,
        expect: Callable[[tuple[str, ...]], None] | None = None,
    ) -> Reply:
        """One request/reply. ``retry``: the request is idempotent, so a lost or garbled reply may be retried.
        ``expect`` checks a normal reply's lines; a reply of the wrong shape is a late answer to an earlier
        request and is skipped."""
        request = encode_command(self.address, cmd, data)

        def accept(reply: Reply) -> bool:
            if reply.error is not None:
                return True
            if len(reply.lines) != body_lines:
                return False
            if expect is not None:
                try:
                    expect(reply.lines)
                except ProtocolError:
                    return False
            return True

        attempts = 1 + max(0, self.options.retries) if retry else 1
        last: Exception | None = None
        for _ in range(attempts):
            try:
                reply = await self.transport.transact(
                    request, address=self.address, poll=self._poll, body_lines=body_lines,
                    timeout_s=self.timeout_s, accept=accept,
                )
            except (DriverTimeout, ProtocolError) as exc:
                last = exc
                continue
            self._observe_prompt(reply.prompt)
            error = reply.error
            if error is not None:
                kind, message = error
                code = "OOR" if "range" in message.lower() else ("ARG" if kind == "argument" else "NA")
                raise PumpRejected(f"{cmd} {data}: pump replied {' / '.join(reply.lines)}", code=code)
            return reply
        assert last is not None
        raise last
