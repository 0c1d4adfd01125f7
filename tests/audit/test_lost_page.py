"""A power cut that loses an unsynced page in the middle of the newest segment's tail (delayed allocation: page N
lost, page N+1 on disk, page N reads back as zeros). The writer cuts it only after the last writer record (each is
fdatasync'd) and within what can be unsynced; any other damage is left untouched for verify to refuse."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.audit.canonical import loads_line, sha256_hex
from driverd.audit.verify import verify_log
from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.core.errors import AuditError

from .conftest import StepClock

PAGE = 4096
CFG = AuditConfig(segment_max_records=10_000, checkpoint_every_records=10_000, checkpoint_every_s=10**6,
                  group_commit_ms=10**9, group_commit_records=64)


def crashed_log(d: Path, key: Ed25519PrivateKey, unsynced: int = 40, checkpoint: bool = True) -> tuple[Path, int]:
    """segment_start, durable records, a checkpoint, then `unsynced` telemetry records the writer never synced
    (group commit not yet due) when the power went. Returns the segment and where the synced part ends."""
    w = AuditWriter.open(d, CFG, key, StepClock())
    for i in range(12):
        w.append("setpoint", pump_id="bed-1", course_id=None, durable=True, i=i, pad="s" * 150)
    if checkpoint:
        w.checkpoint()
    seg = d / "audit-000001.jsonl"
    synced = seg.stat().st_size
    for i in range(unsynced):
        w.append("pump_report", pump_id="bed-1", course_id=None, durable=False, i=i, pad="x" * 200)
    w._release()  # the power cut: nothing more written, nothing synced
    return seg, synced


def zero(seg: Path, start: int, end: int) -> bytes:
    data = bytearray(seg.read_bytes())
    data[start:end] = bytes(end - start)
    seg.write_bytes(bytes(data))
    return bytes(data)


def lines_of(seg: Path) -> list[dict]:
    return [loads_line(x) for x in seg.read_bytes().split(b"\n")[:-1]]


def reopen(d: Path, key: Ed25519PrivateKey) -> bool:
    """Open the log as start-up does (and close it); False if the writer itself refused."""
    try:
        AuditWriter.open(d, CFG, key, StepClock(start=StepClock().now.replace(year=2027))).close()
    except AuditError:
        return False
    return True


def test_lost_page_in_unsynced_tail_is_cut_and_logged(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    d = tmp_path / "log"
    seg, synced = crashed_log(d, key)
    page = (synced // PAGE + 1) * PAGE  # wholly unsynced, with later pages on disk
    damaged = zero(seg, page, page + PAGE)
    line_start = damaged.rfind(b"\n", 0, page) + 1
    after = [loads_line(x) for x in damaged[damaged.find(b"\n", page + PAGE) + 1:].split(b"\n")[:-1]]
    assert after  # the case at hand: whole records after the lost page
    reopen(d, key)
    data = seg.read_bytes()
    assert data[:line_start] == damaged[:line_start]  # nothing before the damaged line touched
    recs = lines_of(seg)
    torn = [r for r in recs if r["event"] == "torn_tail_truncated"]
    assert len(torn) == 1
    t = torn[0]
    removed = damaged[line_start:]
    assert t["reason"] == "lost_unsynced_page" and t["offset"] == line_start
    assert t["removed_bytes"] == len(removed) and t["removed_sha256"] == sha256_hex(removed)
    assert base64.b64decode(t["removed_b64"]) == removed
    assert t["removed_seqs"] == [r["seq"] for r in after]
    assert t["removed_lines"] == removed.count(b"\n")
    assert [r["event"] for r in recs[-3:]] == ["torn_tail_truncated", "log_reopened", "checkpoint"]
    assert verify_log(d).ok
    reopen(d, key)  # and again: nothing more to cut
    assert sum(r["event"] == "torn_tail_truncated" for r in lines_of(seg)) == 1
    assert verify_log(d).ok


def test_lost_page_with_a_torn_last_line_is_one_cut(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    d = tmp_path / "log"
    seg, synced = crashed_log(d, key)
    page = (synced // PAGE + 1) * PAGE
    zero(seg, page, page + PAGE)
    data = seg.read_bytes()
    seg.write_bytes(data[:-30])  # the last record's end never made it either
    reopen(d, key)
    torn = [r for r in lines_of(seg) if r["event"] == "torn_tail_truncated"]
    assert len(torn) == 1 and torn[0]["reason"] == "lost_unsynced_page"
    assert verify_log(d).ok


def test_nul_page_before_the_last_writer_record_is_refused_untouched(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """The checkpoint was fdatasync'd after these bytes were written: they were on disk; zeros are real damage."""
    d = tmp_path / "log"
    seg, synced = crashed_log(d, key)
    assert synced > PAGE + 1000
    damaged = zero(seg, PAGE, PAGE + 512)  # a lost sector, fully before the checkpoint line
    reopen(d, key)
    assert seg.read_bytes().startswith(damaged)
    assert "torn_tail_truncated" not in [r.get("event") for r in _readable(seg)]
    assert not verify_log(d).ok


def test_more_lines_than_can_be_unsynced_are_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    d = tmp_path / "log"
    seg, synced = crashed_log(d, key, unsynced=CFG.group_commit_records + 20)
    page = (synced // PAGE + 1) * PAGE  # near the synced part: more than group_commit_records lines follow it
    damaged = zero(seg, page, page + PAGE)
    reopen(d, key)
    assert seg.read_bytes().startswith(damaged)
    assert not verify_log(d).ok


@pytest.mark.parametrize("what", ["stray_zeros", "garbage_after", "first_line"])
def test_damage_that_is_not_a_lost_page_is_refused_untouched(
    tmp_path: Path, key: Ed25519PrivateKey, what: str
) -> None:
    d = tmp_path / "log"
    seg, synced = crashed_log(d, key, checkpoint=what != "first_line")
    page = (synced // PAGE + 1) * PAGE
    if what == "stray_zeros":  # zeros, but not whole sectors
        damaged = zero(seg, page + 100, page + 700)
    elif what == "garbage_after":  # a lost page, and a later line damaged some other way
        zero(seg, page, page + PAGE)
        data = bytearray(seg.read_bytes())
        nl = data.find(b"\n", page + PAGE + 1000)
        data[nl - 5 : nl] = b"#####"
        damaged = bytes(data)
        seg.write_bytes(damaged)
    else:  # segment_start itself: fdatasync'd before anything followed it
        damaged = zero(seg, 0, PAGE)
    opened = reopen(d, key)
    assert seg.read_bytes().startswith(damaged)
    assert not (opened and verify_log(d).ok)


def test_lost_rewrite_of_the_last_synced_page_is_cut(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """The page holding the checkpoint's end was on disk, then re-dirtied by the telemetry after it; losing that
    rewrite reads back the old page: the checkpoint, then zeros to the page's end (not from a sector boundary)."""
    d = tmp_path / "log"
    seg, synced = crashed_log(d, key)
    assert synced % 512
    end = (synced // PAGE + 1) * PAGE
    damaged = zero(seg, synced, end)
    reopen(d, key)
    assert seg.read_bytes()[:synced] == damaged[:synced]
    torn = [r for r in lines_of(seg) if r["event"] == "torn_tail_truncated"]
    assert len(torn) == 1 and torn[0]["reason"] == "lost_unsynced_page" and torn[0]["offset"] == synced
    assert verify_log(d).ok


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_every_page_boundary_class(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """Zero whole sectors anywhere in the segment (a page, or its part past the last synced byte): cut if they lie
    after the checkpoint (within what can be unsynced); before it (the checkpoint intact after them), the file is
    left as it was and start-up is refused. (Zeros that swallow the whole checkpoint line cannot be told from a
    lost page: docs/audit.md, "Lost unsynced pages".)"""
    key = Ed25519PrivateKey.generate()
    d = tmp_path_factory.mktemp("pages") / "log"
    seg, synced = crashed_log(d, key)
    size = seg.stat().st_size
    checkpoint_start = seg.read_bytes().rfind(b"\n", 0, synced - 1) + 1
    sectors = (size + 511) // 512
    first = data.draw(st.integers(0, sectors - 1), label="first sector") * 512
    end = min(first + data.draw(st.integers(1, 8), label="sectors") * 512, size)
    if first < synced < end:
        first = synced if data.draw(st.booleans(), label="after synced") else first
    if first < synced and end > checkpoint_start and end >= synced:
        end = checkpoint_start - checkpoint_start % 512  # keep the checkpoint line readable
        if end <= first:
            return
    damaged = zero(seg, first, end)
    line_start = damaged.rfind(b"\n", 0, first) + 1
    last_line = damaged.find(b"\n", end) in (-1, len(damaged) - 1)  # the damage is in the last line
    opened = reopen(d, key)
    out = seg.read_bytes()
    if first >= synced:  # after the checkpoint line: a lost unsynced page (or the torn last line)
        torn = [r for r in lines_of(seg) if r["event"] == "torn_tail_truncated"]
        assert len(torn) == 1 and torn[0]["offset"] == line_start
        assert torn[0]["reason"] == ("torn_last_line" if last_line else "lost_unsynced_page")
        assert out[:line_start] == damaged[:line_start]
        assert verify_log(d).ok
    else:  # before a readable checkpoint: real damage
        assert out.startswith(damaged)
        assert not (opened and verify_log(d).ok)


def _readable(seg: Path) -> list[dict]:
    out = []
    for x in seg.read_bytes().split(b"\n")[:-1]:
        with contextlib.suppress(ValueError):
            out.append(loads_line(x))
    return out


def test_a_writer_opened_without_announcing_appends_nothing_until_told(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """What start-up relies on: open(announce=False) writes nothing on an undamaged log; reopened() (or the first
    append) writes log_reopened and the open checkpoint, once."""
    d = tmp_path / "log"
    w = AuditWriter.open(d, CFG, key, StepClock())
    w.append("x", pump_id=None, course_id=None, durable=True)
    w.close()
    seg = d / "audit-000001.jsonl"
    before = seg.read_bytes()
    w = AuditWriter.open(d, CFG, key, StepClock(), announce=False)
    w.abandon()  # a refused start
    assert seg.read_bytes() == before
    w = AuditWriter.open(d, CFG, key, StepClock(), announce=False)
    w.append("y", pump_id=None, course_id=None, durable=True)
    w.reopened()  # already done by the append: nothing more
    w.close()
    events = [r["event"] for r in lines_of(seg)[len(before.split(b"\n")) - 1 :]]
    assert events == ["log_reopened", "checkpoint", "y", "checkpoint"]
    assert verify_log(d).ok
