"""`driverd course ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="course commands", no_args_is_help=True)
