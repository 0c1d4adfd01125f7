"""A state delta names its parent by the parent's own line, also when the parent's append wrote a checkpoint after it.

The writer checkpoints inside an append every `checkpoint_every_records` records or `checkpoint_every_s` of log time.
The daemon used to take the writer's `head` after appending a snapshot or delta, which is then the checkpoint's line:
the next delta named the checkpoint as its parent, replay found the delta different from its own (parent), and after a
crash start-up passed over the delta, replayed to it and refused to start until the next full snapshot (found by
review, 2026-12-03). Two ways to it: a config with a checkpoint every record, and the shipped settings (a checkpoint
every 60 s) after a link outage that leaves the log quiet for a day, so that the full snapshot lands in the previous
delta's three-record segment (rotate skips it) 60 s or more after the last checkpoint."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.canonical import sha256_hex
from driverd.audit.segments import segment_name
from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.runtime import daemon as daemon_module
from driverd.runtime.config import AuditSettings
from driverd.runtime.demo import DEMO_TRUST, START
from driverd.runtime.recovery import open_log
from driverd.signing import TrustStore, load_private_key
from tests.runtime.e2e import Timing, rig, run

OFF = timedelta(seconds=30)


def test_appended_head_is_the_appended_line_when_the_append_checkpoints(tmp_path: Path) -> None:
    writer = AuditWriter.open(tmp_path, AuditConfig(checkpoint_every_records=1), Ed25519PrivateKey.generate(),
                              lambda: START)
    rec = writer.append("note", pump_id=None, course_id=None, durable=True)
    writer.close()
    lines = (tmp_path / segment_name(writer.segment)).read_bytes().splitlines()
    mine = next(line for line in lines if f'"seq":{rec["seq"]},'.encode() in line)
    assert b'"event":"checkpoint"' in lines[lines.index(mine) + 1]  # the append wrote a checkpoint after it
    assert writer.appended_head == sha256_hex(mine) != writer.head


def _deltas_and_crash_copy(tmp_path: Path, audit: AuditSettings, timing: Timing, script: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def body() -> None:
        async with rig("modbus-tcp", tmp_path, ("bed-1",), timing=timing, audit=audit) as r:
            assert (await r.push("bed-1"))["ok"]
            await script(r)
            recs = r.records()
            out["deltas"] = [x for x in recs if x["event"] == "state_delta"]
            out["replay"] = r.replay()
            shutil.copytree(tmp_path / "audit", tmp_path / "crashed")  # a power cut here (all of it synced)

    run(body(), timeout=400)
    return out


def _starts(tmp_path: Path) -> None:
    key = load_private_key(tmp_path / "keys" / "audit.key")
    writer, _ = open_log(tmp_path / "crashed", AuditConfig(), key, lambda: START + timedelta(days=5),
                         TrustStore.load(DEMO_TRUST))
    writer.close()


def test_a_checkpoint_every_record_keeps_the_delta_chain(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(daemon_module, "DELTA_RECORDS", 40)

    async def script(r: Any) -> None:
        for h in range(1, 4):
            for m in (0, 20, 40):
                await r.advance_to(START + timedelta(hours=h, minutes=m) + OFF)
                r.records()

    out = _deltas_and_crash_copy(tmp_path, AuditSettings(checkpoint_every_records=1, checkpoint_every_s=3600),
                                 Timing(poll_s=60, deadman_s=0), script)
    assert len(out["deltas"]) >= 2
    assert out["replay"].ok, out["replay"].divergences[:3]
    _starts(tmp_path)


def test_the_shipped_settings_after_a_day_long_link_outage_keep_the_delta_chain(tmp_path: Path) -> None:
    async def script(r: Any) -> None:
        t = START + timedelta(hours=2, minutes=5)
        await r.advance_to(t)
        r.records()
        r.faults("bed-1").drop_next(1_000_000)  # the pump is unreachable (cable out)
        for _ in range(3 * 30):  # 30 h, the audit timer every 20 min
            t += timedelta(minutes=20)
            await r.advance_to(t)
            r.records()
        r.faults("bed-1").clear()  # cable back in
        for _ in range(3 * 3):
            t += timedelta(minutes=20)
            await r.advance_to(t)
            r.records()

    out = _deltas_and_crash_copy(tmp_path, AuditSettings(),
                                 Timing(poll_s=600, deadman_s=0, link_timeout_s=1200, driver_timeout_s=0.02), script)
    assert out["deltas"]
    assert out["replay"].ok, out["replay"].divergences[:3]
    _starts(tmp_path)
