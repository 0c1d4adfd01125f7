"""`driverd demo`: a whole burst course on simulated pumps over the real driver path, then audit verify+replay."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer

from driverd.cli.output import EXIT_REFUSED, emit_json, fail, usage


def demo(
    speed: Annotated[str, typer.Option(help="'max' (virtual time, as fast as possible) or N "
                                            "(never faster than N x real time)")] = "max",
    pumps: Annotated[int, typer.Option(min=1, max=64, help="Number of simulated pumps")] = 1,
    driver: Annotated[str, typer.Option(help="sim (in-process), newera or harvard (serial over a PTY), modbus (TCP)")]
    = "sim",
    audit: Annotated[Path | None, typer.Option(help="Keep the audit log (and the demo's keys) in this directory; "
                                                    "without it everything is removed at exit")] = None,
    faults: Annotated[bool, typer.Option("--faults", help="Occlude bed-1, then cut its link; a clinician "
                                                          "resumes each")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary")] = False,
    hl7_to: Annotated[str | None, typer.Option("--hl7-to", metavar="HOST:PORT",
                                               help="Send the course's PCD-01/PCD-04 messages to this MLLP receiver")]
    = None,
) -> None:
    """Run a full burst course (100 -> 300 -> 500 mg/24h, 3-day hold, stop) and verify the audit log."""
    from driverd.runtime.demo import DRIVERS, DemoOptions

    if driver not in DRIVERS:
        usage(f"--driver must be one of {', '.join(DRIVERS)}")
    rate: float | None = None
    if speed != "max":
        try:
            rate = float(speed)
            if not 1 <= rate <= 1e7:
                raise ValueError
        except ValueError:
            usage("--speed must be 'max' or a number from 1 to 10000000")
    if audit is not None and audit.exists() and any(audit.iterdir()):
        usage(f"--audit {audit}: directory is not empty (a demo writes a new log)")
    address = None
    if hl7_to is not None:
        from driverd.core.errors import Problem
        from driverd.hl7.settings import parse_address

        problems: list[Problem] = []
        address = parse_address(hl7_to, "--hl7-to", problems)
        if problems:
            usage(str(problems[0]))
    # The work dir holds the demo's private audit key: it goes at exit, on error and on Ctrl-C/SIGTERM too, unless
    # --audit asked to keep the run (then the log, its public key and the config stay for `audit verify`).
    work = Path(tempfile.mkdtemp(prefix="driverd-demo-"))
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        opts = DemoOptions(driver=driver, pumps=pumps, speed=rate, audit_dir=audit, faults=faults, hl7_to=address,
                           work_dir=work)
        summary, replayed = _run(opts, as_json)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if audit is None:
            shutil.rmtree(work, ignore_errors=True)
    summary["kept"] = audit is not None
    if as_json:
        emit_json(summary)
    else:
        _print(summary, replayed)
    if not summary["ok"]:
        if as_json:
            raise typer.Exit(EXIT_REFUSED)  # the summary says why: "ok": false and "failures"
        fail("demo FAILED: " + "; ".join(summary["failures"]), as_json=False, code=EXIT_REFUSED)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks (the demo's temp dir is removed)


def _run(opts: Any, as_json: bool) -> tuple[dict[str, Any], Any]:
    from driverd.audit.reader import iter_lines
    from driverd.audit.replay import replay_lines
    from driverd.audit.segments import list_segments
    from driverd.audit.verify import verify_log
    from driverd.runtime.demo import run_demo
    from driverd.runtime.demo_checks import DemoJudge
    from driverd.signing import load_public_key

    show = sys.stdout.isatty() and not as_json
    if show:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]course"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                      TextColumn("{task.description}"), TimeElapsedColumn()) as bar:
            task = bar.add_task("starting", total=1.0)
            result = asyncio.run(run_demo(opts, lambda done, phases: bar.update(task, completed=done,
                                                                                description=phases)))
    else:
        result = asyncio.run(run_demo(opts))

    key = load_public_key(result.audit_public_key)
    verified = verify_log(result.audit_dir, public_key=key, require_sealed=True)
    # Judged from the log itself, as an auditor would: did every course end as planned, reach every step, and
    # deliver what was commanded (driverd.runtime.demo_checks)?
    judge = DemoJudge([p["pump_id"] for p in result.pumps], poll_period_s=Decimal(str(opts.poll_period_s)),
                      deadman_s=opts.deadman_s)
    # Streamed record by record: memory does not grow with the log (32 pumps write about 230,000 records).
    replayed = replay_lines(judge.watch(line for _, seg in list_segments(result.audit_dir) for line in iter_lines(seg)))
    failures = judge.reasons()
    if not verified.ok:
        failures.append("audit verify failed")
    if not replayed.ok:
        failures.append(f"audit replay failed ({len(replayed.divergences)} divergence(s))")
    if result.timed_out:
        failures.append("gave up at the virtual time limit before every course ended")
    if result.hl7 is not None and not result.hl7["delivered"]:
        failures.append("HL7 messages not all delivered")
    summary: dict[str, Any] = {
        "ok": not failures,
        "failures": failures,
        "driver": opts.driver,
        "speed": opts.speed,
        "virtual_seconds": result.virtual_seconds,
        "audit_dir": str(result.audit_dir),
        "audit_public_key": str(result.audit_public_key),
        "pumps": result.pumps,
        "courses": judge.summary(),
        "faults": result.faults,
        **({"hl7": result.hl7} if result.hl7 is not None else {}),
        "syringe_log": result.syringe_log,
        "verify": verified.as_dict(),
        "replay": replayed.as_dict(),
    }
    return summary, replayed


def _print(summary: dict[str, Any], replayed: Any) -> None:
    echo = typer.echo
    echo(f"driverd demo: {len(summary['pumps'])} pump(s) over '{summary['driver']}', "
         f"{summary['virtual_seconds'] / 86400:.2f} virtual days")
    for line in replayed.text_lines()[2:]:
        echo(line)
    for f in summary["faults"]:
        echo(f"fault: {f}")
    h = summary.get("hl7")
    if h is not None:
        echo(f"hl7: {h['acked']} message(s) ACKed by {h['to']} ({h['resent']} resent, {h['rejected']} rejected), "
             f"{h['pending']} still queued{'' if h['delivered'] else ' - NOT DELIVERED'}")
    for p in summary["pumps"]:
        echo(f"{p['pump_id']}: {p['syringe_changes']} syringe change(s), {p['delivered_mg']} mg delivered")
    for line in summary["syringe_log"]:
        echo(f"syringe: {line}")
    v = summary["verify"]
    echo(f"audit verify: {'OK' if v['ok'] else 'FAILED'} - {v['records']} records, {v['checkpoints']} signed "
         f"checkpoints, key {(v['key_fingerprint'] or '')[:16]}..., unsealed tail {v['unsealed_records']}")
    echo(f"audit replay: {'OK' if replayed.ok else 'FAILED'} - {replayed.inputs} inputs, "
         f"{replayed.outputs_checked} decisions recomputed, {len(replayed.divergences)} divergence(s)")
    for c in summary["courses"]:
        echo(f"{c['pump_id']}: course {c['course_id']} ended {c['phase']} ({c['end_cause'] or 'no end record'}), "
             f"steps {len(c['reached_steps'])}/{len(c['planned_steps'])}, pump-reported {c['delivered_mg']} mg, "
             f"commanded {c['commanded_mg']} mg")
    if summary["kept"]:
        echo(f"audit log: {summary['audit_dir']}  (public key {summary['audit_public_key']})")
        echo(f"verify it yourself: driverd audit verify {summary['audit_dir']} --key {summary['audit_public_key']}")
    else:
        echo("audit log: removed at exit with the demo's keys (give --audit DIR to keep them)")
    echo("demo: OK" if summary["ok"] else "demo: FAILED: " + "; ".join(summary["failures"]))
