"""`driverd sim harvard`: a simulated Harvard Apparatus Pump 11 Elite on a pseudo-terminal or a loopback TCP port.

The first stdout line is the device path (``--pty``) or the TCP port (``--tcp``); the second is the driver URL
(then ``control: PATH`` with ``--control``). Every fault that fires prints a ``fault:`` line; ``--json`` prints one
JSON object a line instead. Faults can be triggered while it runs: ``driverd sim fault --control PATH cut``. A port
in use is a one-line error, exit 1. Runs until SIGINT/SIGTERM, on the real clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from driverd.cli.sim_console import SimConsole, check_serial_endpoint, decimal_option, run_simulator
from driverd.core.errors import DriverdError
from driverd.core.quantities import MAX_DIAMETER_MM, MAX_VOLUME_ML
from drivers.harvard.driver import BAUD_RATES
from simulators.clock import SystemClock
from simulators.faults import FaultPlan
from simulators.pump import PumpModel


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
    control: Annotated[
        Path | None,
        typer.Option("--control", help="unix socket for run-time faults (driverd sim fault --control PATH ...)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="status lines as JSON objects, one a line (first the "
                                                         "endpoint: port or device, url(s)); errors as JSON")] = False,
) -> None:
    """Run a simulated Harvard Apparatus Pump 11 Elite that speaks its pump-chain ASCII protocol."""
    from simulators.harvard import elite_model_kwargs

    console = SimConsole(as_json=as_json)

    check_serial_endpoint(pty, tcp, address, baud, BAUD_RATES, as_json)
    fill_ml = decimal_option(fill, "fill", MAX_VOLUME_ML, as_json)
    diameter_mm = decimal_option(diameter, "diameter", MAX_DIAMETER_MM, as_json)
    try:
        model = PumpModel(SystemClock(), fill_volume_ml=fill_ml, diameter_mm=diameter_mm, **elite_model_kwargs())
        plan = (
            FaultPlan.from_scenario(faults, alarm_hook=model.inject_alarm)
            if faults
            else FaultPlan(alarm_hook=model.inject_alarm)
        )
        if wire_time:
            plan.set_baud(baud)
        plan.on_event = lambda ev: console.fault(f"harvard-{address}", ev)
    except DriverdError as exc:
        console.error(str(exc))
    from simulators.harvard import Endpoint, serve_harvard  # imported late: keeps `driverd --help` fast

    def describe(endpoint: Endpoint) -> tuple[str, list[str], dict[str, Any]]:
        extra: dict[str, Any] = {"device": endpoint.device} if pty else {"port": endpoint.port}
        return (endpoint.device or "" if pty else str(endpoint.port),
                [endpoint.url + (f"&baud={baud}" if pty else "")], extra)

    run_simulator(console, lambda: serve_harvard(model, plan, pty=pty, tcp_port=tcp, host=host, address=address),
                  describe, tcp=tcp, host=host, control=control, plans={address: plan})


def register(app: typer.Typer) -> None:
    """Add this protocol's `sim` command to the group."""
    app.command("harvard")(harvard)
