"""The demo's course watch (`demo._CourseWatch`) wakes its loop only after the changes where the loop can end the
demo, and does the snapshot and group commit of the other changes in a callback at the same turn of the event
loop: the run and its log are the same, record for record, as when the loop wakes after every change (a progress
display makes it do that), whatever the daemon's snapshot policy (the real `maybe_snapshot` runs at both)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from driverd.runtime.demo import DemoOptions, DemoResult, run_demo

# Fields that differ between two runs only because each run has its own audit key (at any depth: a state delta
# names its parent record by the hash of its line).
CRYPTO = {"hash", "prev", "prev_segment_hash", "key_fingerprint", "public_key", "sig", "head", "line_sha256"}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in CRYPTO}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def records(audit_dir: Path) -> list[dict[str, Any]]:
    out = []
    for segment in sorted(audit_dir.glob("audit-*.jsonl")):
        for line in segment.read_text().splitlines():
            out.append(_strip(json.loads(line)))
    return out


def run(work: Path, opts: dict[str, Any], every_change: bool) -> DemoResult:
    progress = (lambda done, phases: None) if every_change else None
    return asyncio.run(run_demo(DemoOptions(work_dir=work, **opts), progress))


@pytest.mark.parametrize("opts", [{}, {"faults": True}, {"pumps": 2, "poll_period_s": 20.0}],
                         ids=["course", "faults", "two-pumps-20s"])
def test_the_gated_watch_gives_the_same_run_and_log(tmp_path: Path, opts: dict[str, Any]) -> None:
    gated = run(tmp_path / "gated", opts, every_change=False)
    every = run(tmp_path / "every", opts, every_change=True)
    assert gated.pumps == every.pumps
    assert gated.virtual_seconds == every.virtual_seconds and gated.faults == every.faults
    logged = records(gated.audit_dir)
    assert logged == records(every.audit_dir)
    # The run wrote several state snapshots (or deltas), each at the same point in both runs.
    assert sum(1 for r in logged if r["event"] in ("state_snapshot", "state_delta")) >= 5
