"""The version of the core's decision rules.

Replay recomputes every decision from the logged inputs with the core it runs. When a release changes what the
core decides for the same inputs (a new alarm, a refusal, another rate), a log written by an earlier release
replays with divergences where the rules changed, which is not a wrong decision. So the daemon records the rules it
decides by (`daemon_start`'s `rules`), and replay says, for a divergence in a stretch of the log decided by other
rules, which rules decided it (docs/audit.md, "Decision rules").

Bump `RULES_VERSION` in every change that makes the core decide anything differently for the same inputs, and add a
line to the history below. A change that only makes the core faster, or that changes no decision, keeps it.
"""

from __future__ import annotations

from typing import Final

RULES_VERSION: Final = 1

#: What each version changed (the ones before 1 were not recorded in the log).
RULES_HISTORY: Final[dict[int, str]] = {
    1: "first recorded (driverd 0.1.0, 2026-12-04): SUP-1..SUP-22, the syringe-change and resume rules of "
       "2026-12-03, the range check at every new connection",
}
