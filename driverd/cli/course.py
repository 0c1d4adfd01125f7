"""`driverd course hold|resume|escalate|reduce|taper|stop|ack-clock|change-syringe PUMP --by ID --reason TEXT`:
clinician commands (change-syringe also takes --fill ML [--concentration MG_PER_ML]).

Each is sent to the running daemon, which feeds it to the course state machine and the safety kernel; a
command the core refuses is exit 1 with its reason (and is in the audit log either way). Every answer says what
the pump now runs by its read-back (rate and dose), whether that is verified, and the audit record's seq.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import typer

from driverd.cli.output import EXIT_USAGE, emit_json, fail
from driverd.cli.status import (
    DEFAULT_CONFIG,
    DEFAULT_TIMEOUT_S,
    ConfigOpt,
    JsonOpt,
    SocketOpt,
    TimeoutOpt,
    call,
    report_refusal,
    resolve_socket,
)

app = typer.Typer(help="Clinician commands for a running course (sent to the daemon).", no_args_is_help=True)

PumpArg = Annotated[str, typer.Argument(help="Pump id, as in the daemon config.", show_default=False)]
ByOpt = Annotated[str, typer.Option("--by", help="Clinician id (recorded in the audit log).", show_default=False)]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).", show_default=False)]


def _send(action: str, pump: str, by: str, reason: str, dose: str | None, as_json: bool, socket: Path | None,
          config: Path, timeout: float) -> None:
    payload: dict[str, Any] = {"op": "command", "pump_id": pump, "action": action, "by": by, "reason": reason}
    if dose is not None:
        try:
            value = Decimal(dose)
            if not value.is_finite() or value < 0:
                raise InvalidOperation
        except InvalidOperation:
            fail(f"--dose must be a non-negative decimal number of mg/24h, got {dose!r}", as_json=as_json,
                 code=EXIT_USAGE)
        payload["dose_mg_per_24h"] = dose.strip()
    path = resolve_socket(socket, config, as_json)
    reply = call(path, payload, as_json, timeout)
    what = f"{action} {pump}"
    if action == "stop" and _already_stopped(reply):
        # Idempotent: the course is stopped, which is what was asked (the repeated command is in the audit log).
        if as_json:
            emit_json({**{k: v for k, v in reply.items() if k != "refusals"}, "ok": True, "already_stopped": True})
        else:
            typer.echo(f"OK  {what}: already stopped; {now_runs(reply)}")
        return
    if not reply.get("ok"):
        if not as_json and "pump_rate_ml_per_h" in reply:
            typer.echo(f"  {now_runs(reply)}", err=True)
        report_refusal(what, reply, as_json)
    if as_json:
        emit_json(reply)
    else:
        typer.echo(f"OK  {what}: phase {reply.get('phase')}; {now_runs(reply)}")


def _already_stopped(reply: dict[str, Any]) -> bool:
    refusals = reply.get("refusals") or []
    return (not reply.get("ok") and reply.get("phase") == "stopped" and bool(refusals)
            and all(isinstance(r, dict) and r.get("reason") == "illegal_transition" for r in refusals))


def now_runs(reply: dict[str, Any]) -> str:
    """What the pump runs now by its read-back (rate and dose), whether that is verified, and the record seq."""
    rate = reply.get("pump_rate_ml_per_h")
    dose = reply.get("pump_dose_mg_per_24h")
    if rate is None:
        runs = "pump rate unknown (no read-back)"
    else:
        runs = f"pump runs {rate} mL/h" + (f" ({dose} mg/24h)" if dose is not None else "")
        commanded = reply.get("commanded_ml_per_h")
        runs += ", verified" if reply.get("verified") else f", NOT verified (commanded {commanded} mL/h)"
    level = reply.get("level_mg_per_24h")
    return runs + (f"; course level {level} mg/24h" if level is not None else "") + f"; record seq {reply.get('seq')}"


@app.callback()
def _group() -> None:
    """Clinician commands for a running course (sent to the daemon)."""


@app.command()
def hold(pump: PumpArg, by: ByOpt, reason: ReasonOpt, as_json: JsonOpt = False, socket: SocketOpt = None,
         config: ConfigOpt = DEFAULT_CONFIG, timeout: TimeoutOpt = DEFAULT_TIMEOUT_S) -> None:
    """Hold at the current dose during titration: no further automatic escalation. The schedule's hold then
    runs (its end starts the taper or stops the course); `escalate` can still confirm the next step."""
    _send("hold", pump, by, reason, None, as_json, socket, config, timeout)


@app.command()
def resume(pump: PumpArg, by: ByOpt, reason: ReasonOpt, as_json: JsonOpt = False, socket: SocketOpt = None,
           config: ConfigOpt = DEFAULT_CONFIG, timeout: TimeoutOpt = DEFAULT_TIMEOUT_S) -> None:
    """Resume a paused course or one in alarm, once its cause is dealt with (the pump's latched alarm is
    acknowledged and the pump read first). Not for a held course: hold is not paused, use `escalate` to go on.

    The rate is at most the last verified rate and the course level; refused while the pump still reports the
    alarm, the link is down, a setpoint is unverified or the syringe is empty."""
    _send("resume", pump, by, reason, None, as_json, socket, config, timeout)


@app.command()
def escalate(pump: PumpArg, by: ByOpt, reason: ReasonOpt, as_json: JsonOpt = False, socket: SocketOpt = None,
             config: ConfigOpt = DEFAULT_CONFIG, timeout: TimeoutOpt = DEFAULT_TIMEOUT_S) -> None:
    """Confirm escalation to the schedule's next step (from primed, titrating or hold), if the kernel allows it
    now: not before the step's time and 24 h after the last change, within every limit. `driverd status` shows a
    step waiting for this as PENDING CONFIRMATION."""
    _send("escalate", pump, by, reason, None, as_json, socket, config, timeout)


@app.command()
def reduce(
    pump: PumpArg,
    by: ByOpt,
    reason: ReasonOpt,
    dose: Annotated[
        str | None, typer.Option("--dose", help="Target dose in mg/24h (default: the step below).")
    ] = None,
    as_json: JsonOpt = False,
    socket: SocketOpt = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Reduce the dose (a decrease is always allowed by the kernel). During titration the course then holds.

    Examples: `driverd course reduce bed-1 --by dr-a --reason "too drowsy"` goes to the schedule's step below the
    current level; `... --dose 150` to 150 mg/24h (any dose above 0 and below the current level; 0 is a stop).
    In pause or alarm the new level applies on resume (and a pump still infusing above it is slowed at once)."""
    _send("reduce", pump, by, reason, dose, as_json, socket, config, timeout)


@app.command()
def taper(pump: PumpArg, by: ByOpt, reason: ReasonOpt, as_json: JsonOpt = False, socket: SocketOpt = None,
          config: ConfigOpt = DEFAULT_CONFIG, timeout: TimeoutOpt = DEFAULT_TIMEOUT_S) -> None:
    """Start the schedule's taper now, from titration or hold (taper lock: the rate can no longer rise). A
    schedule without a taper stops the course."""
    _send("taper", pump, by, reason, None, as_json, socket, config, timeout)


@app.command()
def stop(pump: PumpArg, by: ByOpt, reason: ReasonOpt, as_json: JsonOpt = False, socket: SocketOpt = None,
         config: ConfigOpt = DEFAULT_CONFIG, timeout: TimeoutOpt = DEFAULT_TIMEOUT_S) -> None:
    """Stop the infusion and end the course (always allowed). On a course already stopped it changes nothing and
    says "already stopped" (exit 0)."""
    _send("stop", pump, by, reason, None, as_json, socket, config, timeout)


@app.command("ack-clock")
def ack_clock(pump: PumpArg, by: ByOpt, reason: ReasonOpt, as_json: JsonOpt = False, socket: SocketOpt = None,
              config: ConfigOpt = DEFAULT_CONFIG, timeout: TimeoutOpt = DEFAULT_TIMEOUT_S) -> None:
    """Acknowledge a wall-clock step after checking the daemon's time (`driverd status`): escalation may resume."""
    _send("ack_clock", pump, by, reason, None, as_json, socket, config, timeout)


@app.command("change-syringe")
def change_syringe(
    pump: PumpArg,
    fill: Annotated[str, typer.Option("--fill", help="The new syringe's fill in mL.", show_default=False)],
    by: ByOpt,
    reason: ReasonOpt,
    concentration: Annotated[
        str | None,
        typer.Option("--concentration", help="mg/mL of the new syringe (default: the one in use); must be approved "
                                             "by the signed schedule and in the drug library."),
    ] = None,
    as_json: JsonOpt = False,
    socket: SocketOpt = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Change the syringe: the pump is stopped, the new syringe read back and checked, and the course resumes at
    the same dose level (the rate recomputed for the concentration, toward less drug). Never an escalation."""
    payload: dict[str, Any] = {"op": "change_syringe", "pump_id": pump, "by": by, "reason": reason}
    for name, value, key in (("--fill", fill, "fill_volume_ml"), ("--concentration", concentration,
                                                                  "concentration_mg_per_ml")):
        if value is None:
            continue
        try:
            number = Decimal(value)
            if not number.is_finite() or number <= 0:
                raise InvalidOperation
        except InvalidOperation:
            fail(f"{name} must be a positive decimal number, got {value!r}", as_json=as_json, code=EXIT_USAGE)
        payload[key] = value.strip()
    path = resolve_socket(socket, config, as_json)
    reply = call(path, payload, as_json, timeout)
    what = f"change-syringe {pump}"
    if not reply.get("ok"):
        report_refusal(what, reply, as_json)
    if as_json:
        emit_json(reply)
    else:
        syringe = reply.get("syringe") or {}
        typer.echo(f"OK  {what}: phase {reply.get('phase')}; {now_runs(reply)}"
                   + (f"; syringe at {syringe.get('concentration_mg_per_ml')} mg/mL" if syringe else ""))
