"""`driverd status`, and the client side every command that talks to a running daemon shares.

The socket is `--socket PATH`, else $DRIVERD_SOCKET, else the `control_socket` of the config: `--config PATH`, else
$DRIVERD_CONFIG, else /etc/driverd/driverd.toml.
A daemon that does not answer is exit 1 "cannot reach driverd at <socket>"; an unreadable config is exit 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from driverd.cli.output import EXIT_USAGE, emit_json, fail
from driverd.core.errors import ConfigError
from driverd.runtime.config import load_config
from driverd.runtime.control import ControlError, ControlUnavailable, request_sync

# Where the config is looked up: --config, then $DRIVERD_CONFIG, then DEFAULT_CONFIG (the systemd unit's path); the
# socket: --socket, then $DRIVERD_SOCKET, then the config's control_socket. An empty variable counts as unset.
DEFAULT_CONFIG = Path("/etc/driverd/driverd.toml")
CONFIG_ENV = "DRIVERD_CONFIG"
SOCKET_ENV = "DRIVERD_SOCKET"
DEFAULT_TIMEOUT_S = 40.0  # above the server's own 30 s request bound, so its "outcome unknown" reply arrives

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
SocketOpt = Annotated[
    Path | None,
    typer.Option("--socket", envvar=SOCKET_ENV, show_default=False,
                 help="Control socket (default: $DRIVERD_SOCKET, else control_socket of the config)."),
]
ConfigOpt = Annotated[
    Path, typer.Option("--config", envvar=CONFIG_ENV, help="Daemon config, used to find the control socket.")
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the daemon's reply.")]


def _show(path: Path) -> str:
    return ascii(str(path))[1:-1]


def resolve_socket(socket: Path | None, config: Path, as_json: bool) -> Path:
    if socket is not None:
        return socket
    try:
        return load_config(config).control_socket
    except ConfigError as exc:
        problems = [p.as_dict() for p in exc.problems]
        fail(f"cannot use config {_show(config)}: {exc} (or pass --socket)", as_json=as_json, code=EXIT_USAGE,
             problems=problems)


def call(socket: Path, payload: Mapping[str, Any], as_json: bool, timeout: float) -> dict[str, Any]:
    """One request to the daemon; unreachable or broken exchanges are exit 1 with the reason."""
    if not math.isfinite(timeout) or not 0 < timeout <= 600:
        fail(f"--timeout must be > 0 and <= 600 seconds, got {timeout}", as_json=as_json, code=EXIT_USAGE)
    try:
        return request_sync(socket, payload, timeout)
    except ControlUnavailable as exc:
        fail(str(exc), as_json=as_json, socket=str(socket))
    except ControlError as exc:
        fail(f"driverd at {_show(socket)}: {exc}", as_json=as_json, socket=str(socket))


def report_refusal(what: str, reply: Mapping[str, Any], as_json: bool) -> NoReturn:
    """A reply with ok=false: the reasons, exit 1."""
    if as_json:
        emit_json(dict(reply))
        raise typer.Exit(1)
    if "error" in reply:
        field = reply.get("field")
        typer.echo(f"REFUSED  {what}: {reply['error']}" + (f" (field {field})" if field else ""), err=True)
    else:
        typer.echo(f"REFUSED  {what}", err=True)
        for r in reply.get("refusals", []) or []:
            if isinstance(r, Mapping):
                typer.echo(f"  [{r.get('reason')}] {r.get('detail')}", err=True)
    raise typer.Exit(1)


def status(
    as_json: JsonOpt = False,
    socket: SocketOpt = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Show every pump's course: phase, dose level, commanded and verified rate, link, alarms."""
    path = resolve_socket(socket, config, as_json)
    reply = call(path, {"op": "status"}, as_json, timeout)
    if not reply.get("ok"):
        report_refusal("status", reply, as_json)
    if as_json:
        emit_json(reply)
        return
    typer.echo(f"driverd at {_show(path)}  now {reply.get('now')}  library {reply.get('library')}")
    audit = reply.get("audit")
    if reply.get("health") not in (None, "ok") and isinstance(audit, Mapping):
        typer.echo(f"UNHEALTHY ({reply.get('health')}): the audit log cannot be written: {audit.get('error')}")
        typer.echo("  every pump was stopped by the fail-safe (see PUMP STATE); driverd refuses requests and exits")
    header = f"{'PUMP':<12}{'PHASE':<11}{'COURSE':<20}{'mg/24h':>8}{'cmd mL/h':>10}{'ver mL/h':>10}  LINK  ALARM"
    typer.echo(header)
    for p in reply.get("pumps", []):
        if not isinstance(p, Mapping):
            continue
        causes = p.get("alarms")
        alarm = ", ".join(map(str, causes)) if isinstance(causes, list) and causes else (p.get("alarm") or "-")
        lock = " taper-lock" if p.get("taper_lock") else ""
        typer.echo(f"{p.get('pump_id')!s:<12}{p.get('phase')!s:<11}{p.get('course_id') or '-'!s:<20}"
                   f"{p.get('level_mg_per_24h')!s:>8}{p.get('commanded_ml_per_h')!s:>10}"
                   f"{p.get('verified_ml_per_h')!s:>10}  {p.get('link')!s:<5} {alarm}{lock}")
        if p.get("failsafe") is not None:
            typer.echo(f"{'':<12}pump state: {p.get('pump_state')} (read back {p.get('pump_rate_ml_per_h')} mL/h)")
        syr = p.get("syringe")
        if isinstance(syr, dict):
            empty = syr.get("predicted_empty_at")
            warn = "  NEAR EMPTY: change the syringe" if syr.get("near_empty_warning") else ""
            change = "  change in progress" if syr.get("change_in_progress") else ""
            typer.echo(f"{'':<12}syringe {syr.get('number')}: {syr.get('remaining_ml')} of {syr.get('fill_ml')} mL "
                       f"at {syr.get('concentration_mg_per_ml')} mg/mL left"
                       + (f", empty at {empty}" if empty else "") + f"; {p.get('delivered_mg')} mg delivered"
                       + warn + change)
        if p.get("last_error"):
            typer.echo(f"{'':<12}last error: {p['last_error']}")
