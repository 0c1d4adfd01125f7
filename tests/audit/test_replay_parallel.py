"""Parallel replay (issue 12, item 3): the log cut at full state snapshots, each slice replayed by its own worker
process, gives exactly what the sequential replay gives (`ReplayResult.as_dict()` and its text, report included):
on real logs (the demo with a restart, the same with its pumps first seen out of sorted order, a log written
before state deltas, a synthetic log with occlusions and a restart and its copy cut at a crash, a live log that
starts from a snapshot after `audit archive`), for any cut points and 1 to 4 jobs; with divergences inside a slice
(merged) and at a cut (the whole log replayed again in one process); with outputs interrupted by crash boundaries
in any slice (in the sequential pump order); and on damaged logs (the same error). Workers are real processes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from driverd.audit.archive import archive_log, parse_before
from driverd.audit.reader import iter_lines, iter_records
from driverd.audit.replay import ReplayResult, replay_lines
from driverd.audit.replay_parallel import BadSplit, ReplayInfo, replay_log
from driverd.audit.segments import list_segments
from driverd.audit.snapshot import DELTA_EVENT, SNAPSHOT_EVENT
from driverd.cli.main import app
from driverd.core.errors import AuditError
from driverd.signing import load_private_key, load_public_key
from tests.audit.archive_log import ArchiveLog, make_log
from tests.audit.log_edits import copy_log

ROOT = Path(__file__).resolve().parents[2]
FORMAT1 = ROOT / "tests" / "audit" / "data" / "format1-log.tar.gz"
runner = CliRunner()


def _synth_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synth_log", ROOT / "bench" / "synth_log.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synth_log"] = mod
    spec.loader.exec_module(mod)
    return mod


def _resort(rec: dict[str, Any]) -> dict[str, Any]:
    """Snapshots list their schedules by pump: kept so after a rename."""
    if isinstance(rec.get("schedules"), list):
        rec["schedules"] = sorted(rec["schedules"], key=lambda s: s["pump_id"])
    return rec


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> ArchiveLog:
    """Two pumps' 5-day demo courses, a restart (log_reopened), a live course: full snapshots every 6 h."""
    return make_log(tmp_path_factory.mktemp("parallel-made"))


@pytest.fixture(scope="module")
def renamed(made: ArchiveLog, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same log with bed-2 named bed-0: replay meets bed-1 first, a snapshot lists bed-0 first."""
    return copy_log(made.audit, tmp_path_factory.mktemp("renamed") / "audit", _resort, rename={"bed-2": "bed-0"})


@pytest.fixture(scope="module")
def logs(made: ArchiveLog, renamed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("parallel-logs")
    with tarfile.open(FORMAT1) as tar:
        tar.extractall(work / "format1", filter="data")
    synth = work / "synth"
    synth.mkdir()
    asyncio.run(_synth_module().generate(synth, pumps=2, days=4, poll_s=60, faults=1.0, restart_at=[2.0], seed=7,
                                         sync=False))
    live = work / "archived" / "audit"
    shutil.copytree(made.audit, live)
    archive_log(live, parse_before("2026-12-08"), work / "archived" / "archive", load_private_key(made.key),
                public_key=load_public_key(made.pub))
    return {"demo": made.audit, "renamed": renamed, "format1": work / "format1" / "audit", "synth": synth / "audit",
            "synth-crash": synth / "at-2d" / "crash", "archived": live}


def _sequential(log: Path) -> ReplayResult:
    return replay_lines(iter_lines(log))


def _snapshot_seqs(log: Path) -> list[int]:
    return [r["seq"] for r in iter_records(log) if r["event"] == SNAPSHOT_EVENT]


def _same(log: Path, want: ReplayResult, *, parallel: bool = True, **kw: Any) -> ReplayInfo:
    info = ReplayInfo()
    got = replay_log(log, info=info, **kw)
    assert got.as_dict() == want.as_dict()
    assert got.text_lines() == want.text_lines()
    if parallel:
        assert info.mode == "parallel", info.reason
    return info


@pytest.mark.parametrize("name", ["demo", "renamed", "format1", "synth", "synth-crash", "archived"])
def test_parallel_equals_sequential_on_real_logs(logs: dict[str, Path], name: str) -> None:
    log = logs[name]
    want = _sequential(log)
    assert want.ok and want.inputs > 100 and want.report.courses
    cuts = _snapshot_seqs(log)[1:]  # the first snapshot is never a cut (an archived log starts from it)
    assert cuts, name
    for split in ([cuts[-1]], cuts) if len(cuts) > 1 else ([cuts[0]],):
        info = _same(log, want, split_seqs=split)
        assert info.slices == sorted(split)
    for jobs in (1, 2, 3, 4) if name == "demo" else (2, 3):
        info = _same(log, want, parallel=jobs > 1, jobs=jobs, min_bytes=0)
        assert len(info.slices) <= max(0, jobs - 1)
    if name == "archived":
        assert want.seeded_from is not None and want.report.carried_from == want.seeded_from


def test_counts_without_the_report(logs: dict[str, Path]) -> None:
    """verify --full's use: no report, and the snapshots and deltas replayed counted as one pass counts them. Each
    cut's snapshot is the parent of the state deltas after it: their chain crosses into the next slice."""
    log = logs["demo"]
    want = _sequential(log)
    info = ReplayInfo()
    got = replay_log(log, report=False, split_seqs=_snapshot_seqs(log)[2::4], info=info)
    assert info.mode == "parallel"
    assert {k: v for k, v in got.as_dict().items() if k in ("ok", "inputs", "outputs_checked", "divergences",
                                                           "interrupted")} == \
        {k: v for k, v in want.as_dict().items() if k in ("ok", "inputs", "outputs_checked", "divergences",
                                                          "interrupted")}
    assert not got.report.courses
    events = [r["event"] for r in iter_records(log)]
    assert (info.snapshots, info.deltas) == (events.count(SNAPSHOT_EVENT), events.count(DELTA_EVENT))
    assert info.deltas > 50 and len(info.slices) >= 5


_WANT: dict[str, ReplayResult] = {}


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_cut_points(renamed: Path, data: st.DataObject) -> None:
    cuts = _snapshot_seqs(renamed)[1:]
    split = data.draw(st.lists(st.sampled_from(cuts), min_size=1, max_size=5, unique=True))
    if str(renamed) not in _WANT:
        _WANT[str(renamed)] = _sequential(renamed)
    _same(renamed, _WANT[str(renamed)], split_seqs=split)


def test_a_bad_split_point_is_refused(renamed: Path) -> None:
    with pytest.raises(BadSplit, match="seq"):
        replay_log(renamed, split_seqs=[5])


# ------------------------------------------------------------------------------------------------ crash boundaries


def _crash_after(first: int, second: int) -> Any:
    """Outputs of the inputs at seqs `first` and `second` (two pumps) never logged: a crash, the writer's
    log_reopened in the place of the second's first output."""
    def edit(rec: dict[str, Any]) -> dict[str, Any] | None:
        if first < rec["seq"] < second:
            return None
        if rec["seq"] == second + 1:
            return {k: rec[k] for k in ("seq", "ts", "prev", "hash")} | {"event": "log_reopened", "pump_id": None,
                                                                          "course_id": None}
        if second + 1 < rec["seq"] <= second + 6 and rec["event"] in ("setpoint", "transition", "notice"):
            return None
        return rec
    return edit


def _inputs_with_outputs(log: Path) -> list[tuple[int, str, int]]:
    """(input seq, pump, seq of the next input of any pump) of the inputs followed by outputs."""
    from driverd.core.records import INPUT_EVENTS, OUTPUT_EVENTS

    recs = list(iter_records(log))
    out = []
    for i in range(len(recs) - 1):
        if recs[i]["event"] in INPUT_EVENTS and recs[i + 1]["event"] in OUTPUT_EVENTS:
            nxt = next(r["seq"] for r in recs[i + 1:] if r["event"] in INPUT_EVENTS)
            out.append((recs[i]["seq"], recs[i]["pump_id"], nxt))
    return out


def test_interrupted_outputs_keep_the_sequential_pump_order(renamed: Path, tmp_path: Path) -> None:
    """Two pumps' outputs cut off by a crash boundary (and, in a second copy, by the end of the log) inside a
    later slice: replay meets bed-1 before bed-0, the snapshot the slice starts from lists bed-0 first."""
    pairs = [(a, b) for (a, pa, na), (b, pb, _) in zip(_inputs_with_outputs(renamed),
                                                       _inputs_with_outputs(renamed)[1:], strict=False)
             if pa == "bed-1" and pb == "bed-0" and na == b and a > 3000]
    a, b = pairs[0]
    crashed = copy_log(renamed, tmp_path / "crash", _crash_after(a, b))
    ended = copy_log(renamed, tmp_path / "end", lambda r: None if a < r["seq"] < b else r, until=b)
    snaps = _snapshot_seqs(renamed)
    before = [s for s in snaps[1:] if s < a]
    for log in (crashed, ended):
        want = _sequential(log)
        assert want.ok and [(i.input_seq, i.pump_id) for i in want.interrupted] == [(a, "bed-1"), (b, "bed-0")]
        for split in ([before[-1]], before[-2:], [before[0], *[s for s in snaps if s > b][:1]]):
            if log is ended and split[-1] > b:
                continue
            _same(log, want, split_seqs=split)


def test_the_restart_in_a_later_slice(made: ArchiveLog) -> None:
    """The made log's restart (log_reopened) lies in the last slice; the slice before ends just ahead of it."""
    recs = list(iter_records(made.audit))
    reopened = next(r["seq"] for r in recs if r["event"] == "log_reopened")
    snaps = _snapshot_seqs(made.audit)
    _same(made.audit, _sequential(made.audit), split_seqs=[max(s for s in snaps if s < reopened),
                                                           min(s for s in snaps if s > reopened)])


# ------------------------------------------------------------------------------------------------ divergences


def _edit_at(seq: int, change: dict[str, Any]) -> Any:
    return lambda r: {**r, **change} if r["seq"] == seq else r


def test_a_divergence_inside_a_slice_is_merged(made: ArchiveLog, tmp_path: Path) -> None:
    recs = list(iter_records(made.audit))
    setpoint = next(r for r in recs if r["event"] == "setpoint" and r["seq"] > 8000 and r["rate_ml_per_h"] != "0")
    log = copy_log(made.audit, tmp_path / "a", _edit_at(setpoint["seq"], {"rate_ml_per_h": "0.5"}))
    want = _sequential(log)
    assert [d.kind for d in want.divergences] == ["different"]
    snaps = _snapshot_seqs(log)
    for split in ([s for s in snaps if s < setpoint["seq"]][-1:], [snaps[3], snaps[-3]]):
        _same(log, want, split_seqs=split)  # merged, not replayed again


def _snapshot_edit(rec: dict[str, Any], pump: str = "bed-1") -> dict[str, Any]:
    state = rec["states"][pump]
    states = {**rec["states"], pump: {**state, "next_setpoint_id": state["next_setpoint_id"] + 7}}
    return {**rec, "states": states}


def test_an_edited_snapshot(made: ArchiveLog, tmp_path: Path) -> None:
    """At a cut, the slice that checks it diverges there: the whole log is replayed in one process. Elsewhere
    the divergence is merged like any other."""
    snaps = _snapshot_seqs(made.audit)
    target = snaps[8]
    log = copy_log(made.audit, tmp_path / "snap", lambda r: _snapshot_edit(r) if r["seq"] == target else r)
    want = _sequential(log)
    assert not want.ok and {d.seq for d in want.divergences} >= {target}
    info = _same(log, want, parallel=False, split_seqs=[target])
    assert info.mode == "sequential" and f"seq {target}" in info.reason
    _same(log, want, split_seqs=[snaps[4], snaps[12]])


def test_outputs_pending_at_a_cut(made: ArchiveLog, tmp_path: Path) -> None:
    """A snapshot logged between an input and its outputs (the outputs follow it), its states exactly replay's
    there: the slice starting from it would not know the outputs are due, so the log is replayed in one process."""
    from driverd.audit.replay import Replayer
    from driverd.audit.snapshot import snapshot_fields

    recs = list(iter_records(made.audit))
    a = next(s for s, _, _ in _inputs_with_outputs(made.audit) if s > 3000)
    index = next(i for i, r in enumerate(recs) if r["seq"] == a)
    assert recs[index - 1]["event"] not in (SNAPSHOT_EVENT, DELTA_EVENT, "segment_start")
    # The record before the input makes room: the input takes its seq, the snapshot the input's.
    edited = [*recs[:index - 1], {**recs[index], "seq": a - 1}]
    r = Replayer()
    for rec in edited:
        r.add(rec)
    snap = {"seq": a, "ts": recs[index]["ts"], "event": SNAPSHOT_EVENT, "pump_id": None, "course_id": None,
            "prev": recs[index]["prev"], "hash": recs[index]["hash"],
            **snapshot_fields(r.states(), r._versions, r.library_text, r._ledger, r._accepted)}

    def edit(rec: dict[str, Any]) -> Any:
        if rec["seq"] == a - 1:
            return None
        if rec["seq"] == a:
            return [{**rec, "seq": a - 1}, snap]
        return rec

    log = copy_log(made.audit, tmp_path / "p", edit)
    want = _sequential(log)
    assert not [d for d in want.divergences if d.seq == a]  # the snapshot itself checks
    info = _same(log, want, parallel=False, split_seqs=[a])
    assert info.mode == "sequential" and "pending" in info.reason


# ------------------------------------------------------------------------------------------------ damage


def _damage(log: Path, dest: Path, segment_index: int, how: str) -> Path:
    shutil.copytree(log, dest)
    seg = [p for _, p in list_segments(dest)][segment_index]
    data = seg.read_bytes()
    lines = data.splitlines(keepends=True)
    if how == "torn":
        seg.write_bytes(data[:-20])
    elif how == "not canonical":
        lines[3] = lines[3].replace(b'"event":', b'"event": ', 1)
        seg.write_bytes(b"".join(lines))
    elif how == "no seq":  # a pump report without its seq: replay itself fails on it
        from driverd.audit.canonical import dumps

        i = next(i for i, x in enumerate(lines) if b'"event":"pump_report"' in x)
        rec = json.loads(lines[i])
        del rec["seq"]
        lines[i] = dumps(rec) + b"\n"
        seg.write_bytes(b"".join(lines))
    return dest


@pytest.mark.parametrize(("where", "how"), [(-1, "torn"), (40, "not canonical"), (60, "no seq"), (2, "not canonical")])
def test_a_damaged_log_fails_as_sequential_replay_does(made: ArchiveLog, tmp_path: Path, where: int,
                                                       how: str) -> None:
    log = _damage(made.audit, tmp_path / "d", where, how)
    with pytest.raises(Exception) as seq_err:  # the very exception sequential replay raises
        _sequential(log)
    snaps = _snapshot_seqs(made.audit)
    for kw in ({"split_seqs": [snaps[5], snaps[15]]}, {"jobs": 3, "min_bytes": 0}):
        with pytest.raises(type(seq_err.value)) as par_err:
            replay_log(log, **kw)
        assert str(par_err.value) == str(seq_err.value)
    if how in ("torn", "not canonical"):
        assert isinstance(seq_err.value, AuditError)


def test_a_worker_killed_is_not_a_result(made: ArchiveLog) -> None:
    """A worker that dies mid-slice: the log is replayed in one process and that result is returned."""
    want = _sequential(made.audit)
    snaps = _snapshot_seqs(made.audit)
    out: dict[str, Any] = {}
    info = ReplayInfo()

    def run() -> None:
        out["result"] = replay_log(made.audit, split_seqs=snaps[4::6], info=info)

    t = threading.Thread(target=run)
    t.start()
    killed = False
    import multiprocessing

    for _ in range(2000):
        kids = multiprocessing.active_children()
        if kids:
            os.kill(kids[-1].pid or 0, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    t.join()
    assert out["result"].as_dict() == want.as_dict()
    if killed and info.mode == "sequential":
        assert "died" in info.reason or "stopped" in info.reason


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_replay_jobs(made: ArchiveLog) -> None:
    one = runner.invoke(app, ["audit", "replay", str(made.audit), "--json", "--jobs", "1"])
    two = runner.invoke(app, ["audit", "replay", str(made.audit), "--json", "--jobs", "2"])
    assert one.exit_code == two.exit_code == 0, two.output
    assert json.loads(one.stdout) == json.loads(two.stdout)
    text = runner.invoke(app, ["audit", "replay", str(made.audit), "--jobs", "3"])
    assert text.exit_code == 0 and "replay OK" in text.stdout


@pytest.mark.parametrize("bad", ["0", "-1", "two", "65"])
def test_cli_replay_jobs_malformed(made: ArchiveLog, bad: str) -> None:
    res = runner.invoke(app, ["audit", "replay", str(made.audit), "--jobs", bad])
    assert res.exit_code == 2
    assert "--jobs" in res.output


def test_cli_verify_full_with_jobs(made: ArchiveLog, tmp_path: Path) -> None:
    """verify --full replays with the verify workers: the same verdict and counts whatever the jobs, also on a
    log whose snapshot was edited at what would be a cut."""
    from tests.audit.conftest import rechain

    snaps = _snapshot_seqs(made.audit)
    edited = tmp_path / "e"
    shutil.copytree(made.audit, edited)
    rechain(edited, load_private_key(made.key), lambda r: _snapshot_edit(r) if r["seq"] == snaps[10] else r)
    for log in (made.audit, edited):
        outs = []
        for jobs in ("1", "2", "4"):
            res = runner.invoke(app, ["audit", "verify", str(log), "--full", "--json", "--jobs", jobs])
            outs.append((res.exit_code, json.loads(res.stdout)["full"]))
        assert outs[0] == outs[1] == outs[2]
        assert outs[0][1]["ok"] is (log == made.audit), outs[0]
