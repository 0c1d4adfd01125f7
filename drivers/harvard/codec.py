"""Harvard Apparatus Pump 11 Elite "pump chain" ASCII protocol: pure encoding and decoding, no I/O.

Facts from the Pump 11 Elite User's Manual (publication 5420-002 Rev C, "Pump Chain Commands", pp. 52-58; the
PHD ULTRA manual 5419-002 documents the same command family, but its ``status`` differs and is refused here):

- A command is ``[address]command[ argument]`` and a carriage return. The address (0..99) is only written when
  it is not 0; commands are case-insensitive and may be shortened to their first four letters; an ``@`` before the
  command skips the display update.
- A reply is lines that each start with a line feed: body lines ``<lf>[NN:]text<cr>`` and a final prompt
  ``<lf>[NN]<prompt>`` without a carriage return. A pump with a non-zero address prefixes its two-digit address to
  every line, with a colon on body lines and without one on the prompt.
- Prompts: ``:`` idle, ``>`` infusing, ``<`` withdrawing, ``*`` stalled, ``T*`` target reached. In poll mode an
  XON (0x11) follows the prompt, and the pump sends no prompt it was not asked for.
- Errors take two body lines: ``Command error:`` or ``Argument error: <argument>``, then a message line.
- ``status`` (an "internal command") answers ``<rate fl/s> <time in 1/56,000,000 s> <volume fl> <flags>``: rate
  and infused volume in femtolitres, and six flags (direction ``I``/``W``, upper case while the motor runs; limit
  switch; ``S`` stalled; trigger input; direction port; ``T`` target reached).

Framing: in poll mode a reply ends exactly at the XON. Without poll mode (a read-only probe may not switch it on)
the prompt has no terminator, so the decoder is told how many body lines the command answers with (an error
reply has two). That is unambiguous except for a set's error reply on a non-zero address, where ``NN:`` could
start either a body line or the idle prompt; the driver therefore only sends sets in poll mode.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from typing import Final

from driverd.core.errors import QuantityError
from driverd.core.quantities import Resolution, quantize_down
from drivers.base import ProtocolError

CR: Final = 0x0D
LF: Final = 0x0A
XON: Final = 0x11
MAX_REPLY: Final = 4096  # bytes; a reply longer than this is noise, not a pump
MAX_COMMAND: Final = 80

# The rate values the driver sends: at most 4 digits and 4 decimals in mL/h. The pump shows 4 significant digits
# (Appendix B's limits, the `irate lim` reply), so such a value always reads back unchanged.
ELITE_RATE_RESOLUTION: Final = Resolution(decimals=4, significant=4)
SIGNIFICANT_DIGITS: Final = 4


class Prompt(enum.Enum):
    IDLE = ":"
    INFUSING = ">"
    WITHDRAWING = "<"
    STALLED = "*"
    TARGET_REACHED = "T*"


# Rate units. Commands take the short form ("m/h", "u/m"; manual p. 56) or the long one ("ml/hr", "ul/min"),
# replies use the long form. Factors to mL/h are exact.
VOLUME_TO_ML: Final[dict[str, Decimal]] = {
    "m": Decimal(1), "u": Decimal("0.001"), "n": Decimal("0.000001"), "p": Decimal("0.000000001"),
}
TIME_PER_H: Final[dict[str, Decimal]] = {"h": Decimal(1), "m": Decimal(60), "s": Decimal(3600)}
LONG_TIME: Final[dict[str, str]] = {"h": "hr", "m": "min", "s": "sec"}
_RATE_UNIT = re.compile(r"(?P<v>[munp])l?/(?P<t>h|hr|m|min|s|sec)", re.IGNORECASE)
_VOLUME_UNIT = re.compile(r"(?P<v>[munp])l?", re.IGNORECASE)
_NUMBER = re.compile(r"\d{1,12}(\.\d{0,15})?|\.\d{1,15}")
FL_PER_ML: Final = Decimal(10) ** 12
CLOCK_HZ: Final = 56_000_000  # `status` time unit: 1/56,000,000 s


@dataclass(frozen=True, slots=True)
class RateUnit:
    volume: str  # m u n p
    time: str  # h m s

    @classmethod
    def parse(cls, text: str) -> RateUnit | None:
        m = _RATE_UNIT.fullmatch(text)
        if m is None:
            return None
        return cls(m["v"].lower(), m["t"][0].lower())

    @property
    def to_ml_per_h(self) -> Decimal:
        return VOLUME_TO_ML[self.volume] * TIME_PER_H[self.time]

    @property
    def long(self) -> str:
        return f"{self.volume}l/{LONG_TIME[self.time]}"


ML_PER_H: Final = RateUnit("m", "h")


# ============================================================================================== host side


def encode_command(address: int, command: str, argument: str = "") -> bytes:
    """``[address]command[ argument]`` CR. Refuses anything that would not be one clean command line."""
    if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address <= 99:
        raise ProtocolError(f"address must be 0..99, got {address!r}")
    if not re.fullmatch(r"@?[a-zA-Z]{0,12}", command):
        raise ProtocolError(f"command must be letters (optionally after @), got {command!r}")
    if not all(32 <= ord(c) < 127 for c in argument):
        raise ProtocolError(f"argument must be printable ASCII, got {argument!r}")
    text = (str(address) if address else "") + command + (" " + argument if argument else "")
    if len(text) > MAX_COMMAND:
        raise ProtocolError(f"command line longer than {MAX_COMMAND} characters")
    return text.encode("ascii") + b"\r"


@dataclass(frozen=True, slots=True)
class Reply:
    """One whole reply: its body lines (address prefix removed) and the closing prompt."""

    address: int
    lines: tuple[str, ...]
    prompt: Prompt
    xon: bool = False

    @property
    def error(self) -> tuple[str, str] | None:
        """("command" | "argument", the message line) for an error reply, else None."""
        if self.lines and self.lines[0].startswith("Command error"):
            return ("command", self.lines[1].strip() if len(self.lines) > 1 else "")
        if self.lines and self.lines[0].startswith("Argument error"):
            return ("argument", self.lines[1].strip() if len(self.lines) > 1 else "")
        return None


def _is_error_line(text: str) -> bool:
    return text.startswith(("Command error", "Argument error"))


def _line_body(raw: str, address: int) -> str:
    if address == 0:
        return raw
    prefix = f"{address:02d}:"
    if not raw.startswith(prefix):
        raise ProtocolError(f"reply line {raw!r} does not carry this pump's prefix {prefix!r}")
    return raw[len(prefix) :]


def _prompt_token(raw: str, address: int) -> tuple[Prompt | None, bool]:
    """(prompt or None, decided): ``decided`` False while more bytes could still make ``raw`` a prompt."""
    if address:
        head = f"{address:02d}"
        if len(raw) < 2:
            return (None, not head.startswith(raw))
        if raw[:2] != head:
            return (None, True)
        raw = raw[2:]
    if raw in (":", ">", "<", "*"):
        return (Prompt(raw), True)
    if raw == "T*":
        return (Prompt.TARGET_REACHED, True)
    if raw in ("", "T"):
        return (None, False)  # the token has not arrived yet (or T* is half there)
    return (None, True)


def decode_reply(buf: bytes, *, address: int, poll: bool, body_lines: int) -> tuple[Reply | None, int]:
    """Find one whole reply at the start of ``buf``. Returns (reply, bytes consumed) or (None, 0) if incomplete.

    Bytes before the first line feed (an echo, an XON left over from a previous reply) are skipped. Raises
    ProtocolError for a byte that is not 7-bit ASCII (the pump sends none) or for a malformed line; the caller
    discards the buffer then.

    ``poll``: the pump is in poll mode, so the reply ends at the XON after the prompt. Otherwise ``body_lines``
    says how many body lines come before the prompt (an error reply has two, whatever the command).
    """
    for i, b in enumerate(buf):
        if b >= 0x80:
            raise ProtocolError(f"non-ASCII byte 0x{b:02x} at offset {i} of a reply")
    if len(buf) > MAX_REPLY:
        raise ProtocolError(f"more than {MAX_REPLY} bytes without a whole reply")
    start = buf.find(b"\n")
    if start < 0:
        return (None, 0)
    text = buf[start + 1 :].decode("ascii")
    pos = 0
    lines: list[str] = []
    expect = body_lines
    while True:
        nxt_lf = text.find("\n", pos)
        seg = text[pos:] if nxt_lf < 0 else text[pos:nxt_lf]
        cr = seg.find("\r")
        if cr >= 0:
            if cr != len(seg) - 1:
                raise ProtocolError(f"text after a carriage return in reply line {seg!r}")
            body = _line_body(seg[:-1], address)
            lines.append(body)
            if len(lines) == 1 and _is_error_line(body):
                expect = 2
            if nxt_lf < 0:
                return (None, 0)
            pos = nxt_lf + 1
            continue
        # No CR: this is the prompt line, or a body line still arriving.
        xon = seg.find("\x11")
        if xon >= 0:
            if xon != len(seg) - 1:
                raise ProtocolError(f"text after XON in reply line {seg!r}")
            prompt, _ = _prompt_token(seg[:-1], address)
            if prompt is None:
                raise ProtocolError(f"expected a prompt before XON, got {seg[:-1]!r}")
            consumed = start + 1 + pos + len(seg)
            return (Reply(address, tuple(lines), prompt, xon=True), consumed)
        if nxt_lf >= 0:
            # A line feed without a carriage return: an unterminated line is only valid as a prompt (one the
            # pump sent unasked, outside poll mode); anything else is noise.
            prompt, _ = _prompt_token(seg, address)
            if prompt is None or poll:
                raise ProtocolError(f"reply line {seg!r} has no carriage return")
            return (Reply(address, tuple(lines), prompt), start + 1 + pos + len(seg))
        if poll:
            return (None, 0)
        prompt, complete = _prompt_token(seg, address)
        if prompt is None:
            if complete and not _could_be_body(seg, address):
                raise ProtocolError(f"malformed reply line {seg!r}")
            return (None, 0)
        # Without poll mode a prompt is only known to be one once the expected body lines are in: "NN:" on a
        # non-zero address also starts every body line, and a stray prompt is followed by a line feed.
        if len(lines) < expect:
            return (None, 0)
        return (Reply(address, tuple(lines), prompt), start + 1 + pos + len(seg))


def _could_be_body(seg: str, address: int) -> bool:
    if address == 0:
        return True
    head = f"{address:02d}:"
    return seg.startswith(head) or head.startswith(seg)


# ---- parsing what queries answer -----


def _decimal(text: str, what: str) -> Decimal:
    if not _NUMBER.fullmatch(text):
        raise ProtocolError(f"{what}: expected a plain decimal number, got {text!r}")
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise ProtocolError(f"{what}: bad number {text!r}") from None


def parse_rate(text: str) -> Decimal:
    """``irate`` query answer (``2.083 ml/hr``) -> exact mL/h."""
    value, _, unit_text = text.strip().partition(" ")
    unit = RateUnit.parse(unit_text)
    if unit is None:
        raise ProtocolError(f"rate: expected '<number> <ml|ul|nl|pl>/<hr|min|sec>', got {text!r}")
    with localcontext() as ctx:
        ctx.prec = 50
        return _decimal(value, "rate") * unit.to_ml_per_h


def parse_rate_limits(text: str) -> tuple[Decimal, Decimal]:
    """``irate lim`` answer (``85.05 nl/min to 88.32 ml/min``) -> (min, max) mL/h."""
    lo, sep, hi = text.partition(" to ")
    if not sep:
        raise ProtocolError(f"rate limits: expected '<rate> to <rate>', got {text!r}")
    return parse_rate(lo), parse_rate(hi)


def parse_diameter(text: str) -> Decimal:
    """``diameter`` query answer (``19.1300 mm``) -> mm."""
    value, sep, unit = text.strip().partition(" ")
    if not sep or unit != "mm":
        raise ProtocolError(f"diameter: expected '<number> mm', got {text!r}")
    return _decimal(value, "diameter")


_VERSION = re.compile(r"\s*(?P<model>11 ELITE(?: [A-Za-z/ ]*?)?)\s+(?P<fw>\d+\.\d+\.\d+)\s*", re.IGNORECASE)


def parse_version(text: str) -> tuple[str, str]:
    """``ver`` answer (``11 ELITE I/W Single 3.0.4``) -> (model, firmware)."""
    m = _VERSION.fullmatch(text)
    if m is None:
        raise ProtocolError(f"ver: expected '11 ELITE ... <major>.<minor>.<patch>', got {text!r}")
    return m["model"], m["fw"]


@dataclass(frozen=True, slots=True)
class RawStatus:
    """The ``status`` answer, verbatim in the pump's units."""

    rate_fl_per_s: int
    time_cycles: int  # 1/56,000,000 s (not used by the driver)
    volume_fl: int
    running: bool  # flag 1 upper case: the motor runs
    withdraw: bool  # flag 1 is W/w
    stalled: bool  # flag 3 'S'
    target_reached: bool  # flag 6 'T'

    @property
    def infused_ml(self) -> Decimal:
        return Decimal(self.volume_fl) / FL_PER_ML


# Six flags, the Elite's. The PHD ULTRA's `status` (manual 5419-002, p. 88) has five, time in seconds, and a
# lower-case direction letter that does not mean idle there: refused rather than misread.
_STATUS = re.compile(r"(?P<rate>\d{1,20}) (?P<time>\d{1,20}) (?P<vol>\d{1,24}) (?P<flags>[IiWw][.IW][.S][.T][IW][.T])")


def parse_status(text: str) -> RawStatus:
    m = _STATUS.fullmatch(text.strip())
    if m is None:
        raise ProtocolError(f"status: expected '<fl/s> <cycles> <fl> <6 flags>', got {text!r}")
    flags = m["flags"]
    return RawStatus(
        rate_fl_per_s=int(m["rate"]),
        time_cycles=int(m["time"]),
        volume_fl=int(m["vol"]),
        running=flags[0].isupper(),
        withdraw=flags[0] in "Ww",
        stalled=flags[2] == "S",
        target_reached=flags[5] == "T",
    )


def format_rate(value: Decimal) -> str:
    """A rate in mL/h as the driver sends it; a value the pump would round is refused, never rounded here."""
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
        raise QuantityError("rate_ml_per_h", "non-negative", f"must be a non-negative Decimal, got {value!r}")
    if quantize_down(value, ELITE_RATE_RESOLUTION) != value:
        raise QuantityError(
            "rate_ml_per_h", "resolution", f"{value} needs more than 4 digits or 4 decimals (the pump would round it)"
        )
    return _plain(value)


def format_diameter(value: Decimal, resolution: Resolution) -> str:
    if not isinstance(value, Decimal) or not value.is_finite() or value <= 0:
        raise QuantityError("diameter_mm", "positive", f"must be a positive Decimal, got {value!r}")
    if value != value.quantize(Decimal(1).scaleb(-resolution.decimals)):
        raise QuantityError("diameter_mm", "resolution", f"{value} has more than {resolution.decimals} decimals")
    return _plain(value)


def _plain(value: Decimal) -> str:
    text = format(value.normalize(), "f") if value != 0 else "0"
    return text


# ============================================================================================== pump side


@dataclass(frozen=True, slots=True)
class Command:
    """One command line as the pump reads it. ``address`` None: no address given (a direct USB link)."""

    address: int | None
    name: str  # lower case, as typed (may be a four-letter abbreviation)
    argument: str
    fast: bool = False  # '@': no display update


_COMMAND = re.compile(r"(?P<addr>\d{1,2})?(?P<fast>@)?(?P<name>[A-Za-z]*)(?: +(?P<arg>.*?))? *")


def parse_command(line: bytes) -> Command:
    """A command line without its CR. Raises ProtocolError for bytes the pump cannot take as a command."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"non-ASCII command {line!r}") from None
    text = text.replace("\n", "").lstrip(" ")
    m = _COMMAND.fullmatch(text)
    if m is None or not all(32 <= ord(c) < 127 for c in text):
        raise ProtocolError(f"malformed command {text!r}")
    addr = int(m["addr"]) if m["addr"] is not None else None
    return Command(addr, m["name"].lower(), (m["arg"] or "").strip(), fast=m["fast"] is not None)


def encode_reply(address: int, lines: list[str] | tuple[str, ...], prompt: Prompt, *, poll: bool) -> bytes:
    """Body lines and the prompt as the pump sends them (with the XON in poll mode)."""
    body_prefix = f"{address:02d}:" if address else ""
    prompt_prefix = f"{address:02d}" if address else ""
    out = "".join(f"\n{body_prefix}{line}\r" for line in lines) + f"\n{prompt_prefix}{prompt.value}"
    return out.encode("ascii") + (b"\x11" if poll else b"")


def parse_number(text: str) -> Decimal | None:
    """A number argument as the pump reads it: plain decimal digits (up to 15 decimals, as flowchem sends)."""
    if not _NUMBER.fullmatch(text):
        return None
    return Decimal(text)


def round_significant(value: Decimal, digits: int = SIGNIFICANT_DIGITS) -> Decimal:
    """What the pump keeps of a typed value: ``digits`` significant digits (half even)."""
    if value == 0:
        return Decimal(0)
    with localcontext() as ctx:
        ctx.prec = 50
        return value.quantize(Decimal(1).scaleb(value.adjusted() - digits + 1), rounding=ROUND_HALF_EVEN)


def display(value: Decimal) -> str:
    """A number as the pump shows it: plain, no exponent, no trailing zeros."""
    return _plain(value)


def parse_volume_unit(text: str) -> Decimal | None:
    """``ml``/``m``, ``ul``/``u``, ``nl``, ``pl`` -> mL per unit."""
    m = _VOLUME_UNIT.fullmatch(text)
    return None if m is None else VOLUME_TO_ML[m["v"].lower()]
