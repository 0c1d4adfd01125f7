"""`driverd audit ...`: verify, replay, export and report on an audit log (a directory or one segment)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from driverd.cli.output import EXIT_REFUSED, EXIT_USAGE, emit_json, fail, usage
from driverd.core.errors import DriverdError

app = typer.Typer(help="Verify, replay, export and summarise audit logs.", no_args_is_help=True)

LogArg = Annotated[Path, typer.Argument(help="audit log directory, or one segment file (audit-NNNNNN.jsonl)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]


def _need_log(path: Path, as_json: bool) -> None:
    if not path.exists():
        if as_json:
            fail(f"{path}: no such file or directory", as_json=True, code=EXIT_USAGE)
        usage(f"{path}: no such file or directory")


@contextmanager
def _progress(label: str, total: int, as_json: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on a terminal (not with --json, not when piped); otherwise no callback at all."""
    if as_json or not sys.stdout.isatty() or total <= 0:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=True
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@app.command()
def verify(
    log: LogArg,
    key: Annotated[
        Path | None, typer.Option("--key", help="PEM public key (from `driverd keys generate`) to check against")
    ] = None,
    require_sealed: Annotated[
        bool, typer.Option("--require-sealed", help="also fail when records follow the last signed checkpoint")
    ] = False,
    trust: Annotated[
        Path | None,
        typer.Option("--trust", help="trust directory (*.pub): also check every accepted schedule's signed document "
                                     "as crash recovery does"),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", min=1, max=64, help="worker processes (default: one per CPU, at most 8; logs under "
                                                   "4 MiB are verified in this process)"),
    ] = None,
    archive: Annotated[
        list[Path] | None,
        typer.Option("--archive", metavar="DIR", help="also verify the segments `audit archive` moved to DIR: one "
                                                      "chain from seq 1 through the live log (repeatable)"),
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="also replay the whole log through the core: every decision and every "
                                          "state snapshot must equal what replay computes (start-up trusts "
                                          "the newest snapshot on its signature alone)")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check canonical form, seq continuity, the hash chain, segment links and every checkpoint signature."""
    from driverd.audit.reader import total_bytes
    from driverd.audit.signing import load_public_pem
    from driverd.audit.verify import default_workers, verify_log
    from driverd.signing import TrustStore

    _need_log(log, as_json)
    workers = jobs if jobs is not None else default_workers()
    public = None
    store = None
    try:
        if key is not None:
            public = load_public_pem(key)
        if trust is not None:
            store = TrustStore.load(trust)
    except DriverdError as exc:
        if as_json:
            fail(str(exc), as_json=True, code=EXIT_USAGE)
        usage(str(exc))
    schedules: dict[str, Any] | None = None
    try:
        with _progress("verifying", total_bytes(log), as_json) as progress:
            if archive:
                from driverd.audit.archive import verify_with_archive

                report = verify_with_archive(log, list(archive), public_key=public, require_sealed=require_sealed,
                                             progress=progress, workers=workers)
            else:
                report = verify_log(log, public_key=public, require_sealed=require_sealed, progress=progress,
                                    workers=workers)
        if store is not None and report.ok:
            schedules = _check_schedules(log, store)
        replayed = _full_replay(log, archive) if full and report.ok else None
    except DriverdError as exc:
        fail(str(exc), as_json=as_json)
    ok = report.ok and (schedules is None or schedules["ok"]) and (replayed is None or replayed["ok"])
    if as_json:
        emit_json({**report.as_dict(), "ok": ok, "schedules": schedules, "full": replayed})
    else:
        _print_verify(report)
        if schedules is not None:
            if schedules["ok"]:
                typer.echo(f"  schedules: {schedules['checked']} accepted schedule(s), each signed by a key in {trust}")
            else:
                typer.echo(f"FAILED: {schedules['failure']}")
        if replayed is not None:
            if replayed["ok"]:
                typer.echo(f"  full: {replayed['snapshots']} state snapshot(s) and {replayed['outputs']} decision(s) "
                           "equal what replay computes")
            else:
                typer.echo(f"FAILED (full): {replayed['failure']}")
    if not ok:
        raise typer.Exit(EXIT_REFUSED)


def _full_replay(log: Path, archive: list[Path] | None = None) -> dict[str, Any]:
    """`--full`: replay from the first record; every state snapshot is compared with replay's own states. With
    --archive, from the first archived record through the live log."""
    from driverd.audit.reader import iter_records
    from driverd.audit.replay import Replayer
    from driverd.audit.snapshot import SNAPSHOT_EVENT

    records = iter_records(log)
    if archive:
        from driverd.audit.archive import whole_chain

        records = (rec for _, seg in whole_chain(log, list(archive)) for rec in iter_records(seg))
    replayer = Replayer()
    snapshots = 0
    for rec in records:
        snapshots += rec.get("event") == SNAPSHOT_EVENT
        replayer.add(rec)
    result = replayer.finish()
    first = result.divergences[0] if result.divergences else None
    return {"ok": first is None, "snapshots": snapshots, "outputs": result.outputs_checked,
            "divergences": len(result.divergences),
            "failure": None if first is None else f"seq {first.seq} ({first.kind}): {first.detail}"}


def _check_schedules(log: Path, store: Any) -> dict[str, Any]:
    """The signed-schedule check crash recovery applies (driverd.audit.schedules), as a report."""
    from driverd.audit.reader import iter_records
    from driverd.audit.schedules import ScheduleChecker, UntrustedSchedule

    checker = ScheduleChecker(store)
    library = False
    try:
        for rec in iter_records(log):
            library = library or rec.get("event") == "library_loaded"
            if rec.get("event") == "state_snapshot" and not library and isinstance(rec.get("library"), str):
                # A live log after `audit archive` starts from a snapshot: the library in force is the snapshot's.
                checker.add({"event": "library_loaded", "text": rec["library"]})
                library = True
            checker.add(rec)
    except UntrustedSchedule as exc:
        return {"ok": False, "checked": checker.checked, "seq": exc.seq, "failure": str(exc)}
    return {"ok": True, "checked": checker.checked, "seq": None, "failure": None}


def _print_verify(report: Any) -> None:
    f = report.failure
    if f is not None:
        where = f"{f.file}:{f.line}" if f.line else f.file
        seq = f"seq {f.seq}" if f.seq is not None else "log"
        typer.echo(f"FAILED at {seq} ({where}): {f.reason}")
        if report.last_seq is not None:
            typer.echo(f"  records before it verified: seq {report.first_seq}..{report.last_seq}")
    else:
        typer.echo(
            f"OK: {report.records} records in {report.segments} segment(s), seq {report.first_seq}..{report.last_seq}, "
            f"{report.checkpoints} signed checkpoint(s)"
            + (f", last at seq {report.last_checkpoint_seq}" if report.last_checkpoint_seq else "")
        )
        typer.echo(f"  head: {report.head}")
    if report.key_fingerprint:
        src = "from --key" if report.key_source == "argument" else "recorded in the log"
        typer.echo(f"  key: {report.key_fingerprint} ({src})")
    for note in report.notes:
        typer.echo(f"  note: {note}")


@app.command()
def replay(log: LogArg, as_json: JsonOpt = False) -> None:
    """Fold the logged inputs through the pure core; compare every recomputed decision with the log."""
    from driverd.audit.reader import iter_lines, total_bytes
    from driverd.audit.replay import replay_lines

    _need_log(log, as_json)
    try:
        with _progress("replaying", total_bytes(log), as_json) as progress:
            result = replay_lines(iter_lines(log, progress))
    except DriverdError as exc:
        fail(str(exc), as_json=as_json)
    if as_json:
        emit_json(result.as_dict())
    else:
        for text in result.text_lines():
            typer.echo(text)
    if not result.ok:
        raise typer.Exit(EXIT_REFUSED)


@app.command()
def export(
    log: LogArg,
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl")] = "jsonl",
    out: Annotated[Path | None, typer.Option("--out", help="write here instead of stdout")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export every record as CSV (envelope columns + fields as JSON) or JSONL (the exact lines)."""
    from driverd.audit.export import FORMATS, export_text
    from driverd.audit.reader import iter_lines

    _need_log(log, as_json)
    if fmt not in FORMATS:
        if as_json:
            fail(f"--format must be one of {', '.join(FORMATS)}", as_json=True, code=EXIT_USAGE)
        usage(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        text = export_text(iter_lines(log), fmt)
    except DriverdError as exc:
        fail(str(exc), as_json=as_json)
    if out is None:
        if as_json:
            emit_json({"ok": True, "format": fmt, "data": text})
        else:
            sys.stdout.write(text)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"{out}: cannot write: {exc.strerror}", as_json=as_json)
    if as_json:
        emit_json({"ok": True, "format": fmt, "out": str(out), "records": text.count("\n") - (fmt == "csv")})
    else:
        typer.echo(f"wrote {out}")


@app.command()
def report(
    log: LogArg,
    png: Annotated[Path | None, typer.Option("--png", help="also draw a dose timeline (needs driverd[plot])")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Readable summary per pump and course: states with times, rates, mg delivered, refusals, alarms."""
    from driverd.audit.reader import iter_records
    from driverd.audit.report import build_report, plot_png, report_lines

    _need_log(log, as_json)
    try:
        rep = build_report(iter_records(log))
    except DriverdError as exc:
        fail(str(exc), as_json=as_json)
    if png is not None:
        try:
            plot_png(rep, png)
        except DriverdError as exc:
            fail(str(exc), as_json=as_json)
    if as_json:
        emit_json({"ok": True, **rep.as_dict(), **({"png": str(png)} if png else {})})
    else:
        for text in report_lines(rep):
            typer.echo(text)
        if png is not None:
            typer.echo(f"wrote {png}")


# `driverd audit archive` lives in its own module (issue 12).
from driverd.cli.audit_archive import archive as _archive  # noqa: E402

app.command("archive")(_archive)
