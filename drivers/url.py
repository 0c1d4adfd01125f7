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


def serial_port_url(url: DriverURL, driver: str, params: set[str], *, default_baud: int,
                    baud_rates: tuple[int, ...]) -> tuple[str, int, int]:
    """A serial-protocol driver's URL (`<driver>+serial:///dev/tty` or `<driver>+socket://host:port`, with
    `address` 0..99, `baud` and the other `params`) -> (pyserial URL, address, baud). Raises ValidationError
    listing every problem of the URL's form first, then the first bad number."""
    problems: list[Problem] = []
    if url.driver != driver:
        problems.append(Problem("url.scheme", "driver", f"not a {driver} URL: {url.raw!r}"))
    unknown = set(url.params) - params
    problems += [Problem(f"url.{k}", "unknown-parameter", f"unknown parameter {k!r}") for k in sorted(unknown)]
    if url.transport == "serial":
        if not url.path or url.host:
            problems.append(Problem("url.path", "required", f"{driver}+serial:///dev/<tty> needs a device path"))
        port_url = url.path
    elif url.transport == "socket":
        if not url.host or url.port is None:
            problems.append(Problem("url.host", "required", f"{driver}+socket://<host>:<port> needs host and port"))
        port_url = f"socket://{url.host}:{url.port}"
    else:
        problems.append(Problem("url.transport", "enum", f"transport must be serial or socket, got {url.transport!r}"))
        port_url = ""
    if problems:
        raise ValidationError(problems)
    address = url.int_param("address", 0, lo=0, hi=99)
    baud = url.int_param("baud", default_baud, lo=min(baud_rates), hi=max(baud_rates))
    if baud not in baud_rates:
        raise ValidationError(
            [Problem("url.baud", "enum", f"baud must be one of {', '.join(map(str, baud_rates))}, got {baud}")]
        )
    return port_url, address, baud
