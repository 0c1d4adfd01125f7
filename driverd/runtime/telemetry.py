"""Telemetry compaction: which pump reports the channel logs (issue 12, item 2).

Every report is fed to the core (supervision sees every poll), but most polls of a steady course change nothing
a later decision depends on. A report is held back from the log only when that is *proved* harmless at the time,
by running the core a second time: the state replay has after the logged inputs (`replayed`), stepped with the
new report, must give exactly the state the live core reached and no command, both ways. Then the held-back
reports between the last logged input and this one are not needed: replay of the log without them reaches the same
state, so it recomputes the same decisions from there on (the core is a pure function of state, event and
library). The live course adopts the replay-side state (equal, and also identical in representation). In the
steady case (only the newest sample and the counter moved since replay's state) the second step is replaced by
`driverd.core.report_replay.replay_step_agrees`, a sound shortcut: when it holds, the second step would give
exactly the live result.

A report that cannot be held back (its step produced commands, or replay without the held-back report would not
reach the same state: a new 60-s history sample, an alarm, a counter reset, a new rate ...) is logged after the
held-back one; any other input is logged after it too (`before_input`). A report is logged at least every
`heartbeat` of course time, so the log shows the pump's counter at least that often. A crash loses at most the
held-back report, as if that poll had not happened: the recovered state is the one replay gives, which is what
the daemon had at its last logged input plus identical-state polls.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from driverd.core.commands import Command
from driverd.core.events import PumpReport
from driverd.core.machine import step
from driverd.core.protocol import ProtocolSpec
from driverd.core.report_replay import replay_step_agrees
from driverd.core.state import CourseState

#: A report is logged at least this often (course time), whatever it shows.
HEARTBEAT = timedelta(seconds=60)


class ReportCompactor:
    """Decides, per report, what the channel logs. No I/O: the channel writes what it is told to, in order."""

    #: Use the proved shortcut for the steady case (False: always the second step; the tests' reference).
    shortcut = True

    def __init__(self, state: CourseState, protocol: ProtocolSpec, heartbeat: timedelta = HEARTBEAT) -> None:
        self.protocol = protocol
        self.heartbeat = heartbeat
        self.replayed = state  # what replay of the log written so far gives for this pump
        self.pending: PumpReport | None = None  # fed to the core, not logged yet
        self.last_logged_at: datetime | None = None  # course time of the last report logged

    def report(
        self, live: CourseState, event: PumpReport
    ) -> tuple[CourseState, tuple[Command, ...], tuple[PumpReport, ...]]:
        """Step the live course with `event`. Returns the new live state, the commands, and the reports to log now,
        in order, before the commands (empty: `event` is held back)."""
        after, cmds = step(live, event, self.protocol)
        if not cmds:
            if live is self.replayed:  # nothing held back: replay steps from the same state
                shadow, shadow_cmds = after, cmds
            elif self.shortcut and replay_step_agrees(self.replayed, live, event, after):
                # The steady case, proved without a second step (driverd.core.report_replay): replay's step from
                # its own state gives exactly `after` and no command.
                shadow, shadow_cmds = after, cmds
            else:
                shadow, shadow_cmds = step(self.replayed, event, self.protocol)
            if not shadow_cmds and shadow == after:
                # Replay without the held-back report reaches this very state: it is not needed.
                if not self._due(event):
                    self.pending = event
                    return shadow, (), ()
                self.pending = None
                self._logged(shadow, event)
                return shadow, (), (event,)
        out = self._take_pending(live)
        if not cmds and not self._due(event):
            self.pending = event
            return after, cmds, out
        self._logged(after, event)
        return after, cmds, (*out, event)

    def before_input(self, live: CourseState) -> PumpReport | None:
        """Another input is about to be logged: the report held back (if any) must precede it in the log."""
        out = self._take_pending(live)
        return out[0] if out else None

    def input_logged(self, state: CourseState) -> None:
        """Another input was logged and stepped: replay is at `state` now."""
        self.replayed = state

    def _take_pending(self, live: CourseState) -> tuple[PumpReport, ...]:
        pending = self.pending
        if pending is None:
            return ()
        self.pending = None
        self._logged(live, pending)
        return (pending,)

    def _due(self, event: PumpReport) -> bool:
        return self.last_logged_at is None or event.at - self.last_logged_at >= self.heartbeat

    def _logged(self, state: CourseState, event: PumpReport) -> None:
        self.replayed = state
        self.last_logged_at = event.at
