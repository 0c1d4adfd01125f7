"""`driverd hl7 send-test HOST:PORT`: send one PCD-01 observation of a made-up pump to a receiver, await its ACK.

For an integrator setting up a channel (Mirth, Rhapsody...): it shows that the engine receives our messages and
answers them, before any pump or course is involved. The message is built by the same code the daemon uses.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import typer

from driverd.cli.output import EXIT_REFUSED, emit_json, fail, usage


def send_test(
    target: Annotated[str, typer.Argument(metavar="HOST:PORT", help="The receiver's MLLP address")],
    pump: Annotated[str, typer.Option(help="Pump id to put in OBX-18")] = "TEST-PUMP-1",
    timeout: Annotated[float, typer.Option(min=0.1, max=600, help="Seconds to wait for the ACK")] = 10.0,
    sending_application: Annotated[str, typer.Option(help="MSH-3")] = "DRIVERD",
    sending_facility: Annotated[str, typer.Option(help="MSH-4")] = "DRIVERD",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result")] = False,
) -> None:
    """Send one test observation (PCD-01, ORU^R01) and wait for the receiver's ACK."""
    from hl7.mllp import InvalidBlockError

    from driverd.core.errors import DriverdError, Problem
    from driverd.hl7.settings import parse_address, valid_name

    problems: list[Problem] = []
    address = parse_address(target, "HOST:PORT", problems)
    if address is None:
        usage(str(problems[0]))
    for name, value in (("--sending-application", sending_application), ("--sending-facility", sending_facility)):
        if not valid_name(value):
            usage(f"{name}: 1-64 letters, digits, space, '.', '-' or '_'")
    if not pump or len(pump) > 64:
        usage("--pump: 1-64 characters")
    try:
        result = asyncio.run(_send(address.host, address.port, pump, timeout, sending_application,
                                   sending_facility))
    except (OSError, TimeoutError, EOFError, ValueError, InvalidBlockError, DriverdError) as exc:
        # ValueError: an over-long reply; InvalidBlockError: no MLLP block; DriverdError: a reply that is no ACK
        what = "no ACK within the timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        fail(f"{address}: {what}", as_json=as_json, code=EXIT_REFUSED)
    ok = result["ack_code"] in ("AA", "CA")
    if as_json:
        emit_json({"ok": ok, **result})
    else:
        typer.echo(f"sent {result['message_type']} {result['control_id']} to {address}: ACK {result['ack_code']}"
                   + (f" ({result['ack_text']})" if result["ack_text"] else ""))
    if not ok:
        raise typer.Exit(EXIT_REFUSED)


async def _send(host: str, port: int, pump: str, wait_s: float, app: str, facility: str) -> dict[str, Any]:
    from hl7.mllp import open_hl7_connection

    from driverd.hl7.messages import observation_message, parse_ack
    from driverd.hl7.model import Endpoint, Observation

    at = datetime.now(UTC)
    control_id = f"TEST{at:%Y%m%d%H%M%S%f}"[:20]
    obs = Observation(at=at, pump_id=pump, pump_model="driverd send-test", course_id=None, patient_ref=None,
                      drug_name=None, concentration_mg_per_ml=None, phase="idle", pump_state="stopped",
                      rate_ml_per_h=Decimal(0), commanded_ml_per_h=Decimal(0), dose_mg_per_24h=Decimal(0),
                      delivered_ml=Decimal(0), link="up")
    text = observation_message(obs, control_id, Endpoint(app, facility), Endpoint("", ""))
    async with asyncio.timeout(wait_s):
        reader, writer = await open_hl7_connection(host, port, encoding="utf-8")
        try:
            writer.writeblock(text.encode("utf-8"))
            await writer.drain()
            while True:  # an ACK for another message (a confused receiver) is skipped, not taken for ours
                ack = parse_ack((await reader.readblock()).decode("utf-8", "replace"))
                if ack.acked_control_id == control_id:
                    break
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return {"control_id": control_id, "message_type": "ORU^R01", "to": f"{host}:{port}", "ack_code": ack.code,
            "ack_text": ack.text, "message": text.split("\r")}
