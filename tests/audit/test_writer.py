"""The writer: record envelope, chain, durability paths, checkpoints, rotation, torn-tail recovery, fatal I/O."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.canonical import ZERO_HASH, AuditFieldError, dumps, loads_line, record_hash, sha256_hex
from driverd.audit.signing import checkpoint_signature_ok, fingerprint
from driverd.audit.verify import verify_log
from driverd.audit.writer import AuditConfig, AuditWriter, get_audit_logger
from driverd.core.errors import AuditError, ConfigError

from .conftest import StepClock, read_lines, small_config


def records(directory: Path) -> list[dict]:
    return [loads_line(line) for _, line in read_lines(directory)]


def test_first_records_and_chain(tmp_path: Path, key: Ed25519PrivateKey, clock: StepClock) -> None:
    w = AuditWriter.open(tmp_path / "log", small_config(), key, clock)
    rec = w.append("setpoint", pump_id="bed-1", course_id="c-1", durable=True, rate_ml_per_h=Decimal("0.416"))
    assert rec["seq"] == 2 and rec["event"] == "setpoint" and rec["rate_ml_per_h"] == "0.416"
    assert rec["ts"] == "2026-03-02T08:00:01Z"
    w.close()
    recs = records(tmp_path / "log")
    start = recs[0]
    assert start["event"] == "segment_start" and start["seq"] == 1 and start["prev"] == ZERO_HASH
    assert start["key_fingerprint"] == fingerprint(key.public_key())
    assert start["prev_segment_hash"] == ZERO_HASH and start["segment"] == 1
    lines = [line for _, line in read_lines(tmp_path / "log")]
    for i, r in enumerate(recs):
        assert r["hash"] == record_hash(r)
        assert r["seq"] == i + 1
        if i:
            assert r["prev"] == sha256_hex(lines[i - 1])
        assert dumps(r) == lines[i]
    assert recs[-1]["event"] == "checkpoint" and recs[-1]["reason"] == "close"
    assert recs[1] == rec


def test_structlog_logger_appends_through_same_pipeline(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    w = AuditWriter.open(tmp_path / "log", small_config(), key, StepClock())
    log = get_audit_logger(w).bind(pump_id="bed-2")
    rec = log.info("pump_report", course_id="c-9", durable=False, delivered_ml=Decimal("1.25"))
    assert rec["seq"] == 2 and rec["pump_id"] == "bed-2" and rec["delivered_ml"] == "1.25"
    log.warning("alarm", code="occlusion")  # levels do not matter; durable by default on this path
    w.close()
    assert verify_log(tmp_path / "log").ok
    assert [r["event"] for r in records(tmp_path / "log")][:3] == ["segment_start", "pump_report", "alarm"]


@pytest.mark.parametrize(
    ("fields", "path", "rule"),
    [
        ({"rate": 0.5}, "rate", "no-float"),
        ({"seq": 7}, "seq", "reserved"),
        ({"hash": "x"}, "hash", "reserved"),
        ({"nested": {"x": [1.0]}}, "nested.x[0]", "no-float"),
        ({"obj": object()}, "obj", "type"),
    ],
)
def test_bad_fields_change_nothing(
    tmp_path: Path, key: Ed25519PrivateKey, fields: dict, path: str, rule: str
) -> None:
    w = AuditWriter.open(tmp_path / "log", small_config(), key, StepClock())
    before = (w.seq, w.head, (tmp_path / "log" / "audit-000001.jsonl").read_bytes())
    with pytest.raises(AuditFieldError) as info:
        w.append("x", pump_id=None, course_id=None, durable=True, **fields)
    assert (info.value.problems[0].path, info.value.problems[0].rule) == (path, rule)
    assert (w.seq, w.head, (tmp_path / "log" / "audit-000001.jsonl").read_bytes()) == before
    w.append("x", pump_id=None, course_id=None, durable=True)  # still usable
    w.close()
    assert verify_log(tmp_path / "log").ok


@pytest.mark.parametrize("event", ["checkpoint", "segment_start", "", "torn_tail_truncated"])
def test_writer_only_events_refused(tmp_path: Path, key: Ed25519PrivateKey, event: str) -> None:
    w = AuditWriter.open(tmp_path / "log", small_config(), key, StepClock())
    with pytest.raises(AuditFieldError):
        w.append(event, pump_id=None, course_id=None, durable=True, count=1)
    with pytest.raises(AuditFieldError):
        w.append("x", pump_id=5, course_id=None, durable=True)  # type: ignore[arg-type]
    w.close()


def test_naive_clock_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    from datetime import datetime

    with pytest.raises(AuditFieldError):
        AuditWriter.open(tmp_path / "log", small_config(), key, lambda: datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"segment_max_records": 0}, "audit.segment_max_records"),
        ({"segment_max_records": 2}, "audit.segment_max_records"),
        ({"checkpoint_every_records": -1}, "audit.checkpoint_every_records"),
        ({"checkpoint_every_s": 1.5}, "audit.checkpoint_every_s"),
        ({"group_commit_ms": Decimal("NaN")}, "audit.group_commit_ms"),
        ({"group_commit_records": True}, "audit.group_commit_records"),
    ],
)
def test_config_malformed(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        AuditConfig(**kw)
    assert field in {p.path for p in info.value.problems}


def test_checkpoints_by_count_and_time_are_signed(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = StepClock(step=timedelta(seconds=1))
    cfg = small_config(checkpoint_every_records=3, checkpoint_every_s=3600)
    w = AuditWriter.open(tmp_path / "log", cfg, key, clock)
    for _ in range(3):
        w.append("x", pump_id=None, course_id=None, durable=False)
    recs = records(tmp_path / "log")
    assert recs[-1]["event"] == "checkpoint" and recs[-1]["reason"] == "records" and recs[-1]["count"] == 4
    clock.step = timedelta(hours=2)  # virtual time jumps: the next record is due a time checkpoint
    w.append("x", pump_id=None, course_id=None, durable=False)
    w.append("x", pump_id=None, course_id=None, durable=False)
    recs = records(tmp_path / "log")
    assert [r.get("reason") for r in recs if r["event"] == "checkpoint"] == ["records", "interval"]
    for r in recs:
        if r["event"] == "checkpoint":
            assert checkpoint_signature_ok(key.public_key(), r)
            assert r["count"] == r["seq"] - 1 and r["head"] == r["prev"]
    cp = w.checkpoint()
    assert cp is not None and cp["reason"] == "manual"
    w.close()


def test_rotation_links_segments(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    cfg = small_config(segment_max_records=5, checkpoint_every_records=100)
    w = AuditWriter.open(tmp_path / "log", cfg, key, StepClock())
    for i in range(12):
        w.append("x", pump_id=None, course_id=None, durable=i % 2 == 0, i=i)
    w.close()
    segs = sorted((tmp_path / "log").glob("audit-*.jsonl"))
    assert len(segs) >= 3
    prev_last = None
    for n, seg in enumerate(segs, start=1):
        lines = seg.read_bytes().split(b"\n")[:-1]
        first = loads_line(lines[0])
        assert first["event"] == "segment_start" and first["segment"] == n
        assert first["prev_segment_hash"] == (sha256_hex(prev_last) if prev_last else ZERO_HASH)
        assert loads_line(lines[-1])["event"] == "checkpoint"  # every full segment is sealed
        prev_last = lines[-1]
    report = verify_log(tmp_path / "log")
    assert report.ok and report.segments == len(segs) and report.unsealed_records == 0


def test_unsigned_log_verifies_but_is_unsealed(tmp_path: Path) -> None:
    w = AuditWriter.open(tmp_path / "log", small_config(), None, StepClock())
    assert w.checkpoint() is None
    w.append("x", pump_id=None, course_id=None, durable=True)
    w.close()
    report = verify_log(tmp_path / "log")
    assert report.ok and report.key_source == "none" and report.unsealed_records == report.records == 2
    assert not verify_log(tmp_path / "log", require_sealed=True).ok


def test_reopen_continues_chain_and_key_must_match(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    d = tmp_path / "log"
    w = AuditWriter.open(d, small_config(), key, StepClock())
    w.append("x", pump_id=None, course_id=None, durable=True)
    w.close()
    w = AuditWriter.open(d, small_config(), key, StepClock(start=StepClock().now + timedelta(days=1)))
    assert w.seq > 3
    w.close()
    assert verify_log(d).ok
    assert "log_reopened" in [r["event"] for r in records(d)]
    with pytest.raises(AuditError, match="fingerprint"):
        AuditWriter.open(d, small_config(), Ed25519PrivateKey.generate(), StepClock())
    with pytest.raises(AuditError, match="fingerprint"):
        AuditWriter.open(d, small_config(), None, StepClock())


def test_second_writer_refused_and_closed_writer_raises(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    w = AuditWriter.open(tmp_path / "log", small_config(), key, StepClock())
    with pytest.raises(AuditError, match="in use"):
        AuditWriter.open(tmp_path / "log", small_config(), key, StepClock())
    w.close()
    w.close()  # idempotent
    with pytest.raises(AuditError, match="closed"):
        w.append("x", pump_id=None, course_id=None, durable=True)


def test_group_commit_flush(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    w = AuditWriter.open(tmp_path / "log", small_config(group_commit_records=1000), key, StepClock())
    w.append("telemetry", pump_id="p", course_id=None, durable=False)
    assert w._pending == 1  # written, waiting for group commit
    w.flush()
    assert w._pending == 0
    w.append("telemetry", pump_id="p", course_id=None, durable=False)
    w.append("intent", pump_id="p", course_id=None, durable=True)  # a durable record syncs everything before it
    assert w._pending == 0
    w.close()


def _torn_setup(tmp_path: Path, key: Ed25519PrivateKey, tail: bytes) -> tuple[Path, bytes]:
    d = tmp_path / "log"
    w = AuditWriter.open(d, small_config(segment_max_records=100), key, StepClock())
    for i in range(3):
        w.append("x", pump_id=None, course_id=None, durable=True, i=i)
    w._release()  # simulate a crash: no closing checkpoint
    seg = d / "audit-000001.jsonl"
    good = seg.read_bytes()
    seg.write_bytes(good + tail)
    return seg, good


@pytest.mark.parametrize(
    "tail",
    [b'{"course_id":null,"ev', b"\x00" * 4096, b"garbage line\n", b'{"a":1}\n{"x"', b"\xff\xfe\n"],
)
def test_torn_tail_truncated_and_recorded(tmp_path: Path, key: Ed25519PrivateKey, tail: bytes) -> None:
    seg, good = _torn_setup(tmp_path, key, tail)
    # Only the last line is torn: in the two-line case the first of them is a valid JSON line
    # but not a chained record, which the writer must refuse to build on.
    if tail.startswith(b'{"a":1}\n'):
        with pytest.raises(AuditError, match="hash"):
            AuditWriter.open(tmp_path / "log", small_config(), key, StepClock())
        return
    w = AuditWriter.open(tmp_path / "log", small_config(), key, StepClock(start=StepClock().now + timedelta(hours=1)))
    w.close()
    data = seg.read_bytes()
    assert data.startswith(good)  # nothing before the torn line touched
    recs = records(tmp_path / "log")
    torn = [r for r in recs if r["event"] == "torn_tail_truncated"]
    assert len(torn) == 1
    assert torn[0]["removed_bytes"] == len(tail) and torn[0]["removed_sha256"] == sha256_hex(tail)
    assert torn[0]["offset"] == len(good)
    assert verify_log(tmp_path / "log").ok


def test_torn_first_line_of_new_segment(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    d = tmp_path / "log"
    w = AuditWriter.open(d, small_config(segment_max_records=100), key, StepClock())
    w.append("x", pump_id=None, course_id=None, durable=True)
    w.close()
    (d / "audit-000002.jsonl").write_bytes(b'{"course_id":null,"event":"segm')  # crash while rotating
    w = AuditWriter.open(d, small_config(), key, StepClock(start=StepClock().now + timedelta(hours=1)))
    w.append("y", pump_id=None, course_id=None, durable=True)
    w.close()
    assert verify_log(d).ok
    evs = [r["event"] for r in records(d)]
    assert evs.count("segment_start") == 2 and "torn_tail_truncated" in evs


def test_damage_before_last_line_refused_untouched(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    seg, good = _torn_setup(tmp_path, key, b"")
    lines = good.split(b"\n")
    lines[1] = lines[1].replace(b'"i":0', b'"i":9')
    seg.write_bytes(b"\n".join(lines))
    before = seg.read_bytes()
    w = AuditWriter.open(tmp_path / "log", small_config(), key, StepClock())  # last line is fine: opens
    w.close()
    assert seg.read_bytes().startswith(before)
    assert not verify_log(tmp_path / "log").ok  # but verify names the damage


FILL_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from datetime import datetime, timezone
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from driverd.audit.writer import AuditWriter, AuditConfig
    from driverd.core.errors import AuditError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    w = AuditWriter.open(Path(sys.argv[1]), AuditConfig(segment_max_records=10**6), Ed25519PrivateKey.generate(),
                         lambda: datetime(2026, 1, 1, tzinfo=timezone.utc))
    acked, first_error, later = 0, None, []
    for i in range(1000):
        try:
            w.append("x", pump_id=None, course_id=None, durable=True, pad="p" * 100)
            acked = w.seq
        except AuditError as exc:
            first_error = str(exc)
            break
    for call in (lambda: w.append("y", pump_id=None, course_id=None, durable=True), w.flush, w.checkpoint, w.close):
        try:
            call()
            later.append("ok")
        except AuditError as exc:
            later.append("dead" if "dead" in str(exc) else str(exc))
    print(json.dumps({"acked": acked, "error": first_error, "later": later}))
    """
)


def test_io_error_is_fatal_and_never_retried(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", FILL_SCRIPT, str(tmp_path / "log")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["error"] and "not retried" in result["error"]
    assert result["later"] == ["dead", "dead", "dead", "dead"]
    # What was acknowledged is there; the partial last line is a torn tail for the next writer to handle.
    report = verify_log(tmp_path / "log")
    assert report.failure is not None and "torn" in report.failure.reason
    assert report.last_seq == result["acked"]
