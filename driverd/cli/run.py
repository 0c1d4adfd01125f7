"""`driverd run --config PATH`: the daemon in the foreground (systemd's ExecStart).

Operational logs go to stderr (JSON lines unless stderr is a terminal); the audit log goes to audit_dir.
Exit 0 after a clean SIGTERM/SIGINT stop; 1 if the config is invalid or the daemon cannot start.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from driverd.cli.status import DEFAULT_CONFIG


def run(
    config: Annotated[Path, typer.Option("--config", help="Daemon config (TOML).")] = DEFAULT_CONFIG,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON log lines even on a terminal (the default when not a terminal).")
    ] = False,
) -> None:
    """Run the daemon: one channel per configured pump, the control socket, sd_notify and the watchdog."""
    from driverd.runtime.service import configure_logging, serve

    configure_logging(json_output=True if as_json else None)
    try:
        code = asyncio.run(serve(config))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        code = 1
    raise typer.Exit(code)
