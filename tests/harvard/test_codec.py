"""The Pump 11 Elite codec: framing (manual pp. 52-53), number rules, and hostile input that must be refused."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.core.errors import QuantityError
from driverd.core.syringe_limits import ELITE11_DIAMETER_RESOLUTION
from drivers.base import ProtocolError
from drivers.harvard.codec import (
    Prompt,
    RateUnit,
    decode_reply,
    encode_command,
    encode_reply,
    format_diameter,
    format_rate,
    parse_command,
    parse_diameter,
    parse_rate,
    parse_rate_limits,
    parse_status,
    parse_version,
    round_significant,
)

D = Decimal


def test_commands_carry_the_address_only_when_it_is_not_zero() -> None:
    """Manual p. 52: "If the pump address is nonzero, the one or two-digit pump address precedes the command"."""
    assert encode_command(0, "irate", "2.083 m/h") == b"irate 2.083 m/h\r"
    assert encode_command(12, "irate", "3.2 u/m") == b"12irate 3.2 u/m\r"
    assert encode_command(0, "") == b"\r"


@pytest.mark.parametrize(
    ("address", "command", "argument"),
    [(100, "ver", ""), (-1, "ver", ""), (0, "ir ate", ""), (0, "irate", "2\r3"), (0, "irate", "2\n"), (0, "ver", "é")],
)
def test_malformed_commands_are_refused(address: int, command: str, argument: str) -> None:
    with pytest.raises(ProtocolError):
        encode_command(address, command, argument)


def test_reply_framing_address_zero_and_chain_address() -> None:
    """Every line of a non-zero address's reply is prefixed 'NN:'; the prompt 'NN' without a colon (p. 52)."""
    assert encode_reply(0, ["2.083 ml/hr"], Prompt.IDLE, poll=False) == b"\n2.083 ml/hr\r\n:"
    assert encode_reply(6, ["2.083 ml/hr"], Prompt.INFUSING, poll=True) == b"\n06:2.083 ml/hr\r\n06>\x11"
    reply, used = decode_reply(b"\n06:2.083 ml/hr\r\n06>\x11", address=6, poll=True, body_lines=1)
    assert reply is not None and reply.lines == ("2.083 ml/hr",) and reply.prompt is Prompt.INFUSING
    assert used == 21


@pytest.mark.parametrize("address", [0, 7])
@pytest.mark.parametrize("poll", [True, False])
@pytest.mark.parametrize("prompt", list(Prompt))
@given(lines=st.lists(st.from_regex(r"[A-Za-z0-9 ./:%]{1,30}", fullmatch=True), max_size=1))
def test_decode_inverts_encode_whatever_the_chunking(
    address: int, poll: bool, prompt: Prompt, lines: list[str]
) -> None:
    wire = encode_reply(address, lines, prompt, poll=poll)
    for cut in range(len(wire)):
        head, _ = decode_reply(wire[:cut], address=address, poll=poll, body_lines=len(lines))
        # Without poll mode the prompt has no terminator: a prefix is only taken once the body is in (the
        # prompt's own bytes may still be arriving for T*), never for a wrong reply.
        if head is not None:
            assert head.lines == tuple(lines) and not poll
    reply, used = decode_reply(wire, address=address, poll=poll, body_lines=len(lines))
    assert reply is not None and reply.lines == tuple(lines) and reply.prompt is prompt and used == len(wire)


def test_error_replies_are_two_lines_whatever_was_expected() -> None:
    """Manual p. 53: 'Argument error: <arg>' then the message line, then the prompt."""
    wire = encode_reply(3, ["Argument error: 5000 m/h", "   Out of range"], Prompt.IDLE, poll=False)
    reply, _ = decode_reply(wire, address=3, poll=False, body_lines=0)
    assert reply is not None and reply.error == ("argument", "Out of range")
    reply, _ = decode_reply(b"\nCommand error:\r\n   Unknown command\r\n:", address=0, poll=False, body_lines=1)
    assert reply is not None and reply.error == ("command", "Unknown command")


def test_echo_and_stale_xon_before_the_reply_are_skipped() -> None:
    reply, _ = decode_reply(b"\x11irate\r\n2 ml/hr\r\n:\x11", address=0, poll=True, body_lines=1)
    assert reply is not None and reply.lines == ("2 ml/hr",)


@pytest.mark.parametrize(
    ("wire", "address", "poll"),
    [
        (b"\n2.0\xff83 ml/hr\r\n:", 0, False),  # a garbled byte (FaultPlan.garble flips all bits)
        (b"\n07:1 ml/hr\r\n07:\x11", 6, True),  # another pump's reply
        (b"\n06:1 ml/hr\r junk\n06:\x11", 6, True),  # text after CR
        (b"\nhello\x11", 0, True),  # XON after something that is not a prompt
    ],
)
def test_hostile_replies_are_protocol_errors(wire: bytes, address: int, poll: bool) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(wire, address=address, poll=poll, body_lines=1)


def test_an_endless_reply_is_refused() -> None:
    with pytest.raises(ProtocolError):
        decode_reply(b"\n" + b"1" * 5000, address=0, poll=True, body_lines=1)


@pytest.mark.parametrize(
    ("text", "ml_per_h"),
    [("2.083 ml/hr", "2.083"), ("85.05 nl/min", "0.005103"), ("1 ul/sec", "3.6"), ("0.03472 ml/min", "2.0832"),
     ("88.32 ml/min", "5299.2"), ("638.3 pl/min", "0.000038298")],
)
def test_rates_in_every_unit_convert_exactly(text: str, ml_per_h: str) -> None:
    assert parse_rate(text) == D(ml_per_h)


@pytest.mark.parametrize("text", ["", "2.083", "2.083 ml", "2.083 kl/hr", "-1 ml/hr", "1e3 ml/hr", "2,5 ml/hr",
                                  "nan ml/hr", "2.083  ml/hr x"])
def test_malformed_rates_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_rate(text)


def test_rate_limits_diameter_version_status() -> None:
    assert parse_rate_limits("85.05 nl/min to 88.32 ml/min") == (D("0.005103"), D("5299.2"))
    assert parse_diameter("19.1300 mm") == D("19.13")
    assert parse_version("11 ELITE I/W Single 3.0.4") == ("11 ELITE I/W Single", "3.0.4")  # as flowchem saw it
    assert parse_version(" 11 Elite 2.1.0") == ("11 Elite", "2.1.0")  # the manual's form
    raw = parse_status("578611111 201600000000 2083000000000 I...IT")
    assert raw.running and not raw.stalled and raw.target_reached and raw.infused_ml == D("2.083")
    assert parse_status("0 0 0 i.S.I.").stalled
    with pytest.raises(ProtocolError):  # a PHD ULTRA's five-flag status (5419-002 p. 88): not misread as an Elite's
        parse_status("1000 12 5000 i...I")


@pytest.mark.parametrize("text", ["", "1 2 3", "1 2 3 I....", "1 2 3 X.....", "-1 2 3 I.....", "a b c I.....",
                                  "1 2 3 I......", "1 2 3 I...I.."])
def test_malformed_status_is_refused(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_status(text)


@pytest.mark.parametrize("text", ["19.13", "19.13 cm", "mm", "-1 mm", "19,13 mm"])
def test_malformed_diameters_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_diameter(text)


def test_the_driver_never_sends_a_value_the_pump_would_round() -> None:
    assert format_rate(D("2.083")) == "2.083" and format_rate(D("0.0125")) == "0.0125"
    assert format_rate(D(1000)) == "1000"
    for bad in (D("2.0833"), D("10000"), D("-1"), D("NaN"), D("0.00001")):
        with pytest.raises(QuantityError):
            format_rate(bad)
    assert format_diameter(D("14.567"), ELITE11_DIAMETER_RESOLUTION) == "14.567"
    with pytest.raises(QuantityError):
        format_diameter(D("14.56701"), ELITE11_DIAMETER_RESOLUTION)


def test_pump_side_command_parsing() -> None:
    cmd = parse_command(b"12@irat 3.2 u/m")
    assert (cmd.address, cmd.name, cmd.argument, cmd.fast) == (12, "irat", "3.2 u/m", True)
    assert parse_command(b"\n1VER ").name == "ver"  # flowchem's "1VER \r\n": the LF lands before the next line
    assert parse_command(b"6  ").name == ""  # flowchem's is_moving: address and a space
    with pytest.raises(ProtocolError):
        parse_command(b"irate \xff")


def test_units_and_rounding() -> None:
    assert RateUnit.parse("m/h") == RateUnit.parse("ml/hr") == RateUnit("m", "h")
    assert RateUnit.parse("u/m") == RateUnit.parse("UL/MIN") == RateUnit("u", "m")
    assert RateUnit.parse("ml/day") is None and RateUnit.parse("x/h") is None
    assert round_significant(D("3.14159265")) == D("3.142")
    assert round_significant(D("0.0347222222")) == D("0.03472")
