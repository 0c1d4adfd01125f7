"""`driverd demo` end of run: the log is streamed into replay (memory does not grow with the log), and --faults
cuts the link with FaultPlan.cut (a sticky mode: no per-reply queue)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.cli.main import app
from simulators.faults import FaultPlan


def test_demo_streams_the_log_into_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import driverd.runtime.demo as demo_mod
    import driverd.runtime.recovery  # noqa: F401  # imported first: start-up recovery keeps the real iter_lines
    from driverd.audit import reader, replay

    produced = [0]
    # Only the demo's own replay, after the course: the daemon reads its log too while it runs (start-up
    # recovery, the exposure ledger at a push), and those reads are not this test's business.
    streaming = [False]
    real_run_demo = demo_mod.run_demo

    async def run_demo_then_count(*args: Any, **kwargs: Any) -> Any:
        result = await real_run_demo(*args, **kwargs)
        streaming[0] = True
        return result

    ahead: list[int] = []  # lines read but not yet replayed, at every record replay takes
    real_iter_lines, real_add = reader.iter_lines, replay.Replayer.add

    def counting_iter_lines(path: Path, progress: Any = None) -> Iterator[Any]:
        for line in real_iter_lines(path, progress):
            if streaming[0]:
                produced[0] += 1
            yield line

    def counting_add(self: Any, rec: dict[str, Any]) -> None:
        if streaming[0]:
            ahead.append(produced[0] - len(ahead))
        real_add(self, rec)

    drops: list[int] = []
    real_cut = FaultPlan.cut

    def spy_cut(self: FaultPlan) -> None:
        drops.append(self.pending)
        real_cut(self)

    monkeypatch.setattr(demo_mod, "run_demo", run_demo_then_count)
    monkeypatch.setattr(reader, "iter_lines", counting_iter_lines)
    monkeypatch.setattr(replay.Replayer, "add", counting_add)
    monkeypatch.setattr(FaultPlan, "cut", spy_cut)
    res = CliRunner().invoke(app, ["demo", "--faults", "--json", "--audit", str(tmp_path / "log")])
    assert res.exit_code == 0, res.stdout[-2000:]
    summary = json.loads(res.stdout)
    assert summary["ok"] and summary["replay"]["ok"] and summary["verify"]["ok"]
    assert len(ahead) == produced[0] == summary["verify"]["records"]  # every record replayed, once
    assert max(ahead) == 1  # each line is replayed as soon as it is read: nothing is held
    assert drops == [0]  # the link cut is one sticky mode, no queued entries
    assert any("link cut" in f for f in summary["faults"]) and any("link restored" in f for f in summary["faults"])
