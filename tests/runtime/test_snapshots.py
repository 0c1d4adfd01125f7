"""Signed state snapshots (issue 12, item 1): start-up carries on from the newest sealed snapshot and replays only
what follows it, to the same states as replay of the whole log; replay checks every snapshot against its own
states; a crash at every boundary of writing a snapshot (and inside its lines) recovers the same states.
(tests/runtime/test_crash_points.py covers every record boundary of a log holding snapshots too.)"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.audit.exposure import LedgerBuilder
from driverd.audit.replay import replay_records
from driverd.audit.snapshot import SNAPSHOT_EVENT, newest_snapshot, read_snapshot, snapshot_fields
from driverd.audit.writer import WRITER_EVENTS, AuditConfig, AuditWriter
from driverd.cli.main import app
from driverd.core.errors import ValidationError
from driverd.core.state import CourseState
from driverd.runtime import daemon as daemon_module
from driverd.runtime.demo import DEMO_TRUST, START
from driverd.runtime.recovery import open_log, recover
from driverd.signing import TrustStore, load_private_key
from tests.runtime.e2e import Timing, rig, run
from tests.runtime.log_prefix import log_lines, replay_prefix, write_prefix

TRUST = TrustStore.load(DEMO_TRUST)
SHIPPED_EVERY = daemon_module.SNAPSHOT_EVERY
OFF = timedelta(seconds=30)


async def _course(work: Path) -> None:
    """Two pumps at a 60-s poll for 30 virtual hours with a restart in the middle (a snapshot at each start and
    every hour)."""
    daemon_module.SNAPSHOT_EVERY = timedelta(hours=1)  # more snapshots than shipped (6 h): more to check
    try:
        await _course_body(work)
    finally:
        daemon_module.SNAPSHOT_EVERY = SHIPPED_EVERY


async def _course_body(work: Path) -> None:
    async with rig("modbus-tcp", work, ("bed-1", "bed-2"), timing=Timing(poll_s=60, deadman_s=0)) as r:
        assert (await r.push("bed-1"))["ok"] and (await r.push("bed-2"))["ok"]
        for h in range(1, 14):
            await r.advance_to(START + timedelta(hours=h) + OFF)
            r.records()  # the runtime's audit timer: group commit, and a snapshot when due
        await r.restart(silent_for=timedelta(minutes=10))
        for h in range(14, 30):
            await r.advance_to(START + timedelta(hours=h, minutes=11) + OFF)
            r.records()
        assert r.replay().ok


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("snapshots")
    run(_course(work), timeout=240)
    return work


def _full_replay_states(lines: list[tuple[int, bytes]], k: int) -> dict[str, CourseState]:
    return replay_prefix(lines, k)[1]


def test_start_up_from_the_newest_snapshot_gives_the_whole_logs_states(course: Path) -> None:
    tmp_path = course
    audit = tmp_path / "audit"
    records = [json.loads(line) for _, line in log_lines(audit)]
    snaps = [r for r in records if r["event"] == SNAPSHOT_EVENT]
    assert len(snaps) >= 20  # one at each start, then hourly
    for s in snaps:  # each is followed by the checkpoint that signs it
        after = next(r for r in records if r["seq"] == s["seq"] + 1)
        assert after["event"] == "checkpoint"
    result = replay_records(records)  # checks every snapshot against the states replay has there
    assert result.ok, result.divergences[:3]
    recovered = recover(audit, TRUST, load_private_key(tmp_path / "keys" / "audit.key").public_key())
    assert recovered.snapshot_seq == snaps[-1]["seq"]
    assert recovered.records < len(records) - snaps[-1]["seq"] + 5  # only what follows the snapshot
    full = _full_replay_states(log_lines(audit), len(records))
    assert recovered.states == full
    assert {p: repr(s) for p, s in recovered.states.items()} == {p: repr(s) for p, s in full.items()}
    ledger = LedgerBuilder()
    for rec in records:
        ledger.add(rec)
    # The exposure ledger as the whole log gives it (the snapshots prune only bursts a year old: none here).
    assert recovered.ledger.ledger() == ledger.ledger()
    assert {k: v for k, v in recovered.ledger.to_fields().items() if k != "retired"} == ledger.to_fields()


def test_a_crash_at_every_boundary_of_writing_a_snapshot_recovers(course: Path, tmp_path: Path) -> None:
    lines = log_lines(course / "audit")
    key = load_private_key(course / "keys" / "audit.key")
    rng = random.Random(12)
    index = {json.loads(line)["seq"]: k for k, (_, line) in enumerate(lines)}
    snap_seqs = [json.loads(line)["seq"] for _, line in lines if b'"state_snapshot"' in line]
    dest = tmp_path / "cut"
    checked = 0
    for seq in snap_seqs[-4:]:
        k = index[seq]  # lines[k] is the snapshot, lines[k + 1] its checkpoint
        for cut in (k, k + 1, k + 2):  # before the snapshot, between it and its checkpoint, after the checkpoint
            for torn in (b"", lines[cut][1][:rng.randrange(1, len(lines[cut][1]) - 1)]):  # boundary, torn inside
                write_prefix(lines, cut, torn, dest)
                writer, recovered = open_log(dest, AuditConfig(), key, lambda: START + timedelta(days=30), TRUST)
                writer.close()
                assert recovered.states == _full_replay_states(lines, cut), (seq, cut, len(torn))
                checked += 1
    assert checked == 24


def test_replay_refuses_a_snapshot_that_differs_from_the_log(course: Path) -> None:
    records = [json.loads(line) for _, line in log_lines(course / "audit")]
    i = max(i for i, r in enumerate(records) if r["event"] == SNAPSHOT_EVENT and r["states"])
    snap = read_snapshot(records[i])
    pump = sorted(snap.states)[0]
    wrong = dict(snap.states)
    wrong[pump] = replace(wrong[pump], commanded_rate=wrong[pump].commanded_rate + Decimal("0.001"))
    forged = {**records[i], **snapshot_fields(wrong, snap.versions, snap.library, snap.ledger, _acc(snap))}
    result = replay_records([*records[:i], forged, *records[i + 1:]])
    assert [(d.kind, d.pump_id, d.seq) for d in result.divergences] == [("snapshot", pump, records[i]["seq"])]
    versions = {**records[i], **snapshot_fields(snap.states, {**snap.versions, "x": 9}, snap.library, snap.ledger,
                                                   _acc(snap))}
    assert [d.kind for d in replay_records([*records[:i], versions, *records[i + 1:]]).divergences] == ["snapshot"]


def test_the_newest_unsealed_snapshot_is_not_used(course: Path, tmp_path: Path) -> None:
    lines = log_lines(course / "audit")
    last = max(k for k, (_, line) in enumerate(lines) if b'"state_snapshot"' in line)
    dest = tmp_path / "cut"
    write_prefix(lines, last + 1, b"", dest)  # the snapshot's checkpoint never made it
    snap = newest_snapshot(dest)
    assert snap is not None and snap.seq < json.loads(lines[last][1])["seq"]


def _resign(records: list[dict[str, Any]], dest: Path, key_path: Path) -> None:
    """The same records written again by a real writer (so chain and signatures hold), the writer's own omitted."""
    writer = AuditWriter.open(dest, AuditConfig(), load_private_key(key_path), lambda: START)
    for rec in records:
        if rec["event"] in WRITER_EVENTS:
            continue
        fields = {k: v for k, v in rec.items() if k not in ("seq", "ts", "event", "pump_id", "course_id", "prev",
                                                             "hash")}
        writer.append(rec["event"], pump_id=rec["pump_id"], course_id=rec["course_id"], durable=False, **fields)
    writer.close()


def test_audit_verify_full_finds_a_signed_snapshot_that_replay_does_not_reach(course: Path, tmp_path: Path) -> None:
    records = [json.loads(line) for _, line in log_lines(course / "audit")]
    i = max(i for i, r in enumerate(records) if r["event"] == SNAPSHOT_EVENT)
    snap = read_snapshot(records[i])
    pump = sorted(snap.states)[0]
    wrong = {**snap.states, pump: replace(snap.states[pump], taper_index=snap.states[pump].taper_index + 1)}
    forged = {**records[i], **snapshot_fields(wrong, snap.versions, snap.library, snap.ledger, _acc(snap))}
    key_path = course / "keys" / "audit.key"
    _resign(records, tmp_path / "good", key_path)
    _resign([*records[:i], forged, *records[i + 1:]], tmp_path / "forged", key_path)
    for name, verdict in (("good", 0), ("forged", 1)):
        plain = CliRunner().invoke(app, ["audit", "verify", str(tmp_path / name), "--json"])
        assert plain.exit_code == 0, plain.stdout  # chain and signatures hold either way
        res = CliRunner().invoke(app, ["audit", "verify", str(tmp_path / name), "--full", "--json"])
        out = json.loads(res.stdout)
        assert (res.exit_code != 0) == bool(verdict), out
        assert out["full"]["snapshots"] >= 20
        if verdict:
            assert "(snapshot)" in out["full"]["failure"] and pump in out["full"]["failure"]
    # Start-up trusts the newest sealed snapshot on its signature: the forged state is what it recovers. That is
    # why `--full` exists (docs/audit.md).
    forged_start = recover(tmp_path / "forged", TRUST, load_private_key(key_path).public_key())
    assert forged_start.snapshot_seq is not None


def _acc(snap: Any) -> dict[str, Any]:
    return {x["schedule"]["digest"]: x for x in snap.schedules}


@pytest.mark.parametrize(("change", "path", "rule"), [
    ({"format": 2}, "format", "version"),
    ({"states": []}, "states", "type"),
    ({"versions": {"S-1": "1"}}, "versions", "type"),
    ({"versions": {"S-1": True}}, "versions", "type"),
    ({"library": 7}, "library", "type"),
    ({"schedules": {}}, "schedules", "type"),
    ({"schedules": ["x"]}, "schedules", "type"),
    ({"ledger": None}, "ledger.patients", "type"),
    ({"ledger": {"patients": {"c": 1}, "started": {}, "ended": {}, "last_at": {}}}, "ledger.patients.c", "type"),
    ({"ledger": {"patients": {}, "started": {"c": "soon"}, "ended": {}, "last_at": {}}}, "ledger.started.c",
     "format"),
    ({"ledger": {"patients": {}, "started": {}, "ended": {"c": ["2026-01-01T00:00:00Z", "lots"]}, "last_at": {}}},
     "ledger.ended.c", "number"),
    ({"ledger": {"patients": {}, "started": {}, "ended": {"c": "x"}, "last_at": {}}}, "ledger.ended.c", "type"),
    ({"states": {"bed-1": {"pump_id": "bed-1"}}}, "states.bed-1.phase", "required"),
])
def test_a_malformed_snapshot_is_refused_naming_the_field(course: Path, change: dict[str, Any], path: str,
                                                         rule: str) -> None:
    records = [json.loads(line) for _, line in log_lines(course / "audit")]
    good = next(r for r in records if r["event"] == SNAPSHOT_EVENT)
    read_snapshot(good)
    with pytest.raises(ValidationError) as info:
        read_snapshot({**good, **change})
    assert (info.value.problems[0].path, info.value.problems[0].rule) == (path, rule)


def test_replay_refuses_a_snapshot_whose_history_differs_only_in_form(course: Path) -> None:
    """Replay compares a snapshot's states in their encoded form (each history row encoded once for every snapshot
    it appears in): a sample that differs only in a Decimal's exponent is a different state, and a malformed row
    is reported as such, as when every snapshot was decoded."""
    records = [json.loads(line) for _, line in log_lines(course / "audit")]
    i = max(i for i, r in enumerate(records) if r["event"] == SNAPSHOT_EVENT and r["states"])
    pump = sorted(records[i]["states"])[0]
    rows = records[i]["states"][pump]["samples"]
    assert len(rows) > 2
    for row, kind in (([*rows[1][:2], rows[1][2] + "0" if "." in rows[1][2] else rows[1][2] + ".0"], "differs"),
                      ([*rows[1][:2], "lots"], "does not parse")):
        state = {**records[i]["states"][pump], "samples": [rows[0], row, *rows[2:]]}
        forged = {**records[i], "states": {**records[i]["states"], pump: state}}
        result = replay_records([*records[:i], forged, *records[i + 1:]])
        assert [(d.kind, d.seq) for d in result.divergences] == [("snapshot", records[i]["seq"])]
        assert kind in result.divergences[0].detail
    assert replay_records(records).ok
