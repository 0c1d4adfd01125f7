"""`driverd sim newera`: a simulated New Era pump on a pseudo-terminal or a loopback TCP port, real clock.

The first stdout line is the device path (``--pty``) or the TCP port (``--tcp``), so scripts and tests can
read it; the second is the driver URL (then ``control: PATH`` with ``--control``). Every fault that fires prints a
``fault:`` line. ``--json``: one JSON object a line instead (``listening``, ``fault``, ``stopped``). Faults can be
triggered while it runs: ``driverd sim fault --control PATH cut`` (simulators/control.py). Runs until
SIGINT/SIGTERM. A port in use is a one-line error, exit 1.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Annotated, Any

import typer

from driverd.cli.output import usage
from driverd.cli.sim_console import SimConsole, check_serial_endpoint, decimal_option, run_simulator
from driverd.core.errors import DriverdError
from driverd.core.quantities import MAX_DIAMETER_MM, MAX_VOLUME_ML
from drivers.base import AlarmKind
from drivers.newera.driver import BAUD_RATES
from simulators.clock import SystemClock
from simulators.faults import FaultPlan
from simulators.pump import PumpModel


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
    control: Annotated[
        Path | None,
        typer.Option("--control", help="unix socket for run-time faults (driverd sim fault --control PATH ...)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="status lines as JSON objects, one a line (first the "
                                                         "endpoint: port or device, url(s)); errors as JSON")] = False,
) -> None:
    """Run a simulated New Era syringe pump that speaks the NE-1000 RS-232 protocol."""
    console = SimConsole(as_json=as_json)
    check_serial_endpoint(pty, tcp, address, baud, BAUD_RATES, as_json)
    if drop_next < 0 or garble_next < 0:
        usage("--drop-next/--garble-next: must be >= 0", as_json)
    fill_ml = decimal_option(fill, "fill", MAX_VOLUME_ML, as_json)
    diameter_mm = decimal_option(diameter, "diameter", MAX_DIAMETER_MM, as_json)
    try:
        model = PumpModel(SystemClock(), fill_volume_ml=fill_ml, diameter_mm=diameter_mm)

        def alarm_hook(kind: AlarmKind) -> None:
            # A power interruption is more than a flag: it also disarms the dead-man (as World does).
            if kind is AlarmKind.POWER_INTERRUPTED:
                model.power_cycle()
            else:
                model.inject_alarm(kind)

        plan = FaultPlan.from_scenario(faults, alarm_hook=alarm_hook) if faults else FaultPlan(alarm_hook=alarm_hook)
        plan.on_event = lambda ev: console.fault(f"newera-{address}", ev)
        if drop_next:
            plan.drop_next(drop_next)
        if garble_next:
            plan.garble_next(garble_next)
    except DriverdError as exc:
        console.error(str(exc))
    per_byte = 10 / baud if wire_time else None
    from simulators.newera import Endpoint, serve_newera  # imported late: keeps `driverd --help` fast

    def describe(endpoint: Endpoint) -> tuple[str, list[str], dict[str, Any]]:
        extra: dict[str, Any] = {"device": endpoint.device} if pty else {"port": endpoint.port}
        return ((endpoint.device if pty else str(endpoint.port)) or "",
                [endpoint.url + (f"&baud={baud}" if pty else "")], extra)

    def open_server() -> AbstractAsyncContextManager[Endpoint]:
        return serve_newera(model, plan, pty=pty, tcp_port=tcp, host=host, address=address, wire_time=per_byte,
                            power_up=power_up, safe_mode=safe_mode)

    run_simulator(console, open_server, describe, tcp=tcp, host=host, control=control, plans={address: plan})


def register(app: typer.Typer) -> None:
    """Add this protocol's `sim` command to the group."""
    app.command("newera")(newera)
