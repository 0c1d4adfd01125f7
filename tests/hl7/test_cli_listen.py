"""`driverd hl7 listen`: a real process on a loopback port ACKs (AA) what it receives and prints it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import hl7
from hl7.mllp import open_hl7_connection
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from typer.testing import CliRunner

from driverd.cli.main import app

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "driverd.cli.main", "hl7", "listen"]


def msg(cid: str, body: str = "OBX|1|NM|rate||1") -> str:
    return f"MSH|^~\\&|DRIVERD|WARD|PCD|HOSP|20260302120000||ORU^R01^ORU_R01|{cid}|P|2.6\r{body}\r"


async def _start(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(*CLI, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, cwd=REPO,
                                                env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    return proc, first


async def _stop(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _send(port: int, frames: list[bytes], replies: int) -> list[str]:
    reader, writer = await open_hl7_connection("127.0.0.1", port)
    for f in frames:
        writer.writeblock(f)
    await writer.drain()
    got = [(await asyncio.wait_for(reader.readblock(), 30)).decode("utf-8", "surrogateescape")
           for _ in range(replies)]
    writer.close()
    return got


def _check_ack(text: str, control_id: str) -> None:
    ack = hl7.parse(text)
    assert str(ack.segment("MSA")(1)) == "AA" and str(ack.segment("MSA")(2)) == control_id
    # an independent v2.6 parser agrees it is a valid ACK
    parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    assert parsed.name == "ACK" and parsed.validate()
    assert parsed.msa.msa_2.value == control_id


def test_listen_json_acks_and_prints_each_message() -> None:
    async def main() -> None:
        proc, first = await _start("0", "--json")
        try:
            port = json.loads(first)["listening"]["port"]
            assert json.loads(first)["listening"]["host"] == "127.0.0.1"
            frames = [msg("C1").encode(), b"hello, not HL7", msg("C2", "PID|||Zo\xeb\x1b[31m").encode("latin-1")]
            replies = await _send(port, frames, 2)  # nothing to ACK for the unreadable frame
            _check_ack(replies[0], "C1")
            assert str(hl7.parse(replies[1]).segment("MSA")(2)) == "C2"
        finally:
            code, out, err = await _stop(proc)
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[0] == {"type": "ORU^R01^ORU_R01", "control_id": "C1", "ack": "AA", "problem": None,
                            "segments": [msg("C1").split("\r")[0], "OBX|1|NM|rate||1"]}
        assert lines[1]["error"] == "unreadable message, not acknowledged"
        assert lines[2]["control_id"] == "C2" and "not valid UTF-8" in lines[2]["problem"]
        assert lines[2]["segments"][1] == "PID|||Zo\\xeb\\x1b[31m"  # shown escaped, never raw to a terminal

    asyncio.run(main())


def test_listen_text_prints_type_control_id_and_segments() -> None:
    async def main() -> None:
        proc, first = await _start("0", "--host", "127.0.0.1")
        try:
            assert first.startswith("listening on 127.0.0.1:")
            port = int(first.strip().rsplit(":", 1)[1])
            replies = await _send(port, [msg("T1", "PID|||P1\rOBX|1|NM|rate||2").encode()], 1)
            _check_ack(replies[0], "T1")
        finally:
            code, out, _err = await _stop(proc)
        assert code == 0
        assert out.splitlines() == [
            "ORU^R01^ORU_R01 T1 (3 segments, ACK AA)",
            "  " + msg("T1").split("\r")[0],
            "  PID|||P1",
            "  OBX|1|NM|rate||2",
        ]

    asyncio.run(main())


def test_listen_refuses_a_bad_port_and_a_busy_one() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["hl7", "listen", "70000"])
    assert result.exit_code == 2 and "PORT must be 0..65535" in result.output

    async def main() -> None:
        proc, first = await _start("0")
        try:
            port = first.strip().rsplit(":", 1)[1]
            busy = await asyncio.create_subprocess_exec(*CLI, port, "--json", stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE, cwd=REPO,
                                                        env={**os.environ, "PYTHONPATH": str(REPO)})
            out, _ = await asyncio.wait_for(busy.communicate(), 30)
            assert busy.returncode == 1
            assert json.loads(out)["ok"] is False and "cannot listen" in json.loads(out)["error"]["message"]
        finally:
            await _stop(proc)

    asyncio.run(main())


def test_hl7_group_is_on_the_main_cli() -> None:
    result = CliRunner().invoke(app, ["hl7", "--help"])
    assert result.exit_code == 0 and "listen" in result.output
