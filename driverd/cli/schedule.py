"""`driverd schedule ...` commands: validate, sign (push is added by the runtime work).

Exit codes: 0 ok; 1 invalid / refused / signature failed / drug library or trust store missing or invalid;
2 usage (bad option, unreadable schedule file).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from driverd import resources
from driverd.cli.output import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, config_error, emit_json, fail
from driverd.core.canonical import canonical_bytes, decimal_text, to_json_text
from driverd.core.errors import ConfigError, Problem, ValidationError
from driverd.core.protocol import ProtocolSpec, parse_protocol
from driverd.core.quantities import rate_to_dose
from driverd.core.schedule import Schedule
from driverd.core.schedule_parse import (
    MAX_DOCUMENT_BYTES,
    check_structure,
    course_length_days,
    load_json,
    parse_schedule,
    parse_timestamp,
    step_rate_ml_per_h,
)
from driverd.core.volume_plan import VolumePlan, plan_course
from driverd.signing import KeyFileError, SignatureRejected, TrustStore, sign_document

app = typer.Typer(help="Validate and sign schedules.", no_args_is_help=True)

DEFAULT_PROTOCOL = resources.PROTOCOL
SCHEMA_PATH = resources.SCHEDULE_SCHEMA

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
ProtocolOpt = Annotated[
    Path | None, typer.Option("--protocol", help="Drug-library TOML (default: the shipped ketamine-burst.toml).")
]


def _usage(message: str, as_json: bool) -> NoReturn:
    fail(message, as_json=as_json, code=EXIT_USAGE, usage=True)


def _show_path(path: Path) -> str:
    return ascii(str(path))[1:-1]


def _read_document_bytes(path: Path, as_json: bool) -> bytes:
    """At most MAX_DOCUMENT_BYTES + 1 bytes: enough to know a file is too large without reading it all."""
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        _usage(f"cannot read {_show_path(path)}: {exc.strerror or exc}", as_json)


def _read_document(path: Path, as_json: bool) -> tuple[str, Mapping[str, Any]]:
    """The schedule document in PATH as a JSON object; anything else is reported (exit 1) with its problems."""
    name = _show_path(path)
    try:
        doc = load_json(_read_document_bytes(path, as_json))
    except ValidationError as exc:
        _report_invalid(name, list(exc.problems), as_json)
    if not isinstance(doc, Mapping):
        _report_invalid(name, check_structure(doc), as_json)
    return name, doc


def load_protocol(path: Path | None, as_json: bool) -> ProtocolSpec:
    path = path or DEFAULT_PROTOCOL
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # the drug library is configuration: exit 1, like any config
        config_error(f"cannot read protocol {_show_path(path)}: {exc}", as_json=as_json)
    try:
        return parse_protocol(text)
    except ConfigError as exc:
        config_error(f"invalid protocol {_show_path(path)}: {exc}", as_json=as_json)


def _schema_problems(doc: object) -> list[Problem]:
    """The JSON Schema file's verdict, as a cross-check of the pure structural mirror.

    jsonschema is untyped, so it is imported here in the shell and never in the core.
    """
    import jsonschema  # type: ignore[import-untyped]  # imported lazily: only validate needs it

    try:
        schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"), parse_float=Decimal)
    except (OSError, ValueError) as exc:
        return [Problem("", "schema", f"cannot load {SCHEMA_PATH.name}: {exc}")]
    problems = []
    try:
        for err in jsonschema.Draft202012Validator(schema).iter_errors(doc):
            path = "".join(f"/{p}" for p in err.absolute_path)
            problems.append(Problem(path, "schema", err.message[:200]))
    except (InvalidOperation, RecursionError) as exc:
        problems.append(Problem("", "schema", f"schema check failed: {type(exc).__name__}"))
    return problems


def _problems_payload(problems: list[Problem]) -> list[dict[str, str]]:
    return [p.as_dict() for p in problems]


def _num(d: Decimal) -> str:
    return decimal_text(d)


def summarize(schedule: Schedule, spec: ProtocolSpec) -> dict[str, Any]:
    conc = schedule.concentration_mg_per_ml

    def dose_row(dose: Decimal) -> dict[str, str]:
        rate = step_rate_ml_per_h(dose, conc)
        return {
            "dose_mg_per_24h": _num(dose),
            "rate_ml_per_h": _num(rate),
            "delivered_mg_per_24h": _num(rate_to_dose(rate, conc)),
        }

    steps = [
        {"index": i + 1, **dose_row(s.dose_mg_per_24h), "not_before": s.not_before.isoformat(), "auto": s.auto}
        for i, s in enumerate(schedule.steps)
    ]
    taper: str | list[dict[str, Any]] = (
        [{**dose_row(t.dose_mg_per_24h), "after_hours": _num(t.after_hours)} for t in schedule.taper]
        if schedule.taper
        else "stop"
    )
    return {
        "schedule_id": schedule.schedule_id,
        "version": schedule.version,
        "pump_id": schedule.pump_id,
        "patient_ref": schedule.patient_ref,
        "protocol": schedule.protocol,
        "library_version": spec.library_version,
        "drug": {"name": schedule.drug_name, "concentration_mg_per_ml": _num(conc)},
        "syringe": {
            "model": schedule.syringe_model,
            "inner_diameter_mm": _num(schedule.inner_diameter_mm),
            "fill_volume_ml": _num(schedule.fill_volume_ml),
        },
        "steps": steps,
        "hold_days": _num(schedule.hold_days),
        "taper": taper,
        "course_length_days": _num(course_length_days(schedule).quantize(Decimal("0.01"))),
        "max_course_days": _num(spec.max_course_days),
        "approved_by": [{"role": a.role, "id": a.id} for a in schedule.approved_by],
        "approved_at": schedule.approved_at.isoformat(),
        "expires_at": schedule.expires_at.isoformat(),
        "digest": schedule.digest,
        "volume_plan": plan_payload(schedule, plan_course(schedule)),
    }


def plan_payload(schedule: Schedule, plan: VolumePlan) -> dict[str, Any]:
    """The volume plan as JSON: per day and per syringe, at the planned (quantized) rates."""
    sup = schedule.syringes
    supply: Any = "first syringe only" if sup is None else (
        {"change_every_hours": _num(sup.change_every_hours)} if sup.change_every_hours is not None else
        [{"fill_volume_ml": _num(f.fill_volume_ml), "concentration_mg_per_ml": _num(f.concentration_mg_per_ml)}
         for f in sup.fills])
    return {
        "supply": supply,
        "start": plan.start.isoformat(),
        "end": plan.end.isoformat(),
        "total_ml": _num(plan.total_ml),
        "total_mg": _num(plan.total_mg),
        "syringe_changes": plan.changes,
        "days": [{"day": d.day, "start": d.start.isoformat(), "volume_ml": _num(d.volume_ml),
                  "drug_mg": _num(d.drug_mg)} for d in plan.days],
        "syringes": [{"number": p.number, "fill_ml": _num(p.fill_ml),
                      "concentration_mg_per_ml": _num(p.concentration_mg_per_ml), "starts_at": p.starts_at.isoformat(),
                      "ends_at": p.ends_at.isoformat(), "ends": p.ends, "used_ml": _num(p.used_ml),
                      "left_ml": _num(p.left_ml)} for p in plan.syringes],
        "deliverable": not plan.problems,
    }


def _print_plan(plan: dict[str, Any]) -> None:
    echo = typer.echo
    supply = plan["supply"]
    how = supply if isinstance(supply, str) else (
        f"a fresh syringe every {supply['change_every_hours']} h" if isinstance(supply, dict) else
        f"{len(supply)} replacement syringe(s) in order")
    echo(f"  volume plan ({how}; volumes rounded up, empty times rounded down):")
    for d in plan["days"]:
        echo(f"    day {d['day']} from {d['start']}: {d['volume_ml']} mL ({d['drug_mg']} mg)")
    echo(f"    course {plan['total_ml']} mL ({plan['total_mg']} mg), {plan['syringe_changes']} syringe change(s)")
    what = {"change": "changed at", "empty": "runs empty (change it then) at", "course_end": "course ends at"}
    for p in plan["syringes"]:
        echo(f"    syringe {p['number']}: {p['fill_ml']} mL at {p['concentration_mg_per_ml']} mg/mL from "
             f"{p['starts_at']}, {what[p['ends']]} {p['ends_at']} (uses {p['used_ml']} mL, {p['left_ml']} mL left)")


def _print_summary(file: str, s: dict[str, Any]) -> None:
    echo = typer.echo
    echo(f"VALID  {file}")
    echo(f"  schedule {s['schedule_id']} v{s['version']}  pump {s['pump_id']}  patient {s['patient_ref']}")
    echo(f"  protocol {s['library_version']}")
    echo(f"  drug {s['drug']['name']} {s['drug']['concentration_mg_per_ml']} mg/mL; syringe {s['syringe']['model']}"
         f" ({s['syringe']['inner_diameter_mm']} mm, {s['syringe']['fill_volume_ml']} mL)")
    echo("  steps (rates quantized toward less drug):")
    for st in s["steps"]:
        mode = "auto" if st["auto"] else "needs clinician confirmation"
        echo(f"    {st['index']}. {st['dose_mg_per_24h']:>6} mg/24h -> {st['rate_ml_per_h']} mL/h"
             f" (delivers {st['delivered_mg_per_24h']} mg/24h)  not before {st['not_before']}  [{mode}]")
    echo(f"  hold {s['hold_days']} days")
    if s["taper"] == "stop":
        echo("  taper: stop at the end of the hold")
    else:
        for t in s["taper"]:
            echo(f"  taper +{t['after_hours']} h: {t['dose_mg_per_24h']} mg/24h -> {t['rate_ml_per_h']} mL/h")
    echo(f"  course length {s['course_length_days']} days (max {s['max_course_days']})")
    _print_plan(s["volume_plan"])
    echo("  approved by " + ", ".join(f"{a['role']} {a['id']}" for a in s["approved_by"])
         + f" at {s['approved_at']}; expires {s['expires_at']}")
    sig = s["signature"]
    echo(f"  signature: {sig['status']}" + (f" (key {sig['key_id']})" if sig.get("key_id") else "")
         + (f" - {sig['note']}" if sig.get("note") else ""))
    echo(f"  digest sha256:{s['digest']}")


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="Schedule JSON file.", show_default=False, metavar="FILE")],
    as_json: JsonOpt = False,
    protocol: ProtocolOpt = None,
    trust: Annotated[
        Path | None, typer.Option("--trust", help="Trust store directory (*.pub): also verify the signature.")
    ] = None,
    now: Annotated[
        str | None, typer.Option("--now", help="RFC 3339 time for the expiry checks (default: current time).")
    ] = None,
) -> None:
    """Validate a schedule against the JSON Schema and the drug library; list every problem."""
    spec = load_protocol(protocol, as_json)
    if now is None:
        at = datetime.now(UTC)
    else:
        try:
            at = parse_timestamp(now, "--now")
        except ValidationError as exc:
            _usage(f"--now: {exc}", as_json)
    store: TrustStore | None = None
    if trust is not None:
        try:
            store = TrustStore.load(trust)
        except ConfigError as exc:
            config_error(f"--trust: {exc}", as_json=as_json)
    data = _read_document_bytes(file, as_json)
    name = _show_path(file)
    problems: list[Problem] = []
    schedule: Schedule | None = None
    plan_view: dict[str, Any] | None = None
    signature: dict[str, str] = {}
    try:
        doc = load_json(data)
    except ValidationError as exc:
        problems.extend(exc.problems)
        doc = None
    if doc is not None:
        if not isinstance(doc, Mapping):
            problems.extend(check_structure(doc))
        else:
            try:
                schedule = parse_schedule(doc, spec, now=at, check_volume=False)
            except ValidationError as exc:
                problems.extend(exc.problems)
            else:
                plan = plan_course(schedule)
                problems.extend(plan.problems)
                plan_view = plan_payload(schedule, plan)
            # Belt and braces: the schema file must agree with the pure checks (tests prove it does).
            if not check_structure(doc):
                problems.extend(_schema_problems(doc))
            signature = _signature_status(doc, store, problems)
    if problems:
        _report_invalid(name, problems, as_json, plan_view)
    assert schedule is not None
    summary = summarize(schedule, spec)
    summary["signature"] = signature
    if as_json:
        emit_json({"ok": True, "file": name, **summary})
    else:
        _print_summary(name, summary)
    raise typer.Exit(EXIT_OK)


def _signature_status(doc: Mapping[str, object], store: TrustStore | None, problems: list[Problem]) -> dict[str, str]:
    sig = doc.get("signature")
    kid = sig.get("key_id") if isinstance(sig, Mapping) else None
    key_id = kid if isinstance(kid, str) else ""
    if store is None:
        if sig is None:
            return {"status": "unsigned", "note": "not verified (no --trust given)"}
        return {"status": "not-verified", "key_id": key_id[:16], "note": "pass --trust DIR to verify"}
    try:
        verified = store.verify(doc)
    except SignatureRejected as exc:
        problems.append(Problem("/signature", exc.reason, exc.detail))
        return {"status": "rejected", "reason": exc.reason}
    return {"status": "verified", "key_id": verified}


def _report_invalid(name: str, problems: list[Problem], as_json: bool,
                    plan: dict[str, Any] | None = None) -> NoReturn:
    if as_json:
        extra = {} if plan is None else {"volume_plan": plan}
        emit_json({"ok": False, "file": name, "problems": _problems_payload(problems), **extra})
    else:
        typer.echo(f"INVALID  {name}: {len(problems)} problem(s)")
        for p in problems:
            typer.echo(f"  {p.path or '/'}  [{p.rule}]  {p.detail}")
        if plan is not None:
            _print_plan(plan)
    raise typer.Exit(EXIT_REFUSED)


def _write_atomic(path: Path, text: str) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.command()
def sign(
    file: Annotated[Path, typer.Argument(help="Schedule JSON file to sign.", show_default=False, metavar="FILE")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key (PEM, PKCS#8).", show_default=False)],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the signed schedule here (default: standard output).")
    ] = None,
    as_json: JsonOpt = False,
    protocol: ProtocolOpt = None,
) -> None:
    """Sign a valid schedule (Ed25519 over its canonical JSON). Invalid schedules are refused."""
    spec = load_protocol(protocol, as_json)
    name, doc = _read_document(file, as_json)
    try:
        # No time checks: signing ahead of approval time is the signer's business; the daemon checks expiry.
        schedule = parse_schedule(doc, spec, now=None)
    except ValidationError as exc:
        _report_invalid(name, list(exc.problems), as_json)
    try:
        signed = sign_document(doc, key)
    except KeyFileError as exc:
        _usage(f"--key: {exc}", as_json)
    sig = signed["signature"]
    assert isinstance(sig, dict)
    text = to_json_text(signed)
    if out is not None:
        try:
            _write_atomic(out, text)
        except OSError as exc:
            fail(f"cannot write {_show_path(out)}: {exc.strerror or exc}", as_json=as_json)
        if as_json:
            emit_json(
                {"ok": True, "file": name, "out": _show_path(out), "key_id": sig["key_id"], "digest": schedule.digest}
            )
        else:
            typer.echo(f"signed {name} with key {sig['key_id']} -> {_show_path(out)}", err=True)
    elif as_json:
        # The document goes through to_json_text so its numbers stay numbers (the signature covers them).
        envelope = {"ok": True, "file": name, "key_id": sig["key_id"], "digest": schedule.digest, "document": signed}
        typer.echo(canonical_bytes(envelope).decode("utf-8"))
    else:
        typer.echo(text, nl=False)
    raise typer.Exit(EXIT_OK)



@app.command()
def push(
    file: Annotated[Path, typer.Argument(help="Signed schedule JSON file.", show_default=False, metavar="FILE")],
    as_json: JsonOpt = False,
    socket: Annotated[
        Path | None,
        typer.Option("--socket", envvar="DRIVERD_SOCKET", show_default=False,
                     help="Control socket (default: $DRIVERD_SOCKET, else control_socket of the config)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", envvar="DRIVERD_CONFIG", show_default=False,
                                  help="Daemon config, used to find the control socket (default: $DRIVERD_CONFIG, "
                                  "else /etc/driverd/driverd.toml).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the daemon's reply.")] = 40.0,
) -> None:
    """Push a signed schedule to the running daemon. It checks signature, trust, expiry, version and limits."""
    # Imported here: the runtime client is only needed by push (validate/sign stay offline tools).
    from driverd.cli.status import DEFAULT_CONFIG, call, report_refusal, resolve_socket
    from driverd.runtime.control import MAX_REQUEST_BYTES, encode_request

    name, doc = _read_document(file, as_json)
    payload = {"op": "push", "schedule": doc}
    try:
        size = len(encode_request(payload))
    except (TypeError, ValueError) as exc:
        _report_invalid(name, [Problem("", "json", f"cannot be sent exactly: {exc}")], as_json)
    if size > MAX_REQUEST_BYTES:
        _report_invalid(name, [Problem("", "size", f"larger than the control API's {MAX_REQUEST_BYTES} bytes")],
                        as_json)
    path = resolve_socket(socket, config or DEFAULT_CONFIG, as_json)
    reply = call(path, payload, as_json, timeout)
    if not reply.get("ok"):
        report_refusal(f"push {name}", reply, as_json)
    if as_json:
        emit_json({**reply, "file": name})
    else:
        typer.echo(f"ACCEPTED  {name}: schedule {reply.get('schedule_id')} v{reply.get('version')}"
                   f" (key {reply.get('key_id')}), pump phase {reply.get('phase')}")
    raise typer.Exit(EXIT_OK)
