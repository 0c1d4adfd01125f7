"""bench/synth_log.py writes a real log: it verifies (chain, checkpoint signatures, every schedule signed by a
trusted key, every snapshot equal to replay from the first record), replays with no divergence, and start-up
recovery from it (and from its clean-stop and crash copies) gives the states replay gives.

Small: 2 pumps for 6 days at a 60-s poll, courses back to back (bed-1 runs two, bed-2 starts 2.5 days in), an
occlusion and a clinician's resume drawn for every course, a clean restart at day 3. Written without fdatasync
(the generator's `sync=False`: the same bytes, seconds faster)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.audit.reader import iter_records
from driverd.audit.replay import Replayer
from driverd.audit.segments import list_segments
from driverd.cli.main import app
from driverd.core.rules import RULES_VERSION
from driverd.core.state import Phase
from driverd.runtime.demo import DEMO_TRUST
from driverd.runtime.recovery import recover
from driverd.signing import TrustStore

BENCH = Path(__file__).resolve().parents[2] / "bench" / "synth_log.py"
TRUST = TrustStore.load(DEMO_TRUST)


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synth_log", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synth_log"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("synth")
    stats = asyncio.run(_module().generate(out, pumps=2, days=6, poll_s=60, faults=1.0, restart_at=[3.0], seed=7,
                                              sync=False))
    return out, stats


def _replayed(audit: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """States and schedule versions by replay from the first record (every snapshot ignored but checked)."""
    replayer = Replayer()
    versions: dict[str, int] = {}
    for rec in iter_records(audit):
        replayer.add(rec)
        if rec.get("event") == "schedule_accepted":
            sched = rec["schedule"]
            versions[sched["schedule_id"]] = max(versions.get(sched["schedule_id"], 0), sched["version"])
    assert replayer.finish().ok
    return replayer.states(), versions


def test_the_log_verifies_in_full_and_replays(generated: tuple[Path, Any]) -> None:
    out, stats = generated
    audit = out / "audit"
    res = CliRunner().invoke(app, ["audit", "verify", str(audit), "--full", "--require-sealed", "--trust",
                                   str(DEMO_TRUST), "--key", str(out / "keys" / "audit.pub"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["ok"] and report["full"]["ok"] and report["schedules"]["ok"]
    assert report["full"]["snapshots"] >= 4  # each start and stop, and the periodic ones
    assert report["schedules"]["checked"] == stats.courses == 3
    res = CliRunner().invoke(app, ["audit", "replay", str(audit), "--json"])
    assert res.exit_code == 0, res.output
    replay = json.loads(res.output)
    assert replay["ok"] and not replay["divergences"]
    # Each daemon start records the decision rules it decided by: this replay's own (docs/audit.md).
    assert [r["rules"] for r in replay["rules"]] == [RULES_VERSION] * 2 and replay["replay_rules"] == RULES_VERSION


def test_what_the_log_holds(generated: tuple[Path, Any]) -> None:
    """Whole courses back to back, occlusions and their resumes, and the restart."""
    out, stats = generated
    events = Counter(rec["event"] for rec in iter_records(out / "audit"))
    assert events["schedule_accepted"] == 3 and events["daemon_start"] == 2 and events["daemon_stop"] == 2
    assert stats.occlusions >= 1 and events["clinician_command"] >= stats.occlusions
    assert events["alarm"] >= stats.occlusions
    assert events["pump_report"] > (6 + 3.5) * 1440  # a report a minute while a course runs (heartbeat)
    states, _ = _replayed(out / "audit")
    # bed-1: a whole course (5 days), the next pushed as it ended; bed-2: started 2.5 days in, holding at day 6.
    assert states["bed-1"].course_id == "demo-bed-1-20260106" and states["bed-1"].phase is Phase.TITRATING
    assert states["bed-2"].course_id == "demo-bed-2-20260103" and states["bed-2"].phase is Phase.HOLDING
    assert states["bed-2"].delivered_ml > 0


@pytest.mark.parametrize("copy", ["audit", "at-3d/clean", "at-3d/crash"])
def test_recovery_gives_the_states_replay_gives(generated: tuple[Path, Any], copy: str) -> None:
    out, _ = generated
    audit = out / copy
    assert list_segments(audit)
    recovered = recover(audit, TRUST)
    states, versions = _replayed(audit)
    assert recovered.snapshot_seq is not None  # from a snapshot, not the whole log
    assert recovered.states == states
    assert recovered.versions == versions
    if copy.endswith("crash"):
        # The worst point: just before the daemon wrote its next snapshot or delta, so records follow the newest.
        assert recovered.records > 50
