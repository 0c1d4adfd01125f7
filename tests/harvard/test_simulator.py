"""The Pump 11 Elite simulator on its own: what the manual says (pp. 52-58) and the documented conventions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.core.quantities import quantize_down
from drivers.base import AlarmKind, PumpState
from drivers.harvard.codec import ELITE_RATE_RESOLUTION, format_rate, parse_rate, parse_status
from simulators.clock import ManualClock
from simulators.faults import FaultPlan
from simulators.harvard import HarvardPumpProtocol, _Session, elite_model

D = Decimal


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 1, 1, tzinfo=UTC))


def pump(clock: ManualClock, address: int = 0, poll: bool = False) -> HarvardPumpProtocol:
    return HarvardPumpProtocol(elite_model(clock), address=address, poll=poll)


def ask(p: HarvardPumpProtocol, line: str) -> bytes | None:
    return p.handle(line.encode("ascii"))


def test_prompts_and_address_prefixes(clock: ManualClock) -> None:
    p = pump(clock, address=12)
    assert ask(p, "12") == b"\n12:"  # "pump address<CR>": the pump answers with its prompt
    assert ask(p, "") == b"\n12:"  # no address on a direct USB link: answered too
    assert ask(p, "3ver") is None  # another pump's command: silent
    assert ask(p, "12ver") == b"\n12:11 ELITE I Single 3.0.4\r\n12:"
    assert ask(p, "12irate 1 m/h") == b"\n12:"
    assert ask(p, "12irun") == b"\n12>"
    p.poll = True
    assert ask(p, "12") == b"\n12>\x11"  # poll mode: XON after the prompt


def test_four_letter_abbreviations_case_and_fast_prefix(clock: ManualClock) -> None:
    p = pump(clock)
    assert ask(p, "DIAM 14.43") == b"\n:"
    assert ask(p, "@irat 2.5 ul/min") == b"\n:"
    assert ask(p, "diameter") == b"\n14.4300 mm\r\n:"
    assert ask(p, "irate") == b"\n2.5 ul/min\r\n:"
    assert ask(p, "addr") == b"\nPump address is 0\r\n:"
    assert ask(p, "ir") == b"\nCommand error:\r\n   Unknown command\r\n:"  # too short to be an abbreviation


def test_values_keep_four_significant_digits_and_four_decimal_diameters(clock: ManualClock) -> None:
    p = pump(clock)
    assert ask(p, "diameter 14.56789 mm") == b"\n:"
    assert p.model.status().diameter_mm == D("14.5679")
    assert ask(p, "irate 3.14159265 m/m") == b"\n:"
    assert ask(p, "irate") == b"\n3.142 ml/min\r\n:"
    assert p.model.status().rate_ml_per_h == D("188.52")


@pytest.mark.parametrize(
    ("line", "first"),
    [
        ("diameter 33.1", "Argument error: 33.1"),
        ("diameter 0.05", "Argument error: 0.05"),
        ("diameter abc", "Argument error: abc"),
        ("irate 5 m/d", "Argument error: 5 m/d"),
        ("irate -1 m/h", "Argument error: -1 m/h"),
        ("irate 0 m/h", "Argument error: 0 m/h"),
        ("irate 1e2 m/h", "Argument error: 1e2 m/h"),
        ("poll maybe", "Argument error: maybe"),
        ("force 101", "Argument error: 101"),
        ("address 100", "Argument error: 100"),
        ("wrun", "Command error:"),
        ("tvolume 1 m", "Command error:"),
        ("xyzzy", "Command error:"),
    ],
)
def test_errors_are_two_lines_and_change_nothing(clock: ManualClock, line: str, first: str) -> None:
    p = pump(clock)
    before = p.model.status()
    reply = ask(p, line)
    assert reply is not None
    lines = reply.decode().split("\n")[1:]
    assert lines[0] == first + "\r" and lines[1].startswith("   ") and lines[2] == ":"
    after = p.model.status()
    assert (after.rate_ml_per_h, after.diameter_mm, after.state) == (before.rate_ml_per_h, before.diameter_mm,
                                                                      before.state)


def test_rate_range_follows_the_bore(clock: ManualClock) -> None:
    """Appendix B: a 60 mL syringe (26.59 mm) runs 85.05 nl/min .. 88.32 mL/min (the mechanism gives 85.03/88.30)."""
    p = pump(clock)
    ask(p, "diameter 26.59")
    ask(p, "irate 1 m/m")
    assert ask(p, "irate lim") == b"\n0.00008503 ml/min to 88.29 ml/min\r\n:"
    ask(p, "irate 100 n/m")
    assert ask(p, "irate lim") == b"\n85.03 nl/min to 88290000 nl/min\r\n:"
    assert ask(p, "irate 85 n/m") is not None and p.model.status().rate_ml_per_h == D("0.006")  # refused
    assert ask(p, "irate 85.03 n/m") == b"\n:"


def test_status_reports_femtolitres_and_flags(clock: ManualClock) -> None:
    p = pump(clock)
    ask(p, "irate 36 m/h")
    ask(p, "irun")
    clock.advance(2)
    reply = ask(p, "status")
    assert reply is not None
    raw = parse_status(reply.decode().split("\n")[1].rstrip("\r"))
    assert raw.running and not raw.stalled and raw.volume_fl == 20_000_000_000 and raw.rate_fl_per_s == 10**10
    assert raw.time_cycles == 2 * 56_000_000
    ask(p, "stp")
    reply = ask(p, "status")
    assert reply is not None and reply.decode().split("\n")[1].endswith(" i...I.\r")


def test_stall_is_shown_until_the_screen_is_touched(clock: ManualClock) -> None:
    p = pump(clock)
    ask(p, "irate 1 m/h")
    ask(p, "irun")
    p.model.inject_alarm(AlarmKind.OCCLUSION)
    assert ask(p, "") == b"\n*"
    assert ask(p, "irun") == b"\nCommand error:\r\n   Motor stalled\r\n*"
    assert ask(p, "stp") == b"\n*"  # stop always works; the stall stays
    assert p.poll_unsolicited() == b"\n*"  # outside poll mode announced once, unasked
    assert p.poll_unsolicited() is None
    p.touch_screen()
    assert ask(p, "") == b"\n:" and p.model.status().state is PumpState.STOPPED


def test_no_unasked_prompt_in_poll_mode(clock: ManualClock) -> None:
    p = pump(clock, poll=True)
    p.model.inject_alarm(AlarmKind.OCCLUSION)
    assert p.poll_unsolicited() is None
    assert ask(p, "") == b"\n*\x11"


def test_power_up_resets_the_counters_and_keeps_the_settings(clock: ManualClock) -> None:
    """Manual p. 27: "Elapsed Timers and Total Infused Volume will be reset when power resumes"."""
    p = pump(clock)
    ask(p, "diameter 21.59")
    ask(p, "irate 36 m/h")
    ask(p, "irun")
    clock.advance(10)
    assert ask(p, "ivolume") == b"\n100 ul\r\n>"
    p.model.power_cycle()
    assert ask(p, "") == b"\n:"  # idle, no alarm on the wire
    assert ask(p, "ivolume") == b"\n0 ul\r\n:" and ask(p, "itime") == b"\n0 seconds\r\n:"
    assert ask(p, "irate") == b"\n36 ml/hr\r\n:" and ask(p, "diameter") == b"\n21.5900 mm\r\n:"


def test_settings_refused_while_running(clock: ManualClock) -> None:
    p = pump(clock)
    ask(p, "irate 1 m/h")
    ask(p, "irun")
    assert ask(p, "diameter 12") == b"\nCommand error:\r\n   Not allowed while running\r\n>"
    assert ask(p, "irate 2 m/h") == b"\n>"  # the rate may change while running


@pytest.mark.parametrize("data", [b"irate \xff\r", b"\x00\x01\r", b"x" * 300])
def test_noise_on_the_line_never_crashes_the_session(clock: ManualClock, data: bytes) -> None:
    p = pump(clock)
    out: list[bytes] = []
    session = _Session(p, FaultPlan(), out.append, lambda: None)

    async def main() -> None:
        await session.feed(data)
        await session.feed(b"ver\r")

    asyncio.run(main())
    assert out[-1] == b"\n11 ELITE I Single 3.0.4\r\n:"


def test_echo_mode_echoes_what_the_host_types(clock: ManualClock) -> None:
    p = pump(clock)
    out: list[bytes] = []
    session = _Session(p, FaultPlan(), out.append, lambda: None)

    async def main() -> None:
        await session.feed(b"echo on\r")
        await session.feed(b"ver\r")

    asyncio.run(main())
    assert out[1:] == [b"ver\r", b"\n11 ELITE I Single 3.0.4\r\n:"]


@given(st.decimals(min_value=D("0.0027"), max_value=D("2742"), places=4))
def test_every_rate_the_kernel_can_send_reads_back_unchanged(wanted: Decimal) -> None:
    """The driver's resolution (4 digits, 4 decimals) is inside what the pump keeps (4 significant digits)."""
    rate = quantize_down(wanted, ELITE_RATE_RESOLUTION)
    p = pump(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
    assert p.handle(f"irate {format_rate(rate)} m/h".encode()) == b"\n:"
    reply = p.handle(b"irate")
    assert reply is not None
    assert parse_rate(reply.decode().split("\n")[1].rstrip("\r")) == rate == p.model.status().rate_ml_per_h
