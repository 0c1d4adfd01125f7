"""Daemon configuration (driverd.toml): parsed strictly; unknown keys and bad values are errors naming the key."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driverd.core.errors import ConfigError, Problem, ValidationError
from drivers.url import parse_url


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


MODES = ("production", "bench")


_DAEMON_KEYS: dict[str, type | tuple[type, ...]] = {
    "protocol": str, "audit_dir": str, "audit_key": str, "trust_dir": str, "control_socket": str,
    "socket_mode": str, "poll_period_s": (int, float), "link_timeout_s": (int, float), "deadman_s": int,
    "driver_timeout_s": (int, float), "clock_step_tolerance_s": (int, float), "mode": str,
    "failsafe_hold_s": (int, float),
}
_REQUIRED = ("protocol", "audit_dir", "trust_dir", "control_socket")


def load_config(path: Path) -> DaemonConfig:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(str(path), "readable", exc.strerror or str(exc))]) from None
    return parse_config(data, path)


def parse_config(data: bytes, path: Path) -> DaemonConfig:
    problems: list[Problem] = []
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([Problem("/", "toml", f"not valid TOML: {exc}")]) from None
    for key in doc:
        if key not in ("daemon", "audit", "pumps"):
            problems.append(Problem(key, "unknown-key", f"unknown section {key!r}"))
    daemon = doc.get("daemon")
    if not isinstance(daemon, dict):
        raise ConfigError([*problems, Problem("daemon", "required", "missing [daemon] table")])
    for key, value in daemon.items():
        want = _DAEMON_KEYS.get(key)
        if want is None:
            problems.append(Problem(f"daemon.{key}", "unknown-key", f"unknown key {key!r}"))
        elif isinstance(value, bool) or not isinstance(value, want):
            problems.append(Problem(f"daemon.{key}", "type", f"wrong type {type(value).__name__}"))
    for key in _REQUIRED:
        if key not in daemon:
            problems.append(Problem(f"daemon.{key}", "required", "missing"))
    base = path.parent

    def p(key: str) -> Path:
        return (base / str(daemon[key])).resolve() if key in daemon else Path()

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
    pumps = _pumps(doc.get("pumps"), problems)
    if problems:
        raise ConfigError(problems)
    return DaemonConfig(
        path=path, sha256=hashlib.sha256(data).hexdigest(), protocol=p("protocol"), audit_dir=p("audit_dir"),
        audit_key=p("audit_key") if "audit_key" in daemon else None, trust_dir=p("trust_dir"),
        control_socket=p("control_socket"), socket_mode=socket_mode, poll_period_s=poll,
        link_timeout_s=link_timeout, deadman_s=deadman, driver_timeout_s=timeout, pumps=pumps, audit=audit,
        clock_step_tolerance_s=step_tolerance, mode=str(mode), failsafe_hold_s=hold,
    )


def _audit(raw: Any, problems: list[Problem]) -> AuditSettings:
    if not isinstance(raw, dict):
        problems.append(Problem("audit", "type", "expected a table"))
        return AuditSettings()
    defaults = AuditSettings()
    values: dict[str, int] = {}
    for key, value in raw.items():
        if not hasattr(defaults, key):
            problems.append(Problem(f"audit.{key}", "unknown-key", f"unknown key {key!r}"))
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
                problems.append(Problem(f"{where}.{key}", "unknown-key", f"unknown key {key!r}"))
        pid, url = entry.get("id"), entry.get("url")
        if not isinstance(pid, str) or not pid or len(pid) > 64 or not pid.replace("-", "").replace("_", "").isalnum():
            problems.append(Problem(f"{where}.id", "format", "1-64 letters, digits, '-' or '_'"))
            continue
        if pid in seen:
            problems.append(Problem(f"{where}.id", "unique", f"duplicate pump id {pid!r}"))
        seen.add(pid)
        if not isinstance(url, str):
            problems.append(Problem(f"{where}.url", "required", "missing driver URL"))
            continue
        try:
            parse_url(url)
        except ValidationError as exc:
            problems.extend(Problem(f"{where}.url", pr.rule, pr.detail) for pr in exc.problems)
        out.append(PumpConfig(pid, url))
    return tuple(out)
