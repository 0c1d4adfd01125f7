"""`driverd hl7 ...`: tools for integrators connecting a ward engine to driverd over HL7 v2.6 / MLLP.

`listen PORT` is a small receiver that ACKs (AA) every message and prints what arrives: point driverd's
`observations_to` (or an engine's channel) at it to see the PCD-01/PCD-04 traffic. The first stdout line is
``listening on HOST:PORT`` (``--json``: ``{"listening": {"host": ..., "port": ...}}``), so a script can use
PORT 0 and read the port. Runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import re
import signal
from typing import Annotated

import hl7 as pyhl7
import typer

from driverd.cli.hl7_send import send_test
from driverd.cli.output import EXIT_REFUSED, emit_json, fail, usage

app = typer.Typer(help="HL7 v2.6 / MLLP tools for integrators.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def _show(text: str) -> str:
    """Text safe to print on a terminal: control characters and undecodable bytes as \\xNN."""
    def esc(m: re.Match[str]) -> str:
        c = ord(m.group())
        return f"\\x{c - 0xDC00 if c >= 0xDC00 else c:02x}"

    return _UNPRINTABLE.sub(esc, text)


@app.command("listen")
def listen(
    port: Annotated[int, typer.Argument(help="TCP port to listen on (0: any free port, printed).")],
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    as_json: JsonOpt = False,
) -> None:
    """Receive HL7 messages over MLLP, ACK each one (AA) and print it: type, control id, segments."""
    if not 0 <= port <= 65535:
        usage(f"PORT must be 0..65535, got {port}")
    try:
        asyncio.run(_listen(host, port, as_json))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", as_json=as_json, code=EXIT_REFUSED)


async def _listen(host: str, port: int, as_json: bool) -> None:
    from driverd.hl7.mllp import Send, serve_orders, undecodable  # late: keeps `driverd --help` fast

    async def handle(text: str, send: Send) -> None:
        problem = undecodable(text)
        try:
            msg = pyhl7.parse(text)
            msh = msg.segment("MSH")
            kind, control_id = str(msh(9)), str(msh(10))
            segments = [str(seg) for seg in msg]
            ack = str(msg.create_ack("AA"))
        except Exception as exc:  # not an HL7 message: nothing to ACK (no MSH-10 to name)
            reason = f"{type(exc).__name__}: {exc}"
            if as_json:
                emit_json({"error": "unreadable message, not acknowledged", "detail": _show(reason)[:500],
                           "bytes": len(text)})
            else:
                typer.echo(f"unreadable message ({len(text)} characters), not acknowledged: {_show(reason)[:500]}")
            return
        await send(ack)
        if as_json:
            emit_json({"type": _show(kind), "control_id": _show(control_id), "segments": [_show(s) for s in segments],
                       "ack": "AA", "problem": problem})
        else:
            typer.echo(f"{_show(kind)} {_show(control_id)} ({len(segments)} segments, ACK AA)"
                       + (f" warning: {problem}" if problem else ""))
            for seg in segments:
                typer.echo(f"  {_show(seg)}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with await serve_orders(handle, host, port) as server:
        bound = server.sockets[0].getsockname()
        if as_json:
            emit_json({"listening": {"host": bound[0], "port": bound[1]}})
        else:
            typer.echo(f"listening on {bound[0]}:{bound[1]}")
        await stop.wait()


app.command("send-test")(send_test)
