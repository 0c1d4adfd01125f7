"""`driverd audit ...`: verify, replay, export and report on an audit log (a directory or one segment)."""

from __future__ import annotations

import contextlib
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
                                                   "4 MiB are verified in this process); --full replays with them "
                                                   "too"),
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
    all_problems: Annotated[
        bool, typer.Option("--all", help="list every problem in the log (like git fsck), not only the first: seq, "
                                         "file:line, rule and reason for each; one process")
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
    if all_problems:
        _verify_all(log, public, require_sealed, store, trust, full, as_json)
        return
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
        replayed = _full_replay(log, archive, workers) if full and report.ok else None
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
                typer.echo(f"  full: {replayed['snapshots']} state snapshot(s), {replayed['deltas']} state "
                           f"delta(s) and {replayed['outputs']} decision(s) equal what replay computes")
            else:
                typer.echo(f"FAILED (full): {replayed['failure']}")
    if not ok:
        raise typer.Exit(EXIT_REFUSED)


def _verify_all(log: Path, public: Any, require_sealed: bool, store: Any, trust: Path | None, full: bool,
                as_json: bool) -> None:
    """`verify --all`: every problem, then (on a clean log) the --trust and --full checks as without --all."""
    from driverd.audit.fsck import check_all

    try:
        found = check_all(log, public_key=public, require_sealed=require_sealed)
        schedules = _check_schedules(log, store) if store is not None and found.ok else None
        replayed = _full_replay(log) if full and found.ok else None
    except DriverdError as exc:
        fail(str(exc), as_json=as_json)
    ok = found.ok and (schedules is None or schedules["ok"]) and (replayed is None or replayed["ok"])
    if as_json:
        emit_json({**found.as_dict(), "ok": ok, "schedules": schedules, "full": replayed})
    else:
        for p in found.problems:
            seq = f"seq {p.seq}" if p.seq is not None else "log"
            where = f"{p.file}:{p.line}" if p.line else p.file
            typer.echo(f"{seq} ({where}) [{p.rule}] {p.reason}")
        if found.count > len(found.problems):
            typer.echo(f"... and {found.count - len(found.problems)} more problem(s) not listed")
        if found.ok:
            typer.echo(f"OK: no problem in {found.lines} line(s), {found.segments} segment(s)")
        else:
            typer.echo(f"FAILED: {found.count} problem(s) in {found.lines} line(s), {found.segments} segment(s)")
        if schedules is not None:
            typer.echo(f"  schedules: {schedules['checked']} accepted schedule(s), each signed by a key in {trust}"
                       if schedules["ok"] else f"FAILED: {schedules['failure']}")
        if replayed is not None:
            typer.echo(f"  full: {replayed['snapshots']} state snapshot(s), {replayed['deltas']} state delta(s) and "
                       f"{replayed['outputs']} decision(s) equal what replay computes"
                       if replayed["ok"] else f"FAILED (full): {replayed['failure']}")
    if not ok:
        raise typer.Exit(EXIT_REFUSED)


def _full_replay(log: Path, archive: list[Path] | None = None, workers: int = 1) -> dict[str, Any]:
    """`--full`: replay from the first record; every state snapshot is compared with replay's own states. With
    --archive, from the first archived record through the live log. `workers` > 1: in parallel, cut at state
    snapshots (driverd/audit/replay_parallel.py; the verdict is the one-process one)."""
    from driverd.audit.replay_parallel import ReplayInfo, replay_log

    segments = None
    if archive:
        from driverd.audit.archive import whole_chain

        segments = [seg for _, seg in whole_chain(log, list(archive))]
    info = ReplayInfo()
    result = replay_log(log, jobs=workers, segments=segments, report=False, info=info)
    first = result.divergences[0] if result.divergences else None
    return {"ok": first is None, "snapshots": info.snapshots, "deltas": info.deltas,
            "outputs": result.outputs_checked, "divergences": len(result.divergences),
            "failure": None if first is None else f"seq {first.seq} ({first.kind}): {result.detail(first)}"}


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
def replay(
    log: LogArg,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", min=1, max=64, help="worker processes, each replaying a slice of the log between two "
                                                   "state snapshots (default: one per CPU, at most 8; logs under 2 "
                                                   "MiB or without snapshots to cut at are replayed in this process; "
                                                   "the result is the one-process one)"),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", metavar="WHEN",
                     help="replay only from the newest sealed state snapshot at or before WHEN (YYYY-MM-DD, "
                          "midnight UTC, or an RFC 3339 time) to the end; the log is verified from that snapshot "
                          "on first (with --key if given); no per-course report"),
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="with --since: PEM public key the checkpoints must be "
                                                           "signed with")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fold the logged inputs through the pure core; compare every recomputed decision with the log."""
    from driverd.audit.reader import total_bytes
    from driverd.audit.replay_parallel import replay_log
    from driverd.audit.verify import default_workers

    if key is not None and since is None:
        usage("--key: only with --since (`audit verify --key` checks the whole log)", as_json)
    if since is not None:
        _replay_since(log, since, key, as_json)
        return
    _need_log(log, as_json)
    try:
        with _progress("replaying", total_bytes(log), as_json) as progress:
            result = replay_log(log, jobs=jobs if jobs is not None else default_workers(), progress=progress)
    except DriverdError as exc:
        fail(str(exc), as_json=as_json)
    if as_json:
        emit_json(result.as_dict())
    else:
        for text in result.text_lines():
            typer.echo(text)
    if not result.ok:
        raise typer.Exit(EXIT_REFUSED)


def _replay_since(log: Path, since: str, key: Path | None, as_json: bool) -> None:
    from driverd.audit.archive import parse_before
    from driverd.audit.replay_window import replay_since
    from driverd.audit.signing import load_public_pem

    try:
        when = parse_before(since, "--since")
    except ValueError as exc:
        usage(str(exc), as_json)
    public = None
    if key is not None:
        try:
            public = load_public_pem(key)
        except DriverdError as exc:
            usage(f"--key {exc}", as_json)
    _need_log(log, as_json)
    try:
        result, window = replay_since(log, when, public_key=public)
    except DriverdError as exc:
        fail(str(exc), as_json=as_json)
    if as_json:
        emit_json({**result.as_dict(), "window": window.as_dict()})
    else:
        for text in result.text_lines():
            if text == "":  # the per-course report follows: the window has none
                break
            typer.echo(text)
        for text in window.text_lines():
            typer.echo(text)
    if not result.ok:
        raise typer.Exit(EXIT_REFUSED)


PrefixOpt = Annotated[
    bool, typer.Option("--verified-prefix", help="on a damaged log, use only the part `audit verify` accepts (every "
                                                 "record before its first failure), with a loud warning naming where "
                                                 "verification stopped")
]


def _source(log: Path, verified_prefix: bool, as_json: bool) -> tuple[Callable[[], Iterator[Any]], Any]:
    """The lines to read: all of them, or the verified prefix (then also the Prefix, for its warning)."""
    from driverd.audit.fsck import prefix_lines
    from driverd.audit.fsck import verified_prefix as find_prefix
    from driverd.audit.reader import iter_lines
    from driverd.audit.verify import default_workers

    if not verified_prefix:
        return (lambda: iter_lines(log)), None
    try:
        prefix = find_prefix(log, workers=default_workers())
    except DriverdError as exc:
        fail(str(exc), as_json=as_json)
    warning = prefix.warning()
    if warning is not None:
        typer.secho(warning, err=True, fg=typer.colors.RED, bold=True)
    return (lambda: prefix_lines(log, prefix)), prefix


def _damaged_hint(message: str) -> str:
    if "audit verify" in message or "torn" in message or "canonical" in message or "longer than" in message:
        return (f"{message} (`driverd audit verify --all` lists every problem; --verified-prefix reads the part "
                "before the first)")
    return message


@app.command()
def export(
    log: LogArg,
    fmt: Annotated[str, typer.Option("--format", help="csv (a column per field, nested fields as dotted columns) "
                                                      "or jsonl (the exact lines)")] = "jsonl",
    out: Annotated[Path | None, typer.Option("--out", help="write here instead of stdout")] = None,
    pump: Annotated[str | None, typer.Option("--pump", help="only this pump's records")] = None,
    course: Annotated[str | None, typer.Option("--course", help="only this course's records (and its push)")] = None,
    since: Annotated[str | None, typer.Option("--since", help="only records written at or after this ISO 8601 time "
                                                              "(with Z or an offset; a date alone is 00:00 UTC)")]
    = None,
    verified_prefix: PrefixOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export records as CSV (flattened columns) or JSONL (the exact lines), optionally filtered."""
    import io
    import os
    import tempfile

    from driverd.audit.export import FORMATS, Filter, plan, write
    from driverd.audit.timezones import parse_since

    def bad_usage(message: str) -> None:
        if as_json:
            fail(message, as_json=True, code=EXIT_USAGE)
        usage(message)

    _need_log(log, as_json)
    if fmt not in FORMATS:
        bad_usage(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    keep = Filter(pump=pump, course=course)
    if since is not None:
        try:
            keep = Filter(pump=pump, course=course, since=parse_since(since))
        except DriverdError as exc:
            bad_usage(str(exc))
    source, prefix = _source(log, verified_prefix, as_json)
    extra = {"verified_prefix": prefix.as_dict()} if prefix is not None else {}
    try:
        p = plan(source(), keep)
        if out is None:
            buf = io.StringIO() if as_json else sys.stdout
            try:
                n = write(source(), fmt, buf, keep, p.columns)
            except BrokenPipeError:
                # `| head`: the reader has what it wanted; a closed pipe is not a failure.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return
            if as_json:
                assert isinstance(buf, io.StringIO)
                emit_json({"ok": True, "format": fmt, "records": n, "data": buf.getvalue(), **extra})
            return
        # Written beside the target and renamed: a failure leaves no partial file (and no file at all).
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                n = write(source(), fmt, f, keep, p.columns)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except DriverdError as exc:
        fail(_damaged_hint(str(exc)), as_json=as_json)
    except OSError as exc:
        fail(f"{out}: cannot write: {exc.strerror}", as_json=as_json)
    if as_json:
        emit_json({"ok": True, "format": fmt, "out": str(out), "records": n, **extra})
    else:
        typer.echo(f"wrote {n} record(s) to {out}")


@app.command()
def report(
    log: LogArg,
    png: Annotated[Path | None, typer.Option("--png", help="also draw each course (dose over time, commanded vs "
                                                           "pump-reported mg, alarms shaded, steps marked) as PNG; "
                                                           "needs driverd[plot]")] = None,
    svg: Annotated[Path | None, typer.Option("--svg", help="the same drawing as SVG; needs driverd[plot]")] = None,
    tz: Annotated[str, typer.Option("--tz", help="time zone of the human report and the plots' time axis: local, "
                                                 "UTC or an IANA name (Europe/London); JSON is always UTC")] = "UTC",
    verified_prefix: PrefixOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Per course: who ordered each change and why, states, mg commanded and pump-reported, alarm periods,
    refusals, the handover record; times ISO 8601 with zone."""
    from driverd.audit.report import build_report, plot, report_lines
    from driverd.audit.timezones import parse_zone

    _need_log(log, as_json)
    try:
        zone = parse_zone(tz)
    except DriverdError as exc:
        if as_json:
            fail(str(exc), as_json=True, code=EXIT_USAGE)
        usage(str(exc))
    for path in (png, svg):
        if path is not None and (path.is_dir() or not (path.parent if str(path.parent) else Path(".")).is_dir()):
            message = f"{path}: not a file in an existing directory"
            if as_json:
                fail(message, as_json=True, code=EXIT_USAGE)
            usage(message)
    source, prefix = _source(log, verified_prefix, as_json)
    try:
        rep = build_report(line.record for line in source())
        for path, fmt in ((png, "png"), (svg, "svg")):
            if path is not None:
                plot(rep, path, fmt, zone)
    except DriverdError as exc:
        fail(_damaged_hint(str(exc)), as_json=as_json)
    written = {k: str(v) for k, v in (("png", png), ("svg", svg)) if v is not None}
    if as_json:
        emit_json({"ok": True, **rep.as_dict(), **written,
                   **({"verified_prefix": prefix.as_dict()} if prefix is not None else {})})
    else:
        for text in report_lines(rep, zone):
            typer.echo(text)
        for shown in written.values():
            typer.echo(f"wrote {shown}")


def _register_tail() -> None:
    from driverd.cli.audit_tail import tail

    app.command("tail")(tail)


_register_tail()


def _register_archive() -> None:
    # `driverd audit archive` lives in its own module (issue 12).
    from driverd.cli.audit_archive import archive

    app.command("archive")(archive)


_register_archive()
