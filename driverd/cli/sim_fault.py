"""`driverd sim fault --control PATH [--unit N] WORDS...`: trigger a fault in a running simulator.

The simulator (started with ``--control PATH``) applies it at once and prints a ``fault:`` line when it fires.
The words are documented in simulators/control.py and docs/simulators.md: ``cut``, ``restore``, ``drop [N]``,
``garble [N]``, ``delay SECONDS [N]``, ``disconnect``, ``drop-all``, ``clear``, ``occlusion`` (or any alarm kind).
Exit 0 applied, 1 refused or the simulator unreachable, 2 malformed words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from driverd.cli.output import EXIT_REFUSED, emit_json, fail, usage


def fault(
    words: Annotated[list[str], typer.Argument(help="the fault: cut | restore | drop [N] | garble [N] | "
                                                    "delay SECONDS [N] | disconnect | drop-all | clear | "
                                                    "occlusion (or alarm KIND)")],
    control: Annotated[Path, typer.Option("--control", help="the simulator's control socket (its --control PATH)")],
    unit: Annotated[int | None, typer.Option("--unit", help="only this unit (Modbus) / address (New Era); "
                                                            "default: every pump the simulator serves")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the simulator's reply as JSON")] = False,
) -> None:
    """Trigger a fault in a running simulator (started with --control PATH)."""
    from simulators.control import FaultControlError, parse_fault, send_fault

    try:
        parse_fault(words)  # malformed words are a usage error here, before anything is sent
    except FaultControlError as exc:
        usage(str(exc), as_json)
    try:
        reply = send_fault(control, words, unit)
    except OSError as exc:
        fail(f"--control {control}: cannot reach the simulator: {exc.strerror or exc}", as_json=as_json,
             code=EXIT_REFUSED)
    if not reply.get("ok"):
        fail(str(reply.get("error", "refused")), as_json=as_json, code=EXIT_REFUSED)
    if as_json:
        emit_json(reply)
        return
    for applied in reply.get("applied", []):
        typer.echo(f"unit {applied.get('unit')}: {applied.get('fault')}")


def register(app: typer.Typer) -> None:
    """Add `sim fault` to the group."""
    app.command("fault")(fault)
