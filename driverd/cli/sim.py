"""`driverd sim ...`: standalone simulators for benches. Each protocol registers its own command."""

from __future__ import annotations

import typer

from driverd.cli import sim_harvard, sim_modbus, sim_newera

app = typer.Typer(help="Run a simulated pump that speaks a real wire protocol.", no_args_is_help=True)
sim_newera.register(app)
sim_modbus.register(app)
sim_harvard.register(app)
