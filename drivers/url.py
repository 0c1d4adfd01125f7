"""Driver URLs: ``<driver>[+<transport>]://<location>[?key=value&...]``.

Examples: ``newera+serial:///dev/ttyUSB0?address=1&baud=19200``, ``newera+socket://127.0.0.1:7001``,
``modbus+tcp://127.0.0.1:5020?unit=1``, ``modbus+rtu:///dev/ttyUSB1?baud=19200&unit=1``, ``sim://bed-1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from driverd.core.errors import Problem, ValidationError

_SCHEME = re.compile(r"^[a-z][a-z0-9_-]*(\+[a-z][a-z0-9_-]*)?$")


@dataclass(frozen=True, slots=True)
class DriverURL:
    raw: str
    driver: str  # e.g. "newera"
    transport: str  # e.g. "serial", "socket", "tcp", "rtu"; "" when the scheme has no '+'
    host: str  # host for network transports, else ""
    port: int | None
    path: str  # device path for serial transports, name for sim://
    params: dict[str, str] = field(default_factory=dict)

    def int_param(self, name: str, default: int, *, lo: int, hi: int) -> int:
        raw = self.params.get(name)
        if raw is None:
            return default
        if not re.fullmatch(r"\d{1,9}", raw) or not lo <= int(raw) <= hi:
            detail = f"{name} must be an integer {lo}..{hi}, got {raw!r}"
            raise ValidationError([Problem(f"url.{name}", "range", detail)])
        return int(raw)


def parse_url(url: str) -> DriverURL:
    """Parse a driver URL; a malformed one raises ValidationError naming the part and the rule."""
    if not isinstance(url, str) or "://" not in url:
        raise ValidationError([Problem("url", "format", f"expected <driver>[+<transport>]://..., got {url!r}")])
    scheme, _, _ = url.partition("://")
    if not _SCHEME.match(scheme):
        raise ValidationError([Problem("url.scheme", "format", f"bad scheme {scheme!r}")])
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValidationError([Problem("url", "format", str(exc))]) from None
    driver, _, transport = scheme.partition("+")
    params: dict[str, str] = {}
    try:
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
            if key in params:
                raise ValidationError([Problem(f"url.{key}", "duplicate", f"parameter {key!r} given twice")])
            params[key] = value
    except ValueError as exc:
        raise ValidationError([Problem("url.query", "format", str(exc))]) from None
    host = parts.hostname or ""
    path = parts.path
    if driver == "sim":
        # sim://bed-1 : the "host" is the simulated pump's name
        path = parts.netloc
        host = ""
    return DriverURL(raw=url, driver=driver, transport=transport, host=host, port=port, path=path, params=params)
