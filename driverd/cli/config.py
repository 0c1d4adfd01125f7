"""`driverd config ...`: check a daemon config without starting anything; show where the shipped data lives.

`config check` exit codes: 0 the config and everything it names are usable (warnings may be printed); 1 problems
(each named: field, rule, detail); 2 usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from driverd import resources
from driverd.cli.output import EXIT_OK, EXIT_REFUSED, emit_json
from driverd.cli.status import CONFIG_ENV, DEFAULT_CONFIG

app = typer.Typer(help="Check a daemon config; show where the shipped data lives.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _show(path: Path | str) -> str:
    return ascii(str(path))[1:-1]


@app.command()
def check(
    config: Annotated[
        Path, typer.Option("--config", envvar=CONFIG_ENV, help="Daemon config (TOML) to check.")
    ] = DEFAULT_CONFIG,
    as_json: JsonOpt = False,
) -> None:
    """Check a config and everything it names (drug library, trust store, keys, directories, pump URLs and their
    drivers) without starting anything, like `nginx -t`. Exit 0 usable, 1 problems."""
    from driverd.runtime.config_check import check_config  # lazy: keeps other commands' start-up light

    report = check_config(config)
    if as_json:
        emit_json(report.as_dict())
        raise typer.Exit(EXIT_OK if report.ok else EXIT_REFUSED)
    typer.echo(f"driverd: config {_show(config)}" + (f" (mode {report.mode})" if report.mode else ""))
    for item in report.checked:
        typer.echo(f"  ok       {item['field']}: {_show(item['path'])}  {item['detail']}")
    for w in report.warnings:
        typer.echo(f"  warning  {w.path} [{w.rule}] {_show(w.detail)}")
    for p in report.problems:
        typer.echo(f"  error    {p.path} [{p.rule}] {_show(p.detail)}")
    counts = f"{len(report.problems)} error(s), {len(report.warnings)} warning(s)"
    if report.ok:
        typer.echo(f"driverd: config {_show(config)}: test is successful ({counts})")
        raise typer.Exit(EXIT_OK)
    typer.echo(f"driverd: config {_show(config)}: test failed ({counts})")
    raise typer.Exit(EXIT_REFUSED)


@app.command("data-dir")
def data_dir(as_json: JsonOpt = False) -> None:
    """Print the directory of the shipped data: drug library, register map, schedule schema, example schedules
    and configs, demo keys (copy examples from there)."""
    if as_json:
        emit_json({"ok": True, "data_dir": str(resources.DATA_DIR)})
    else:
        typer.echo(str(resources.DATA_DIR))
