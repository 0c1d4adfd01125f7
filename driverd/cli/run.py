"""`driverd run --config PATH`: the daemon in the foreground (systemd's ExecStart).

The config is `--config`, else $DRIVERD_CONFIG, else /etc/driverd/driverd.toml.

Operational logs go to stderr (JSON lines unless stderr is a terminal; `<N>` priority prefixes when stderr is the
journal); the audit log goes to audit_dir. SIGHUP reloads the trust store and the settings that can change live.
Exit 0 after a clean SIGTERM/SIGINT stop; 1 if the config is invalid, the daemon cannot start, or `--speed` is
given with a config that is not a bench's.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Annotated

import typer

from driverd.cli.output import config_error, usage
from driverd.cli.status import CONFIG_ENV, DEFAULT_CONFIG
from driverd.core.errors import ConfigError

MAX_SPEED = 1_000_000.0


def run(
    config: Annotated[
        Path, typer.Option("--config", envvar=CONFIG_ENV, help="Daemon config (TOML); else $DRIVERD_CONFIG.")
    ] = DEFAULT_CONFIG,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON log lines even on a terminal (the default when not a terminal).")
    ] = False,
    speed: Annotated[
        float | None,
        typer.Option("--speed", help="Scaled clock: course time runs N x real time (benches against external "
                     "simulators). Refused (exit 1) unless the config sets [daemon] mode = \"bench\"."),
    ] = None,
) -> None:
    """Run the daemon: one channel per configured pump, the control socket, sd_notify and the watchdog."""
    from driverd.runtime.config import load_config  # lazy: the runtime is imported only by the commands using it
    from driverd.runtime.service import configure_logging, serve

    if speed is not None and not (math.isfinite(speed) and 0 < speed <= MAX_SPEED):
        usage(f"--speed: a number above 0 and at most {MAX_SPEED:g}, got {speed}", as_json)
    if as_json:  # a bad config as one JSON error on stdout (serve re-reads it; without --json it reports it)
        try:
            load_config(config)
        except ConfigError as exc:
            config_error(f"config {ascii(str(config))[1:-1]}: {exc}", as_json=True,
                         problems=[p.as_dict() for p in exc.problems])
    configure_logging(json_output=True if as_json else None)
    try:
        code = asyncio.run(serve(config, speed=speed))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        code = 1
    raise typer.Exit(code)
