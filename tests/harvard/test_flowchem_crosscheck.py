"""Cross-check with flowchem's Elite 11 client (cambiegroup/flowchem, src/flowchem/devices/harvardapparatus/).

flowchem is not a driverd dependency (it pulls in a web framework and ~50 packages), so this replays the exact
bytes its client writes, as recorded from its source (``HarvardApparatusPumpIO._write``:
``f"{address}{command} {arguments}\\r\\n"``, the arguments as ``Elite11`` formats them), through the simulator's
own byte-level session, and reads the replies the way flowchem does (``_read_reply`` / ``parse_response_line``):
split at line feeds, strip, drop the first line and empty ones, then every line must start with the two-digit
address and a prompt character, and the body follows. A live run of flowchem 1.1.6 itself against
``driverd sim harvard`` is recorded in docs/simulators.md (tests/harvard/flowchem_live.py).
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import pytest

from simulators.clock import ManualClock
from simulators.faults import FaultPlan
from simulators.harvard import HarvardPumpProtocol, _Session, elite_model

ADDRESS = 6  # flowchem's parser needs a non-zero address (see test_flowchem_parser_needs_a_nonzero_address)
FLOWCHEM_STATUS = {":": "IDLE", ">": "INFUSING", "<": "WITHDRAWING", "T": "TARGET_REACHED", "*": "STALLED"}
QUANTITY = re.compile(r"\d+(\.\d+)? (ml|ul|nl|pl)/(min|hr|sec)")  # what pint parses in get_flow_rate / lim

# What Elite11.initialize() writes (stop, syringe diameter/volume, force, version, clear target), then a session.
INITIALIZE = [b"6stp \r\n", b"6diameter 19.1300 mm\r\n", b"6svolume 20.000000000000000 m\r\n", b"6FORCE 30\r\n",
              b"6VER \r\n", b"6cvolume \r\n", b"6ctvolume \r\n"]


def flowchem_lines(reply: bytes) -> list[str]:
    """HarvardApparatusPumpIO._read_reply: readlines, decode, strip, pop the first, drop empties."""
    lines = [part.decode("ascii").strip() for part in reply.splitlines(keepends=True)]
    lines.pop(0)
    return [x for x in lines if x]


def flowchem_parse(line: str, address: int) -> tuple[str, str]:
    """HarvardApparatusPumpIO.parse_response_line and the address assertion in write_and_read_reply."""
    assert len(line) >= 3
    assert int(line[0:2]) == address
    status = FLOWCHEM_STATUS[line[2:3]]
    return status, line[4:] if status == "TARGET_REACHED" else line[3:]


class Wire:
    def __init__(self, address: int = ADDRESS) -> None:
        self.model = elite_model(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        self.protocol = HarvardPumpProtocol(self.model, address=address)
        self.out: list[bytes] = []
        self.session = _Session(self.protocol, FaultPlan(), self.out.append, lambda: None)

    async def send(self, data: bytes) -> bytes:
        self.out.clear()
        await self.session.feed(data)
        return b"".join(self.out)


async def _exchange(wire: Wire, data: bytes) -> tuple[list[str], list[str]]:
    lines = flowchem_lines(await wire.send(data))
    assert lines, f"no reply to {data!r}"
    statuses, bodies = zip(*(flowchem_parse(line, ADDRESS) for line in lines), strict=True)
    assert "STALLED" not in statuses
    # check_for_errors looks at the last line only (the prompt), so an error would pass flowchem unnoticed:
    # check every line here instead.
    assert not any(e in b for b in bodies for e in ("Command error", "Unknown command", "Argument error")), bodies
    return list(statuses), list(bodies)


def test_flowchem_session_replays_cleanly() -> None:
    async def main() -> None:
        wire = Wire()
        # autodiscover_address(): "\r\n", then readline() -> b"\n", readline() -> the prompt, whose first two
        # characters are the address.
        reply = await wire.send(b"\r\n")
        first, prompt = reply.split(b"\n", 1)[0] + b"\n", reply.split(b"\n", 1)[1]
        assert first == b"\n" and int(prompt[0:2]) == ADDRESS
        for data in INITIALIZE:
            await _exchange(wire, data)
        _, body = await _exchange(wire, b"6VER \r\n")
        assert body[0] == "11 ELITE I Single 3.0.4" and "I/W" not in body[0]  # -> Elite11PumpOnly
        _, body = await _exchange(wire, b"6diameter \r\n")
        assert body[0] == "19.1300 mm"  # as flowchem's hardware test expects ("10.0000 mm" for 10 mm)
        _, body = await _exchange(wire, b"6svolume \r\n")
        assert body[0] == "20 ml"  # flowchem's hardware test: "10 ml"
        _, body = await _exchange(wire, b"6FORCE \r\n")
        assert int(body[0][:-1]) == 30  # get_force: percent[:-1]
        # set_flow_rate("0.05 ml/min"): irate lim, then the bounded rate with 10 decimals in m/m
        _, body = await _exchange(wire, b"6irate lim \r\n")
        lo, hi = body[0].split(" to ")
        assert QUANTITY.fullmatch(lo) and QUANTITY.fullmatch(hi)
        await _exchange(wire, b"6irate 0.0500000000 m/m\r\n")
        _, body = await _exchange(wire, b"6irate \r\n")
        assert body[0] == "0.05 ml/min" and QUANTITY.fullmatch(body[0])
        status, _ = await _exchange(wire, b"6  \r\n")  # is_moving(): raw line, prompt at [2:3]
        assert status[-1] == "IDLE"
        await _exchange(wire, b"6irun \r\n")
        status, _ = await _exchange(wire, b"6  \r\n")
        assert status[-1] == "INFUSING"
        _, body = await _exchange(wire, b"6crate \r\n")
        assert body[0] == "Infusing at 0.05 ml/min"  # get_current_flow_rate: partition(" at ")
        await _exchange(wire, b"6stp \r\n")
        status, _ = await _exchange(wire, b"6  \r\n")
        assert status[-1] == "IDLE"
        _, body = await _exchange(wire, b"6metrics \r\n")
        assert any(line.startswith("Pump type string") for line in body)
        assert [line for line in body if line.startswith("Direction")] == ["Direction          Infuse"]
        assert wire.model.status().rate_ml_per_h == 3  # 0.05 mL/min, exactly

    asyncio.run(main())


def test_flowchem_parser_needs_a_nonzero_address() -> None:
    """Manual p. 52: a pump at address 0 prefixes nothing, so flowchem's parse_response_line cannot read it
    (it asserts len >= 3 and takes the first two characters as the address). flowchem 1.1.6 live against our
    simulator at address 0 fails the same way in initialize()."""

    async def main() -> None:
        wire = Wire(address=0)
        lines = flowchem_lines(await wire.send(b"0stp \r\n"))
        assert lines == [":"]
        with pytest.raises(AssertionError):
            flowchem_parse(lines[0], 0)

    asyncio.run(main())


def test_flowchem_argument_error_is_in_the_reply_but_not_on_the_last_line() -> None:
    """flowchem's check_for_errors reads the last line, which is always the prompt: the error lines are there."""

    async def main() -> None:
        wire = Wire()
        lines = flowchem_lines(await wire.send(b"6irate 1000000.0000000000 m/m\r\n"))
        bodies = [flowchem_parse(line, ADDRESS)[1] for line in lines]
        assert bodies == ["Argument error: 1000000.0000000000 m/m", "   Out of range", ""]

    asyncio.run(main())
