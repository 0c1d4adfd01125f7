"""`driverd status [--watch]`, and the client side every command that talks to a running daemon shares.

The socket is `--socket PATH`, else $DRIVERD_SOCKET, else the `control_socket` of the config: `--config PATH`, else
$DRIVERD_CONFIG, else /etc/driverd/driverd.toml.
A daemon that does not answer is exit 1 "cannot reach driverd at <socket>"; a missing or invalid config is exit 1
too (docs/operations.md, "Exit codes").
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from datetime import tzinfo
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from driverd.cli.output import EXIT_USAGE, config_error, emit_json, error_payload, fail
from driverd.cli.timefmt import BadZone, TzOpt, format_time, parse_zone
from driverd.core.errors import ConfigError

# Where the config is looked up: --config, then $DRIVERD_CONFIG, then DEFAULT_CONFIG (the systemd unit's path); the
# socket: --socket, then $DRIVERD_SOCKET, then the config's control_socket. An empty variable counts as unset.
DEFAULT_CONFIG = Path("/etc/driverd/driverd.toml")
CONFIG_ENV = "DRIVERD_CONFIG"
SOCKET_ENV = "DRIVERD_SOCKET"
DEFAULT_TIMEOUT_S = 40.0  # above the server's own 30 s request bound, so its "outcome unknown" reply arrives
MAX_WATCH_INTERVAL_S = 3600.0

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
    from driverd.runtime.config import load_config  # lazy: every CLI command would pay for the runtime's imports

    try:
        return load_config(config).control_socket
    except ConfigError as exc:
        problems = [p.as_dict() for p in exc.problems]
        config_error(f"cannot use config {_show(config)}: {exc} (or pass --socket)", as_json=as_json,
                     problems=problems)


def _check_timeout(timeout: float, as_json: bool) -> None:
    if not math.isfinite(timeout) or not 0 < timeout <= 600:
        fail(f"--timeout must be > 0 and <= 600 seconds, got {timeout}", as_json=as_json, code=EXIT_USAGE)


def call(socket: Path, payload: Mapping[str, Any], as_json: bool, timeout: float) -> dict[str, Any]:
    """One request to the daemon; unreachable or broken exchanges are exit 1 with the reason."""
    _check_timeout(timeout, as_json)
    from driverd.runtime.control import ControlError, ControlUnavailable, request_sync  # lazy, as above

    try:
        return request_sync(socket, payload, timeout)
    except ControlUnavailable as exc:
        fail(str(exc), as_json=as_json, error_code="unreachable", socket=str(socket))
    except ControlError as exc:
        fail(f"driverd at {_show(socket)}: {exc}", as_json=as_json, error_code="daemon_error", socket=str(socket))


def report_refusal(what: str, reply: Mapping[str, Any], as_json: bool) -> NoReturn:
    """A reply with ok=false: the reasons, exit 1."""
    if as_json:
        if "error" in reply and not isinstance(reply["error"], Mapping):
            # A request the daemon did not understand: the CLI's one error shape, the field kept.
            emit_json(error_payload(str(reply["error"]), "request_error", field=reply.get("field")))
        else:
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


# ------------------------------------------------------------------------------------------------ views


def _alarms(p: Mapping[str, Any]) -> str:
    causes = p.get("alarms")
    text = ", ".join(map(str, causes)) if isinstance(causes, list) and causes else str(p.get("alarm") or "-")
    return text + (" taper-lock" if p.get("taper_lock") else "")


def _schedule(p: Mapping[str, Any]) -> str:
    sid = p.get("schedule_id") or p.get("course_id")
    if not sid:
        return "-"
    version = p.get("schedule_version")
    return f"{sid} v{version}" if version is not None else str(sid)


def _next(p: Mapping[str, Any], zone: tzinfo | None) -> str:
    nxt = p.get("next_step")
    if not isinstance(nxt, Mapping):
        return "-"
    how = "" if nxt.get("auto") else " (needs confirmation)"
    return f"{nxt.get('kind')} {nxt.get('dose_mg_per_24h')} mg/24h at {format_time(nxt.get('at'), zone)}{how}"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def pump_details(p: Mapping[str, Any], zone: tzinfo | None) -> list[str]:
    """The lines under a pump's row: what needs attention, the syringe, errors."""
    out: list[str] = []
    pending = p.get("pending_confirmation")
    if isinstance(pending, Mapping):
        out.append(f"PENDING CONFIRMATION: step to {pending.get('dose_mg_per_24h')} mg/24h due since "
                   f"{format_time(pending.get('since'), zone)} (driverd course escalate {p.get('pump_id')})")
    if p.get("unverified_setpoint") is not None:
        out.append(f"setpoint {p['unverified_setpoint']} sent, not yet verified by read-back")
    if p.get("clock_fault"):
        out.append(f"clock fault: {p['clock_fault']} (driverd course ack-clock)")
    if p.get("failsafe") is not None:
        out.append(f"pump state: {p.get('pump_state')} (read back {p.get('pump_rate_ml_per_h')} mL/h)")
    syr = p.get("syringe")
    if isinstance(syr, Mapping):
        empty = syr.get("predicted_empty_at")
        warn = "  NEAR EMPTY: change the syringe" if syr.get("near_empty_warning") else ""
        change = "  change in progress" if syr.get("change_in_progress") else ""
        out.append(f"syringe {syr.get('number')}: {syr.get('remaining_ml')} of {syr.get('fill_ml')} mL "
                   f"at {syr.get('concentration_mg_per_ml')} mg/mL left"
                   + (f", empty at {format_time(empty, zone)}" if empty else "")
                   + f"; {p.get('delivered_mg')} mg delivered" + warn + change)
    if p.get("last_error"):
        at = p.get("last_error_at")
        out.append(f"last error{' at ' + format_time(at, zone) if at else ''}: {p['last_error']}")
    return out


COLUMNS = ("PUMP", "PHASE", "SCHEDULE", "mg/24h", "cmd mL/h", "pump mL/h", "ver mL/h", "LINK", "ALARMS", "NEXT STEP")


def pump_row(p: Mapping[str, Any], zone: tzinfo | None) -> tuple[str, ...]:
    return (str(p.get("pump_id")), _dash(p.get("phase")), _schedule(p), _dash(p.get("level_mg_per_24h")),
            _dash(p.get("commanded_ml_per_h")), _dash(p.get("reported_ml_per_h")),
            _dash(p.get("verified_ml_per_h")), _dash(p.get("link")), _alarms(p), _next(p, zone))


def _headline(path: Path, reply: Mapping[str, Any], zone: tzinfo | None) -> list[str]:
    out = [f"driverd at {_show(path)}  now {format_time(reply.get('now'), zone)}  library {reply.get('library')}"]
    audit = reply.get("audit")
    if reply.get("health") not in (None, "ok") and isinstance(audit, Mapping):
        out.append(f"UNHEALTHY ({reply.get('health')}): the audit log cannot be written: {audit.get('error')}")
        out.append("  every pump was stopped by the fail-safe (see pump state); driverd refuses requests and exits")
    return out


def print_status(path: Path, reply: Mapping[str, Any], zone: tzinfo | None) -> None:
    """Plain text (greppable; one row per pump, its details indented below)."""
    for line in _headline(path, reply, zone):
        typer.echo(line)
    pumps = [p for p in reply.get("pumps", []) if isinstance(p, Mapping)]
    rows = [COLUMNS, *(pump_row(p, zone) for p in pumps)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    for i, row in enumerate(rows):
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
        if i:
            for line in pump_details(pumps[i - 1], zone):
                typer.echo(f"    {line}")


def status_table(path: Path, reply: Mapping[str, Any], zone: tzinfo | None) -> Any:
    """The same view as a rich renderable (for --watch): the table, then each pump's details under it."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=" ".join(_headline(path, reply, zone)), title_justify="left", expand=False)
    for col in COLUMNS:
        table.add_column(col, no_wrap=col in ("PUMP", "PHASE", "SCHEDULE", "LINK"),
                         justify="right" if "mL/h" in col or col == "mg/24h" else "left")
    notes = Text()
    for p in reply.get("pumps", []):
        if not isinstance(p, Mapping):
            continue
        alarmed = p.get("phase") == "alarm" or bool(p.get("alarms"))
        table.add_row(*pump_row(p, zone), style="bold red" if alarmed else None)
        for line in pump_details(p, zone):
            urgent = line.startswith(("PENDING", "last error", "clock fault")) or "NEAR EMPTY" in line
            notes.append(f"{p.get('pump_id')}: {line}\n", style="bold yellow" if urgent else None)
    notes.rstrip()
    return Group(table, notes) if notes else table


# ------------------------------------------------------------------------------------------------ command


def status(
    as_json: JsonOpt = False,
    socket: SocketOpt = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    tz: TzOpt = "UTC",
    watch: Annotated[bool, typer.Option("--watch", help="Keep refreshing (a live table on a terminal; one "
                                                        "snapshot per refresh when piped, one JSON line each "
                                                        "with --json). Ctrl-C ends it (exit 0).")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes with --watch.")] = 2.0,
    count: Annotated[int | None, typer.Option("--count", help="With --watch: stop after N refreshes.",
                                              min=1)] = None,
) -> None:
    """Show every pump: phase, schedule id and version, dose level, commanded / pump-reported / verified rate,
    next step due (time and dose), pending confirmation, every active alarm, link, last unresolved error and the
    syringe.

    Rates: cmd is the last rate sent, pump what the pump reports it delivers now, ver the last rate read back
    equal to what was sent."""
    try:
        zone = parse_zone(tz)
    except BadZone as exc:
        fail(str(exc), as_json=as_json, code=EXIT_USAGE)
    if not math.isfinite(interval) or not 0 < interval <= MAX_WATCH_INTERVAL_S:
        fail(f"--interval must be > 0 and <= {MAX_WATCH_INTERVAL_S:g} seconds, got {interval}", as_json=as_json,
             code=EXIT_USAGE)
    if count is not None and not watch:
        fail("--count is for --watch", as_json=as_json, code=EXIT_USAGE)
    _check_timeout(timeout, as_json)
    path = resolve_socket(socket, config, as_json)
    if not watch:
        reply = _fetch(path, as_json, timeout)
        if as_json:
            emit_json(reply)
        else:
            print_status(path, reply, zone)
        return
    try:
        _watch(path, as_json, timeout, zone, interval, count)
    except KeyboardInterrupt:
        return  # the normal way to leave a watch


def _fetch(path: Path, as_json: bool, timeout: float) -> dict[str, Any]:
    reply = call(path, {"op": "status"}, as_json, timeout)
    if not reply.get("ok"):
        report_refusal("status", reply, as_json)
    return reply


def _watch(path: Path, as_json: bool, timeout: float, zone: tzinfo | None, interval: float,
           count: int | None) -> None:
    """Refresh until Ctrl-C or `count` refreshes. A daemon that stops answering ends the watch with exit 1."""
    done = 0
    live_view = not as_json and sys.stdout.isatty()
    if live_view:
        from rich.live import Live

        with Live(auto_refresh=False, screen=False) as live:
            while count is None or done < count:
                if done:
                    time.sleep(interval)
                live.update(status_table(path, _fetch(path, as_json, timeout), zone), refresh=True)
                done += 1
        return
    while count is None or done < count:
        if done:
            time.sleep(interval)
        reply = _fetch(path, as_json, timeout)
        if as_json:
            emit_json(reply)
        else:
            if done:
                typer.echo("")
            print_status(path, reply, zone)
            sys.stdout.flush()
        done += 1
