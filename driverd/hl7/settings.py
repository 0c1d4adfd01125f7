"""The `[hl7]` section of driverd.toml: parsed strictly (unknown keys and bad values name the key).

The section is off by default (no section: no HL7 at all). When present, every address must be given as
HOST:PORT; an order listener is only reachable from another host if its HOST says so (the example config uses
127.0.0.1, and a bare ":PORT" is refused rather than silently meaning every interface).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from driverd.core.errors import Problem

MAX_NAME_CHARS: Final = 64  # MSH-3..6 HD namespace ids are short; 64 leaves room for a real engine's names
_NAME: Final = re.compile(r"[A-Za-z0-9_.\- ]{1,64}")
_HOST: Final = re.compile(r"[A-Za-z0-9.\-]{1,253}")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Hl7Settings:
    queue_dir: Path  # the durable outbox and order log (default: `hl7` next to the audit directory)
    orders_listen: Address | None = None  # PCD-03 in (None: no order listener)
    observations_to: Address | None = None  # PCD-01/PCD-04 out (None: nothing is sent, nothing queued)
    observation_period_s: float = 60.0
    sending_application: str = "DRIVERD"
    sending_facility: str = "DRIVERD"
    receiving_application: str = ""
    receiving_facility: str = ""
    ack_timeout_s: float = 10.0  # an outbound message is re-sent (same MSH-10) if no ACK comes within this
    max_frame_bytes: int = 1_048_576  # an inbound frame above this closes its connection
    max_connections: int = 64
    tls_ca: Path | None = None  # CA bundle: verify the receiver (out) / require client certificates (in)
    tls_cert: Path | None = None  # our certificate chain (required for TLS on the listener)
    tls_key: Path | None = None

    def client_ssl(self) -> ssl.SSLContext | None:
        """TLS for the outbound connection: on when a CA bundle is configured (the receiver is verified)."""
        if self.tls_ca is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_ca))
        if self.tls_cert is not None:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return ctx

    def server_ssl(self) -> ssl.SSLContext | None:
        """TLS for the order listener: on when our certificate is configured; with a CA bundle too, a client
        must present a certificate it signed (mutual TLS)."""
        if self.tls_cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        if self.tls_ca is not None:
            ctx.load_verify_locations(cafile=str(self.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def valid_name(text: object) -> bool:
    """An MSH-3..6 name: short, and free of HL7 delimiters and control characters."""
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


def parse_address(text: Any, key: str, problems: list[Problem]) -> Address | None:
    """HOST:PORT (IPv6 as [::1]:PORT); the host is required (no implicit "every interface")."""
    rule = "HOST:PORT with a host name or IP address and a port 1..65535"
    if not isinstance(text, str) or len(text) > 300:
        problems.append(Problem(key, "address", rule))
        return None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif not _HOST.fullmatch(host):
        host = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or len(port) > 5:
        problems.append(Problem(key, "address", rule))
        return None
    return Address(host, int(port))


_NUMBERS: Final[dict[str, tuple[float, float]]] = {
    "observation_period_s": (1, 86_400),
    "ack_timeout_s": (0.1, 600),
}
_INTEGERS: Final[dict[str, tuple[int, int]]] = {
    "max_frame_bytes": (1024, 64 * 1024 * 1024),
    "max_connections": (1, 4096),
}
_NAMES: Final = ("sending_application", "sending_facility", "receiving_application", "receiving_facility")
_PATHS: Final = ("queue_dir", "tls_ca", "tls_cert", "tls_key")


def parse_hl7(raw: Any, base: Path, audit_dir: Path, problems: list[Problem]) -> Hl7Settings | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(Problem("hl7", "type", "expected a table"))
        return None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"hl7.{str(key)[:64]}"
        if key in ("orders_listen", "observations_to"):
            values[key] = parse_address(value, where, problems)
        elif key in _NUMBERS:
            lo, hi = _NUMBERS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                problems.append(Problem(where, "range", f"must be a number in [{lo:g}, {hi:g}]"))
            else:
                values[key] = float(value)
        elif key in _INTEGERS:
            ilo, ihi = _INTEGERS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not ilo <= value <= ihi:
                problems.append(Problem(where, "range", f"must be an integer in [{ilo}, {ihi}]"))
            else:
                values[key] = value
        elif key in _NAMES:
            if not valid_name(value):
                problems.append(Problem(where, "format", "1-64 letters, digits, space, '.', '-' or '_' (no HL7 "
                                        "delimiters)"))
            else:
                values[key] = value
        elif key in _PATHS:
            if not isinstance(value, str) or not value or len(value) > 4096 or re.search(r"[\x00-\x1f\x7f]", value):
                problems.append(Problem(where, "path", "a path without control characters"))
            else:
                values[key] = (base / value).resolve()
        else:
            problems.append(Problem(where, "unknown-key", f"unknown key {str(key)[:64]!r}"))
    if ("tls_key" in values) != ("tls_cert" in values):
        problems.append(Problem("hl7.tls_key", "consistency", "tls_cert and tls_key are given together"))
    queue_dir = values.pop("queue_dir", audit_dir.parent / "hl7")
    return Hl7Settings(queue_dir=queue_dir, **{k: v for k, v in values.items() if v is not None})
