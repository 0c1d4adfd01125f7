"""Entry point: the `driverd` command. Groups live in their own modules; this file only joins them."""

from __future__ import annotations

import typer

from driverd.cli import audit, course, demo, hl7, keys, pump, run, schedule, sim, status

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
app.command("run")(run.run)
app.command("status")(status.status)
app.command(name="demo")(demo.demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
