"""Entry point: the `driverd` command. Groups live in their own modules; this file only joins them.

`run_cli` is the one place exit codes are settled for every command (docs/operations.md, "Exit codes"):
0/1/2 only, usage errors as JSON under --json, a reader closing stdout early is not a failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

import driverd
from driverd.cli import audit, config, course, demo, hl7, keys, pump, run, schedule, sim, status
from driverd.cli.output import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, emit_json, error_payload

try:  # typer >= 0.26 carries its own copy of click; older ones use click itself
    from typer._click import exceptions as click_exc
    from typer._click import utils as click_utils
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exc  # type: ignore[no-redef]
    from click import utils as click_utils  # type: ignore[no-redef]

app = typer.Typer(
    name="driverd",
    help="driverd: runs burst subcutaneous ketamine courses on syringe drivers, with a safety kernel and audit log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(schedule.app, name="schedule")
app.add_typer(keys.app, name="keys")
app.add_typer(audit.app, name="audit")
app.add_typer(pump.app, name="pump")
app.add_typer(sim.app, name="sim")
app.add_typer(course.app, name="course")
app.add_typer(hl7.app, name="hl7")
app.add_typer(config.app, name="config")
app.command("run")(run.run)
app.command("status")(status.status)
app.command(name="demo")(demo.demo)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"driverd {driverd.__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """driverd: runs burst subcutaneous ketamine courses on syringe drivers, with a safety kernel and audit log."""


def _silence_stdout() -> None:
    """The reader went away: point stdout at /dev/null so the interpreter's final flush cannot fail loudly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _stdout_closed(exc: BaseException | None = None) -> bool:
    """Did the reader close stdout? typer then wraps the streams in click's PacifyFlushWrapper and exits 1;
    rich points stdout at /dev/null and exits 1 from inside `except BrokenPipeError`."""
    if isinstance(sys.stdout, click_utils.PacifyFlushWrapper):
        return True
    seen = 0
    cause = exc.__context__ if exc is not None else None
    while cause is not None and seen < 8:
        if isinstance(cause, BrokenPipeError):
            return True
        cause, seen = cause.__context__, seen + 1
    return False


def _show_usage_error(exc: click_exc.ClickException, as_json: bool) -> None:
    if as_json:
        message = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        emit_json(error_payload(message, "usage", **({"command": ctx.command_path} if ctx is not None else {})))
        return
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()  # the help text itself
        return
    try:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
    except ImportError:  # typer without rich
        exc.show()


def run_cli(argv: Sequence[str] | None = None, command: typer.Typer = app) -> int:
    """Run the CLI and return its exit code: exactly 0, 1 or 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    try:
        try:
            rv = command(args=args, prog_name="driverd", standalone_mode=False)
            code = rv if isinstance(rv, int) else EXIT_OK
        except click_exc.UsageError as exc:
            _show_usage_error(exc, as_json)
            code = EXIT_USAGE
        except click_exc.ClickException as exc:  # e.g. a file click could not open: the answer is no
            if as_json:
                emit_json(error_payload(exc.format_message(), "failed"))
            else:
                exc.show()
            code = EXIT_REFUSED
        except typer.Abort:  # Ctrl-C / end of input at a prompt
            code = EXIT_REFUSED
        except SystemExit as exc:
            if _stdout_closed(exc):
                return EXIT_OK
            code = exc.code if isinstance(exc.code, int) else EXIT_REFUSED
    except BrokenPipeError:  # stdout closed while reporting an error above
        _silence_stdout()
        return EXIT_OK
    if _stdout_closed():
        return EXIT_OK
    if code not in (EXIT_OK, EXIT_REFUSED, EXIT_USAGE) and not _daemon_code(args, code):
        code = EXIT_REFUSED  # e.g. 130 from an interrupt: only 0/1/2 leave driverd
    return code


def _daemon_code(args: list[str], code: int) -> bool:
    """The one code outside 0/1/2: the daemon (`driverd run`) exits 3 when its audit log died at run time and
    every pump was stopped by the fail-safe, so the service manager can tell that apart (docs/safety.md, CRA-3)."""
    if not args or args[0] != "run":
        return False
    from driverd.runtime.service import EXIT_AUDIT_DEAD

    return code == EXIT_AUDIT_DEAD


def main() -> None:
    code = run_cli()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":
    main()
