"""Shared CLI output: JSON for machines (--json), readable text for people; exit codes 0/1/2.

Exit codes, the same in every command (docs/operations.md, "Exit codes"):
- 0: done (also when stdout was closed early by the reader, e.g. `driverd status | head -1`);
- 1: the command ran and the answer is no: refused, invalid, verification failed, daemon unreachable, or the
  configuration it needs (daemon config, drug library, register map, fault scenario) is missing or invalid;
- 2: the command line is wrong: unknown option, bad value, a named input file that does not exist.

With --json an error is one JSON object on stdout: {"ok": false, "error": {"code": ..., "message": ...}}.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from typing import Any, NoReturn

import typer

EXIT_OK = 0
EXIT_REFUSED = 1  # refused / invalid / verification failed / config missing or invalid
EXIT_USAGE = 2

#: `error.code` of a JSON error by exit code, unless the caller names a more specific one.
DEFAULT_ERROR_CODE = {EXIT_REFUSED: "failed", EXIT_USAGE: "usage"}


def _default(obj: object) -> Any:
    if isinstance(obj, Decimal):
        return format(obj, "f")
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def emit_json(payload: object) -> None:
    sys.stdout.write(json.dumps(payload, default=_default, sort_keys=True) + "\n")
    sys.stdout.flush()


def error_payload(message: str, code: str, **extra: object) -> dict[str, Any]:
    """The one JSON shape of a CLI error."""
    return {"ok": False, "error": {"code": code, "message": message}, **extra}


def fail(message: str, *, as_json: bool, code: int = EXIT_REFUSED, error_code: str | None = None,
         **extra: object) -> NoReturn:
    """Report a refusal/invalid input and exit non-zero, without a traceback."""
    if as_json:
        emit_json(error_payload(message, error_code or DEFAULT_ERROR_CODE.get(code, "failed"), **extra))
    else:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def config_error(message: str, *, as_json: bool, **extra: object) -> NoReturn:
    """A configuration the command needs is missing or invalid: exit 1 in every command."""
    fail(message, as_json=as_json, code=EXIT_REFUSED, error_code="config", **extra)


def usage(message: str, as_json: bool = False) -> NoReturn:
    if as_json:
        emit_json(error_payload(message, "usage"))
    else:
        typer.echo(f"usage error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)
