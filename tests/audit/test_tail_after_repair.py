"""`audit tail` across a crash and a restart: the restarted writer cuts the damaged end of the newest segment (a
torn last line, or lost unsynced pages) and appends from there. The follower must show every record the file ends
up holding after what it had shown, once, and no fragment of the cut."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.canonical import loads_line
from driverd.audit.tail import Follower, TailLine
from driverd.audit.writer import AuditConfig, AuditWriter

from .conftest import StepClock

PAGE = 4096
CFG = AuditConfig(segment_max_records=10_000, checkpoint_every_records=10_000, checkpoint_every_s=10**6,
                  group_commit_ms=10**9, group_commit_records=64, bulk_events=frozenset({"telemetry"}))


def _records(seg: Path) -> list[dict]:
    return [loads_line(x) for x in seg.read_bytes().split(b"\n")[:-1]]


def _shown(lines: list[TailLine]) -> list[tuple[int | None, str]]:
    return [(x.record["seq"], x.record["event"]) if x.record else (None, "damaged") for x in lines]


def _restart(d: Path, key: Ed25519PrivateKey, n: int) -> None:
    w = AuditWriter.open(d, CFG, key, StepClock(start=StepClock().now + timedelta(days=1)))
    for i in range(n):
        w.append("work", pump_id=None, course_id=None, durable=True, i=100 + i)
    w.close()


def test_an_unreadable_last_line_is_shown_once_and_not_read_past(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    d = tmp_path / "log"
    w = AuditWriter.open(d, CFG, key, StepClock())
    for i in range(3):
        w.append("work", pump_id=None, course_id=None, durable=True, i=i)
    w._release()  # crash
    seg = d / "audit-000001.jsonl"
    with seg.open("ab") as f:
        f.write(b"\x00" * 300 + b"\n")  # the last line's bytes lost, its newline made it
    fol = Follower(d)
    first = list(fol.poll())
    assert _shown(first)[-1] == (None, "damaged") and first[-1].lineno == 5
    assert list(fol.poll()) == []  # shown once
    _restart(d, key, 3)
    after = list(fol.poll())
    on_disk = _records(seg)[4:]  # what follows the last whole record shown
    assert _shown(after) == [(r["seq"], r["event"]) for r in on_disk]
    assert after[0].record is not None and after[0].record["event"] == "torn_tail_truncated"
    assert [x.lineno for x in after] == list(range(5, 5 + len(on_disk)))
    assert [x.raw for x in after] == seg.read_bytes().split(b"\n")[4:-1]


def test_an_unreadable_line_followed_by_more_is_shown_once(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    d = tmp_path / "log"
    w = AuditWriter.open(d, CFG, key, StepClock())
    w.append("work", pump_id=None, course_id=None, durable=True, i=0)
    seg = d / "audit-000001.jsonl"
    fol = Follower(d)
    assert len(list(fol.poll())) == 2
    with seg.open("ab") as f:
        f.write(b"garbage\n")  # damage verify will report; the follower shows it as it is
    assert _shown(list(fol.poll())) == [(None, "damaged")]
    with seg.open("ab") as f:
        f.write(b"more garbage\n")
    assert [x.raw for x in fol.poll()] == [b"more garbage"]  # the first one not again
    w._release()


def test_records_cut_with_a_lost_page_are_followed_by_what_replaced_them(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """The follower read the records after a lost page (whole, but never synced); the restarted writer cuts them
    with the page and reuses their seqs. The follower goes back to the cut and shows what the file now holds."""
    d = tmp_path / "log"
    w = AuditWriter.open(d, CFG, key, StepClock())
    w.append("work", pump_id=None, course_id=None, durable=True, i=0)
    seg = d / "audit-000001.jsonl"
    synced = seg.stat().st_size
    for i in range(40):
        w.append("telemetry", pump_id="bed-1", course_id=None, durable=False, i=i, pad="x" * 200)
    w._release()
    data = bytearray(seg.read_bytes())
    page = (synced // PAGE + 1) * PAGE
    data[page : page + PAGE] = bytes(PAGE)
    seg.write_bytes(bytes(data))
    fol = Follower(d)
    before = list(fol.poll())
    assert (None, "damaged") in _shown(before)
    _restart(d, key, 5)
    after = list(fol.poll())
    recs = _records(seg)
    cut = next(i for i, r in enumerate(recs) if r["event"] == "torn_tail_truncated")
    # Exactly the records from the cut on (seqs the follower had shown for the lost records, reused), in order.
    assert [x.record for x in after] == recs[cut:]
    assert [x.lineno for x in after] == list(range(cut + 1, len(recs) + 1))
    assert json.loads(after[0].raw)["reason"] == "lost_unsynced_page"
    assert list(fol.poll()) == []


def test_a_segment_replaced_under_the_follower_is_read_again_without_repeats(tmp_path: Path) -> None:
    """Not something the writer does (it cuts at most group_commit_records lines): every line read is gone. The
    segment is read again from its start; records up to the last seq shown are skipped, newer ones shown."""
    def log(d: Path, n: int, days: int) -> Path:
        w = AuditWriter.open(d, CFG, None, StepClock(start=StepClock().now + timedelta(days=days)))
        for i in range(n):
            w.append("work", pump_id=None, course_id=None, durable=True, i=i)
        w.close()
        return d / "audit-000001.jsonl"

    seg = log(tmp_path / "log", 5, 0)
    fol = Follower(tmp_path / "log")
    shown = list(fol.poll())
    last = shown[-1].record
    assert last is not None
    seg.write_bytes(log(tmp_path / "other", 9, 1).read_bytes())
    again = list(fol.poll())
    assert [x.record for x in again] == [r for r in _records(seg) if r["seq"] > last["seq"]]
