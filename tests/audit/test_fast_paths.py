"""The performance paths of the audit log give exactly the bytes of the definitions they replace.

- `dumps` (a C encoder built once) == json.dumps with the canonical options (`_reference_dumps`);
- `hashed_line` (one encoding pass for line and hash) == dumps(record + hash) and record_hash;
- `format_ts` (isoformat) == the strftime form it replaced;
- the writer's canonicalize fast path still refuses what canonicalize refuses, naming the field;
- a golden log written by the writer before this work (tests/audit/data/golden-log) is reproduced byte for byte
  and still verifies. Regenerate it only on purpose: python tests/audit/test_fast_paths.py OUT_DIR.
"""

from __future__ import annotations

import enum
import json
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from driverd.audit import canonical
from driverd.audit.canonical import (
    AuditFieldError,
    _reference_dumps,
    dumps,
    format_ts,
    hashed_line,
    loads_line,
    record_hash,
)
from driverd.audit.verify import verify_log
from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.core.errors import AuditError

GOLDEN = Path(__file__).parent / "data" / "golden-log"

# Keys that sort right around "hash" (the split point), plus ordinary ones.
KEYS = st.sampled_from(["a", "has", "hasg", "hash2", "hasi", "hashh", "Hash", "h", "i", "zz", "", "ü", "é1",
                        "course_id", "prev", "seq", "ts"])
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=12)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=5),
                                                                                         inner, max_size=4),
                    max_leaves=12)
RECORDS = st.dictionaries(KEYS, JSON, max_size=10)


@given(JSON.map(lambda v: {"v": v}) | RECORDS)
def test_dumps_is_the_reference_encoding(obj: dict[str, Any]) -> None:
    assert dumps(obj) == _reference_dumps(obj)


@given(RECORDS)
def test_dumps_fallback_path_same_bytes(obj: dict[str, Any]) -> None:
    saved = canonical._FAST_ENCODE
    canonical._FAST_ENCODE = None  # type: ignore[misc]  # the path taken when the C encoder is unavailable
    try:
        assert dumps(obj) == _reference_dumps(obj)
    finally:
        canonical._FAST_ENCODE = saved  # type: ignore[misc]


@given(RECORDS)
def test_hashed_line_equals_two_pass_definition(record: dict[str, Any]) -> None:
    record.pop("hash", None)
    line, digest = hashed_line(record)
    assert digest == record_hash(record)
    assert line == _reference_dumps({**record, "hash": digest})


def test_hashed_line_refuses_a_record_with_hash() -> None:
    with pytest.raises(ValueError, match="already has a hash"):
        hashed_line({"hash": "x"})


@pytest.mark.parametrize(
    "line", [b"\xef\xbb\xbf{}", b'{"a":1.0}', b'{"a":-Infinity}', b'{"a":1} ', b"{} {}", b'"text"', b"null"]
)
def test_loads_line_with_the_prebuilt_decoder_still_rejects(line: bytes) -> None:
    with pytest.raises(ValueError):
        loads_line(line)


def _old_format_ts(value: datetime) -> str:
    """format_ts as it was (strftime): the bytes it produced must not change."""
    utc = value.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}"
    return text + "Z"


@given(st.datetimes(min_value=datetime(1001, 1, 1), max_value=datetime(9998, 12, 31),
                    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                               timezone(-timedelta(hours=11))])))
def test_format_ts_same_text_as_strftime(value: datetime) -> None:
    assert format_ts(value) == _old_format_ts(value)


def test_format_ts_still_refuses_naive() -> None:
    with pytest.raises(AuditFieldError) as info:
        format_ts(datetime(2026, 1, 1))
    assert info.value.problems[0].rule == "timezone"


# ---------------------------------------------------------------------------------------------- writer


class _Level(enum.IntEnum):
    HIGH = 3


def test_writer_fast_path_refuses_what_canonicalize_refuses(tmp_path: Path) -> None:
    clock = iter(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i) for i in range(100))
    with AuditWriter.open(tmp_path / "log", AuditConfig(), None, lambda: next(clock)) as w:
        before = (tmp_path / "log" / "audit-000001.jsonl").read_bytes()
        for bad, rule in (("\ud800", "utf-8"), (1.5, "no-float"), (b"x", "type")):
            with pytest.raises(AuditFieldError) as info:
                w.append("x", pump_id=None, course_id=None, durable=True, field=bad)
            assert (info.value.problems[0].path, info.value.problems[0].rule) == ("field", rule)
        assert (tmp_path / "log" / "audit-000001.jsonl").read_bytes() == before
        rec = w.append("x", pump_id="p", course_id=None, durable=True, level=_Level.HIGH, flag=True, text="naïve",
                       plain="ascii", n=None)
    assert rec["level"] == 3 and type(rec["level"]) is int
    assert rec["flag"] is True and rec["text"] == "naïve"
    line = (tmp_path / "log" / "audit-000001.jsonl").read_bytes().splitlines()[-1]  # unsigned: no close checkpoint
    assert json.loads(line)["level"] == 3 and b'"flag":true' in line


def test_flush_due(tmp_path: Path) -> None:
    clock = iter(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i) for i in range(100))
    never = AuditConfig(group_commit_ms=3_600_000, group_commit_records=1000)
    with AuditWriter.open(tmp_path / "a", never, None, lambda: next(clock)) as w:
        assert w.flush_due() is False  # nothing pending
        w.append("t", pump_id=None, course_id=None, durable=False)
        assert w.flush_due() is False  # pending, but not group_commit_ms old
        w.flush()
        assert w.flush_due() is False
    always = AuditConfig(group_commit_ms=0, group_commit_records=1000)
    w = AuditWriter.open(tmp_path / "b", always, None, lambda: next(clock))
    w.append("t", pump_id=None, course_id=None, durable=False)
    # group_commit_ms=0: append itself synced (due at once), so nothing is left for flush_due
    assert w.flush_due() is False
    w.close()
    with pytest.raises(AuditError, match="closed"):
        w.flush_due()


def test_non_utc_clock_gives_the_same_log(tmp_path: Path) -> None:
    """The writer now keeps the clock's datetime instead of re-parsing ts: same checkpoints, same bytes."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    tz = timezone(timedelta(hours=-7))
    cfg = AuditConfig(checkpoint_every_s=90, checkpoint_every_records=1000)
    for name, zone in (("utc", UTC), ("local", tz)):
        t = [datetime(2026, 1, 1, tzinfo=UTC)]

        def clock(zone: Any = zone, t: list[datetime] = t) -> datetime:
            t[0] += timedelta(seconds=7, microseconds=3)
            return t[0].astimezone(zone)

        with AuditWriter.open(tmp_path / name, cfg, key, clock) as w:
            for i in range(60):
                w.append("tick", pump_id="p", course_id=None, durable=i % 10 == 0, i=i)
    utc_bytes = (tmp_path / "utc" / "audit-000001.jsonl").read_bytes()
    assert utc_bytes == (tmp_path / "local" / "audit-000001.jsonl").read_bytes()
    assert utc_bytes.count(b'"reason":"interval"') >= 4


# ------------------------------------------------------------------------------------------ golden log


def _golden_inputs() -> Iterator[tuple[str, bool, dict[str, Any]]]:
    t = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    for i in range(40):
        yield "pump_report", False, {"alarms": ["near_end"] if i % 7 == 0 else [], "at": t + timedelta(seconds=60 * i),
                                     "delivered_ml": Decimal("0.0035") * i, "rate_ml_per_h": Decimal("0.208"),
                                     "state": "infusing"}
        yield "tick", False, {"at": t + timedelta(seconds=60 * i, microseconds=i)}
    yield "setpoint", True, {"id": 3, "rate_ml_per_h": Decimal("0.250"),
                             "detail": "naïve → ünïcode \"quoted\" \\ tab\t",
                             "nested": {"hash": "x", "a": [1, None, True, {"z": Decimal("1E+2")}]}, "zz": None,
                             "aa": "first", "when": datetime(2026, 12, 1, 10, 0, tzinfo=timezone(timedelta(hours=2)))}


def write_golden(out: Path) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    ts = [datetime(2026, 12, 1, 9, 0, tzinfo=UTC)]

    def clock() -> datetime:
        ts[0] += timedelta(seconds=30, microseconds=7)
        return ts[0]

    cfg = AuditConfig(segment_max_records=50, checkpoint_every_records=16, group_commit_records=8)
    with AuditWriter.open(out, cfg, key, clock) as w:
        for name, durable, fields in _golden_inputs():
            w.append(name, pump_id="bed-1", course_id="c-1", durable=durable, **fields)


def test_writer_reproduces_the_golden_log_byte_for_byte(tmp_path: Path) -> None:
    write_golden(tmp_path / "log")
    want = sorted(GOLDEN.glob("audit-*.jsonl"))
    got = sorted((tmp_path / "log").glob("audit-*.jsonl"))
    assert [p.name for p in got] == [p.name for p in want] and len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert g.read_bytes() == w.read_bytes(), g.name


def test_golden_log_still_verifies() -> None:
    report = verify_log(GOLDEN)
    assert report.ok, report.failure
    assert (report.records, report.segments, report.checkpoints) == (126, 3, 42)


if __name__ == "__main__":
    target = Path(sys.argv[1])
    shutil.rmtree(target, ignore_errors=True)
    write_golden(target)
