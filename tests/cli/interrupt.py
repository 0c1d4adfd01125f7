"""Starting a child that a test will interrupt with SIGINT (Ctrl-C).

A child inherits an ignored SIGINT and the parent thread's blocked signals across exec, and Python then installs no
KeyboardInterrupt handler: Ctrl-C would do nothing, whatever driverd does. A test runner (or a worker process of it)
may have SIGINT ignored or blocked. The child is given what a terminal gives a foreground program: SIGINT at its
default, not blocked. `state()` says what the parent had, for the failure message."""

from __future__ import annotations

import signal


def sigint_deliverable() -> None:
    """preexec_fn for subprocess.Popen: SIGINT unblocked and at its default in the child (before exec)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def state() -> str:
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    return f"parent SIGINT handler {signal.getsignal(signal.SIGINT)!r}, blocked: {blocked}"
