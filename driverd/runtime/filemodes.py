"""Start-up check of the modes of the files the daemon trusts or keeps secret.

A world-writable trust directory (or trusted key) lets any local user add a key whose schedules the daemon
accepts; a private key that others can read lets them sign audit checkpoints; an audit directory others can
enter exposes the patient record. In `mode = "production"` any of these refuses the start; in "bench" it is a
warning. The daemon creates its own files with safe modes whatever the umask (audit directory 0750, segments
0640; `driverd keys generate`: directory 0700, private key 0600): this catches files made by hand.
"""

from __future__ import annotations

import stat
from pathlib import Path

from driverd.runtime.config import DaemonConfig
from driverd.signing import PUBLIC_SUFFIX


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None  # missing or unreadable: the component that opens it reports that, with its own message


def unsafe_file_modes(config: DaemonConfig) -> list[str]:
    """Every unsafe mode found, as a sentence naming the path, its mode and the rule."""
    problems: list[str] = []
    trust = config.trust_dir
    mode = _mode(trust)
    if mode is not None and mode & stat.S_IWOTH:
        problems.append(f"trust_dir {trust} is world-writable (mode {mode:04o}): anyone could add a trusted key; "
                        "make it 0755 or stricter, owned by root")
    if mode is not None and trust.is_dir():
        for pub in sorted(trust.glob(f"*{PUBLIC_SUFFIX}")):
            m = _mode(pub)
            if m is not None and m & stat.S_IWOTH:
                problems.append(f"trusted key {pub} is world-writable (mode {m:04o}); make it 0644 or stricter")
    if config.audit_key is not None:
        m = _mode(config.audit_key)
        if m is not None and m & (stat.S_IRWXG | stat.S_IRWXO):
            problems.append(f"audit_key {config.audit_key} is readable or writable by group/others (mode {m:04o}); "
                            "make it 0600 (or 0400), owned by the daemon's user")
    if config.hl7 is not None:
        # The outbox and order log hold patient references and orders, like the audit log.
        q = _mode(config.hl7.queue_dir)
        if q is not None and q & 0o007:
            problems.append(f"hl7 queue_dir {config.hl7.queue_dir} is open to others (mode {q:04o}); make it 0700")
    m = _mode(config.audit_dir)
    if m is not None and m & stat.S_IRWXO:
        problems.append(f"audit_dir {config.audit_dir} is open to others (mode {m:04o}); make it 0750 or 0700")
    return problems
