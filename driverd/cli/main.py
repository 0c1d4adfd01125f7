"""Entry point: the `driverd` command. Groups live in their own modules; this file only joins them."""

from __future__ import annotations

from typing import Annotated

import typer

import driverd
from driverd.cli import audit, config, course, demo, hl7, keys, pump, run, schedule, sim, status

app = typer.Typer(
    name="driverd",
    help="driverd: runs burst subcutaneous ketamine courses on syringe drivers, with a safety kernel and audit log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(schedule.app, name="schedule")
app.add_typer(keys.app, name="keys")
app.add_typer(audit.app, name="audit")
app.add_typer(pump.app, name="pump")
app.add_typer(sim.app, name="sim")
app.add_typer(course.app, name="course")
app.add_typer(hl7.app, name="hl7")
app.add_typer(config.app, name="config")
app.command("run")(run.run)
app.command("status")(status.status)
app.command(name="demo")(demo.demo)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"driverd {driverd.__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """driverd: runs burst subcutaneous ketamine courses on syringe drivers, with a safety kernel and audit log."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
