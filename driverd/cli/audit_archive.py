"""`driverd audit archive LOG --before DATE DIR`: move sealed segments whose courses have ended out of the live log
(driverd/audit/archive.py; docs/audit.md, "Archiving")."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from driverd.cli.output import EXIT_REFUSED, emit_json, fail, usage
from driverd.core.errors import DriverdError

if TYPE_CHECKING:  # imported when the command runs (the CLI's start-up stays light)
    from driverd.audit.archive import ArchiveRefused


def archive(
    log: Annotated[Path, typer.Argument(help="the live audit log directory")],
    dest: Annotated[Path, typer.Argument(metavar="DIR", help="archive directory (created if missing)")],
    before: Annotated[str, typer.Option("--before", metavar="DATE",
                                        help="archive only segments whose records are all before this: YYYY-MM-DD "
                                             "(midnight UTC) or an RFC 3339 time")],
    key: Annotated[Path | None, typer.Option("--key", help="the daemon's audit signing key (PEM private key): "
                                                           "signs the archive anchor; required for a signed log")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable JSON output")] = False,
) -> None:
    """Move sealed segments before DATE whose courses have ended into DIR, leaving a signed archive anchor: the
    live log still verifies and start-up still recovers. Running it again finishes an interrupted run."""
    from driverd.audit.archive import ArchiveRefused, archive_log, parse_before
    from driverd.signing import load_private_key

    def bad_usage(message: str) -> None:
        usage(message, as_json)

    try:
        cut = parse_before(before)
    except ValueError as exc:
        bad_usage(str(exc))
    if not log.is_dir():
        bad_usage(f"{log}: not an audit log directory")
    private = None
    if key is not None:
        try:
            private = load_private_key(key)
        except DriverdError as exc:
            bad_usage(f"--key {exc}")
    try:
        result = archive_log(log, cut, dest, private)
    except ArchiveRefused as exc:
        if exc.nothing_to_archive:
            # Not a failure (cron runs this daily): exit 0, saying why nothing went. Nothing was moved.
            _nothing(exc, log, as_json)
            return
        # JSON: error.code is the reason (not_before_date, course_active, ...).
        fail(f"archive refused ({exc.reason}): {exc.detail}", as_json=as_json, code=EXIT_REFUSED,
             error_code=exc.reason)
    except DriverdError as exc:
        fail(str(exc), as_json=as_json, code=EXIT_REFUSED, error_code="io_error")
    if as_json:
        emit_json(result.as_dict())
        return
    if result.finished:
        typer.echo(f"finished an interrupted archive: removed segments {_span(result.finished)} (archived earlier)")
    if result.archived:
        typer.echo(f"archived segments {_span(result.archived)} ({result.bytes_moved} bytes) to {result.archive}")
    typer.echo(f"live log: from segment {result.first_segment} (seq {result.last_seq + 1}), starting from the state "
               f"snapshot at seq {result.snapshot_seq}; anchor {result.as_dict()['anchor']} "
               f"({'signed' if result.signed else 'unsigned: the log has no key'})")


def _nothing(exc: ArchiveRefused, log: Path, as_json: bool) -> None:
    if as_json:
        emit_json({"ok": True, "log": str(log), "archived": [], "finished": [],
                   "nothing_to_archive": {"reason": exc.reason, "detail": exc.detail}})
    else:
        typer.echo(f"nothing to archive ({exc.reason}): {exc.detail}")


def _span(numbers: list[int]) -> str:
    return f"{numbers[0]}..{numbers[-1]}" if len(numbers) > 1 else str(numbers[0])
