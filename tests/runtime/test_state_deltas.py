"""State deltas (issue 12, item 1): between full snapshots the daemon writes only what changed, so a restart after a
crash replays minutes of records, not hours. Start-up from the newest sealed delta rebuilds exactly the states of
the whole log; a crash at every boundary of writing a delta (and inside its line) recovers the same states as
replay of that prefix, falling back to the previous delta when the newest is unsealed or torn; a delta whose chain
does not resolve is passed over; replay (and `audit verify --full`) refuses a forged or malformed delta; a log
written before deltas (format 1 snapshots only, `tests/audit/data/format1-log.tar.gz`) still verifies, replays
and recovers, and the daemon carries on from it with deltas."""

from __future__ import annotations

import json
import random
import tarfile
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.audit.replay import replay_records
from driverd.audit.segments import segment_name
from driverd.audit.snapshot import DELTA_EVENT, SNAPSHOT_EVENT, apply_delta, newest_snapshot
from driverd.audit.writer import WRITER_EVENTS, AuditConfig, AuditWriter
from driverd.cli.main import app
from driverd.core.errors import AuditError, ValidationError
from driverd.core.state import CourseState
from driverd.runtime import daemon as daemon_module
from driverd.runtime.demo import DEMO_TRUST, START
from driverd.runtime.recovery import open_log, recover
from driverd.signing import TrustStore, load_private_key
from tests.runtime.e2e import Timing, rig, run
from tests.runtime.log_prefix import log_lines, replay_prefix, write_prefix

TRUST = TrustStore.load(DEMO_TRUST)
OFF = timedelta(seconds=30)
FIXTURE = Path(__file__).resolve().parents[1] / "audit" / "data" / "format1-log.tar.gz"


async def _course(work: Path) -> None:
    """Two pumps at a 60-s poll for 30 virtual hours with a restart in the middle: a full snapshot at each start
    and after 24 h, a delta every 40 records in between (shipped: 1,000)."""
    shipped = daemon_module.DELTA_RECORDS
    daemon_module.DELTA_RECORDS = 40
    try:
        async with rig("modbus-tcp", work, ("bed-1", "bed-2"), timing=Timing(poll_s=60, deadman_s=0)) as r:
            assert (await r.push("bed-1"))["ok"] and (await r.push("bed-2"))["ok"]
            for h in range(1, 14):
                for m in (0, 20, 40):
                    await r.advance_to(START + timedelta(hours=h, minutes=m) + OFF)
                    r.records()  # the runtime's audit timer: group commit, and a snapshot or delta when due
            await r.restart(silent_for=timedelta(minutes=10))
            for h in range(14, 30):
                for m in (0, 20, 40):
                    await r.advance_to(START + timedelta(hours=h, minutes=m + 11) + OFF)
                    r.records()
            assert r.replay().ok
    finally:
        daemon_module.DELTA_RECORDS = shipped


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("deltas")
    run(_course(work), timeout=240)
    return work


def _full_replay_states(lines: list[tuple[int, bytes]], k: int) -> dict[str, CourseState]:
    result, states = replay_prefix(lines, k)
    assert result.ok
    return states


def _records(audit: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for _, line in log_lines(audit)]


def test_start_up_from_the_newest_delta_gives_the_whole_logs_states(course: Path) -> None:
    audit = course / "audit"
    records = _records(audit)
    deltas = [r for r in records if r["event"] == DELTA_EVENT]
    fulls = [r for r in records if r["event"] == SNAPSHOT_EVENT]
    assert len(deltas) >= 20 and len(fulls) >= 3  # start, 24 h, restart (stop and start)
    for d in deltas:  # each opens its segment (after the writer's own records) and is signed right after
        after = next(r for r in records if r["seq"] == d["seq"] + 1)
        assert after["event"] == "checkpoint"
    assert any(p.get("add") for d in deltas for p in d["pumps"].values())  # history rows carried
    assert all("samples" not in p.get("fields", {}) for d in deltas for p in d["pumps"].values())
    result = replay_records(records)  # checks every snapshot and every delta against replay's states
    assert result.ok, result.divergences[:3]
    key = load_private_key(course / "keys" / "audit.key").public_key()
    # The newest record of either kind is the clean stop's full snapshot: cut the log after the newest delta.
    last_delta = max(k for k, (_, line) in enumerate(log_lines(audit)) if b'"event":"state_delta"' in line)
    dest = course / "to-last-delta"
    write_prefix(log_lines(audit), last_delta + 2, b"", dest)  # the delta and its checkpoint
    recovered = recover(dest, TRUST, key)
    assert recovered.snapshot_seq == deltas[-1]["seq"] and recovered.records == 1  # its checkpoint
    full = _full_replay_states(log_lines(audit), last_delta + 2)
    assert {p: repr(s) for p, s in recovered.states.items()} == {p: repr(s) for p, s in full.items()}
    whole = recover(audit, TRUST, key)
    assert whole.snapshot_seq == fulls[-1]["seq"]


def test_a_crash_at_every_boundary_of_writing_a_delta_recovers(course: Path, tmp_path: Path) -> None:
    lines = log_lines(course / "audit")
    key = load_private_key(course / "keys" / "audit.key")
    rng = random.Random(13)
    index = {json.loads(line)["seq"]: k for k, (_, line) in enumerate(lines)}
    delta_seqs = [json.loads(line)["seq"] for _, line in lines if b'"event":"state_delta"' in line]
    dest = tmp_path / "cut"
    checked = 0
    for seq in delta_seqs[len(delta_seqs) // 2 - 3:len(delta_seqs) // 2] + delta_seqs[-3:]:
        k = index[seq]  # lines[k] is the delta, lines[k + 1] its checkpoint
        for cut in (k - 1, k, k + 1, k + 2):  # before its segment's checkpoint, before it, unsealed, sealed
            for torn in (b"", lines[cut][1][:rng.randrange(1, len(lines[cut][1]) - 1)]):  # boundary, torn inside
                write_prefix(lines, cut, torn, dest)
                writer, recovered = open_log(dest, AuditConfig(), key, lambda: START + timedelta(days=30), TRUST)
                writer.close()
                assert recovered.states == _full_replay_states(lines, cut), (seq, cut, len(torn))
                # Sealed by its checkpoint: start-up began from this delta; before it, torn inside it, or unsealed
                # (the reopened writer signs its checkpoint only after recovery): from the one before, the delta
                # itself replayed and checked (the torn line is cut off first).
                assert (recovered.snapshot_seq == seq) == (cut > k + 1), (seq, cut, recovered.snapshot_seq)
                checked += 1
    assert checked == 48


def test_a_delta_whose_chain_does_not_resolve_is_passed_over(course: Path, tmp_path: Path) -> None:
    lines = log_lines(course / "audit")
    last = max(k for k, (_, line) in enumerate(lines) if b'"event":"state_delta"' in line)
    rec = json.loads(lines[last][1])
    dest = tmp_path / "broken"
    write_prefix(lines, last + 2, b"", dest)
    assert newest_snapshot(dest).seq == rec["seq"]  # type: ignore[union-attr]
    parent = rec["parent"]
    seg = dest / segment_name(parent["segment"])
    # The parent's segment is gone: the newest delta cannot be rebuilt, nor can any other of the same run after
    # it; start-up falls back to an older one, and verify from there refuses the gap.
    seg.rename(tmp_path / "aside.jsonl")
    older = newest_snapshot(dest)
    assert older is not None and older.seq < parent["seq"]
    with pytest.raises(AuditError, match="does not verify"):
        recover(dest, TRUST, load_private_key(course / "keys" / "audit.key").public_key())
    # A parent line with other bytes than its child names (an edit): the same.
    (tmp_path / "aside.jsonl").rename(seg)
    data = seg.read_bytes().replace(b'"event":"state_', b'"event":"state_', 1)
    lines_of = data.splitlines(keepends=True)
    for i, line in enumerate(lines_of):
        if json.loads(line)["seq"] == parent["seq"]:
            lines_of[i] = line.replace(b'"format":', b'"format": ', 1)
    seg.write_bytes(b"".join(lines_of))
    older = newest_snapshot(dest)
    assert older is not None and older.seq < parent["seq"]
    with pytest.raises(AuditError, match="does not verify"):
        recover(dest, TRUST, load_private_key(course / "keys" / "audit.key").public_key())


def _forge(records: list[dict[str, Any]], i: int, change: dict[str, Any]) -> list[dict[str, Any]]:
    return [*records[:i], {**records[i], **change}, *records[i + 1:]]


def test_replay_refuses_a_delta_that_differs_from_the_log(course: Path) -> None:
    records = _records(course / "audit")
    i = max(i for i, r in enumerate(records) if r["event"] == DELTA_EVENT
            and any(p.get("fields", {}).get("raw_delivered_ml") for p in r["pumps"].values()))
    pump = sorted(p for p, x in records[i]["pumps"].items() if x.get("fields", {}).get("raw_delivered_ml"))[0]
    patch = records[i]["pumps"][pump]
    wrong = str(Decimal(patch["fields"]["raw_delivered_ml"]) + Decimal("0.001"))
    forged = _forge(records, i, {"pumps": {**records[i]["pumps"], pump: {**patch, "fields": {
        **patch["fields"], "raw_delivered_ml": wrong}}}})
    result = replay_records(forged)
    assert [(d.kind, d.pump_id, d.seq) for d in result.divergences] == [("snapshot", pump, records[i]["seq"])]
    assert "differs from the replayed states" in result.divergences[0].detail
    # A row dropped from its history, a version claimed, a parent named that is not the previous one.
    for change in ({"pumps": {**records[i]["pumps"], pump: {**patch, "add": patch["add"][1:]}}},
                   {"versions_patch": {"set": {"x": 9}, "del": []}},
                   {"ledger_patch": {"patients": {"set": {"x": "someone"}, "del": []}}},
                   {"parent": {**records[i]["parent"], "seq": records[i]["parent"]["seq"] - 1}}):
        assert [d.kind for d in replay_records(_forge(records, i, change)).divergences] == ["snapshot"], change
    assert replay_records(records).ok


@pytest.mark.parametrize(("change", "path", "rule"), [
    ({"format": 3}, "format", "version"),
    ({"format": True}, "format", "version"),
    ({"pumps": []}, "pumps", "type"),
    ({"gone": "bed-1"}, "gone", "type"),
    ({"gone": ["bed-9"]}, "gone.bed-9", "unknown"),
    ({"extra": 1}, "extra", "unknown"),
    ({"pumps": {"bed-1": {"fields": {}}}}, "pumps.bed-1", "type"),
    ({"pumps": {"bed-1": {"fields": {}, "drop": -1, "add": []}}}, "pumps.bed-1.drop", "range"),
    ({"pumps": {"bed-1": {"fields": {}, "drop": 10**6, "add": []}}}, "pumps.bed-1.drop", "range"),
    ({"pumps": {"bed-1": {"fields": {}, "drop": 0, "add": {}}}}, "pumps.bed-1.add", "type"),
    ({"pumps": {"bed-1": {"fields": {"nope": 1}, "drop": 0, "add": []}}}, "pumps.bed-1.fields", "type"),
    ({"pumps": {"bed-1": {"fields": [], "samples": []}}}, "pumps.bed-1.fields", "type"),
    ({"pumps": {"bed-9": {"fields": {}, "drop": 0, "add": []}}}, "pumps.bed-9", "unknown"),
    ({"pumps": {"bed-1": {"state": 3}}}, "pumps.bed-1.state", "type"),
    ({"versions_patch": 3}, "versions_patch", "type"),
    ({"versions_patch": {"set": {}}}, "versions_patch", "type"),
    ({"versions_patch": {"set": [], "del": []}}, "versions_patch.set", "type"),
    ({"versions_patch": {"set": {}, "del": "x"}}, "versions_patch.del", "type"),
    ({"versions_patch": {"set": {}, "del": ["nope"]}}, "versions_patch.del.nope", "unknown"),
    ({"ledger_patch": []}, "ledger_patch", "type"),
    ({"ledger_patch": {"patients": []}}, "ledger_patch.patients", "type"),
    ({"ledger_patch": {"started": {"set": {}, "del": ["nope"]}}}, "ledger_patch.started.del.nope", "unknown"),
    ({"ledger_patch": {}, "ledger": {}}, "ledger_patch", "conflict"),
    ({"format": 1}, "ledger_patch", "unknown"),  # a format-2 field in a format-1 delta
    ({"versions": {}}, "versions", "unknown"),  # and a format-1 field in a format-2 one
])
def test_a_malformed_delta_is_refused_naming_the_field(course: Path, change: dict[str, Any], path: str,
                                                      rule: str) -> None:
    records = _records(course / "audit")
    i = next(i for i, r in enumerate(records) if r["event"] == DELTA_EVENT)
    parent = next(r for r in records if r["seq"] == records[i]["parent"]["seq"])
    assert parent["event"] == SNAPSHOT_EVENT
    base = {k: parent[k] for k in ("states", "versions", "library", "ledger", "schedules")}
    apply_delta(base, records[i])
    with pytest.raises(ValidationError) as info:
        apply_delta(base, {**records[i], **change})
    assert (info.value.problems[0].path, info.value.problems[0].rule) == (path, rule)
    result = replay_records(_forge(records, i, change))  # replay names it too
    assert [d.kind for d in result.divergences] == ["snapshot"]
    assert "does not parse" in result.divergences[0].detail and path in result.divergences[0].detail


def _resign(records: list[dict[str, Any]], dest: Path, key_path: Path) -> None:
    """The same records written again by a real writer (so chain and signatures hold), the writer's own omitted.
    Deltas name their parent's line hash and segment, which change: they are re-pointed as the writer goes."""
    writer = AuditWriter.open(dest, AuditConfig(), load_private_key(key_path), lambda: START)
    parent: dict[str, Any] = {}
    for rec in records:
        if rec["event"] in WRITER_EVENTS:
            continue
        fields = {k: v for k, v in rec.items() if k not in ("seq", "ts", "event", "pump_id", "course_id", "prev",
                                                             "hash")}
        if rec["event"] == DELTA_EVENT:
            fields["parent"] = parent
        if rec["event"] in (DELTA_EVENT, SNAPSHOT_EVENT):
            writer.rotate()
        out = writer.append(rec["event"], pump_id=rec["pump_id"], course_id=rec["course_id"], durable=False,
                            **fields)
        if rec["event"] in (DELTA_EVENT, SNAPSHOT_EVENT):
            parent = {"seq": out["seq"], "segment": writer.segment, "line_sha256": writer.head}
            writer.checkpoint("snapshot")
    writer.close()


def test_audit_verify_full_finds_a_signed_delta_that_replay_does_not_reach(course: Path, tmp_path: Path) -> None:
    records = _records(course / "audit")
    i = max(i for i, r in enumerate(records) if r["event"] == DELTA_EVENT and r["pumps"])
    pump = sorted(records[i]["pumps"])[0]
    patch = records[i]["pumps"][pump]
    forged = _forge(records, i, {"pumps": {**records[i]["pumps"], pump: {
        **patch, "fields": {**patch.get("fields", {}), "taper_index": 7}}}})
    key_path = course / "keys" / "audit.key"
    _resign(records, tmp_path / "good", key_path)
    _resign(forged, tmp_path / "forged", key_path)
    for name, bad in (("good", False), ("forged", True)):
        plain = CliRunner().invoke(app, ["audit", "verify", str(tmp_path / name), "--json"])
        assert plain.exit_code == 0, plain.stdout  # chain and signatures hold either way
        res = CliRunner().invoke(app, ["audit", "verify", str(tmp_path / name), "--full", "--json"])
        out = json.loads(res.stdout)
        assert (res.exit_code != 0) == bad, out
        if bad:
            assert "(snapshot)" in out["full"]["failure"] and pump in out["full"]["failure"]


def test_a_log_written_before_deltas_verifies_replays_recovers_and_carries_on(tmp_path: Path) -> None:
    """format1-log.tar.gz: one pump for 6 virtual hours with a restart, written by the code before deltas
    (git 499d69c-era main: full snapshots, format 1, hourly)."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    audit, pub = tmp_path / "audit", tmp_path / "keys" / "audit.pub"
    records = _records(audit)
    assert not any(r["event"] == DELTA_EVENT for r in records)
    assert {r["format"] for r in records if r["event"] == SNAPSHOT_EVENT} == {1}
    res = CliRunner().invoke(app, ["audit", "verify", str(audit), "--key", str(pub), "--full", "--json"])
    assert res.exit_code == 0, res.stdout
    assert replay_records(records).ok
    from driverd.signing import load_public_key

    recovered = recover(audit, TRUST, load_public_key(pub))
    assert recovered.snapshot_seq == max(r["seq"] for r in records if r["event"] == SNAPSHOT_EVENT)
    assert recovered.states == _full_replay_states(log_lines(audit), len(records))
