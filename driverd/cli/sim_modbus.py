"""`driverd sim modbus`: simulated Modbus pumps (one per unit id) behind one TCP port or RTU on a PTY, real clock.

The first stdout line is the TCP port (``--tcp``) or the device path (``--pty``), so scripts and tests can read
it; then one driver URL per unit. Runs until SIGINT/SIGTERM. Pumps are named ``modbus-<unit>``.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import Annotated

import typer

from driverd.cli.output import EXIT_REFUSED, emit_json, fail, usage
from driverd.core.errors import DriverdError
from drivers.modbus.regmap import RegisterMap, load_map
from simulators.clock import SystemClock
from simulators.faults import FaultPlan
from simulators.world import World


def parse_units(text: str, as_json: bool = False) -> list[int]:
    """ "1,2,3" -> [1, 2, 3]; unit ids 1..247, no duplicates (usage error otherwise)."""
    if not re.fullmatch(r"\s*\d{1,3}(\s*,\s*\d{1,3})*\s*", text):
        usage(f"--units: expected comma-separated unit ids like 1,2,3, got {text!r}", as_json)
    units = [int(u) for u in text.split(",")]
    bad = [u for u in units if not 1 <= u <= 247]
    if bad:
        usage(f"--units: unit ids are 1..247, got {bad[0]}", as_json)
    if len(set(units)) != len(units):
        usage("--units: a unit id is listed twice", as_json)
    return units


def modbus(
    tcp: Annotated[int | None, typer.Option("--tcp", help="serve Modbus TCP on HOST:PORT (0 = any free port)")] = None,
    pty: Annotated[
        bool, typer.Option("--pty", help="serve Modbus RTU on a new pseudo-terminal (prints its path)")
    ] = False,
    host: Annotated[str, typer.Option("--host", help="TCP address to bind")] = "127.0.0.1",
    units: Annotated[str, typer.Option("--units", help="unit ids served, comma-separated")] = "1",
    faults: Annotated[
        Path | None, typer.Option("--faults", help="fault scenario TOML applied to each unit (simulators/faults.py)")
    ] = None,
    regmap: Annotated[Path | None, typer.Option("--map", help="register map TOML (default: the shipped map)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the endpoint as one JSON line "
                                                         '({"port" or "device", "urls"}); errors as JSON')] = False,
) -> None:
    """Run simulated syringe pumps that speak Modbus (TCP, or RTU on a PTY), one per unit id."""
    if pty == (tcp is not None):
        usage("give exactly one of --tcp PORT or --pty", as_json)
    if tcp is not None and not 0 <= tcp <= 65535:
        usage(f"--tcp: port must be 0..65535, got {tcp}", as_json)
    unit_ids = parse_units(units, as_json)
    world = World(SystemClock())
    try:
        the_map = load_map(regmap) if regmap else load_map()
        plans: dict[int, FaultPlan] = {}
        for unit in unit_ids:
            name = f"modbus-{unit}"
            plan = FaultPlan.from_scenario(faults) if faults else FaultPlan()
            plans[unit] = world.set_faults(name, plan)
    except DriverdError as exc:
        fail(str(exc), as_json=as_json, code=EXIT_REFUSED, error_code="config")
    asyncio.run(_serve(world, {u: f"modbus-{u}" for u in unit_ids}, plans, tcp=tcp, pty=pty, host=host, regmap=the_map,
                       as_json=as_json))


async def _serve(
    world: World,
    unit_ids: dict[int, str],
    plans: dict[int, FaultPlan],
    *,
    tcp: int | None,
    pty: bool,
    host: str,
    regmap: RegisterMap,
    as_json: bool = False,
) -> None:
    from simulators.modbus import serve_modbus  # imported late (pymodbus): keeps `driverd --help` fast

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = (
        serve_modbus(world, unit_ids, plans, pty=True, regmap=regmap)
        if pty
        else (serve_modbus(world, unit_ids, plans, tcp_port=tcp, host=host, regmap=regmap))
    )
    async with server as endpoint:
        if as_json:
            where: dict[str, object] = {"device": endpoint.path} if pty else {"port": endpoint.port}
            emit_json({**where, "urls": [endpoint.url(unit) for unit in unit_ids]})
        else:
            typer.echo(endpoint.path if pty else str(endpoint.port))
            for unit in unit_ids:
                typer.echo(endpoint.url(unit))
        await stop.wait()


def register(app: typer.Typer) -> None:
    """Add this protocol's `sim` command to the group."""
    app.command("modbus")(modbus)
