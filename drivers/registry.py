"""Driver registry: every driver, built-in or third-party, is an entry point in group ``driverd.drivers``.

A driver module is imported only when a URL selects it (python-can style), so a missing optional dependency
of one driver never breaks the others.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

from driverd.core.errors import Problem, ValidationError
from drivers.base import DriverOptions, PumpDriver
from drivers.url import DriverURL, parse_url

GROUP = "driverd.drivers"


@cache
def _entry_points() -> tuple[EntryPoint, ...]:
    """The group's entry points, read once per process: each read scans every installed distribution's metadata
    (about 13 ms here), and start-up opens one driver per pump (32 pumps: 0.43 s). A driver installed later is
    seen at the next start, as with any code change."""
    return tuple(entry_points(group=GROUP))


def available() -> list[str]:
    return sorted(ep.name for ep in _entry_points())


def driver_class(name: str) -> type[PumpDriver]:
    matches = [ep for ep in _entry_points() if ep.name == name]
    if not matches:
        raise ValidationError(
            [Problem("url.scheme", "known-driver", f"no driver {name!r}; available: {', '.join(available())}")]
        )
    cls = matches[0].load()
    if not (isinstance(cls, type) and issubclass(cls, PumpDriver)):
        raise ValidationError([Problem("url.scheme", "driver-type", f"entry point {name!r} is not a PumpDriver")])
    return cls


def open_driver(url: str | DriverURL, options: DriverOptions | None = None) -> PumpDriver:
    """Build (not connect) the driver a URL names."""
    parsed = parse_url(url) if isinstance(url, str) else url
    return driver_class(parsed.driver)(parsed, options)
