"""`driverd sim modbus`: simulated Modbus pumps (one per unit id) behind one TCP port or RTU on a PTY, real clock.

The first stdout line is the TCP port (``--tcp``) or the device path (``--pty``), so scripts and tests can read
it; then one driver URL per unit (then ``control: PATH`` with ``--control``). Every fault that fires prints a
``fault:`` line; ``--json`` prints one JSON object a line instead (``listening``, ``fault``, ``stopped``). Faults
can be triggered while it runs: ``driverd sim fault --control PATH [--unit N] cut`` (simulators/control.py).
pymodbus's own log records come out as one line each on stderr, never as raw text or a traceback. A port in use
is a one-line error, exit 1. Runs until SIGINT/SIGTERM. Pumps are named ``modbus-<unit>``.
"""

from __future__ import annotations

import functools
import re
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Annotated, Any

import typer

from driverd.cli.output import usage
from driverd.cli.sim_console import SimConsole, run_simulator
from driverd.core.errors import DriverdError
from drivers.modbus.regmap import load_map
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
    control: Annotated[
        Path | None,
        typer.Option("--control", help="unix socket for run-time faults (driverd sim fault --control PATH ...)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="status lines as JSON objects, one a line (first the "
                                                         "endpoint: port or device, url(s)); errors as JSON")] = False,
) -> None:
    """Run simulated syringe pumps that speak Modbus (TCP, or RTU on a PTY), one per unit id."""
    console = SimConsole(as_json=as_json)
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
            plan.on_event = functools.partial(console.fault, name)
            plans[unit] = world.set_faults(name, plan)
    except DriverdError as exc:
        console.error(str(exc), error_code="config")
    from simulators.modbus import ModbusEndpoint, serve_modbus  # imported late (pymodbus): keeps `driverd --help` fast

    names = {u: f"modbus-{u}" for u in unit_ids}

    def open_server() -> AbstractAsyncContextManager[ModbusEndpoint]:
        if pty:
            return serve_modbus(world, names, plans, pty=True, regmap=the_map)
        return serve_modbus(world, names, plans, tcp_port=tcp, host=host, regmap=the_map)

    def describe(endpoint: ModbusEndpoint) -> tuple[str, list[str], dict[str, Any]]:
        extra: dict[str, Any] = {"device": endpoint.path} if pty else {"port": endpoint.port}
        return endpoint.path if pty else str(endpoint.port), [endpoint.url(u) for u in unit_ids], extra

    run_simulator(console, open_server, describe, tcp=tcp, host=host, control=control, plans=plans)


def register(app: typer.Typer) -> None:
    """Add this protocol's `sim` command to the group."""
    app.command("modbus")(modbus)
