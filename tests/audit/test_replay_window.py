"""`driverd audit replay LOG --since WHEN` (driverd/audit/replay_window.py): replay from the newest sealed full
state snapshot at or before WHEN. It checks what a whole replay checks from there on (every decision, every later
snapshot and delta), refuses a window that does not verify, and says where it started; what lies before the
snapshot is `audit verify --full`'s to check, and the tests show that boundary on purpose."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.audit.archive import archive_log, parse_before
from driverd.audit.canonical import format_ts, parse_ts
from driverd.audit.reader import iter_lines, iter_records
from driverd.audit.replay import ReplayResult, replay_lines
from driverd.audit.replay_window import replay_since
from driverd.audit.snapshot import SNAPSHOT_EVENT
from driverd.cli.main import app
from driverd.core.errors import AuditError
from driverd.core.records import INPUT_EVENTS
from driverd.signing import load_private_key, load_public_key
from tests.audit.archive_log import ArchiveLog, make_log
from tests.audit.conftest import rechain

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> ArchiveLog:
    """Two pumps' 5-day demo courses, a restart, a live course: full snapshots every 6 h, state deltas between."""
    return make_log(tmp_path_factory.mktemp("window-made"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> ArchiveLog:
    """The same without state deltas, for the logs edited and re-signed with `rechain`: a delta names its parent
    by the parent line's hash, which re-chaining changes (every delta would diverge, hiding what a test shows)."""
    return make_log(tmp_path_factory.mktemp("window-plain"), deltas=False)


@pytest.fixture(scope="module")
def whole(made: ArchiveLog) -> ReplayResult:
    return replay_lines(iter_lines(made.audit))


def _snapshots(log: Path) -> list[dict[str, Any]]:
    return [r for r in iter_records(log) if r["event"] == SNAPSHOT_EVENT]


def _inputs_after(log: Path, seq: int) -> int:
    return sum(1 for r in iter_records(log)
               if r["seq"] > seq and r["event"] in INPUT_EVENTS and isinstance(r.get("pump_id"), str))


def _copy(made: ArchiveLog, dest: Path) -> Path:
    shutil.copytree(made.audit, dest)
    return dest


def test_the_window_checks_every_decision_after_its_snapshot(made: ArchiveLog, whole: ReplayResult) -> None:
    """For a WHEN between each pair of snapshots (and exactly at one): seeded from the newest at or before it, every
    input after it folded, the same outputs compared and the same crash interruptions as the whole replay there."""
    assert whole.ok and whole.inputs > 1000
    snaps = _snapshots(made.audit)
    assert len(snaps) >= 8
    for i, snap in enumerate(snaps):
        ts = parse_ts(snap["ts"])
        for since in (ts, ts + timedelta(minutes=1)):
            if i + 1 < len(snaps) and since >= parse_ts(snaps[i + 1]["ts"]):
                continue
            result, window = replay_since(made.audit, since)
            assert result.ok, result.divergences
            assert window.snapshot_seq == snap["seq"] and window.snapshot_ts == snap["ts"]
            assert result.inputs == _inputs_after(made.audit, snap["seq"])
            assert [i.as_dict() for i in result.interrupted] == \
                [i.as_dict() for i in whole.interrupted if i.input_seq > snap["seq"]]
            assert window.verified["ok"] and window.verified["last_checkpoint_seq"] >= snap["seq"]
            assert window.records == sum(1 for r in iter_records(made.audit) if r["seq"] > snap["seq"])
            assert not result.report.courses  # no per-course report: `audit report` reads the whole log


def test_before_every_snapshot_the_whole_log_is_replayed(made: ArchiveLog, whole: ReplayResult) -> None:
    first = parse_ts(_snapshots(made.audit)[0]["ts"])
    result, window = replay_since(made.audit, first - timedelta(seconds=1))
    assert window.snapshot_seq is None and "whole log" in window.text_lines()[0]
    assert (result.ok, result.inputs, result.outputs_checked) == (whole.ok, whole.inputs, whole.outputs_checked)


def _setpoint_after(log: Path, seq: int) -> dict[str, Any]:
    return next(r for r in iter_records(log) if r["event"] == "setpoint" and r["seq"] > seq
                and r["rate_ml_per_h"] != "0")


def test_a_wrong_decision_in_the_window_diverges(plain: ArchiveLog, tmp_path: Path) -> None:
    """A setpoint the core would not have sent, in a log re-chained and re-signed (a buggy daemon): the window
    replay reports it at its seq, as the whole replay does, and the CLI exits 1."""
    log = _copy(plain, tmp_path / "audit")
    snap = _snapshots(log)[3]
    sp = _setpoint_after(log, snap["seq"])
    rechain(log, load_private_key(plain.key),
            lambda r: {**r, "rate_ml_per_h": "0.5"} if r["seq"] == sp["seq"] else r)
    result, window = replay_since(log, parse_ts(snap["ts"]), public_key=load_public_key(plain.pub))
    assert window.snapshot_seq == snap["seq"]
    assert [(d.seq, d.kind) for d in result.divergences] == [(sp["seq"], "different")]
    assert [d.as_dict() for d in result.divergences] == \
        [d.as_dict() for d in replay_lines(iter_lines(log)).divergences]
    out = runner.invoke(app, ["audit", "replay", str(log), "--since", snap["ts"]])
    assert out.exit_code == 1 and f"DIVERGENCE at seq {sp['seq']}" in out.output


def test_a_wrong_snapshot_shows_in_the_window(plain: ArchiveLog, tmp_path: Path) -> None:
    """The window trusts its seed snapshot as start-up does. A seed that is not what replay gives (edited and
    re-signed: a setpoint counter 7 ahead) shows at the first decision or snapshot after it that depends on it;
    the whole replay (what `audit verify --full` runs) finds the edited snapshot itself."""
    log = _copy(plain, tmp_path / "audit")
    snap = _snapshots(log)[4]

    def edit(r: dict[str, Any]) -> dict[str, Any]:
        if r["seq"] != snap["seq"]:
            return r
        state = r["states"]["bed-1"]
        return {**r, "states": {**r["states"], "bed-1": {**state, "next_setpoint_id": state["next_setpoint_id"] + 7}}}

    rechain(log, load_private_key(plain.key), edit)
    result, _ = replay_since(log, parse_ts(snap["ts"]))
    next_snap = next(r["seq"] for r in iter_records(log) if r["seq"] > snap["seq"] and r["event"] == SNAPSHOT_EVENT)
    assert not result.ok and snap["seq"] < result.divergences[0].seq <= next_snap
    assert next_snap in {d.seq for d in result.divergences}  # the next snapshot holds the true counter
    assert snap["seq"] in {d.seq for d in replay_lines(iter_lines(log)).divergences}


def test_history_before_the_snapshot_is_not_replayed(plain: ArchiveLog, tmp_path: Path) -> None:
    """The trust boundary, shown: a wrong decision before the seed snapshot (re-signed) is not the window's to
    find; the whole replay finds it. The CLI's text says so."""
    log = _copy(plain, tmp_path / "audit")
    snaps = _snapshots(log)
    sp = _setpoint_after(log, snaps[1]["seq"])
    seed = next(s for s in snaps if s["seq"] > sp["seq"] + 100)
    rechain(log, load_private_key(plain.key), lambda r: {**r, "rate_ml_per_h": "0.5"} if r["seq"] == sp["seq"] else r)
    assert replay_since(log, parse_ts(seed["ts"]))[0].ok
    assert [d.seq for d in replay_lines(iter_lines(log)).divergences] == [sp["seq"]]
    out = runner.invoke(app, ["audit", "replay", str(log), "--since", seed["ts"]])
    assert out.exit_code == 0, out.output
    assert f"from the state snapshot at seq {seed['seq']}" in out.output and "verify --full" in out.output


def test_a_window_that_does_not_verify_is_refused(made: ArchiveLog, tmp_path: Path) -> None:
    """Edited after the snapshot without re-signing: nothing is replayed, exit 1 naming the failure."""
    log = _copy(made, tmp_path / "audit")
    snap = _snapshots(log)[3]
    sp = _setpoint_after(log, snap["seq"])
    for seg in sorted(log.glob("audit-*.jsonl")):
        lines = seg.read_bytes().split(b"\n")
        for k, line in enumerate(lines):
            if line and json.loads(line)["seq"] == sp["seq"]:
                rec = json.loads(line)
                lines[k] = line.replace(f'"rate_ml_per_h":"{rec["rate_ml_per_h"]}"'.encode(),
                                        b'"rate_ml_per_h":"0.5"')
                assert lines[k] != line
                seg.write_bytes(b"\n".join(lines))
    with pytest.raises(AuditError, match="does not verify"):
        replay_since(log, parse_ts(snap["ts"]))
    out = runner.invoke(app, ["audit", "replay", str(log), "--since", snap["ts"], "--json"])
    assert out.exit_code == 1 and "does not verify" in json.loads(out.output)["error"]["message"]


def test_a_foreign_key_is_refused(made: ArchiveLog, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    since = _snapshots(made.audit)[2]["ts"]
    out = runner.invoke(app, ["audit", "replay", str(made.audit), "--since", since, "--key", str(other)])
    assert out.exit_code == 1 and "does not verify" in out.output
    ok = runner.invoke(app, ["audit", "replay", str(made.audit), "--since", since, "--key", str(made.pub)])
    assert ok.exit_code == 0 and "replay OK" in ok.output


def test_an_unsealed_snapshot_is_passed_over(made: ArchiveLog, tmp_path: Path) -> None:
    """The log cut just after a snapshot, before the checkpoint that seals it (a crash): the one before is taken."""
    recs = list(iter_records(made.audit))
    snaps = _snapshots(made.audit)
    target = snaps[-3]
    checkpoint = next(r["seq"] for r in recs if r["seq"] > target["seq"] and r["event"] == "checkpoint")
    log = _copy(made, tmp_path / "audit")
    for seg in sorted(log.glob("audit-*.jsonl")):
        keep = [line for line in seg.read_bytes().split(b"\n")[:-1] if json.loads(line)["seq"] < checkpoint]
        if keep:
            seg.write_bytes(b"".join(x + b"\n" for x in keep))
        else:
            seg.unlink()
    result, window = replay_since(log, parse_ts(target["ts"]) + timedelta(minutes=1))
    older = [s for s in snaps if s["seq"] < target["seq"]][-1]
    assert result.ok and window.snapshot_seq == older["seq"]


def test_an_archived_log(made: ArchiveLog, tmp_path: Path, whole: ReplayResult) -> None:
    """After `audit archive` the live log starts from a snapshot: a window inside it replays as in the full log."""
    live = _copy(made, tmp_path / "live")
    archive_log(live, parse_before("2026-12-08"), tmp_path / "archive", load_private_key(made.key),
                public_key=load_public_key(made.pub))
    snaps = _snapshots(live)
    snap = snaps[len(snaps) // 2]
    result, window = replay_since(live, parse_ts(snap["ts"]), public_key=load_public_key(made.pub))
    assert result.ok and window.snapshot_seq == snap["seq"]
    assert result.inputs == _inputs_after(made.audit, snap["seq"])


@pytest.mark.parametrize("args, message", [
    (["--since", "yesterday"], "--since: not a date"),
    (["--since", "2026-12-05T10:00:00"], "--since: give a time zone"),
    (["--since", "2026-13-01"], "--since: not a date"),
    (["--key", "x.pub"], "--key: only with --since"),
    (["--since", "2026-12-05", "--key", "/nonexistent.pub"], "--key"),
])
def test_malformed_arguments(made: ArchiveLog, args: list[str], message: str) -> None:
    out = runner.invoke(app, ["audit", "replay", str(made.audit), *args])
    assert out.exit_code == 2 and message in out.output, out.output


def test_the_json_names_the_window(made: ArchiveLog) -> None:
    snap = _snapshots(made.audit)[2]
    out = runner.invoke(app, ["audit", "replay", str(made.audit), "--since", format_ts(parse_ts(snap["ts"])),
                              "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["ok"] and doc["window"]["snapshot_seq"] == snap["seq"] and doc["window"]["verified"]["ok"]
