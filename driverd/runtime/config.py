"""Daemon configuration (driverd.toml): parsed strictly; unknown keys and bad values are errors naming the key."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, TypeGuard

from driverd.core.errors import ConfigError, Problem, ValidationError
from driverd.core.toml_text import MAX_TOML_BYTES, load_toml
from driverd.hl7.settings import Hl7Settings, parse_hl7
from drivers.url import parse_url

MAX_PATH_CHARS: Final = 4096
MAX_URL_CHARS: Final = 1024
#: C0/C1 control characters: never in a path, a URL or a text that reaches the audit log.
CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class PumpConfig:
    id: str
    url: str


@dataclass(frozen=True, slots=True)
class AuditSettings:
    checkpoint_every_records: int = 1000
    checkpoint_every_s: int = 60
    group_commit_ms: int = 200
    group_commit_records: int = 256
    segment_max_records: int = 100_000


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """Bounds of the control socket ([control] in driverd.toml): what one client can cost the daemon."""

    max_connections: int = 64  # all clients together; when full, the longest-idle connection makes room
    max_connections_per_peer: int = 8  # one client process (SO_PEERCRED pid); its own idlest makes room
    max_inflight_per_peer: int = 4  # requests of one process being worked on at once; more wait their turn
    max_request_bytes: int = 256 * 1024  # one request line
    max_schedule_bytes: int = 64 * 1024  # a pushed schedule, in canonical JSON
    max_text_chars: int = 256  # `by` and `reason` of a command
    read_timeout_s: float = 10.0  # a whole request line must arrive within this (slow clients are dropped)
    request_timeout_s: float = 30.0  # an answer is due within this, else "outcome unknown"
    refusal_log_burst: int = 20  # refusals logged one by one per client user (uid) before throttling
    refusal_log_per_minute: int = 60  # sustained rate of those; the rest become one summary record


# key -> (lowest, highest): integers where the default is an int, numbers otherwise.
_CONTROL_RANGES: Final[dict[str, tuple[float, float]]] = {
    "max_connections": (2, 4096),
    "max_connections_per_peer": (1, 4096),
    "max_inflight_per_peer": (1, 1024),
    "max_request_bytes": (1024, 16 * 1024 * 1024),
    "max_schedule_bytes": (1024, 1024 * 1024),
    "max_text_chars": (1, 256),  # the daemon refuses longer `by`/`reason` anyway
    "read_timeout_s": (0.1, 3600),
    "request_timeout_s": (0.1, 3600),
    "refusal_log_burst": (1, 100_000),
    "refusal_log_per_minute": (1, 1_000_000),
}


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """[metrics]: the Prometheus endpoint (off unless the section is present; loopback unless `host` says)."""

    port: int
    host: str = "127.0.0.1"


def valid_pump_id(pid: object) -> TypeGuard[str]:
    """1-64 letters, digits, '-' or '_' (the rule for [[pumps]] ids; the control API applies it too)."""
    return (isinstance(pid, str) and 0 < len(pid) <= 64
            and pid.replace("-", "").replace("_", "").isalnum())


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    path: Path
    sha256: str  # hash of the config file's bytes, logged at start
    protocol: Path
    audit_dir: Path
    audit_key: Path | None
    trust_dir: Path
    control_socket: Path
    socket_mode: int
    poll_period_s: float
    link_timeout_s: float
    deadman_s: int
    driver_timeout_s: float
    pumps: tuple[PumpConfig, ...]
    audit: AuditSettings = field(default_factory=AuditSettings)
    # A wall-clock step larger than this is a clock fault (docs/safety.md, "Time"); smaller ones add up.
    clock_step_tolerance_s: float = 2.0
    # "production" refuses to start on unsafe file modes (world-writable trust store, readable private key);
    # "bench" only warns (simulators, demos, tests on a developer's machine).
    mode: str = "production"
    # After the audit log dies and every pump is stopped: real seconds the daemon stays up to answer `status`
    # (health: audit_dead) before it exits non-zero. Keep it below the unit's WatchdogSec.
    failsafe_hold_s: float = 5.0
    control: ControlSettings = field(default_factory=ControlSettings)
    hl7: Hl7Settings | None = None  # [hl7]: IHE PCD over HL7 v2 / MLLP (off when absent)
    metrics: MetricsSettings | None = None  # [metrics]: Prometheus endpoint (off when absent)


MODES = ("production", "bench")


_DAEMON_KEYS: dict[str, type | tuple[type, ...]] = {
    "protocol": str, "audit_dir": str, "audit_key": str, "trust_dir": str, "control_socket": str,
    "socket_mode": str, "poll_period_s": (int, float), "link_timeout_s": (int, float), "deadman_s": int,
    "driver_timeout_s": (int, float), "clock_step_tolerance_s": (int, float), "mode": str,
    "failsafe_hold_s": (int, float),
}
_REQUIRED = ("protocol", "audit_dir", "trust_dir", "control_socket")


def _show(key: object) -> str:
    """A key for an error message: quoted, escaped, and short whatever the file holds."""
    text = ascii(str(key))
    return text if len(text) <= 66 else text[:60] + "...'"


def load_config(path: Path) -> DaemonConfig:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TOML_BYTES + 1)  # enough to tell it is too large without reading it all
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        detail = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        raise ConfigError([Problem(_show(path)[1:-1], "readable", detail)]) from None
    return parse_config(data, path)


def parse_config(data: bytes, path: Path) -> DaemonConfig:
    problems: list[Problem] = []
    doc = load_toml(data)
    for key in doc:
        if key not in ("daemon", "audit", "control", "pumps", "hl7", "metrics"):
            problems.append(Problem(_show(key)[1:-1], "unknown-key", f"unknown section {_show(key)}"))
    daemon = doc.get("daemon")
    if not isinstance(daemon, dict):
        raise ConfigError([*problems, Problem("daemon", "required", "missing [daemon] table")])
    for key, value in daemon.items():
        want = _DAEMON_KEYS.get(key)
        if want is None:
            problems.append(Problem(f"daemon.{_show(key)[1:-1]}", "unknown-key", f"unknown key {_show(key)}"))
        elif isinstance(value, bool) or not isinstance(value, want):
            problems.append(Problem(f"daemon.{key}", "type", f"wrong type {type(value).__name__}"))
        elif isinstance(value, str) and key != "socket_mode" and (len(value) > MAX_PATH_CHARS
                                                                   or CONTROL_CHARS.search(value)):
            # A NUL byte would only fail later, deep in the file system calls.
            problems.append(Problem(f"daemon.{key}", "path", f"a path of at most {MAX_PATH_CHARS} characters "
                                    "without control characters (NUL, newline, ...)"))
    for key in _REQUIRED:
        if key not in daemon:
            problems.append(Problem(f"daemon.{key}", "required", "missing"))
    base = path.parent

    def p(key: str) -> Path:
        if key not in daemon or any(pr.path == f"daemon.{key}" for pr in problems):
            return Path()
        try:
            return (base / str(daemon[key])).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # e.g. a symlink loop
            problems.append(Problem(f"daemon.{key}", "path", f"cannot resolve: {exc}"))
            return Path()

    def num(key: str, default: float, lo: float, hi: float) -> float:
        v = daemon.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            problems.append(Problem(f"daemon.{key}", "range", f"must be a number in [{lo}, {hi}]"))
            return default
        return float(v)

    poll = num("poll_period_s", 2.0, 0.05, 3600)
    link_timeout = num("link_timeout_s", 10.0, 0.1, 3600)
    deadman = int(num("deadman_s", 30, 0, 255))  # New Era SAF takes 0..255 s
    timeout = num("driver_timeout_s", 1.0, 0.01, 60)
    step_tolerance = num("clock_step_tolerance_s", 2.0, 0.1, 3600)
    hold = num("failsafe_hold_s", 5.0, 0, 600)
    mode = daemon.get("mode", "production")
    if mode not in MODES:
        problems.append(Problem("daemon.mode", "enum", f"must be one of {', '.join(MODES)}"))
    if deadman and deadman < 2 * poll:
        problems.append(Problem("daemon.deadman_s", "heartbeat", "must be at least twice poll_period_s (polls are "
                                "the heartbeat) or 0"))
    mode_raw = daemon.get("socket_mode", "0660")
    try:
        socket_mode = int(str(mode_raw), 8)
        if not 0 <= socket_mode <= 0o777 or socket_mode & 0o007:
            raise ValueError
    except ValueError:
        problems.append(Problem("daemon.socket_mode", "mode", "octal mode without access for others, e.g. \"0660\""))
        socket_mode = 0o660
    audit = _audit(doc.get("audit", {}), problems)
    control = _control(doc.get("control", {}), problems)
    pumps = _pumps(doc.get("pumps"), problems)
    paths = {key: p(key) for key in ("protocol", "audit_dir", "audit_key", "trust_dir", "control_socket")}
    hl7 = parse_hl7(doc.get("hl7"), base, paths["audit_dir"], problems)
    metrics = _metrics(doc["metrics"], problems) if "metrics" in doc else None
    if problems:
        raise ConfigError(problems)
    return DaemonConfig(
        path=path, sha256=hashlib.sha256(data).hexdigest(), protocol=paths["protocol"],
        audit_dir=paths["audit_dir"], audit_key=paths["audit_key"] if "audit_key" in daemon else None,
        trust_dir=paths["trust_dir"], control_socket=paths["control_socket"], socket_mode=socket_mode,
        poll_period_s=poll, link_timeout_s=link_timeout, deadman_s=deadman, driver_timeout_s=timeout, pumps=pumps,
        audit=audit, control=control, clock_step_tolerance_s=step_tolerance, mode=str(mode),
        failsafe_hold_s=hold, hl7=hl7, metrics=metrics,
    )


def _control(raw: Any, problems: list[Problem]) -> ControlSettings:
    if not isinstance(raw, dict):
        problems.append(Problem("control", "type", "expected a table"))
        return ControlSettings()
    defaults = ControlSettings()
    values: dict[str, Any] = {}
    value: Any
    for key, value in raw.items():
        bounds = _CONTROL_RANGES.get(key)
        if bounds is None:
            problems.append(Problem(f"control.{_show(key)[1:-1]}", "unknown-key", f"unknown key {_show(key)}"))
            continue
        lo, hi = bounds
        integral = isinstance(getattr(defaults, key), int)
        number = isinstance(value, int) or (not integral and isinstance(value, float))
        if isinstance(value, bool) or not number or not lo <= value <= hi:
            what = "an integer" if integral else "a number"
            problems.append(Problem(f"control.{key}", "range", f"must be {what} in [{lo:g}, {hi:g}]"))
        else:
            values[key] = value if integral else float(value)
    settings = ControlSettings(**values)
    if settings.max_connections_per_peer > settings.max_connections:
        problems.append(Problem("control.max_connections_per_peer", "consistency",
                                "must not exceed control.max_connections"))
    if settings.max_schedule_bytes > settings.max_request_bytes:
        problems.append(Problem("control.max_schedule_bytes", "consistency",
                                "must not exceed control.max_request_bytes (a schedule travels in one request)"))
    assert {f.name for f in fields(ControlSettings)} == set(_CONTROL_RANGES)
    return settings


def _audit(raw: Any, problems: list[Problem]) -> AuditSettings:
    if not isinstance(raw, dict):
        problems.append(Problem("audit", "type", "expected a table"))
        return AuditSettings()
    defaults = AuditSettings()
    values: dict[str, int] = {}
    for key, value in raw.items():
        if not hasattr(defaults, key):
            problems.append(Problem(f"audit.{_show(key)[1:-1]}", "unknown-key", f"unknown key {_show(key)}"))
        elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000_000:
            problems.append(Problem(f"audit.{key}", "range", "must be an integer 1..10000000"))
        else:
            values[key] = value
    return AuditSettings(**values)


def _pumps(raw: Any, problems: list[Problem]) -> tuple[PumpConfig, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(Problem("pumps", "required", "at least one [[pumps]] entry"))
        return ()
    out: list[PumpConfig] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"pumps[{i}]"
        if not isinstance(entry, dict):
            problems.append(Problem(where, "type", "expected a table"))
            continue
        for key in entry:
            if key not in ("id", "url"):
                problems.append(Problem(f"{where}.{_show(key)[1:-1]}", "unknown-key", f"unknown key {_show(key)}"))
        pid, url = entry.get("id"), entry.get("url")
        if not valid_pump_id(pid):
            problems.append(Problem(f"{where}.id", "format", "1-64 letters, digits, '-' or '_'"))
            continue
        if pid in seen:
            problems.append(Problem(f"{where}.id", "unique", f"duplicate pump id {pid!r}"))
        seen.add(pid)
        if not isinstance(url, str):
            problems.append(Problem(f"{where}.url", "required", "missing driver URL"))
            continue
        if len(url) > MAX_URL_CHARS or CONTROL_CHARS.search(url):
            problems.append(Problem(f"{where}.url", "format", f"at most {MAX_URL_CHARS} characters, no control "
                                    "characters"))
            continue
        try:
            parse_url(url)
        except ValidationError as exc:
            problems.extend(Problem(f"{where}.url", pr.rule, pr.detail) for pr in exc.problems)
        out.append(PumpConfig(pid, url))
    return tuple(out)


def _metrics(raw: Any, problems: list[Problem]) -> MetricsSettings | None:
    """[metrics] port = N (0: any free port, logged), host = an IP address (default 127.0.0.1, loopback)."""
    if not isinstance(raw, dict):
        problems.append(Problem("metrics", "type", "expected a table"))
        return None
    before = len(problems)
    for key in raw:
        if key not in ("port", "host"):
            problems.append(Problem(f"metrics.{_show(key)[1:-1]}", "unknown-key", f"unknown key {_show(key)}"))
    port = raw.get("port")
    if "port" not in raw:
        problems.append(Problem("metrics.port", "required", "missing (0 = any free port)"))
    elif isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        problems.append(Problem("metrics.port", "range", "must be an integer in [0, 65535]"))
    host = raw.get("host", "127.0.0.1")
    try:
        if not isinstance(host, str) or len(host) > 64:
            raise ValueError
        ipaddress.ip_address(host)
    except ValueError:
        problems.append(Problem("metrics.host", "address", "an IP address, e.g. \"127.0.0.1\" (the default) or "
                                "\"::1\"; a host name is not resolved"))
    if len(problems) > before:
        return None
    assert isinstance(port, int) and isinstance(host, str)
    return MetricsSettings(port=port, host=host)
