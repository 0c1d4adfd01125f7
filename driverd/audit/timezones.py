"""Time zones for human output (`--tz local|UTC|ZONE`) and ISO 8601 times with their offset.

The log keeps every time in UTC; a zone only changes how a time is shown. `local` is the zone of this machine
(`TZ`, else /etc/localtime), ZONE an IANA name (Europe/London), resolved with the standard library's zoneinfo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from driverd.core.errors import DriverdError


class UnknownZone(DriverdError):
    """--tz names no zone this machine knows."""


@dataclass(frozen=True, slots=True)
class Zone:
    name: str  # what the reader sees: "UTC", "Europe/London", "local (Europe/Paris)"
    tz: tzinfo

    def iso(self, at: datetime | None) -> str:
        """ISO 8601 with the zone's offset at that instant ("Z" for UTC), to the second; "?" for no time."""
        if at is None:
            return "?"
        local = at.astimezone(self.tz).replace(microsecond=0)
        text = local.isoformat()
        return text[:-6] + "Z" if self.tz is UTC else text


UTC_ZONE = Zone("UTC", UTC)


def _local() -> Zone:
    key = os.environ.get("TZ", "").lstrip(":")
    if key:
        try:
            return Zone(f"local ({key})", ZoneInfo(key))
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        target = str(Path("/etc/localtime").resolve())
    except OSError:
        target = ""
    if "/zoneinfo/" in target:
        key = target.split("/zoneinfo/", 1)[1]
        try:
            return Zone(f"local ({key})", ZoneInfo(key))
        except (ZoneInfoNotFoundError, ValueError):
            pass
    fixed = datetime.now(UTC).astimezone().tzinfo  # no zone name found: this machine's current offset
    assert fixed is not None
    return Zone(f"local ({datetime.now(UTC).astimezone().strftime('%z')})", fixed)


def parse_zone(value: str) -> Zone:
    """`local`, `UTC` (any case; also `Z`) or an IANA zone name. Raises UnknownZone naming the value."""
    text = value.strip()
    if text.lower() in ("utc", "z"):
        return UTC_ZONE
    if text.lower() == "local":
        return _local()
    try:
        return Zone(text, ZoneInfo(text))
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name longer than a file name may be
        raise UnknownZone(f"--tz: unknown zone {value[:64]!r} (use local, UTC or an IANA name such as "
                          "Europe/London)") from None


def parse_since(value: str) -> datetime:
    """An ISO 8601 time with a zone offset or Z (a date alone means its midnight UTC). Raises DriverdError."""
    text = value.strip()
    try:
        at = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise DriverdError(f"--since: {value!r} is not an ISO 8601 time (e.g. 2026-12-01T09:00:00Z)") from None
    if at.tzinfo is None:
        if len(text) == 10:  # a date: midnight UTC
            return at.replace(tzinfo=UTC)
        raise DriverdError(f"--since: {value!r} has no zone: add Z or an offset such as +01:00")
    return at
