"""`driverd demo`: a whole burst course on simulated pumps over the real driver path, then audit verify+replay."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from driverd.cli.output import EXIT_REFUSED, emit_json, fail, usage


def demo(
    speed: Annotated[str, typer.Option(help="'max' (virtual time, as fast as possible) or N (N x real time)")] = "max",
    pumps: Annotated[int, typer.Option(min=1, max=64, help="Number of simulated pumps")] = 1,
    driver: Annotated[str, typer.Option(help="sim (in-process), newera or harvard (serial over a PTY), modbus (TCP)")]
    = "sim",
    audit: Annotated[Path | None, typer.Option(help="Audit log directory (default: a new temp dir)")] = None,
    faults: Annotated[bool, typer.Option("--faults", help="Inject an occlusion and a link loss on bed-1")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary")] = False,
    hl7_to: Annotated[str | None, typer.Option("--hl7-to", metavar="HOST:PORT",
                                               help="Send the course's PCD-01/PCD-04 messages to this MLLP receiver")]
    = None,
) -> None:
    """Run a full burst course (100 -> 300 -> 500 mg/24h, 3-day hold, stop) and verify the audit log."""
    from driverd.audit.reader import iter_lines
    from driverd.audit.replay import replay_lines
    from driverd.audit.segments import list_segments
    from driverd.audit.verify import verify_log
    from driverd.runtime.demo import DRIVERS, DemoOptions, run_demo
    from driverd.signing import load_public_key

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
    opts = DemoOptions(driver=driver, pumps=pumps, speed=rate, audit_dir=audit, faults=faults, hl7_to=address)

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
    # Streamed record by record: memory does not grow with the log (32 pumps write about 230,000 records).
    replayed = replay_lines(line for _, seg in list_segments(result.audit_dir) for line in iter_lines(seg))
    ok = verified.ok and replayed.ok and not result.timed_out and all(p["phase"] == "stopped" for p in result.pumps)
    if result.hl7 is not None:
        ok = ok and bool(result.hl7["delivered"])
    summary: dict[str, Any] = {
        "ok": ok,
        "driver": driver,
        "virtual_seconds": result.virtual_seconds,
        "audit_dir": str(result.audit_dir),
        "audit_public_key": str(result.audit_public_key),
        "pumps": result.pumps,
        "faults": result.faults,
        **({"hl7": result.hl7} if result.hl7 is not None else {}),
        "syringe_log": result.syringe_log,
        "verify": verified.as_dict(),
        "replay": replayed.as_dict(),
    }
    if as_json:
        emit_json(summary)
    else:
        _print(summary, replayed)
    if not ok:
        fail("demo did not complete cleanly (see above)", as_json=as_json, code=EXIT_REFUSED)


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
    echo(f"audit log: {summary['audit_dir']}  (public key {summary['audit_public_key']})")
    echo(f"verify it yourself: driverd audit verify {summary['audit_dir']} --key {summary['audit_public_key']}")
