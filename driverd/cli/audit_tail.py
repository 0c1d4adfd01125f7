"""`driverd audit tail LOG [-n N] [-f] [--json]`: the newest records, then (with -f) each record as it is
appended, following segment rotation, until Ctrl-C / SIGTERM (exit 0).

Readable form, one line per record: `seq ts event pump course key=value ...` (times in --tz, with their zone);
--json prints each record's exact line (JSON lines, as in the log). Reading only: `driverd audit verify` checks
the chain and the signatures.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from datetime import tzinfo
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from driverd.cli.output import EXIT_USAGE, fail, usage
from driverd.cli.timefmt import BadZone, TzOpt, format_time, parse_zone
from driverd.core.errors import DriverdError

ENVELOPE = ("seq", "ts", "event", "pump_id", "course_id", "hash", "prev")
MAX_VALUE_CHARS = 160  # a readable line: long values (a schedule, a public key) are cut; --json has them whole
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)")


def _value(value: Any, zone: tzinfo | None) -> str:
    if isinstance(value, str) and ISO_TIME.fullmatch(value):
        text = format_time(value, zone, precise=True)
    elif isinstance(value, str) and value and " " not in value and "=" not in value and '"' not in value:
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    text = text.encode("ascii", "backslashreplace").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def readable(record: dict[str, Any], zone: tzinfo | None) -> str:
    """One record as one readable line."""
    ts = record.get("ts")
    head = [f"{record.get('seq', '?')!s:>7}", format_time(ts, zone, precise=True) if ts else "-",
            str(record.get("event", "?"))]
    if record.get("pump_id") is not None:
        head.append(f"pump={_value(record['pump_id'], zone)}")
    if record.get("course_id") is not None:
        head.append(f"course={_value(record['course_id'], zone)}")
    rest = [f"{k}={_value(v, zone)}" for k, v in sorted(record.items()) if k not in ENVELOPE]
    return " ".join(head + rest)


def _stop_on_sigterm() -> None:
    def handler(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def tail(
    log: Annotated[Path, typer.Argument(help="audit log directory, or one segment file (audit-NNNNNN.jsonl)")],
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="how many of the newest records to show "
                                                                    "first (0: only new ones with -f)")] = 10,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing records as they are appended, "
                                                                "across segment rotation, until Ctrl-C")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="each record's exact JSON line")] = False,
    tz: TzOpt = "UTC",
    interval: Annotated[float, typer.Option("--interval", help="with -f: seconds between looks for new records",
                                            min=0.01, max=60)] = 0.2,
) -> None:
    """Show the newest records of an audit log, and with -f every record as it is appended."""
    from driverd.audit.tail import Follower, TailLine

    try:
        zone = parse_zone(tz)
    except BadZone as exc:
        fail(str(exc), as_json=as_json, code=EXIT_USAGE)
    if not log.exists():
        usage(f"{log}: no such file or directory", as_json)
    follower = Follower(log)

    def show(line: TailLine) -> None:
        if line.record is None:
            typer.echo(f"warning: {line.file}:{line.lineno}: {line.error}", err=True)
            return
        if as_json:
            sys.stdout.write(line.raw.decode("utf-8", "backslashreplace") + "\n")
        else:
            sys.stdout.write(readable(line.record, zone) + "\n")

    if follow:
        _stop_on_sigterm()
    try:
        for line in follower.backlog(lines):
            show(line)
        sys.stdout.flush()
        while follow:
            time.sleep(interval)
            for line in follower.poll():
                show(line)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return  # the way to stop following
    except DriverdError as exc:
        fail(str(exc), as_json=as_json)
