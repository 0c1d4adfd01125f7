"""sd_notify(3) without a dependency: one datagram per message to $NOTIFY_SOCKET.

No-op when the variable is unset (not started by systemd, or Type= is not notify). Abstract sockets are
written `@name` in the variable and have a leading NUL byte on the wire. Failures are reported, never raised:
a lost notification must not take the daemon down (systemd's watchdog then restarts it, which is the point).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

NOTIFY_ENV = "NOTIFY_SOCKET"
WATCHDOG_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. vsock addresses: not supported here


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `message` (e.g. "READY=1" or "WATCHDOG=1\\nSTATUS=...") to the service manager.

    Returns True if a datagram was sent, False if notification is disabled or failed.
    """
    env = os.environ if env is None else env
    target = env.get(NOTIFY_ENV, "")
    address = _address(target) if target else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when no watchdog is armed for us."""
    env = os.environ if env is None else env
    raw = env.get(WATCHDOG_ENV, "")
    pid = env.get(WATCHDOG_PID_ENV, "")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (e.g. we were exec'd by a wrapper)
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
