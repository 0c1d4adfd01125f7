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
from driverd.core.machine import report_step, step
from driverd.core.protocol import ProtocolSpec
from driverd.core.report_replay import replay_sample_agrees, replay_step_agrees
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
        # A live state that holds `replayed`'s very objects in every field except those a pump report sets
        # (report_replay.SET_BY_REPORT), or None: the shortcut then needs no field-by-field identity check. Known
        # when it came from `replayed` (or from such a state) by a quiet report (`machine.report_step`: only the
        # accumulated fields replaced) that kept the history and the infusing flag. Forgotten whenever
        # `replayed` moves.
        self._near: CourseState | None = None

    def report(
        self, live: CourseState, event: PumpReport
    ) -> tuple[CourseState, tuple[Command, ...], tuple[PumpReport, ...]]:
        """Step the live course with `event`. Returns the new live state, the commands, and the reports to log now,
        in order, before the commands (empty: `event` is held back)."""
        after, cmds, quiet = report_step(live, event, self.protocol)
        if not cmds:
            replayed = self.replayed
            near = live is replayed or live is self._near
            if live is replayed:  # nothing held back: replay steps from the same state
                shadow, shadow_cmds = after, cmds
            elif self.shortcut and self._agrees(live, event, after, near):
                # The steady case, proved without a second step (driverd.core.report_replay): replay's step from
                # its own state gives exactly `after` and no command.
                shadow, shadow_cmds = after, cmds
            else:
                shadow, shadow_cmds = step(replayed, event, self.protocol)
            if not shadow_cmds and (shadow is after or shadow == after):
                # Replay without the held-back report reaches this very state: it is not needed.
                if not self._due(event):
                    self.pending = event
                    self._near = after if near and shadow is after and self._keeps(quiet, live, after) else None
                    return shadow, (), ()
                self.pending = None
                self._logged(shadow, event)
                return shadow, (), (event,)
        out = self._take_pending(live)  # replay is at `live` now (it was already if nothing was held back)
        if not cmds and not self._due(event):
            self.pending = event
            near = live is self.replayed or live is self._near
            self._near = after if near and self._keeps(quiet, live, after) else None
            return after, cmds, out
        self._logged(after, event)
        return after, cmds, (*out, event)

    @staticmethod
    def _keeps(quiet: bool, live: CourseState, after: CourseState) -> bool:
        """`after` holds `live`'s very objects in every field but those a report sets: a quiet report replaces only
        the accumulated fields (`machine.report_step`), and here the history and the infusing flag among them stayed.
        So `after` is near `replayed` if `live` was (or was `replayed` itself)."""
        return quiet and after.samples is live.samples and after.pump_infusing is live.pump_infusing

    def _agrees(self, live: CourseState, event: PumpReport, after: CourseState, near: bool) -> bool:
        """Whether replay's step from `replayed` with `event` gives exactly `after` and no command (sufficient
        test: driverd.core.report_replay). `near`: `live` is `replayed` or `self._near`, so every field but those
        a report sets is known to be the very same object already."""
        if near:
            return replay_sample_agrees(self.replayed, live, event, after)
        return replay_step_agrees(self.replayed, live, event, after)

    def before_input(self, live: CourseState) -> PumpReport | None:
        """Another input is about to be logged: the report held back (if any) must precede it in the log."""
        out = self._take_pending(live)
        return out[0] if out else None

    def input_logged(self, state: CourseState) -> None:
        """Another input was logged and stepped: replay is at `state` now."""
        self.replayed = state
        self._near = None

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
        self._near = None
        self.last_logged_at = event.at
