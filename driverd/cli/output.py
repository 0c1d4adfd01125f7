"""Shared CLI output: JSON for machines (--json), readable text for people; exit codes 0/1/2."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from typing import Any, NoReturn

import typer

EXIT_OK = 0
EXIT_REFUSED = 1  # refused / invalid / verification failed
EXIT_USAGE = 2


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


def fail(message: str, *, as_json: bool, code: int = EXIT_REFUSED, **extra: object) -> NoReturn:
    """Report a refusal/invalid input and exit non-zero, without a traceback."""
    if as_json:
        emit_json({"ok": False, "error": message, **extra})
    else:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def usage(message: str) -> NoReturn:
    typer.echo(f"usage error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)
