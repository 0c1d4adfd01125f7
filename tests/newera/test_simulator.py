"""The New Era simulator's own rules, sans-IO (frames in, bytes out), plus its PTY framing behaviour."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from drivers.base import AlarmKind, ProtocolError, PumpState
from drivers.newera.codec import (
    AlarmCode,
    Direction,
    ErrorCode,
    Frame,
    FrameDecoder,
    RateUnit,
    Reply,
    Status,
    frame_safe,
    parse_reply,
)
from simulators.clock import ManualClock
from simulators.faults import FaultPlan
from simulators.newera import NewEraPumpProtocol, serve_newera
from simulators.pump import PumpModel


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 1, 1, tzinfo=UTC))


@pytest.fixture
def pump(clock: ManualClock) -> NewEraPumpProtocol:
    return NewEraPumpProtocol(PumpModel(clock))


def ask(pump: NewEraPumpProtocol, text: str, *, safe: bool = False) -> Reply:
    """Send one basic/safe packet (raw text, as a terminal would type it) and parse the reply."""
    decoder = FrameDecoder(Direction.TO_PUMP)
    decoder.feed(text.encode() + b"\r" if not safe else _safe(text))
    frame = decoder.next_frame()
    assert frame is not None
    out = pump.handle(frame)
    assert out is not None
    host = FrameDecoder(Direction.TO_HOST, safe=None)
    host.feed(out)
    reply_frame = host.next_frame()
    assert reply_frame is not None
    return parse_reply(reply_frame.payload)


def _safe(text: str) -> bytes:
    return frame_safe(text.encode())


def test_basic_session(pump: NewEraPumpProtocol, clock: ManualClock) -> None:
    assert ask(pump, "0VER").data == "NE1000V3.928"
    assert ask(pump, "0 dia 26.7") == Reply(0, Status.STOPPED)
    assert ask(pump, "0DIA").data == "26.70"
    assert ask(pump, "0RAT 36 MH") == Reply(0, Status.STOPPED)
    assert ask(pump, "0RAT").data == "36.00MH"
    assert ask(pump, "0RUN").status is Status.INFUSING
    clock.advance(100)
    assert ask(pump, "0DIS").data == "I1.000W0.000ML"
    assert ask(pump, "0STP").status is Status.PAUSED  # manual §STP: the first STP pauses
    assert ask(pump, "0STP").status is Status.STOPPED  # the second stops
    assert ask(pump, "0CLDINF").status is Status.STOPPED
    assert ask(pump, "0DIS").data == "I0.000W0.000ML"
    assert ask(pump, "0") == Reply(0, Status.STOPPED)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("0RAT2.0833MH", ErrorCode.OUT_OF_RANGE),  # 5 digits: never rounded
        ("0RAT1.0005", ErrorCode.OUT_OF_RANGE),  # 4 decimals
        ("0RAT-1MH", ErrorCode.OUT_OF_RANGE),
        ("0RAT1001MH", ErrorCode.OUT_OF_RANGE),  # above the pump's maximum
        ("0DIA60", ErrorCode.OUT_OF_RANGE),
        ("0DIA1.2.3", ErrorCode.OUT_OF_RANGE),
        ("0SAF256", ErrorCode.OUT_OF_RANGE),
        ("0SAFX", ErrorCode.OUT_OF_RANGE),
        ("0XYZ", ErrorCode.UNKNOWN_COMMAND),
        ("0RUN", ErrorCode.NOT_APPLICABLE),  # rate is 0
        ("0VOL5", ErrorCode.NOT_APPLICABLE),  # target volume not modelled (simulator-only)
        ("0DIRWDR", ErrorCode.NOT_APPLICABLE),  # infuse-only (simulator-only)
        ("0DIRREV", ErrorCode.NOT_APPLICABLE),
        ("0CLDX", ErrorCode.OUT_OF_RANGE),
    ],
)
def test_pump_rules_refuse_and_change_nothing(pump: NewEraPumpProtocol, text: str, error: ErrorCode) -> None:
    before = pump.model.status()
    assert ask(pump, text).error is error
    after = pump.model.status()
    assert (after.rate_ml_per_h, after.diameter_mm, after.state, after.deadman_s) == (
        before.rate_ml_per_h,
        before.diameter_mm,
        before.state,
        before.deadman_s,
    )


def test_rate_units(pump: NewEraPumpProtocol) -> None:
    assert ask(pump, "0RAT1.5MM").error is None  # while stopped: units change, converted exactly
    assert pump.model.status().rate_ml_per_h == Decimal(90)
    assert ask(pump, "0RAT").data == "1.500MM"
    assert ask(pump, "0RUN").status is Status.INFUSING
    assert ask(pump, "0RAT2MH").error is ErrorCode.NOT_APPLICABLE  # units may not change while running
    assert ask(pump, "0RAT2").error is None  # same units: fine while running
    assert pump.model.status().rate_ml_per_h == Decimal(120)


def test_alarm_is_reported_once_then_data_is_accepted(pump: NewEraPumpProtocol) -> None:
    ask(pump, "0RAT1MH")
    ask(pump, "0RUN")
    pump.model.inject_alarm(AlarmKind.OCCLUSION)
    assert ask(pump, "0RAT2MH") == Reply(0, Status.ALARM, alarm=AlarmCode.STALLED)  # not executed
    assert pump.model.status().rate_ml_per_h == 1
    assert ask(pump, "0") == Reply(0, Status.STOPPED)  # acknowledged on the wire
    assert pump.model.status().state is PumpState.ALARM  # the model still shows it until the host acts
    assert ask(pump, "0RAT2MH") == Reply(0, Status.STOPPED)
    assert pump.model.status().state is PumpState.STOPPED and pump.model.status().rate_ml_per_h == 2


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (AlarmKind.OCCLUSION, AlarmCode.STALLED),
        (AlarmKind.END_OF_SYRINGE, AlarmCode.STALLED),  # simulator-only convention: a stall at the end
        (AlarmKind.POWER_INTERRUPTED, AlarmCode.RESET),
        (AlarmKind.SAFE_MODE_TIMEOUT, AlarmCode.SAFE_TIMEOUT),
        (AlarmKind.PROGRAM_ERROR, AlarmCode.PROGRAM_ERROR),
        (AlarmKind.OTHER, AlarmCode.OUT_OF_RANGE),
    ],
)
def test_alarm_wire_codes(pump: NewEraPumpProtocol, kind: AlarmKind, code: AlarmCode) -> None:
    pump.model.inject_alarm(kind)
    assert ask(pump, "0").alarm is code


@pytest.mark.parametrize("kind", [AlarmKind.NEAR_END, AlarmKind.LOW_BATTERY])
def test_warnings_are_not_on_the_wire(pump: NewEraPumpProtocol, kind: AlarmKind) -> None:
    ask(pump, "0RAT1MH")
    ask(pump, "0RUN")
    pump.model.inject_alarm(kind)
    assert ask(pump, "0") == Reply(0, Status.INFUSING)


def test_power_up_in_basic_mode_is_silent_until_asked(pump: NewEraPumpProtocol) -> None:
    """Issue 16.3: in basic mode the pump never transmits unprompted; the first packet gets A?R."""
    assert pump.power_up() is None
    assert pump.unsolicited == []
    assert ask(pump, "0VER").alarm is AlarmCode.RESET
    assert ask(pump, "0VER").data == "NE1000V3.928"


def test_power_up_in_safe_mode_announces_reset(pump: NewEraPumpProtocol) -> None:
    """NE-1000 manual §10.4 Safe Mode, Auto-Alarm: an alarm in safe mode sends an unsolicited status packet."""
    ask(pump, "0SAF20", safe=True)
    announce = pump.power_up()
    assert announce == frame_safe(b"00A?R")
    assert pump.poll_unsolicited() is None  # announced once
    assert ask(pump, "0VER", safe=True).alarm is AlarmCode.RESET  # and still acknowledged by the next packet
    assert ask(pump, "0VER", safe=True).data == "NE1000V3.928"


def test_safe_mode_framing_and_deadman(pump: NewEraPumpProtocol, clock: ManualClock) -> None:
    # SAF arrives safe-framed; the reply uses the new mode.
    assert ask(pump, "0SAF5", safe=True) == Reply(0, Status.STOPPED)
    assert pump.safe
    assert ask(pump, "0SAF", safe=True).data == "5"
    ask(pump, "0RAT36MH", safe=True)
    ask(pump, "0RUN", safe=True)
    clock.advance(4)
    assert ask(pump, "0", safe=True).status is Status.INFUSING  # contact re-arms
    clock.advance(6)
    assert ask(pump, "0", safe=True).alarm is AlarmCode.SAFE_TIMEOUT
    st = pump.model.status()
    assert st.delivered_ml == Decimal("0.09")  # stopped exactly 5 s after the last contact (4 + 5 s)
    assert ask(pump, "0SAF0", safe=True) == Reply(0, Status.STOPPED)
    assert not pump.safe


def test_corrupt_safe_packet_gets_com_only_in_safe_mode(pump: NewEraPumpProtocol) -> None:
    assert pump.bad_packet(ProtocolError("crc")) is None  # basic mode: silence
    ask(pump, "0SAF9", safe=True)
    out = pump.bad_packet(ProtocolError("crc"))
    assert out is not None
    d = FrameDecoder(Direction.TO_HOST, safe=True)
    d.feed(out)
    frame = d.next_frame()
    assert frame is not None and parse_reply(frame.payload).error is ErrorCode.COMMUNICATION


def test_other_addresses_and_broadcast(clock: ManualClock) -> None:
    pump = NewEraPumpProtocol(PumpModel(clock), address=7)
    assert pump.handle(Frame(b"3RAT1MH", safe=False)) is None
    assert pump.model.status().rate_ml_per_h == 0
    assert pump.handle(Frame(b"*RAT1MH", safe=False)) is None  # broadcast: executed, no reply
    assert pump.model.status().rate_ml_per_h == 1
    assert pump.handle(Frame(b"\xff", safe=False)) is None  # garbage in basic mode: silence
    reply = pump.handle(Frame(b"07RAT", safe=False))
    assert reply == b"\x0207S1.000MH\x03"


def test_other_rate_units_display(pump: NewEraPumpProtocol) -> None:
    pump.rate_unit = RateUnit.UL_PER_H
    ask(pump, "0RAT500")  # 500 µL/h
    assert pump.model.status().rate_ml_per_h == Decimal("0.5")
    assert ask(pump, "0RAT").data == "500.0UH"


def _pty_exchange(device: str, chunks: list[tuple[bytes, float]]) -> bytes:
    fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
    try:
        for data, pause in chunks:
            os.write(fd, data)
            time.sleep(pause)
        os.set_blocking(fd, False)
        deadline = time.monotonic() + 5
        out = b""
        while time.monotonic() < deadline and not out.endswith(b"\x03"):
            try:
                out += os.read(fd, 100)
            except BlockingIOError:
                time.sleep(0.01)
        return out
    finally:
        os.close(fd)


def test_inter_byte_timeout_discards_a_partial_packet_on_the_pty(clock: ManualClock) -> None:
    """A packet interrupted for more than 0.5 s is dropped; the next whole one is answered."""

    async def main() -> None:
        model = PumpModel(clock)
        async with serve_newera(model, pty=True) as ep:
            assert ep.device is not None
            out = await asyncio.to_thread(_pty_exchange, ep.device, [(b"0RAT9", 0.7), (b"0RAT2MH\r", 0.0)])
        assert out == b"\x0200S\x03"
        assert model.status().rate_ml_per_h == 2  # not 92: the partial "0RAT9" was discarded

    asyncio.run(asyncio.wait_for(main(), 30))


def test_wire_time_imitation_still_answers(clock: ManualClock) -> None:
    async def main() -> None:
        model = PumpModel(clock)
        plan = FaultPlan()
        plan.set_baud(19200)
        async with serve_newera(model, plan, pty=True) as ep:
            assert ep.device is not None
            out = await asyncio.to_thread(_pty_exchange, ep.device, [(b"0VER\r", 0.0)])
        assert out == b"\x0200SNE1000V3.928\x03"

    asyncio.run(asyncio.wait_for(main(), 30))


def test_value_the_display_cannot_show_is_out_of_range_not_a_crash(pump: NewEraPumpProtocol) -> None:
    ask(pump, "0DIA26.59")
    assert ask(pump, "0RAT1000MH").error is None
    pump.rate_unit = RateUnit.UL_PER_H  # 1,000,000 uL/h does not fit 4 digits
    assert ask(pump, "0RAT").error is ErrorCode.OUT_OF_RANGE
    assert ask(pump, "0").status is Status.STOPPED
