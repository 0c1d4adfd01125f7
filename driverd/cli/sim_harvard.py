"""`driverd sim harvard`: a simulated Harvard Apparatus Pump 11 Elite on a pseudo-terminal or a loopback TCP port.

The first stdout line is the device path (``--pty``) or the TCP port (``--tcp``); the second is the driver URL.
Runs until SIGINT/SIGTERM, on the real clock.
"""

from __future__ import annotations

import asyncio
import signal
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import typer

from driverd.cli.output import EXIT_REFUSED, emit_json, fail, usage
from driverd.core.errors import DriverdError, QuantityError
from driverd.core.quantities import MAX_DIAMETER_MM, MAX_VOLUME_ML, parse_decimal
from drivers.harvard.driver import BAUD_RATES
from simulators.clock import SystemClock
from simulators.faults import FaultPlan
from simulators.pump import PumpModel


def _decimal(text: str, name: str, maximum: Decimal, as_json: bool = False) -> Decimal:
    try:
        return parse_decimal(text, name, maximum=maximum, allow_zero=False)
    except QuantityError as exc:
        usage(f"--{name}: {exc}", as_json)


def harvard(
    pty: Annotated[bool, typer.Option("--pty", help="serve on a new pseudo-terminal (prints its path)")] = False,
    tcp: Annotated[int | None, typer.Option("--tcp", help="serve on 127.0.0.1:PORT (0 = any free port)")] = None,
    host: Annotated[str, typer.Option("--host", help="TCP address to bind")] = "127.0.0.1",
    address: Annotated[int, typer.Option("--address", help="pump chain address 0..99")] = 0,
    baud: Annotated[int, typer.Option("--baud", help="baud rate (for --wire-time and the URL)")] = 115200,
    wire_time: Annotated[
        bool, typer.Option("--wire-time", help="delay replies by the time their bytes take at --baud (8N1)")
    ] = False,
    faults: Annotated[
        Path | None, typer.Option("--faults", help="fault scenario TOML (see simulators/faults.py)")
    ] = None,
    fill: Annotated[str, typer.Option("--fill", help="syringe fill volume, mL")] = "17",
    diameter: Annotated[str, typer.Option("--diameter", help="syringe inner diameter, mm")] = "19.13",
    as_json: Annotated[bool, typer.Option("--json", help="print the endpoint as one JSON line "
                                          "({device|port, url}); errors as JSON")] = False,
) -> None:
    """Run a simulated Harvard Apparatus Pump 11 Elite that speaks its pump-chain ASCII protocol."""
    from simulators.harvard import elite_model_kwargs

    if pty == (tcp is not None):
        usage("give exactly one of --pty or --tcp PORT", as_json)
    if tcp is not None and not 0 <= tcp <= 65535:
        usage(f"--tcp: port must be 0..65535, got {tcp}", as_json)
    if not 0 <= address <= 99:
        usage(f"--address: must be 0..99, got {address}", as_json)
    if baud not in BAUD_RATES:
        usage(f"--baud: must be one of {', '.join(map(str, BAUD_RATES))}, got {baud}", as_json)
    fill_ml = _decimal(fill, "fill", MAX_VOLUME_ML, as_json)
    diameter_mm = _decimal(diameter, "diameter", MAX_DIAMETER_MM, as_json)
    try:
        model = PumpModel(SystemClock(), fill_volume_ml=fill_ml, diameter_mm=diameter_mm, **elite_model_kwargs())
        plan = (
            FaultPlan.from_scenario(faults, alarm_hook=model.inject_alarm)
            if faults
            else FaultPlan(alarm_hook=model.inject_alarm)
        )
        if wire_time:
            plan.set_baud(baud)
    except DriverdError as exc:
        fail(str(exc), as_json=as_json, code=EXIT_REFUSED)
    asyncio.run(_serve(model, plan, pty=pty, tcp=tcp, host=host, address=address, baud=baud, as_json=as_json))


async def _serve(model: PumpModel, plan: FaultPlan, *, pty: bool, tcp: int | None, host: str, address: int,
                 baud: int, as_json: bool = False) -> None:
    from simulators.harvard import serve_harvard  # imported late: keeps `driverd --help` fast

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve_harvard(model, plan, pty=pty, tcp_port=tcp, host=host, address=address) as endpoint:
        url = endpoint.url + (f"&baud={baud}" if pty else "")
        if as_json:
            emit_json({"device": endpoint.device, "url": url} if pty else {"port": endpoint.port, "url": url})
        else:
            typer.echo(endpoint.device if pty else str(endpoint.port))
            typer.echo(url)
        await stop.wait()


def register(app: typer.Typer) -> None:
    """Add this protocol's `sim` command to the group."""
    app.command("harvard")(harvard)
