"""Shared fixtures: a signing key, an injectable clock, and real logs written through the writer."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.canonical import ZERO_HASH, dumps, loads_line, record_hash, sha256_hex
from driverd.audit.signing import sign_checkpoint
from driverd.audit.writer import AuditConfig, AuditWriter

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


class StepClock:
    """Virtual time: each read returns the current time, then moves it on by `step`."""

    def __init__(self, start: datetime = T0, step: timedelta = timedelta(seconds=1)) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> datetime:
        t = self.now
        self.now += self.step
        return t


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def pub_pem(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    p = tmp_path / "audit.pub"
    p.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return p


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


def small_config(**kw: int) -> AuditConfig:
    base = {
        "segment_max_records": 12,
        "checkpoint_every_records": 5,
        "checkpoint_every_s": 3600,
        "group_commit_ms": 10_000,
        "group_commit_records": 4,
    }
    base.update(kw)
    return AuditConfig(**base)  # type: ignore[arg-type]


def write_generic_log(directory: Path, key: Ed25519PrivateKey | None, n: int = 20, **cfg: int) -> Path:
    """A closed log of n caller records with mixed durability, over several segments."""
    w = AuditWriter.open(directory, small_config(**cfg), key, StepClock())
    for i in range(n):
        w.append(
            "telemetry" if i % 3 else "setpoint_intent",
            pump_id=f"bed-{i % 2}",
            course_id="c-1",
            durable=i % 3 == 0,
            i=i,
            rate_ml_per_h=Decimal("0.416"),
            note="ü→✓",
        )
    w.close()
    return directory


def append_snapshot_segments(w: AuditWriter, segments: int) -> None:
    """A small log in an open writer: `segments` segments, each after the first opening with an (empty) state
    snapshot (the segments `audit archive` may cut at), then closed."""
    for _ in range(4):  # a segment rotates only once it holds more than its own start
        w.append("daemon_start", pump_id=None, course_id=None, durable=True)
    for _ in range(segments - 1):
        w.rotate()
        w.append("state_snapshot", pump_id=None, course_id=None, durable=True, format=1, states={}, versions={},
                 library=None, ledger={"patients": {}, "started": {}, "ended": {}, "last_at": {}}, schedules=[])
        for _ in range(3):
            w.append("daemon_stop", pump_id=None, course_id=None, durable=True)
    w.close()


@pytest.fixture
def generic_log(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    return write_generic_log(tmp_path / "log", key)


def read_lines(directory: Path) -> list[tuple[Path, bytes]]:
    """(segment, line) pairs in log order."""
    out = []
    for seg in sorted(directory.glob("audit-*.jsonl")):
        for line in seg.read_bytes().split(b"\n")[:-1]:
            out.append((seg, line))
    return out


def rechain(directory: Path, key: Ed25519PrivateKey, edit: Callable[[dict], dict]) -> None:
    """What a key-holding attacker (or a buggy daemon) could do: edit records and re-chain + re-sign everything."""
    prev = ZERO_HASH
    per_seg: dict[Path, list[bytes]] = {}
    for seg, line in read_lines(directory):
        rec = edit(loads_line(line))
        rec["prev"] = prev
        if rec["event"] == "segment_start":
            rec["prev_segment_hash"] = prev
        if rec["event"] == "checkpoint":
            rec["head"] = prev
            rec.pop("sig", None)
            rec["sig"] = sign_checkpoint(key, rec)
        rec["hash"] = record_hash(rec)
        raw = dumps(rec)
        prev = sha256_hex(raw)
        per_seg.setdefault(seg, []).append(raw)
    for seg, lines in per_seg.items():
        seg.write_bytes(b"".join(x + b"\n" for x in lines))


@pytest.fixture
def cwd_tmp(tmp_path: Path) -> Iterator[Path]:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)
