"""New Era RS-232 protocol codec: pure, bytes in / bytes out, no I/O (h11 / pymodbus-framer style).

Both directions live here so the driver (host side) and the simulator (pump side) share one definition:

- host -> pump: basic mode ``<address><command><data>`` + CR; safe mode STX, LEN, DATA, CRC_hi, CRC_lo, ETX
  with LEN = len(DATA) + 4 and CRC-16/XMODEM over DATA.
- pump -> host: basic mode STX ``<address:2><status>[data]`` ETX; safe mode the same STX/LEN/CRC/ETX framing.

Sources: the NE-1000 user manual (publication 1200-01, §10.2-10.4) and the open-source client nesp-lib (PyPI
`nesp-lib`); docs/simulators.md lists what is implemented and every known difference. Every decoder is total:
malformed input gives ``ProtocolError`` (never IndexError/UnicodeError), and numbers are Decimal, never float.
"""

from __future__ import annotations

import binascii
import enum
import re
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Final

from driverd.core.errors import QuantityError
from drivers.base import ProtocolError

STX: Final = 0x02
ETX: Final = 0x03
CR: Final = 0x0D

MAX_ADDRESS: Final = 99
# LEN is one byte and counts itself, the two CRC bytes and ETX.
SAFE_OVERHEAD: Final = 4
MAX_SAFE_DATA: Final = 255 - SAFE_OVERHEAD
# A basic-mode packet longer than this is noise, not a command/reply (the longest real one is ~20 bytes).
MAX_BASIC_PAYLOAD: Final = 64

MAX_DIGITS: Final = 4
MAX_DECIMALS: Final = 3


def crc16_xmodem(data: bytes) -> int:
    """CRC-16/XMODEM: poly 0x1021, init 0, no reflection, no final xor."""
    return binascii.crc_hqx(data, 0)


# --------------------------------------------------------------------------------------------- numbers


def format_number(value: Decimal, *, field: str = "value") -> str:
    """The pump's number format: at most 4 digits, one decimal point, at most 3 decimals.

    Refuses (QuantityError) instead of rounding: the safety kernel already quantized toward less drug, so a
    value that does not fit is a bug upstream, and silently sending a different number would be a hazard.
    Trailing zeros are kept when they fit (``10.0`` stays ``10.0``) and dropped only when needed to fit.
    """
    if not isinstance(value, Decimal) or isinstance(value, bool):
        raise QuantityError(field, "type", f"expected a Decimal, got {type(value).__name__}")
    if not value.is_finite():
        raise QuantityError(field, "finite", f"must be finite, got {value}")
    if value < 0 or value.is_signed():
        if value != 0:
            raise QuantityError(field, "non-negative", f"must not be negative, got {value}")
        value = Decimal(0)
    for candidate in (value, _strip_zeros(value)):
        text = format(candidate, "f")
        if _fits(text):
            return text
    raise QuantityError(
        field,
        "pump-number-format",
        f"{value} needs more than {MAX_DIGITS} digits or {MAX_DECIMALS} decimals; refusing to round",
    )


def _strip_zeros(value: Decimal) -> Decimal:
    # normalize() may produce an exponent (1E+3); quantize back to an integer in that case.
    n = value.normalize()
    return n.quantize(Decimal(1)) if n.as_tuple().exponent > 0 else n  # type: ignore[operator]


def _fits(text: str) -> bool:
    _, _, frac = text.partition(".")
    return sum(c.isdigit() for c in text) <= MAX_DIGITS and len(frac) <= MAX_DECIMALS


def format_display(value: Decimal) -> str:
    """How the pump shows a measured value (delivered volume): 4 significant digits, always a decimal point.

    Used by the simulator only. A display truncates (it is a reading, not a setpoint); the value is never
    rounded up. Values >= 10000 cannot be shown and raise.
    """
    if not value.is_finite() or value < 0:
        raise QuantityError("value", "non-negative", f"cannot display {value}")
    if value >= 10000:
        raise QuantityError("value", "display-range", f"{value} does not fit 4 digits")
    int_digits = max(len(str(int(value))), 1)
    places = min(MAX_DECIMALS, MAX_DIGITS - int_digits)
    q = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN)
    text = format(q, "f")
    return text if "." in text else text + "."


_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")


def parse_number(text: str, *, field: str = "value") -> Decimal:
    """Parse the pump's plain decimal notation into Decimal (no signs, no exponents, no float)."""
    if not _NUMBER.fullmatch(text):
        raise ProtocolError(f"{field}: not a pump number: {text!r}")
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid literals
        raise ProtocolError(f"{field}: not a number: {text!r}") from None


class RateUnit(enum.Enum):
    UL_PER_MIN = "UM"
    ML_PER_MIN = "MM"
    UL_PER_H = "UH"
    ML_PER_H = "MH"


class VolumeUnit(enum.Enum):
    UL = "UL"
    ML = "ML"


# Exact factors to mL/h (and to mL): used to convert a reading, never a setpoint (setpoints are sent in MH).
RATE_TO_ML_PER_H: Final[dict[RateUnit, Decimal]] = {
    RateUnit.UL_PER_MIN: Decimal("0.06"),
    RateUnit.ML_PER_MIN: Decimal(60),
    RateUnit.UL_PER_H: Decimal("0.001"),
    RateUnit.ML_PER_H: Decimal(1),
}
VOLUME_TO_ML: Final[dict[VolumeUnit, Decimal]] = {VolumeUnit.UL: Decimal("0.001"), VolumeUnit.ML: Decimal(1)}


@dataclass(frozen=True, slots=True)
class Rate:
    value: Decimal
    unit: RateUnit

    @property
    def ml_per_h(self) -> Decimal:
        return self.value * RATE_TO_ML_PER_H[self.unit]


@dataclass(frozen=True, slots=True)
class Dispensed:
    infused: Decimal
    withdrawn: Decimal
    unit: VolumeUnit

    @property
    def infused_ml(self) -> Decimal:
        return self.infused * VOLUME_TO_ML[self.unit]


_RATE = re.compile(r"(?P<n>[0-9.]+)(?P<u>UM|MM|UH|MH)")
_DIS = re.compile(r"I(?P<i>[0-9.]+)W(?P<w>[0-9.]+)(?P<u>UL|ML)")
_VOL = re.compile(r"(?P<n>[0-9.]+)(?P<u>UL|ML)")


def parse_rate(data: str) -> Rate:
    """``RAT`` query reply data, e.g. ``2.083MH``."""
    m = _RATE.fullmatch(data)
    if not m:
        raise ProtocolError(f"rate: expected <number><UM|MM|UH|MH>, got {data!r}")
    return Rate(parse_number(m["n"], field="rate"), RateUnit(m["u"]))


def parse_volume(data: str) -> tuple[Decimal, VolumeUnit]:
    """``VOL`` query reply data, e.g. ``0.000ML``."""
    m = _VOL.fullmatch(data)
    if not m:
        raise ProtocolError(f"volume: expected <number><UL|ML>, got {data!r}")
    return parse_number(m["n"], field="volume"), VolumeUnit(m["u"])


def parse_dispensed(data: str) -> Dispensed:
    """``DIS`` reply data: ``I<infused>W<withdrawn><UL|ML>``."""
    m = _DIS.fullmatch(data)
    if not m:
        raise ProtocolError(f"dispensed: expected I<n>W<n><UL|ML>, got {data!r}")
    return Dispensed(parse_number(m["i"], field="infused"), parse_number(m["w"], field="withdrawn"), VolumeUnit(m["u"]))


def parse_diameter(data: str) -> Decimal:
    return parse_number(data, field="diameter")


# --------------------------------------------------------------------------------------------- commands

_COMMAND_NAME = re.compile(r"[A-Z]{0,3}")
# Printable ASCII without the framing bytes; spaces are allowed (the pump ignores them).
_DATA = re.compile(r"[\x20-\x7e]*")


def encode_command(address: int, command: str, data: str = "", *, safe: bool) -> bytes:
    """Host -> pump packet. ``command`` "" is the status query. Refuses anything the pump could misread."""
    if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address <= MAX_ADDRESS:
        raise QuantityError("address", "range", f"address must be an integer 0..{MAX_ADDRESS}: {address!r}")
    if not isinstance(command, str) or not _COMMAND_NAME.fullmatch(command):
        raise QuantityError("command", "format", f"command must be 0-3 uppercase letters, got {command!r}")
    if not isinstance(data, str) or not _DATA.fullmatch(data):
        raise QuantityError("data", "format", f"data must be printable ASCII, got {data!r}")
    if command == "" and data:
        raise QuantityError("data", "format", "the status query takes no data")
    body = f"{address}{command}{data}".encode("ascii")
    if not safe:
        return body + bytes([CR])
    return frame_safe(body)


def frame_safe(body: bytes) -> bytes:
    """Wrap DATA in safe-mode framing."""
    if not 1 <= len(body) <= MAX_SAFE_DATA:
        raise QuantityError("data", "length", f"safe-mode data must be 1..{MAX_SAFE_DATA} bytes: {len(body)}")
    crc = crc16_xmodem(body)
    return bytes([STX, len(body) + SAFE_OVERHEAD]) + body + crc.to_bytes(2, "big") + bytes([ETX])


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded host -> pump packet (pump side). ``address`` None means broadcast (``*``)."""

    address: int | None
    name: str  # "" for the status query
    data: str


# RESET is the one five-letter command (``*RESET``); every other command name has at most three letters.
_COMMAND = re.compile(r"(?P<addr>\*|\d{0,2})(?P<name>RESET|[A-Z]{0,3})(?P<data>.*)", re.DOTALL)


def parse_command(payload: bytes) -> Command:
    """Parse a command payload (without framing). Spaces are ignored and case does not matter, as on the pump.

    A missing address means address 0 (what the pump assumes for a bare command).
    """
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"command: not ASCII: {payload!r}") from None
    if not _DATA.fullmatch(text):
        raise ProtocolError(f"command: control characters in {payload!r}")
    text = text.replace(" ", "").upper()
    m = _COMMAND.fullmatch(text)
    if m is None:  # pragma: no cover - the pattern matches every string
        raise ProtocolError(f"command: unparseable {payload!r}")
    addr = m["addr"]
    address = None if addr == "*" else int(addr) if addr else 0
    return Command(address, m["name"], m["data"])


# --------------------------------------------------------------------------------------------- replies


class Status(enum.Enum):
    INFUSING = "I"
    WITHDRAWING = "W"
    STOPPED = "S"
    PAUSED = "P"
    TIMED_PAUSE = "T"
    WAITING_TRIGGER = "U"
    PURGING = "X"
    ALARM = "A"


class AlarmCode(enum.Enum):
    RESET = "R"  # power interrupted / reset
    STALLED = "S"  # motor stalled
    SAFE_TIMEOUT = "T"  # safe-mode communication timeout
    PROGRAM_ERROR = "E"
    OUT_OF_RANGE = "O"  # pumping program phase out of range


class ErrorCode(enum.Enum):
    UNKNOWN_COMMAND = ""  # bare "?"
    NOT_APPLICABLE = "NA"
    OUT_OF_RANGE = "OOR"
    COMMUNICATION = "COM"
    IGNORED = "IGN"


@dataclass(frozen=True, slots=True)
class Reply:
    address: int
    status: Status
    alarm: AlarmCode | None = None
    error: ErrorCode | None = None
    data: str = ""


_REPLY = re.compile(r"(?P<addr>\d\d)(?P<status>[IWSPTUXA])(?P<rest>[\x20-\x7e]*)")


def parse_reply(payload: bytes) -> Reply:
    """Parse a pump reply payload (without framing): ``<address:2><status>[?error | ?alarm | data]``."""
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"reply: not ASCII: {payload!r}") from None
    m = _REPLY.fullmatch(text)
    if m is None:
        raise ProtocolError(f"reply: expected <2-digit address><status>[data], got {text!r}")
    address, status, rest = int(m["addr"]), Status(m["status"]), m["rest"]
    if status is Status.ALARM:
        if len(rest) != 2 or rest[0] != "?" or rest[1] not in {a.value for a in AlarmCode}:
            raise ProtocolError(f"reply: alarm must be A?<R|S|T|E|O>, got {text!r}")
        return Reply(address, status, alarm=AlarmCode(rest[1]))
    if rest.startswith("?"):
        code = rest[1:]
        if code not in {e.value for e in ErrorCode}:
            raise ProtocolError(f"reply: unknown error code {code!r} in {text!r}")
        return Reply(address, status, error=ErrorCode(code))
    return Reply(address, status, data=rest)


def encode_reply(
    address: int,
    status: Status,
    *,
    alarm: AlarmCode | None = None,
    error: ErrorCode | None = None,
    data: str = "",
    safe: bool,
) -> bytes:
    """Pump -> host packet (the simulator's side)."""
    if not 0 <= address <= MAX_ADDRESS:
        raise QuantityError("address", "range", f"address must be 0..{MAX_ADDRESS}, got {address}")
    if (status is Status.ALARM) != (alarm is not None):
        raise QuantityError("alarm", "consistency", "status A goes with an alarm code, and only it")
    if sum(x is not None and x != "" for x in (alarm, error, data or None)) > 1:
        raise QuantityError("data", "consistency", "a reply carries at most one of alarm, error, data")
    if not _DATA.fullmatch(data):
        raise QuantityError("data", "format", f"data must be printable ASCII, got {data!r}")
    tail = f"?{alarm.value}" if alarm else f"?{error.value}" if error is not None else data
    body = f"{address:02d}{status.value}{tail}".encode("ascii")
    return frame_safe(body) if safe else bytes([STX]) + body + bytes([ETX])


# --------------------------------------------------------------------------------------------- framing


class Direction(enum.Enum):
    TO_HOST = "to_host"  # decoding replies (driver side)
    TO_PUMP = "to_pump"  # decoding commands (simulator side)


@dataclass(frozen=True, slots=True)
class Frame:
    payload: bytes
    safe: bool


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes in any chunking, then ``next_frame()`` until it returns None.

    ``next_frame()`` raises ProtocolError for a malformed frame or noise; the offending bytes are already
    consumed, so calling it again continues with the rest of the stream (resynchronising on the next STX).

    - TO_HOST, safe=False: STX payload ETX.     TO_HOST, safe=True: STX LEN payload CRC CRC ETX.
      TO_HOST, safe=None: either, told apart by the byte after STX.
    - TO_PUMP: a safe frame when a packet starts with STX, otherwise a basic packet ending at CR; the pump
      accepts both framings at any time (that is how ``SAF`` switches modes, see nesp-lib).
    """

    def __init__(self, direction: Direction, *, safe: bool | None = False) -> None:
        self.direction = direction
        self.safe = safe
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (a partial packet)."""
        return len(self._buf)

    def take_partial(self) -> bytes:
        """Remove and return the bytes of an incomplete frame (to continue decoding them elsewhere)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def discard_partial(self) -> bool:
        """Drop a partial packet (the inter-byte timeout fired); True if there was one."""
        had = bool(self._buf)
        self._buf.clear()
        return had

    def next_frame(self) -> Frame | None:
        buf = self._buf
        if not buf:
            return None
        if self.direction is Direction.TO_PUMP:
            if buf[0] == STX:
                return self._safe()
            return self._basic_command()
        if buf[0] != STX:
            # Noise before a reply: drop up to the next STX, report it once.
            cut = buf.find(bytes([STX]))
            cut = len(buf) if cut < 0 else cut
            noise = bytes(buf[:cut])
            del buf[:cut]
            raise ProtocolError(f"noise before STX: {noise[:16]!r}")
        if self.safe is None:
            # Auto-detect (used for the SAF handshake, whose reply framing depends on the pump's state):
            # a basic reply starts STX + an address digit; a safe one STX + LEN, and a LEN of 0x30..0x39
            # would mean a 44..53-byte reply, which no New Era reply is.
            if len(buf) < 2:
                return None
            return self._basic_reply() if 0x30 <= buf[1] <= 0x39 else self._safe()
        return self._safe() if self.safe else self._basic_reply()

    def _safe(self) -> Frame | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        length = buf[1]
        if length < SAFE_OVERHEAD + 1:
            del buf[:1]
            raise ProtocolError(f"safe frame: LEN {length} too small")
        if len(buf) < length + 1:
            return None
        frame = bytes(buf[: length + 1])
        body, crc, end = frame[2:-3], frame[-3:-1], frame[-1]
        if end != ETX:
            # Drop only the STX and rescan: the real frame may start inside what we took for this one.
            del buf[:1]
            raise ProtocolError(f"safe frame: expected ETX at LEN, got 0x{end:02x}")
        if int.from_bytes(crc, "big") != crc16_xmodem(body):
            del buf[:1]
            raise ProtocolError(f"safe frame: CRC mismatch (got {crc.hex()}, want {crc16_xmodem(body):04x})")
        del buf[: length + 1]
        return Frame(body, safe=True)

    def _basic_reply(self) -> Frame | None:
        buf = self._buf
        end = buf.find(bytes([ETX]))
        restart = buf.find(bytes([STX]), 1)
        if restart >= 0 and (end < 0 or restart < end):
            del buf[:restart]
            raise ProtocolError("basic reply: truncated (new STX before ETX)")
        if end < 0:
            if len(buf) > MAX_BASIC_PAYLOAD + 1:
                buf.clear()
                raise ProtocolError("basic reply: too long without ETX")
            return None
        payload = bytes(buf[1:end])
        del buf[: end + 1]
        return Frame(payload, safe=False)

    def _basic_command(self) -> Frame | None:
        buf = self._buf
        end = buf.find(bytes([CR]))
        stx = buf.find(bytes([STX]))
        if stx >= 0 and (end < 0 or stx < end):
            # A safe packet starts: whatever came before it was an unterminated basic packet.
            del buf[:stx]
            raise ProtocolError("basic command: unterminated before STX")
        if end < 0:
            if len(buf) > MAX_BASIC_PAYLOAD:
                buf.clear()
                raise ProtocolError("basic command: too long without CR")
            return None
        payload = bytes(buf[:end])
        del buf[: end + 1]
        # LF after CR (terminal programs) is whitespace, not part of the packet. A packet without a command
        # (a bare CR, or only spaces) is still a packet: the pump answers it as a status query (manual §10.2).
        return Frame(payload.strip(b"\n"), safe=False)
