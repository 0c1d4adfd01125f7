"""Times in human CLI output: always ISO 8601 with the zone, in the zone the reader asked for (`--tz`).

`--tz UTC` (the default) prints `2026-12-01T09:00:00Z`; `--tz local` the machine's zone and `--tz Europe/Paris` any
IANA zone, with the offset (`2026-12-01T10:00:00+01:00`), so a time is never ambiguous. JSON output keeps UTC
(`...Z`) whatever `--tz` says: machines convert for themselves.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import Annotated

import typer

from driverd.audit.timezones import UnknownZone
from driverd.audit.timezones import parse_zone as resolve_zone

TzOpt = Annotated[
    str,
    typer.Option("--tz", help="Zone for times in human output: UTC, local, or an IANA zone such as Europe/London. "
                              "Times always carry their offset; --json output stays in UTC."),
]


class BadZone(ValueError):
    """`--tz` names no zone this machine knows."""


def parse_zone(spec: str) -> tzinfo | None:
    """UTC -> UTC; local -> None (the machine's zone at each instant); otherwise an IANA zone."""
    text = spec.strip()
    if text.upper() in ("UTC", "Z"):
        return UTC
    if text.lower() == "local":
        return None
    try:
        return resolve_zone(text).tz  # one resolver for every --tz (reports use it too)
    except UnknownZone as exc:
        raise BadZone(str(exc)) from None


def format_time(value: datetime | str | None, zone: tzinfo | None = UTC, *, precise: bool = False) -> str:
    """ISO 8601 with zone in `zone` (None: local), to the second unless `precise` (audit records keep their
    microseconds). Text that is not a time is returned as it is; None is '-'."""
    if value is None:
        return "-"
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    else:
        at = value
    if at.tzinfo is None:
        return at.isoformat()  # never guess a zone for a naive time
    shown = at.astimezone(zone) if zone is not None else at.astimezone()
    if not precise:
        shown = shown.replace(microsecond=0)
    text = shown.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") and zone is UTC else text
