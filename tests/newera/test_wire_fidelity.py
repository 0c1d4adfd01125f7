"""Issue 16, items 1-7: the New Era simulator true to the manual, and the driver where it is affected.

Manual references are to the NE-1000 User Manual (publication 1200-01, V3.9): §10.2 basic mode packets, §10.3
network commands and the Command Burst, §10.4 safe mode, Appendix B the command table, §12.5 specifications.
Each test asserts the wire (the reply bytes) and the pump state (the model), not logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from drivers.base import AlarmKind, DriverError, DriverOptions, PumpRejected, PumpState
from drivers.newera.codec import AlarmCode, Direction, ErrorCode, Frame, FrameDecoder, Reply, Status, parse_reply
from drivers.newera.driver import NewEraDriver
from drivers.registry import open_driver
from simulators.clock import ManualClock
from simulators.newera import Endpoint, NewEraPumpProtocol, serve_newera
from simulators.pump import PumpModel
from tests.newera.test_simulator import ask

D = Decimal


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 1, 1, tzinfo=UTC))


@pytest.fixture
def pump(clock: ManualClock) -> NewEraPumpProtocol:
    return NewEraPumpProtocol(PumpModel(clock))


def wire(pump: NewEraPumpProtocol, raw: bytes) -> list[bytes]:
    """Feed raw host bytes through the pump-side decoder; return every reply packet (raw bytes)."""
    decoder = FrameDecoder(Direction.TO_PUMP)
    decoder.feed(raw)
    out = []
    while (frame := decoder.next_frame()) is not None:
        reply = pump.handle(frame)
        if reply is not None:
            out.append(reply)
    return out


# ---- 1. a packet without a command is a status query (§10.2) -----


def test_bare_cr_is_a_status_query(pump: NewEraPumpProtocol) -> None:
    assert wire(pump, b"\r") == [b"\x0200S\x03"]
    assert wire(pump, b"0\r") == [b"\x0200S\x03"]
    assert wire(pump, b"  \r") == [b"\x0200S\x03"]  # spaces are ignored
    ask(pump, "0RAT1MH")
    ask(pump, "0RUN")
    assert wire(pump, b"\r") == [b"\x0200I\x03"]


def test_bare_cr_to_another_address_is_not_answered(clock: ManualClock) -> None:
    pump = NewEraPumpProtocol(PumpModel(clock), address=4)
    assert wire(pump, b"\r") == []  # a bare CR means address 0
    assert wire(pump, b"4\r") == [b"\x0204S\x03"]


# ---- 2. system commands and the Network Command Burst (§10.3) -----


def test_system_commands_override_the_address(clock: ManualClock) -> None:
    pump = NewEraPumpProtocol(PumpModel(clock), address=7)
    assert wire(pump, b"*ADR\r") == [b"\x0207S07\x03"]  # find a pump whose address is unknown
    assert wire(pump, b"*VER\r") == [b"\x0207SNE1000V3.928\x03"]
    assert wire(pump, b"*ADR 12\r") == [b"\x0212S\x03"] and pump.address == 12
    assert wire(pump, b"*RAT 2 MH\r") == []  # every pump executes, none answers
    assert pump.model.status().rate_ml_per_h == 2
    assert wire(pump, b"*RUN\r") == [] and pump.model.status().state is PumpState.INFUSING
    assert wire(pump, b"*STP\r") == [] and pump.model.status().state is PumpState.STOPPED
    assert wire(pump, b"*RESET\r") == []  # restarts: the next packet gets the reset alarm
    assert parse_reply(wire(pump, b"12\r")[0][1:-1]).alarm is AlarmCode.RESET


def test_network_command_burst_is_executed_by_each_pump(clock: ManualClock) -> None:
    pumps = [NewEraPumpProtocol(PumpModel(clock), address=a) for a in (0, 1, 2)]
    burst = b"0 rat 100 mh * 1 rat 250 mh * 0 dia 26.59 *\r"
    replies = [wire(p, burst) for p in pumps]
    assert [p.model.status().rate_ml_per_h for p in pumps] == [100, 250, 0]
    assert pumps[0].model.status().diameter_mm == D("26.59")
    assert replies == [[b"\x0200S\x03"], [b"\x0201S\x03"], []]  # one reply per addressed pump, after its last


def test_burst_with_a_bad_segment_is_a_bad_packet(pump: NewEraPumpProtocol) -> None:
    assert wire(pump, b"0RAT1MH*0\x01*\r") == []  # control character: noise in basic mode
    assert pump.model.status().rate_ml_per_h == 0


# ---- 3. Auto-Alarm in safe mode only (§10.4) -----


def test_basic_mode_never_transmits_unprompted(pump: NewEraPumpProtocol) -> None:
    assert pump.power_up() is None
    pump.model.inject_alarm(AlarmKind.OCCLUSION)
    assert pump.poll_unsolicited() is None
    assert pump.unsolicited == []


def test_safe_mode_alarm_sends_one_unsolicited_status_packet(pump: NewEraPumpProtocol) -> None:
    ask(pump, "0SAF50", safe=True)
    ask(pump, "0RAT1MH", safe=True)
    ask(pump, "0RUN", safe=True)
    pump.model.inject_alarm(AlarmKind.OCCLUSION)
    packet = pump.poll_unsolicited()
    assert packet is not None
    d = FrameDecoder(Direction.TO_HOST, safe=True)
    d.feed(packet)
    frame = d.next_frame()
    assert frame is not None and parse_reply(frame.payload) == Reply(0, Status.ALARM, alarm=AlarmCode.STALLED)
    assert pump.poll_unsolicited() is None  # once per alarm
    assert ask(pump, "0", safe=True).alarm is AlarmCode.STALLED  # still acknowledged by the next packet


@contextlib.asynccontextmanager
async def rig(
    clock: ManualClock, *, deadman_s: int, safe_mode: bool = True, url_extra: str = ""
) -> AsyncIterator[tuple[NewEraDriver, PumpModel, Endpoint]]:
    model = PumpModel(clock)
    async with serve_newera(model, pty=True, safe_mode=safe_mode) as ep:
        driver = open_driver(ep.url + url_extra, DriverOptions(timeout_s=0.6, retries=1, deadman_s=deadman_s))
        assert isinstance(driver, NewEraDriver)
        try:
            yield driver, model, ep
        finally:
            await driver.close()


def test_driver_reads_an_unsolicited_alarm_packet(clock: ManualClock) -> None:
    async def body() -> None:
        async with rig(clock, deadman_s=50) as (driver, model, ep):
            await driver.connect()
            await driver.set_rate(D(2))
            await driver.run()
            sent = len(driver.transport.sent)
            announced = asyncio.Event()
            poll = ep.protocol.poll_unsolicited

            def spy() -> bytes | None:
                packet = poll()
                if packet is not None:
                    announced.set()  # the simulator writes it right after this returns
                return packet

            ep.protocol.poll_unsolicited = spy  # type: ignore[method-assign]
            model.inject_alarm(AlarmKind.OCCLUSION)
            await announced.wait()  # the simulator's Auto-Alarm poll runs every 50 ms
            # Written to the PTY master is not yet readable at the slave: the kernel hands the bytes over from a
            # work queue, later (under load, after the driver's non-blocking read). So read until it arrived,
            # as a host polling the line does; the 30-s bound below is the only limit, never asserted on.
            latched = await driver.check_unsolicited()
            while not latched:
                await asyncio.sleep(0.01)
                latched = await driver.check_unsolicited()
            assert AlarmKind.OCCLUSION in latched
            assert len(driver.transport.sent) == sent  # nothing was sent: it came from the unsolicited packet
            with pytest.raises(Exception, match="occlusion"):
                await driver.set_rate(D(3))  # refused until cleared
            assert model.status().rate_ml_per_h == 2

    asyncio.run(asyncio.wait_for(body(), 30))


# ---- 4. rates in every unit, RAT C/I, DIR STK, STP pause/stop, volume units (Appendix B) -----


@pytest.mark.parametrize(
    ("text", "ml_per_h", "shown"),
    [
        ("0RAT416.6UH", D("0.4166"), "416.6UH"),  # valid as typed, though 0.4166 mL/h has 4 decimals
        ("0RAT 1.234 UM", D("0.07404"), "1.234UM"),
        ("0RAT0.050MM", D("3.000"), "0.050MM"),
        ("0RAT C 2.5 MH", D("2.5"), "2.500MH"),
        ("0RATI3MH", D("3"), "3.000MH"),
    ],
)
def test_rates_follow_the_number_rule_as_sent(
    pump: NewEraPumpProtocol, text: str, ml_per_h: Decimal, shown: str
) -> None:
    assert ask(pump, text) == Reply(0, Status.STOPPED)
    assert pump.model.status().rate_ml_per_h == ml_per_h
    assert ask(pump, "0RAT").data == shown


def test_rate_as_sent_still_refuses_five_digits(pump: NewEraPumpProtocol) -> None:
    assert ask(pump, "0RAT416.66UH").error is ErrorCode.OUT_OF_RANGE
    assert pump.model.status().rate_ml_per_h == 0


def test_dir_stk_only_while_stopped(pump: NewEraPumpProtocol) -> None:
    assert ask(pump, "0DIR").data == "INF"
    assert ask(pump, "0DIRSTK") == Reply(0, Status.STOPPED)
    assert ask(pump, "0DIR").data == "STK"
    ask(pump, "0RAT1MH")
    assert ask(pump, "0RUN").status is Status.INFUSING  # the direction pin is not wired: infuse
    assert ask(pump, "0DIRSTK").error is ErrorCode.NOT_APPLICABLE


def test_stp_pauses_then_stops(pump: NewEraPumpProtocol, clock: ManualClock) -> None:
    ask(pump, "0RAT36MH")
    ask(pump, "0RUN")
    clock.advance(100)
    assert ask(pump, "0STP").status is Status.PAUSED
    assert pump.model.status().state is PumpState.STOPPED  # not moving
    assert ask(pump, "0").status is Status.PAUSED
    assert ask(pump, "0RUN").status is Status.INFUSING  # RUN resumes a paused program
    assert ask(pump, "0STP").status is Status.PAUSED
    assert ask(pump, "0STP").status is Status.STOPPED
    assert ask(pump, "0STP").status is Status.STOPPED


def test_driver_stop_leaves_the_pump_stopped_not_paused(clock: ManualClock) -> None:
    async def body() -> None:
        async with rig(clock, deadman_s=0) as (driver, model, ep):
            await driver.connect()
            await driver.set_rate(D(2))
            await driver.run()
            await driver.stop()
            assert [c.name for c in ep.protocol.requests][-2:] == ["STP", "STP"]
            assert (await driver.read_status()).state is PumpState.STOPPED
            assert ep.protocol._status_char() is Status.STOPPED and model.status().state is PumpState.STOPPED

    asyncio.run(asyncio.wait_for(body(), 30))


def test_volume_units_follow_the_diameter(pump: NewEraPumpProtocol, clock: ManualClock) -> None:
    assert ask(pump, "0DIA14.0") == Reply(0, Status.STOPPED)
    assert ask(pump, "0VOL").data.endswith("UL")
    ask(pump, "0RAT36MH")
    ask(pump, "0RUN")
    clock.advance(10)
    assert ask(pump, "0DIS").data == "I100.0W0.000UL"  # 0.1 mL shown in uL
    ask(pump, "0STP")
    ask(pump, "0STP")
    assert ask(pump, "0DIA14.01") == Reply(0, Status.STOPPED)
    assert ask(pump, "0DIS").data == "I0.100W0.000ML"


# ---- 5. the rest of Appendix B: implemented, or answered as a pump without the feature -----


@pytest.mark.parametrize(
    ("text", "data", "error"),
    [
        ("0PUR", "", ErrorCode.NOT_APPLICABLE),  # purge is not modelled (a drug pump never purges)
        ("0PHN", "01", None),
        ("0PHN1", "", None),
        ("0PHN2", "", ErrorCode.NOT_APPLICABLE),  # single-phase program only
        ("0FUN", "RAT", None),
        ("0FUNRAT", "", None),
        ("0FUNLPS", "", ErrorCode.NOT_APPLICABLE),
        ("0AL", "0", None),
        ("0AL1", "", None),
        ("0AL7", "", ErrorCode.OUT_OF_RANGE),
        ("0PF", "0", None),
        ("0BUZ", "0", None),
        ("0LOC", "0", None),
        ("0LOCP1", "", None),
        ("0TRG", "FT", None),
        ("0TRGLE", "", None),
        ("0TRGXX", "", ErrorCode.OUT_OF_RANGE),
        ("0DIN", "0", None),
        ("0ROM", "0", None),
        ("0OUT1", "", None),
        ("0IN", "0", None),
        ("0ADR", "00", None),
        ("0ADR100", "", ErrorCode.OUT_OF_RANGE),
        ("0ADR5B1234", "", ErrorCode.OUT_OF_RANGE),
        ("0TIM", "", ErrorCode.UNKNOWN_COMMAND),  # not in the NE-1000 command set: bare "?"
    ],
)
def test_appendix_b_commands(pump: NewEraPumpProtocol, text: str, data: str, error: ErrorCode | None) -> None:
    reply = ask(pump, text)
    assert (reply.data, reply.error) == (data, error)
    assert pump.model.status().state is PumpState.STOPPED and pump.model.status().rate_ml_per_h == 0


def test_stored_settings_are_kept(pump: NewEraPumpProtocol) -> None:
    ask(pump, "0AL1")
    ask(pump, "0TRGLE")
    assert (ask(pump, "0AL").data, ask(pump, "0TRG").data) == ("1", "LE")
    assert ask(pump, "0ADR5B9600") == Reply(5, Status.STOPPED)
    assert (pump.address, pump.baud) == (5, 9600)


# ---- 6. the syringe bounds the rate (§12.5) -----


def test_simulator_refuses_a_rate_the_syringe_cannot_run(pump: NewEraPumpProtocol) -> None:
    ask(pump, "0DIA19.13")
    assert ask(pump, "0RAT0.012MH").error is ErrorCode.OUT_OF_RANGE  # 19.13 mm: min 0.01208 mL/h
    assert ask(pump, "0RAT879.6MH").error is ErrorCode.OUT_OF_RANGE  # max 879.59 mL/h
    assert pump.model.status().rate_ml_per_h == 0
    assert ask(pump, "0RAT0.013MH").error is None
    assert ask(pump, "0RAT879.5MH").error is None
    ask(pump, "0DIA4.699")  # a 1 mL syringe runs far lower rates
    assert ask(pump, "0RAT0.73UH").error is None
    assert pump.model.status().rate_ml_per_h == D("0.00073")


def test_driver_reports_the_syringes_range(clock: ManualClock) -> None:
    async def body() -> None:
        async with rig(clock, deadman_s=0) as (driver, model, _ep):
            await driver.connect()
            assert driver.rate_range(D("19.13")) == (D("0.013"), D("879.5"))
            await driver.configure_syringe(D("19.13"))
            with pytest.raises(PumpRejected, match=r"19.13 mm syringe this pump runs 0.013..879.5 mL/h") as info:
                await driver.set_rate(D("0.010"))
            assert info.value.code == "OOR"
            assert model.status().rate_ml_per_h == 0

    asyncio.run(asyncio.wait_for(body(), 30))


# ---- 7. firmware without safe mode; the reply timeout follows the baud rate -----


def test_firmware_without_safe_mode_answers_question_mark(clock: ManualClock) -> None:
    pump = NewEraPumpProtocol(PumpModel(clock), safe_mode_supported=False)
    assert ask(pump, "0SAF").error is ErrorCode.UNKNOWN_COMMAND
    assert ask(pump, "0SAF10").error is ErrorCode.UNKNOWN_COMMAND
    assert pump.handle(Frame(b"0SAF10", safe=True)) is None  # a safe frame is noise to it
    assert pump.model.status().deadman_s == 0


def test_driver_refuses_a_pump_without_safe_mode_by_default(clock: ManualClock) -> None:
    async def body() -> None:
        async with rig(clock, deadman_s=10, safe_mode=False) as (driver, model, _ep):
            with pytest.raises(DriverError, match="no safe mode"):
                await driver.connect()
            assert not driver.has_safe_mode
            assert model.status().deadman_s == 0

    asyncio.run(asyncio.wait_for(body(), 30))


def test_driver_runs_a_pump_without_safe_mode_when_allowed_and_warns(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with rig(clock, deadman_s=10, safe_mode=False, url_extra="&without_safe_mode=allow") as (
            driver,
            model,
            _ep,
        ):
            with caplog.at_level(logging.WARNING, logger="drivers.newera.driver"):
                await driver.connect()
            assert not driver.has_safe_mode
            assert any("NO DEAD-MAN" in r.getMessage() for r in caplog.records)
            await driver.set_rate(D(2))
            await driver.run()
            assert model.status().state is PumpState.INFUSING
            assert driver.transport.sent[-1] == b"0RUN\r"  # basic framing from then on

    asyncio.run(asyncio.wait_for(body(), 30))


def test_reply_timeout_scales_with_the_baud_rate() -> None:
    slow, fast = (
        open_driver(f"newera+socket://127.0.0.1:1?baud={baud}", DriverOptions(timeout_s=0.5)) for baud in (300, 19200)
    )
    assert isinstance(slow, NewEraDriver) and isinstance(fast, NewEraDriver)
    assert fast.timeout_s > 0.5 and slow.timeout_s > fast.timeout_s + 4  # 138 bytes at 300 baud: 4.6 s on the wire
    with pytest.raises(Exception, match="without_safe_mode"):
        open_driver("newera+socket://127.0.0.1:1?without_safe_mode=maybe")
