"""`driverd config check`: a daemon config and everything it names, checked without starting anything.

Like `nginx -t`: the config is parsed as the daemon parses it, then the drug library is parsed, the trust store and
the audit key are loaded, every pump URL is built into its driver (registered? parameters right?) without opening
a port, file modes are judged as the start-up check judges them, and the paths the daemon will create are checked
for being creatable. Nothing is written and no pump, socket or port is touched.

Errors are what would stop the daemon (or make it refuse every schedule); warnings are what it would start with
but an operator should know (the published demo key trusted, an unsigned audit log, a serial device not plugged
in, a directory the current user could not create).
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driverd.core.errors import ConfigError, DriverdError, Problem, ValidationError
from driverd.core.protocol import parse_protocol
from driverd.runtime.config import DaemonConfig, load_config
from driverd.runtime.filemodes import unsafe_file_modes
from driverd.runtime.oplog import DEMO_KEY_IDS
from driverd.signing import KeyFileError, TrustStore, load_private_key
from drivers.base import DriverOptions
from drivers.registry import driver_class
from drivers.url import parse_url

#: URL transports that name a local device file (its absence is a warning: a USB adapter may be unplugged).
SERIAL_TRANSPORTS = frozenset({"serial", "rtu"})

# The sentences of filemodes.unsafe_file_modes start with the setting they judge.
_MODE_FIELDS = (("trust_dir", "daemon.trust_dir"), ("trusted key", "daemon.trust_dir"),
                ("audit_key", "daemon.audit_key"), ("hl7 queue_dir", "hl7.queue_dir"),
                ("audit_dir", "daemon.audit_dir"))


@dataclass
class CheckReport:
    config: Path
    mode: str | None = None
    checked: list[dict[str, str]] = field(default_factory=list)  # what passed: field, path, detail
    problems: list[Problem] = field(default_factory=list)  # errors: the daemon would not start (or not work)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def passed(self, field_name: str, path: Path | str, detail: str) -> None:
        self.checked.append({"field": field_name, "path": str(path), "detail": detail})

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "config": str(self.config), "mode": self.mode, "checked": self.checked,
                "problems": [p.as_dict() for p in self.problems], "warnings": [w.as_dict() for w in self.warnings]}


def check_config(path: Path) -> CheckReport:
    report = CheckReport(config=path)
    try:
        config = load_config(path)
    except ConfigError as exc:
        # The file as a whole (unreadable, not UTF-8, not TOML, too large) is the field "config", named in full.
        whole = ("readable", "size", "encoding", "toml")
        report.problems.extend(Problem("config", p.rule, f"{path}: {p.detail}") if p.rule in whole else p
                               for p in exc.problems)
        return report
    report.mode = config.mode
    report.passed("config", path, f"parsed; mode {config.mode}, {len(config.pumps)} pump(s)")
    _protocol(config, report)
    _trust(config, report)
    _audit_key(config, report)
    _creatable(report, "daemon.audit_dir", config.audit_dir, directory=True)
    _control_socket(config, report)
    _pumps(config, report)
    if config.hl7 is not None:
        _hl7(config, report)
    _file_modes(config, report)
    return report


def _protocol(config: DaemonConfig, report: CheckReport) -> None:
    try:
        text = config.protocol.read_text(encoding="utf-8")
        spec = parse_protocol(text)
    except OSError as exc:
        report.problems.append(Problem("daemon.protocol", "readable", f"{config.protocol}: {exc.strerror or exc}"))
    except UnicodeDecodeError as exc:
        report.problems.append(Problem("daemon.protocol", "encoding", f"{config.protocol}: not UTF-8 ({exc.reason})"))
    except ConfigError as exc:
        report.problems.extend(Problem(f"daemon.protocol: {p.path}", p.rule, f"{config.protocol}: {p.detail}")
                               for p in exc.problems)
    else:
        report.passed("daemon.protocol", config.protocol,
                      f"drug library {spec.id} version {spec.version}: {spec.drug}, ceiling "
                      f"{spec.ceiling_mg_per_24h} mg/24h")


def _trust(config: DaemonConfig, report: CheckReport) -> None:
    try:
        trust = TrustStore.load(config.trust_dir)
    except ConfigError as exc:
        report.problems.extend(Problem("daemon.trust_dir", p.rule, f"{p.path}: {p.detail}") for p in exc.problems)
        return
    if not trust.keys:
        report.problems.append(Problem("daemon.trust_dir", "trust-store", f"{config.trust_dir}: no *.pub key, so "
                                       "the daemon would refuse every schedule"))
        return
    report.passed("daemon.trust_dir", config.trust_dir, f"{len(trust.keys)} trusted key(s): "
                  + ", ".join(sorted(trust.keys)))
    demo = sorted(set(trust.keys) & DEMO_KEY_IDS)
    if demo:
        report.warnings.append(Problem("daemon.trust_dir", "demo-key-trusted",
                                       f"{config.trust_dir} holds the published DEMO key ({', '.join(demo)}): anyone "
                                       "can sign schedules it accepts; NOT FOR CLINICAL USE"))


def _audit_key(config: DaemonConfig, report: CheckReport) -> None:
    if config.audit_key is None:
        report.warnings.append(Problem("daemon.audit_key", "audit-unsigned",
                                       "no audit_key: checkpoints are not signed, so the log proves no origin"))
        return
    try:
        load_private_key(config.audit_key)
    except KeyFileError as exc:
        report.problems.append(Problem("daemon.audit_key", "key", str(exc)))
    else:
        report.passed("daemon.audit_key", config.audit_key, "Ed25519 private key")


def _creatable(report: CheckReport, field_name: str, path: Path, *, directory: bool) -> None:
    """PATH is a directory already (when `directory`), or the daemon can make it: its nearest existing ancestor
    is a directory. Whether this user may write there is only a warning: the daemon may run as another user."""
    target = path if directory else path.parent
    if target.exists():
        if not target.is_dir():
            report.problems.append(Problem(field_name, "directory", f"{target} exists and is not a directory"))
        elif not os.access(target, os.W_OK | os.X_OK):
            report.warnings.append(Problem(field_name, "writable", f"{target} is not writable by this user (uid "
                                           f"{os.getuid()}); the daemon's user must be able to write there"))
            report.passed(field_name, path, "directory exists")
        else:
            report.passed(field_name, path, "directory exists")
        return
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        report.problems.append(Problem(field_name, "directory", f"cannot create {target}: {ancestor} is not a "
                                       "directory"))
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        report.warnings.append(Problem(field_name, "creatable", f"{target} does not exist and this user (uid "
                                       f"{os.getuid()}) cannot create it in {ancestor}; the daemon's user (or "
                                       "systemd's StateDirectory=/RuntimeDirectory=) must"))
    else:
        report.passed(field_name, path, f"will be created (in {ancestor})")


def _control_socket(config: DaemonConfig, report: CheckReport) -> None:
    path = config.control_socket
    try:
        st = path.lstat()
    except FileNotFoundError:
        _creatable(report, "daemon.control_socket", path, directory=False)
        return
    except OSError as exc:
        report.problems.append(Problem("daemon.control_socket", "readable", f"{path}: {exc.strerror or exc}"))
        return
    if not stat.S_ISSOCK(st.st_mode):
        report.problems.append(Problem("daemon.control_socket", "socket", f"{path} exists and is not a socket; the "
                                       "daemon refuses to replace it"))
    else:  # a running daemon's, or left over after a crash (the daemon removes a stale one at start)
        report.passed("daemon.control_socket", path, "a socket exists there (a running daemon's, or stale)")


def _pumps(config: DaemonConfig, report: CheckReport) -> None:
    options = DriverOptions(timeout_s=config.driver_timeout_s, retries=1, deadman_s=config.deadman_s)
    for i, pump in enumerate(config.pumps):
        where = f"pumps[{i}].url"
        try:
            url = parse_url(pump.url)  # already checked by load_config; parsed again for its parts
            cls = driver_class(url.driver)
            cls(url, options)  # builds the driver: every URL parameter is checked, nothing is opened
        except (ValidationError, ConfigError) as exc:
            # A driver names the part of the URL ("url.unit"): the field becomes "pumps[0].url.unit".
            report.problems.extend(Problem(f"pumps[{i}].{p.path}" if p.path.startswith("url") else where, p.rule,
                                           f"{pump.id} ({pump.url}): {p.detail}") for p in exc.problems)
            continue
        except (DriverdError, OSError, ValueError) as exc:  # e.g. a Modbus map=PATH that cannot be read
            report.problems.append(Problem(where, "driver", f"{pump.id}: {exc}"))
            continue
        detail = f"{pump.id}: driver {url.driver!r} ({cls.__module__}.{cls.__qualname__}); not connected"
        if url.transport in SERIAL_TRANSPORTS and url.path and not Path(url.path).exists():
            report.warnings.append(Problem(where, "device", f"{pump.id}: serial device {url.path} does not exist "
                                           "now (adapter unplugged?)"))
        report.passed(where, pump.url, detail)


def _hl7(config: DaemonConfig, report: CheckReport) -> None:
    hl7 = config.hl7
    assert hl7 is not None
    _creatable(report, "hl7.queue_dir", hl7.queue_dir, directory=True)
    unreadable = False
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(hl7, name)
        if path is not None and not os.access(path, os.R_OK):
            what = "does not exist" if not path.exists() else "is not readable by this user"
            report.problems.append(Problem(f"hl7.{name}", "readable", f"{path} {what}"))
            unreadable = True
    if unreadable:
        return
    # Building the SSL contexts the gateway builds proves the PEM files parse and the key matches the certificate.
    for name, build in (("hl7.tls_ca", hl7.client_ssl), ("hl7.tls_cert", hl7.server_ssl)):
        try:
            ctx = build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            report.problems.append(Problem(name, "tls", f"cannot load the TLS files: {exc}"))
        else:
            if ctx is not None:
                report.passed(name, getattr(hl7, name.removeprefix("hl7.")) or "", "TLS context builds")


def _file_modes(config: DaemonConfig, report: CheckReport) -> None:
    for sentence in unsafe_file_modes(config):
        where = next((f for prefix, f in _MODE_FIELDS if sentence.startswith(prefix)), "file-mode")
        finding = Problem(where, "file-mode", sentence)
        # The same verdict as the start-up check: production refuses to start, bench only warns.
        (report.problems if config.mode == "production" else report.warnings).append(finding)
