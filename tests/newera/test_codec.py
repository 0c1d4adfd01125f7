"""New Era codec: vectors from the manual/reference file, hypothesis round trips, malformed input."""

from __future__ import annotations

import contextlib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.core.errors import QuantityError
from driverd.core.quantities import NEW_ERA_RESOLUTION, quantize_down
from drivers.base import ProtocolError
from drivers.newera.codec import (
    CR,
    ETX,
    STX,
    AlarmCode,
    Command,
    Direction,
    ErrorCode,
    Frame,
    FrameDecoder,
    RateUnit,
    Reply,
    Status,
    VolumeUnit,
    crc16_xmodem,
    encode_command,
    encode_reply,
    format_display,
    format_number,
    frame_safe,
    parse_command,
    parse_diameter,
    parse_dispensed,
    parse_number,
    parse_rate,
    parse_reply,
    parse_volume,
)

# ---------------------------------------------------------------------------------------------- vectors


def test_manual_safe_mode_example_saf0() -> None:
    # The manual's example packet carries the bare "SAF0" (address omitted, which means address 0).
    vector = bytes.fromhex("02 08 53 41 46 30 55 43 03")
    assert frame_safe(b"SAF0") == vector
    assert crc16_xmodem(b"SAF0") == 0x5543
    decoder = FrameDecoder(Direction.TO_PUMP)
    decoder.feed(vector)
    frame = decoder.next_frame()
    assert frame == Frame(b"SAF0", safe=True)
    assert parse_command(frame.payload) == Command(0, "SAF", "0")


@pytest.mark.parametrize(
    ("command", "data", "expected"),
    [
        ("RUN", "", "02 08 30 52 55 4E 44 07 03"),
        ("STP", "", "02 08 30 53 54 50 B3 F9 03"),
        ("RAT", "10.0MH", "02 0E 30 52 41 54 31 30 2E 30 4D 48 79 A6 03"),
    ],
)
def test_reference_safe_vectors(command: str, data: str, expected: str) -> None:
    assert encode_command(0, command, data, safe=True) == bytes.fromhex(expected)


def test_basic_mode_encoding() -> None:
    assert encode_command(0, "RAT", "2.083MH", safe=False) == b"0RAT2.083MH\r"
    assert encode_command(12, "", safe=False) == b"12\r"
    assert encode_command(99, "VER", safe=False) == b"99VER\r"


def test_crc_check_value() -> None:
    # CRC-16/XMODEM catalogue check value.
    assert crc16_xmodem(b"123456789") == 0x31C3


# ---------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("0", "0"),
        ("2.083", "2.083"),
        ("10.0", "10.0"),
        ("1000", "1000"),
        ("9999", "9999"),
        ("0.001", "0.001"),
        ("2.08300", "2.083"),  # trailing zeros dropped only because they do not fit
        ("10.0000", "10"),
        ("1E+3", "1000"),
        ("-0", "0"),
        ("999.9", "999.9"),
    ],
)
def test_format_number_accepts(value: str, text: str) -> None:
    assert format_number(Decimal(value)) == text


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("2.0833", "pump-number-format"),  # 5 digits: refuse, never round
        ("0.0005", "pump-number-format"),  # 4 decimals
        ("10000", "pump-number-format"),
        ("123.45", "pump-number-format"),
        ("-1", "non-negative"),
        ("NaN", "finite"),
        ("Infinity", "finite"),
    ],
)
def test_format_number_refuses(value: str, rule: str) -> None:
    with pytest.raises(QuantityError) as info:
        format_number(Decimal(value), field="rate")
    assert info.value.problems[0].path == "rate"
    assert info.value.problems[0].rule == rule


def test_format_number_refuses_float() -> None:
    with pytest.raises(QuantityError) as info:
        format_number(2.5)  # type: ignore[arg-type]
    assert info.value.problems[0].rule == "type"


@given(st.decimals(min_value=0, max_value=5000, allow_nan=False, allow_infinity=False, places=6))
def test_kernel_quantized_values_always_format_exactly(value: Decimal) -> None:
    """Whatever the kernel's quantize_down produces for New Era, the codec sends it exactly."""
    q = quantize_down(value, NEW_ERA_RESOLUTION)
    assert parse_number(format_number(q)) == q


@given(st.decimals(min_value=0, max_value=100000, allow_nan=False, allow_infinity=False, places=5))
def test_format_number_never_changes_a_value(value: Decimal) -> None:
    try:
        text = format_number(value)
    except QuantityError:
        return
    assert Decimal(text) == value


@pytest.mark.parametrize(
    ("value", "text"),
    [("0", "0.000"), ("1.23456", "1.234"), ("12.3456", "12.34"), ("999.99", "999.9"), ("1000", "1000.")],
)
def test_format_display_truncates_to_four_digits(value: str, text: str) -> None:
    assert format_display(Decimal(value)) == text


@pytest.mark.parametrize("bad", ["", ".", "1.2.3", "-1", "1e3", "abc", " 1", "½"])
def test_parse_number_malformed(bad: str) -> None:
    with pytest.raises(ProtocolError):
        parse_number(bad)


def test_value_parsers() -> None:
    r = parse_rate("2.083MH")
    assert (r.value, r.unit, r.ml_per_h) == (Decimal("2.083"), RateUnit.ML_PER_H, Decimal("2.083"))
    assert parse_rate("1.000MM").ml_per_h == Decimal(60)
    assert parse_rate("500.0UH").ml_per_h == Decimal("0.5")
    d = parse_dispensed("I1.234W0.000ML")
    assert (d.infused, d.withdrawn, d.unit) == (Decimal("1.234"), Decimal(0), VolumeUnit.ML)
    assert parse_dispensed("I250.0W0.000UL").infused_ml == Decimal("0.25")
    assert parse_volume("0.000ML") == (Decimal(0), VolumeUnit.ML)
    assert parse_diameter("19.13") == Decimal("19.13")
    assert isinstance(parse_rate("1.5MH").value, Decimal)


@pytest.mark.parametrize("bad", ["", "2.083", "2.083XX", "MH", "-1MH", "1.0mh", "1,0MH"])
def test_parse_rate_malformed(bad: str) -> None:
    with pytest.raises(ProtocolError, match="rate"):
        parse_rate(bad)


@pytest.mark.parametrize("bad", ["", "I1W2", "1.0W0.0ML", "I1.0W0.0", "Ix W0ML", "I1.0W0.0GL"])
def test_parse_dispensed_malformed(bad: str) -> None:
    with pytest.raises(ProtocolError, match="dispensed"):
        parse_dispensed(bad)


# ---------------------------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("address", "command", "data", "field"),
    [
        (100, "RUN", "", "address"),
        (-1, "RUN", "", "address"),
        (True, "RUN", "", "address"),
        (0, "run", "", "command"),
        (0, "RATE", "", "command"),
        (0, "RAT", "1\r", "data"),
        (0, "RAT", "é", "data"),
        (0, "", "1", "data"),
    ],
)
def test_encode_command_refuses(address: int, command: str, data: str, field: str) -> None:
    with pytest.raises(QuantityError) as info:
        encode_command(address, command, data, safe=False)
    assert info.value.problems[0].path == field


def test_parse_command_is_case_and_space_insensitive() -> None:
    assert parse_command(b"0 rat 2.083 mh") == Command(0, "RAT", "2.083MH")
    assert parse_command(b"DIRINF") == Command(0, "DIR", "INF")
    assert parse_command(b"07") == Command(7, "", "")
    assert parse_command(b"*STP") == Command(None, "STP", "")
    assert parse_command(b"12VER") == Command(12, "VER", "")


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"0RAT\x01", "0RAT1\u00e9".encode()])
def test_parse_command_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_command(bad)


commands = st.tuples(
    st.integers(0, 99),
    st.sampled_from(["", "RUN", "STP", "RAT", "DIA", "DIS", "VER", "SAF", "VOL", "DIR", "CLD"]),
    st.text(alphabet="0123456789.MHULINF", max_size=10),
)


@given(commands, st.booleans())
def test_command_round_trip(cmd: tuple[int, str, str], safe: bool) -> None:
    address, name, data = cmd
    if name == "":
        data = ""
    # data that starts with letters would be read as part of the command name: that is the pump's grammar,
    # so only round-trip data that the grammar can separate.
    if name and len(name) < 3:
        return
    wire = encode_command(address, name, data, safe=safe)
    decoder = FrameDecoder(Direction.TO_PUMP)
    decoder.feed(wire)
    frame = decoder.next_frame()
    assert frame is not None and frame.safe is safe
    assert decoder.next_frame() is None
    assert parse_command(frame.payload) == Command(address, name, data)


# ---------------------------------------------------------------------------------------------- replies


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        (b"00S", Reply(0, Status.STOPPED)),
        (b"01I2.083MH", Reply(1, Status.INFUSING, data="2.083MH")),
        (b"00SNE1000V3.928", Reply(0, Status.STOPPED, data="NE1000V3.928")),
        (b"00A?R", Reply(0, Status.ALARM, alarm=AlarmCode.RESET)),
        (b"00A?T", Reply(0, Status.ALARM, alarm=AlarmCode.SAFE_TIMEOUT)),
        (b"00S?", Reply(0, Status.STOPPED, error=ErrorCode.UNKNOWN_COMMAND)),
        (b"00I?NA", Reply(0, Status.INFUSING, error=ErrorCode.NOT_APPLICABLE)),
        (b"00S?OOR", Reply(0, Status.STOPPED, error=ErrorCode.OUT_OF_RANGE)),
        (b"00S?COM", Reply(0, Status.STOPPED, error=ErrorCode.COMMUNICATION)),
        (b"00S?IGN", Reply(0, Status.STOPPED, error=ErrorCode.IGNORED)),
        (b"99P", Reply(99, Status.PAUSED)),
    ],
)
def test_parse_reply(text: bytes, reply: Reply) -> None:
    assert parse_reply(text) == reply


@pytest.mark.parametrize(
    "bad",
    [b"", b"0", b"00", b"0S", b"00Q", b"00A", b"00A?", b"00A?Z", b"00A?RX", b"00S?XYZ", b"00S\x01", b"\xff0S", b"aaS"],
)
def test_parse_reply_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(bad)


replies = st.one_of(
    st.builds(
        lambda a, s, d: Reply(a, s, data=d),
        st.integers(0, 99),
        st.sampled_from([s for s in Status if s is not Status.ALARM]),
        st.text(alphabet="0123456789.MHLINFWVE", max_size=16),
    ),
    st.builds(lambda a, c: Reply(a, Status.ALARM, alarm=c), st.integers(0, 99), st.sampled_from(AlarmCode)),
    st.builds(
        lambda a, s, e: Reply(a, s, error=e),
        st.integers(0, 99),
        st.sampled_from([s for s in Status if s is not Status.ALARM]),
        st.sampled_from(ErrorCode),
    ),
)


@given(replies, st.booleans(), st.booleans(), st.lists(st.integers(1, 7), max_size=6))
def test_reply_round_trip_any_chunking(reply: Reply, safe: bool, auto: bool, cuts: list[int]) -> None:
    wire = encode_reply(reply.address, reply.status, alarm=reply.alarm, error=reply.error, data=reply.data, safe=safe)
    # auto: the decoder tells the framings apart itself (the SAF handshake)
    decoder = FrameDecoder(Direction.TO_HOST, safe=None if auto else safe)
    frames = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        decoder.feed(wire[pos : pos + cut])
        pos += cut
        while (f := decoder.next_frame()) is not None:
            frames.append(f)
    decoder.feed(wire[pos:])
    while (f := decoder.next_frame()) is not None:
        frames.append(f)
    assert [parse_reply(f.payload) for f in frames] == [reply]
    assert decoder.pending == 0


def test_encode_reply_refuses_inconsistent() -> None:
    with pytest.raises(QuantityError):
        encode_reply(0, Status.ALARM, safe=False)
    with pytest.raises(QuantityError):
        encode_reply(0, Status.STOPPED, alarm=AlarmCode.RESET, safe=False)
    with pytest.raises(QuantityError):
        encode_reply(0, Status.STOPPED, error=ErrorCode.NOT_APPLICABLE, data="1", safe=False)
    with pytest.raises(QuantityError):
        encode_reply(100, Status.STOPPED, safe=False)


# ---------------------------------------------------------------------------------------------- framing


def _drain(decoder: FrameDecoder) -> tuple[list[Frame], int]:
    frames: list[Frame] = []
    errors = 0
    for _ in range(10_000):
        try:
            f = decoder.next_frame()
        except ProtocolError:
            errors += 1
            continue
        if f is None:
            return frames, errors
        frames.append(f)
    raise AssertionError("decoder did not make progress")


GOOD = encode_reply(0, Status.STOPPED, data="2.083MH", safe=True)


def test_bad_crc_is_protocol_error_then_resync() -> None:
    bad = bytearray(GOOD)
    bad[-2] ^= 0xFF
    d = FrameDecoder(Direction.TO_HOST, safe=True)
    d.feed(bytes(bad) + GOOD)
    with pytest.raises(ProtocolError, match="CRC"):
        while d.next_frame() is None:
            pass
    frames, _ = _drain(d)
    assert frames == [Frame(b"00S2.083MH", safe=True)]


def test_wrong_length_and_missing_etx() -> None:
    bad = bytearray(GOOD)
    bad[1] += 1  # LEN too large: ETX not where LEN says
    d = FrameDecoder(Direction.TO_HOST, safe=True)
    d.feed(bytes(bad) + b"\x00" + GOOD)
    frames, errors = _drain(d)
    assert frames == [Frame(b"00S2.083MH", safe=True)] and errors >= 1
    d2 = FrameDecoder(Direction.TO_HOST, safe=True)
    d2.feed(bytes([STX, 3]))
    with pytest.raises(ProtocolError, match="LEN"):
        d2.next_frame()


def test_truncated_frame_waits_then_discard_partial() -> None:
    d = FrameDecoder(Direction.TO_HOST, safe=True)
    d.feed(GOOD[:-3])
    assert d.next_frame() is None
    assert d.pending == len(GOOD) - 3
    assert d.discard_partial() is True
    d.feed(GOOD)
    assert d.next_frame() == Frame(b"00S2.083MH", safe=True)


def test_basic_reply_truncated_by_new_stx_and_noise() -> None:
    d = FrameDecoder(Direction.TO_HOST, safe=False)
    d.feed(b"junk" + bytes([STX]) + b"00I" + bytes([STX]) + b"00S" + bytes([ETX]))
    with pytest.raises(ProtocolError, match="noise"):
        d.next_frame()
    with pytest.raises(ProtocolError, match="truncated"):
        d.next_frame()
    assert d.next_frame() == Frame(b"00S", safe=False)


def test_basic_too_long_is_error_not_memory_growth() -> None:
    d = FrameDecoder(Direction.TO_HOST, safe=False)
    d.feed(bytes([STX]) + b"9" * 500)
    with pytest.raises(ProtocolError, match="too long"):
        d.next_frame()
    assert d.pending == 0
    p = FrameDecoder(Direction.TO_PUMP)
    p.feed(b"0" * 500)
    with pytest.raises(ProtocolError, match="too long"):
        p.next_frame()


def test_pump_side_mixed_framings_and_crlf() -> None:
    d = FrameDecoder(Direction.TO_PUMP)
    d.feed(b"0RUN\r\n\r" + encode_command(0, "STP", safe=True) + b"0 dis\r")
    frames, errors = _drain(d)
    assert errors == 0
    # The LF of CRLF is dropped; the bare CR after it is a packet without a command: a status query (issue 16.1).
    assert [(parse_command(f.payload).name, f.safe) for f in frames] == [
        ("RUN", False),
        ("", False),
        ("STP", True),
        ("DIS", False),
    ]


def test_pump_side_unterminated_basic_before_safe() -> None:
    d = FrameDecoder(Direction.TO_PUMP)
    d.feed(b"0RA" + encode_command(0, "STP", safe=True))
    with pytest.raises(ProtocolError, match="unterminated"):
        d.next_frame()
    assert d.next_frame() == Frame(b"0STP", safe=True)


@given(st.binary(max_size=300), st.sampled_from([True, False, None]), st.sampled_from(Direction))
def test_noise_never_crashes(noise: bytes, safe: bool | None, direction: Direction) -> None:
    """Arbitrary bytes: only frames or ProtocolError, and the decoder always makes progress."""
    d = FrameDecoder(direction, safe=safe)
    d.feed(noise)
    frames, _ = _drain(d)
    for f in frames:
        with contextlib.suppress(ProtocolError):
            parse_reply(f.payload) if direction is Direction.TO_HOST else parse_command(f.payload)


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_good_frame_survives_surrounding_noise(before: bytes, after: bytes) -> None:
    """A valid safe frame after noise is still found once the noise is flushed by the inter-byte timeout."""
    d = FrameDecoder(Direction.TO_HOST, safe=True)
    d.feed(before)
    _drain(d)
    d.discard_partial()  # what the 0.5 s inter-byte timeout does
    d.feed(GOOD + after)
    first = d.next_frame()
    assert first == Frame(b"00S2.083MH", safe=True)
    _drain(d)


def test_constants() -> None:
    assert (STX, ETX, CR) == (2, 3, 13)
