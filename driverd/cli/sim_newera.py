"""`driverd sim newera`: a simulated New Era pump on a pseudo-terminal or a loopback TCP port, real clock.

The first stdout line is the device path (``--pty``) or the TCP port (``--tcp``), so scripts and tests can
read it; the second is the driver URL. Runs until SIGINT/SIGTERM.
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
from drivers.newera.driver import BAUD_RATES
from simulators.clock import SystemClock
from simulators.faults import FaultPlan
from simulators.pump import PumpModel


def _decimal(text: str, name: str, maximum: Decimal, as_json: bool = False) -> Decimal:
    try:
        return parse_decimal(text, name, maximum=maximum, allow_zero=False)
    except QuantityError as exc:
        usage(f"--{name}: {exc}", as_json)


def newera(
    pty: Annotated[bool, typer.Option("--pty", help="serve on a new pseudo-terminal (prints its path)")] = False,
    tcp: Annotated[int | None, typer.Option("--tcp", help="serve on 127.0.0.1:PORT (0 = any free port)")] = None,
    host: Annotated[str, typer.Option("--host", help="TCP address to bind")] = "127.0.0.1",
    address: Annotated[int, typer.Option("--address", help="pump network address 0..99")] = 0,
    baud: Annotated[int, typer.Option("--baud", help="baud rate (for --wire-time and the URL)")] = 19200,
    wire_time: Annotated[
        bool, typer.Option("--wire-time", help="delay replies by the time their bytes take at --baud (8N1)")
    ] = False,
    faults: Annotated[
        Path | None, typer.Option("--faults", help="fault scenario TOML (see simulators/faults.py)")
    ] = None,
    drop_next: Annotated[int, typer.Option("--drop-next", help="drop the first N replies")] = 0,
    garble_next: Annotated[int, typer.Option("--garble-next", help="garble the first N replies")] = 0,
    fill: Annotated[str, typer.Option("--fill", help="syringe fill volume, mL")] = "17",
    diameter: Annotated[str, typer.Option("--diameter", help="syringe inner diameter, mm")] = "19.13",
    power_up: Annotated[
        bool,
        typer.Option(
            "--power-up/--no-power-up",
            help="start with the power-up reset alarm (A?R to the first packet; unprompted only in safe mode)",
        ),
    ] = True,
    safe_mode: Annotated[
        bool,
        typer.Option("--safe-mode/--no-safe-mode", help="--no-safe-mode: firmware without safe mode (SAF -> ?)"),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the endpoint as one JSON line "
                                                         '({"device" or "port", "url"}); errors as JSON')] = False,
) -> None:
    """Run a simulated New Era syringe pump that speaks the NE-1000 RS-232 protocol."""
    if pty == (tcp is not None):
        usage("give exactly one of --pty or --tcp PORT", as_json)
    if tcp is not None and not 0 <= tcp <= 65535:
        usage(f"--tcp: port must be 0..65535, got {tcp}", as_json)
    if not 0 <= address <= 99:
        usage(f"--address: must be 0..99, got {address}", as_json)
    if baud not in BAUD_RATES:
        usage(f"--baud: must be one of {', '.join(map(str, BAUD_RATES))}, got {baud}", as_json)
    if drop_next < 0 or garble_next < 0:
        usage("--drop-next/--garble-next: must be >= 0", as_json)
    fill_ml = _decimal(fill, "fill", MAX_VOLUME_ML, as_json)
    diameter_mm = _decimal(diameter, "diameter", MAX_DIAMETER_MM, as_json)
    try:
        model = PumpModel(SystemClock(), fill_volume_ml=fill_ml, diameter_mm=diameter_mm)
        plan = (
            FaultPlan.from_scenario(faults, alarm_hook=model.inject_alarm)
            if faults
            else FaultPlan(alarm_hook=model.inject_alarm)
        )
        if drop_next:
            plan.drop_next(drop_next)
        if garble_next:
            plan.garble_next(garble_next)
    except DriverdError as exc:
        fail(str(exc), as_json=as_json, code=EXIT_REFUSED)
    per_byte = 10 / baud if wire_time else None
    asyncio.run(
        _serve(
            model,
            plan,
            pty=pty,
            tcp=tcp,
            host=host,
            address=address,
            baud=baud,
            wire_time=per_byte,
            power_up=power_up,
            safe_mode=safe_mode,
            as_json=as_json,
        )
    )


async def _serve(
    model: PumpModel,
    plan: FaultPlan,
    *,
    pty: bool,
    tcp: int | None,
    host: str,
    address: int,
    baud: int,
    wire_time: float | None,
    power_up: bool,
    safe_mode: bool = True,
    as_json: bool = False,
) -> None:
    from simulators.newera import serve_newera  # imported late: keeps `driverd --help` fast

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve_newera(
        model,
        plan,
        pty=pty,
        tcp_port=tcp,
        host=host,
        address=address,
        wire_time=wire_time,
        power_up=power_up,
        safe_mode=safe_mode,
    ) as endpoint:
        first = endpoint.device if pty else str(endpoint.port)
        url = endpoint.url + (f"&baud={baud}" if pty else "")
        if as_json:
            emit_json({"device": endpoint.device, "url": url} if pty else {"port": endpoint.port, "url": url})
        else:
            typer.echo(first)
            typer.echo(url)
        await stop.wait()


def register(app: typer.Typer) -> None:
    """Add this protocol's `sim` command to the group."""
    app.command("newera")(newera)
