"""New Era wire codec on hostile bytes (issue #11 item 5): any stream decodes to frames or ProtocolError, and
any frame's payload parses or raises ProtocolError; never another exception. Safe-mode frames are built with a
valid CRC so the payload parsers see the hostile content, not only the framing checks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core.errors import DriverdError
from drivers.base import ProtocolError
from drivers.newera.codec import (
    MAX_SAFE_DATA,
    Direction,
    FrameDecoder,
    frame_safe,
    parse_command,
    parse_diameter,
    parse_dispensed,
    parse_number,
    parse_rate,
    parse_reply,
    parse_volume,
)

HOSTILE_DATA = [
    "1e999999999MH", "9" * 200 + "MH", "0." + "0" * 200 + "1ML", "I1e9W1e9ML", "-1MH", "NaNMH", "InfinityUL",
    "\x00\x00", "\u00ff", "1..2MH", ".MH", "I.W.UL", "1" * 5000, "٣MH",
]
VALUE_PARSERS: list[Callable[[str], Any]] = [parse_rate, parse_volume, parse_dispensed, parse_number, parse_diameter]

texts = st.one_of(st.sampled_from(HOSTILE_DATA), st.text(max_size=60),
                  st.text(alphabet="0123456789.eEIWMLUH+-", max_size=60))


def _parse_payload(payload: bytes, direction: Direction) -> None:
    """What the driver/simulator does with a frame: parse it, then parse its data field."""
    try:
        if direction is Direction.TO_PUMP:
            parse_command(payload)
            return
        reply = parse_reply(payload)
    except ProtocolError:
        return
    for parser in VALUE_PARSERS:
        with contextlib.suppress(ProtocolError):
            parser(reply.data)


def _decode_all(stream: bytes, direction: Direction, safe: bool | None) -> None:
    d = FrameDecoder(direction, safe=safe)
    d.feed(stream)
    for _ in range(len(stream) + 2):  # every call consumes bytes: bounded
        try:
            frame = d.next_frame()
        except ProtocolError:
            continue
        if frame is None:
            break
        _parse_payload(frame.payload, direction)
    d.discard_partial()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from(Direction), st.sampled_from([True, False, None]))
def test_arbitrary_bytes_decode_to_frames_or_protocol_errors(stream: bytes, direction: Direction,
                                                             safe: bool | None) -> None:
    _decode_all(stream, direction, safe)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=MAX_SAFE_DATA),
                          texts.map(lambda t: b"00S" + t.encode("utf-8", "surrogatepass")[: MAX_SAFE_DATA - 3])),
                min_size=1, max_size=5),
       st.binary(max_size=20), st.sampled_from(Direction))
def test_valid_crc_frames_with_hostile_payloads(payloads: list[bytes], noise: bytes, direction: Direction) -> None:
    stream = noise + b"".join(frame_safe(p) for p in payloads if p)
    _decode_all(stream, direction, True)
    _decode_all(stream, direction, None)


@settings(max_examples=500, deadline=None)
@given(texts)
def test_value_parsers_only_raise_protocol_error(text: str) -> None:
    for parser in VALUE_PARSERS:
        try:
            parser(text)
        except ProtocolError as exc:
            assert isinstance(exc, DriverdError) and str(exc)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_payload_parsers_only_raise_protocol_error(payload: bytes) -> None:
    for direction in Direction:
        _parse_payload(payload, direction)
        _parse_payload(b"00S" + payload, direction)
