"""SIGHUP: reload the trust store and the settings that can change under running courses; report the rest.

What changes live: the trust store (re-read from `trust_dir`, which may itself change), `poll_period_s`,
`link_timeout_s`, `clock_step_tolerance_s` and `failsafe_hold_s`. Everything else (pumps and their drivers, the drug
library, the audit directory and key, the control socket and its limits, the dead-man, driver timeouts, the mode,
[audit], [hl7], [metrics]) is bound to open files, sockets or pump state: a changed value is named in the audit
record and the op log and the running value is kept until a restart.

A new config that does not parse, a trust store that does not load, unsafe file modes in production mode, or a poll
period the running dead-man cannot take: an error line, and nothing changes. Every reload that succeeds is an
audit record (`config_reloaded`: the file's hash, the keys now trusted, what was applied and what was not), which
the op log reports (a `warning` line names what was not applied).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from driverd.core.errors import DriverdError
from driverd.runtime import oplog
from driverd.runtime.config import DaemonConfig, load_config
from driverd.runtime.filemodes import unsafe_file_modes
from driverd.signing import TrustStore

if TYPE_CHECKING:
    from driverd.runtime.daemon import Daemon

#: DaemonConfig fields a reload applies to the running daemon.
LIVE: Final = ("trust_dir", "poll_period_s", "link_timeout_s", "clock_step_tolerance_s", "failsafe_hold_s")
#: Not settings: what the file is, not what it says.
_IDENTITY: Final = ("path", "sha256")


@dataclasses.dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    applied: tuple[str, ...] = ()
    not_applied: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


def plan(running: DaemonConfig, new: DaemonConfig) -> tuple[DaemonConfig, tuple[str, ...], tuple[str, ...]]:
    """The config to run with (the live settings from `new`, the rest as running), what changed that is applied
    and what changed that is not."""
    changed = [f.name for f in dataclasses.fields(DaemonConfig)
               if f.name not in _IDENTITY and getattr(running, f.name) != getattr(new, f.name)]
    applied = tuple(k for k in changed if k in LIVE)
    held = tuple(k for k in changed if k not in LIVE)
    merged = dataclasses.replace(running, sha256=new.sha256, **{k: getattr(new, k) for k in applied})
    return merged, applied, held


def reload(daemon: Daemon, config_path: Path) -> ReloadResult:
    """Re-read `config_path` and apply what can change live (see the module doc). Never raises."""
    try:
        return _reload(daemon, config_path)
    except Exception as exc:  # a reload must never take the daemon down
        return _failed([f"{type(exc).__name__}: {exc}"], config_path)


def _failed(problems: list[str], config_path: Path) -> ReloadResult:
    oplog.emit("err", "config_reload_failed", config=str(config_path), problems=problems,
               detail="nothing changed; the running config and trust store are kept")
    return ReloadResult(False, problems=tuple(problems))


def _reload(daemon: Daemon, config_path: Path) -> ReloadResult:
    running = daemon.config
    if daemon.failsafe.active or daemon.audit is None or daemon.audit.dead:
        return _failed(["the audit log is dead (fail-safe): a reload could not be recorded"], config_path)
    try:
        new = load_config(config_path)
    except DriverdError as exc:
        found = getattr(exc, "problems", None)
        return _failed([str(p) for p in found] if found else [str(exc)], config_path)
    merged, applied, held = plan(running, new)
    problems: list[str] = []
    if merged.deadman_s and merged.deadman_s < 2 * merged.poll_period_s:
        problems.append(f"daemon.poll_period_s: {merged.poll_period_s:g} s is more than half the running dead-man "
                        f"({merged.deadman_s} s, which changes only at a restart)")
    if merged.mode == "production":
        problems.extend(unsafe_file_modes(merged))
    try:
        trust = TrustStore.load(merged.trust_dir)
    except DriverdError as exc:
        problems.extend(str(p) for p in getattr(exc, "problems", None) or [exc])
        trust = None
    if problems or trust is None:
        return _failed(problems, config_path)
    # Applied from here: nothing below can fail on the new config's account.
    daemon.trust = trust
    daemon.config = merged
    for ch in daemon.channels.values():
        ch.poll_period = timedelta(seconds=merged.poll_period_s)
        ch.link_timeout = timedelta(seconds=merged.link_timeout_s)
        ch.set_clock_step_tolerance(timedelta(seconds=merged.clock_step_tolerance_s))
    daemon.audit.append("config_reloaded", pump_id=None, course_id=None, durable=True, config=str(config_path),
                        config_sha256=new.sha256, trust_keys=sorted(trust.keys), applied=list(applied),
                        not_applied=list(held))
    oplog.startup_warnings(audit_key_configured=merged.audit_key is not None, trusted_key_ids=trust.keys,
                           mode=merged.mode)
    return ReloadResult(True, applied, held)
