"""A power cut that loses an unsynced page in the middle of the newest segment's tail (delayed allocation: page N
lost, page N+1 on disk, page N reads back as zeros). The writer cuts it only when nothing after it can have been
fdatasync'd (only bulk events, AuditConfig.bulk_events, follow) and within what can be unsynced, and saves what it
cut whole in a side file; any other damage is left untouched for verify to refuse."""

from __future__ import annotations

import base64
import contextlib
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.audit.canonical import loads_line, sha256_hex
from driverd.audit.segments import segment_names
from driverd.audit.verify import verify_log
from driverd.audit.writer import TORN_KEEP_BYTES, AuditConfig, AuditWriter
from driverd.core.errors import AuditError, ConfigError
from driverd.runtime.channel import BULK_EVENTS

from .conftest import StepClock

PAGE = 4096
CFG = AuditConfig(segment_max_records=10_000, checkpoint_every_records=10_000, checkpoint_every_s=10**6,
                  group_commit_ms=10**9, group_commit_records=64, bulk_events=BULK_EVENTS)  # the daemon's set


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


def reopen(d: Path, key: Ed25519PrivateKey, cfg: AuditConfig = CFG) -> bool:
    """Open the log as start-up does (and close it); False if the writer itself refused."""
    try:
        AuditWriter.open(d, cfg, key, StepClock(start=StepClock().now.replace(year=2027))).close()
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
    assert (d / t["removed_file"]).read_bytes() == removed  # every cut byte kept, beside the log
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
    if first >= synced and end < len(damaged) and _name_cut_short(damaged, line_start, end):
        # The zeros begin inside a record's event name, and bytes follow them (the line may hold several records):
        # it cannot be told to be a bulk event, so nothing is cut.
        assert out.startswith(damaged)
        assert not (opened and verify_log(d).ok)
    elif first >= synced:  # after the checkpoint line: a lost unsynced page (or the torn last line)
        torn = [r for r in lines_of(seg) if r["event"] == "torn_tail_truncated"]
        assert len(torn) == 1 and torn[0]["offset"] == line_start
        assert torn[0]["reason"] == ("torn_last_line" if last_line else "lost_unsynced_page")
        assert out[:line_start] == damaged[:line_start]
        assert verify_log(d).ok
    else:  # before a readable checkpoint: real damage
        assert out.startswith(damaged)
        assert not (opened and verify_log(d).ok)


def _name_cut_short(data: bytes, line_start: int, end: int) -> bool:
    """Whether a damaged line (from line_start to the line holding byte end-1) shows an event name the zeros cut."""
    stop = data.find(b"\n", max(end - 1, line_start))
    return any(not m.group(2) for m in re.finditer(rb'"event":"([^"\x00]*)("?)', data[line_start:stop]))


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


# ------------------------------------------------------------------ only bulk events may be cut (review5 F3)


def _tail_with(d: Path, key: Ed25519PrivateKey, last: str, durable: bool) -> tuple[Path, int, int]:
    """A checkpoint, 20 telemetry records (unsynced), then `last` (durable: fdatasync'd, so every byte before it
    was on disk when it returned) and one more telemetry record. Returns the segment, where `last`'s line starts
    and its seq."""
    w = AuditWriter.open(d, CFG, key, StepClock())
    w.checkpoint()
    checkpointed = (d / "audit-000001.jsonl").stat().st_size
    for i in range(20):
        w.append("pump_report", pump_id="bed-1", course_id=None, durable=False, i=i, pad="x" * 200)
    rec = w.append(last, pump_id="bed-1", course_id=None, durable=durable, setpoint_id=7, rate_ml_per_h="1.250",
                   pad="s" * 600)  # a line longer than a sector
    w.append("pump_report", pump_id="bed-1", course_id=None, durable=False, i=99, pad="x" * 200)
    w._release()  # power cut
    seg = d / "audit-000001.jsonl"
    data = seg.read_bytes()
    at = data.rfind(b"\n", 0, data.find(f'"seq":{rec["seq"]},'.encode())) + 1
    assert checkpointed < at - 2 * 512  # the damage below lies after the last writer record
    return seg, at, rec["seq"]


@pytest.mark.parametrize("last", ["setpoint", "alarm", "hl7_in"])
def test_a_record_that_is_not_bulk_after_the_damage_refuses_the_cut(
    tmp_path: Path, key: Ed25519PrivateKey, last: str
) -> None:
    """A setpoint is fdatasync'd before it goes on the wire: zeros before it were on disk, i.e. real damage, and the
    setpoint must not be cut. So is every record outside bulk_events (an HL7 order's hl7_in, before its reply)."""
    d = tmp_path / "log"
    seg, at, _ = _tail_with(d, key, last, True)
    sector = ((at - 600) // 512) * 512  # a whole sector before the record's line, after the checkpoint
    assert sector + 512 <= at
    damaged = zero(seg, sector, sector + 512)
    assert not reopen(d, key) or not verify_log(d).ok
    assert seg.read_bytes().startswith(damaged)
    assert "torn_tail_truncated" not in [r["event"] for r in _readable(seg)]
    assert [p.name for p in d.iterdir() if p.name.startswith("cut-")] == []


def test_a_durable_record_named_in_the_damaged_line_refuses_the_cut(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """The zeros start inside the setpoint's own line, after its event name: it was fdatasync'd all the same."""
    d = tmp_path / "log"
    seg, at, _ = _tail_with(d, key, "setpoint", True)
    data = seg.read_bytes()
    sector = ((data.find(b'"event":"setpoint"', at) + 18) // 512 + 1) * 512
    assert sector < data.find(b"\n", at)  # the zeros begin inside the setpoint line, after its name
    damaged = zero(seg, sector, sector + 512)
    assert not reopen(d, key) or not verify_log(d).ok
    assert seg.read_bytes().startswith(damaged)


def test_a_durable_record_torn_with_zeros_to_the_end_is_still_cut(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """The record the power cut interrupted (its fdatasync never returned, so it never went on the wire), its end
    lost as zeros up to the file's end: one record's torn end, cut as before, whatever its event."""
    d = tmp_path / "log"
    seg, at, _ = _tail_with(d, key, "setpoint", True)
    data = seg.read_bytes()
    end = data.find(b"\n", at) + 1
    sector = ((data.find(b'"event":"setpoint"', at) + 18) // 512 + 1) * 512
    assert sector < end
    seg.write_bytes(data[:sector] + bytes(-(-end // 512) * 512 - sector))  # its size reached the disk, not its data
    assert reopen(d, key)
    t = next(r for r in lines_of(seg) if r["event"] == "torn_tail_truncated")
    assert t["reason"] == "torn_last_line" and t["offset"] == at
    assert verify_log(d).ok


def test_only_bulk_events_after_the_damage_are_cut(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """The same log with the records after the damage all bulk (ticks, pump reports and the core's outputs other
    than setpoints and alarms): cut, every byte kept."""
    d = tmp_path / "log"
    w = AuditWriter.open(d, CFG, key, StepClock())
    w.append("setpoint", pump_id="bed-1", course_id=None, durable=True, pad="s" * 300)
    seg = d / "audit-000001.jsonl"
    synced = seg.stat().st_size
    outputs = ["transition", "notice", "refused", "course_summary"]  # the core's non-durable outputs: bulk too
    for i in range(30):
        name = outputs[i // 3 % 4] if i % 3 == 2 else ("tick" if i % 3 else "pump_report")
        w.append(name, pump_id="bed-1", course_id=None, durable=False, i=i, pad="x" * 200)
    w._release()
    page = (synced // PAGE + 1) * PAGE
    damaged = zero(seg, page, page + PAGE)
    line_start = damaged.rfind(b"\n", 0, page) + 1
    assert reopen(d, key)
    t = next(r for r in lines_of(seg) if r["event"] == "torn_tail_truncated")
    assert t["reason"] == "lost_unsynced_page" and t["offset"] == line_start and t["removed_seqs"]
    assert (d / t["removed_file"]).read_bytes() == damaged[line_start:]
    assert verify_log(d).ok


def test_without_bulk_events_nothing_is_taken_for_a_lost_page(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """The writer alone does not know which records were unsynced (the default config): no lost-page cut."""
    d = tmp_path / "log"
    seg, synced = crashed_log(d, key)
    page = (synced // PAGE + 1) * PAGE
    damaged = zero(seg, page, page + PAGE)
    assert not reopen(d, key, AuditConfig(group_commit_records=64)) or not verify_log(d).ok
    assert seg.read_bytes().startswith(damaged)


def test_a_bulk_event_cannot_be_written_durably(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Else a lost-page cut could take a record whose fdatasync returned."""
    w = AuditWriter.open(tmp_path / "log", CFG, key, StepClock())
    seq = w.seq
    with pytest.raises(AuditError, match=r"durable.*bulk_events"):
        w.append("pump_report", pump_id="bed-1", course_id=None, durable=True)
    assert w.seq == seq and not w.dead
    w.append("pump_report", pump_id="bed-1", course_id=None, durable=False)
    w.close()


def test_an_event_outside_bulk_events_cannot_be_written_unsynced(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """The cut goes by name: a name outside bulk_events must always mean a durable record (once, hl7_in was written
    both ways, and a lost page of them refused every start)."""
    w = AuditWriter.open(tmp_path / "log", CFG, key, StepClock())
    seq = w.seq
    with pytest.raises(AuditError, match=r"durable.*not in audit\.bulk_events"):
        w.append("hl7_in", pump_id=None, course_id=None, durable=False)
    assert w.seq == seq and not w.dead
    w.append("hl7_in", pump_id=None, course_id=None, durable=True)
    w.close()


@pytest.mark.parametrize("bulk", [frozenset({"checkpoint"}), frozenset({""}), {"tick"}])
def test_bulk_events_config_is_checked(bulk: object) -> None:
    with pytest.raises(ConfigError, match=r"audit\.bulk_events"):
        AuditConfig(bulk_events=bulk)  # type: ignore[arg-type]


# ------------------------------------------------------------------ every cut byte kept (review5 F5)


def test_the_cut_is_saved_and_synced_before_the_segment_is_truncated(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "log"
    seg, synced = crashed_log(d, key)
    page = (synced // PAGE + 1) * PAGE
    damaged = zero(seg, page, page + PAGE)
    line_start = damaged.rfind(b"\n", 0, page) + 1
    calls: list[tuple[str, str]] = []
    real_fsync, real_truncate = os.fsync, os.ftruncate

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def ftruncate(fd: int, n: int) -> None:
        calls.append(("ftruncate", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_truncate(fd, n)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    assert reopen(d, key)
    monkeypatch.undo()
    t = next(r for r in lines_of(seg) if r["event"] == "torn_tail_truncated")
    side = d / t["removed_file"]
    assert calls[:3] == [("fsync", side.name), ("fsync", "log"), ("ftruncate", seg.name)]
    assert side.read_bytes() == damaged[line_start:] and sha256_hex(side.read_bytes()) == t["removed_sha256"]
    assert side.stat().st_mode & 0o777 == 0o640
    # Not a segment: listing, verify, fsck and the next start leave it alone.
    assert [name for _, name in segment_names(d)] == [seg.name]
    from driverd.audit.fsck import check_all
    assert verify_log(d).ok and check_all(d).count == 0
    assert reopen(d, key) and side.read_bytes() == damaged[line_start:] and verify_log(d).ok


def test_a_crash_before_the_truncate_redoes_the_same_cut(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """A side file left half written (the crash came before the segment was cut) is rewritten whole."""
    from driverd.audit.writer import cut_file_name

    d = tmp_path / "log"
    seg, synced = crashed_log(d, key)
    page = (synced // PAGE + 1) * PAGE
    damaged = zero(seg, page, page + PAGE)
    line_start = damaged.rfind(b"\n", 0, page) + 1
    side = d / cut_file_name(1, line_start, damaged[line_start:])
    side.write_bytes(damaged[line_start : line_start + 10])
    assert reopen(d, key)
    t = next(r for r in lines_of(seg) if r["event"] == "torn_tail_truncated")
    assert t["removed_file"] == side.name and side.read_bytes() == damaged[line_start:]


def test_a_cut_larger_than_the_record_keeps_is_kept_whole(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """More than TORN_KEEP_BYTES of readable telemetry after a lost page: the record keeps the first 64 KiB, the
    side file all of it."""
    cfg = AuditConfig(segment_max_records=10_000, checkpoint_every_records=10_000, checkpoint_every_s=10**6,
                      group_commit_ms=10**9, group_commit_records=256, bulk_events=BULK_EVENTS)
    d = tmp_path / "log"
    w = AuditWriter.open(d, cfg, key, StepClock())
    w.checkpoint()
    seg = d / "audit-000001.jsonl"
    synced = seg.stat().st_size
    for i in range(250):
        w.append("pump_report", pump_id="bed-1", course_id=None, durable=False, i=i, pad="x" * 300)
    w._release()
    page = (synced // PAGE + 1) * PAGE
    damaged = zero(seg, page, page + PAGE)
    line_start = damaged.rfind(b"\n", 0, page) + 1
    assert reopen(d, key, cfg)
    t = next(r for r in lines_of(seg) if r["event"] == "torn_tail_truncated")
    removed = damaged[line_start:]
    assert t["removed_bytes"] == len(removed) > TORN_KEEP_BYTES
    assert base64.b64decode(t["removed_b64"]) == removed[:TORN_KEEP_BYTES]
    assert (d / t["removed_file"]).read_bytes() == removed
    assert verify_log(d).ok


def test_a_torn_last_line_within_the_keep_size_needs_no_side_file(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    d = tmp_path / "log"
    seg, _ = crashed_log(d, key)
    seg.write_bytes(seg.read_bytes()[:-30])
    assert reopen(d, key)
    t = next(r for r in lines_of(seg) if r["event"] == "torn_tail_truncated")
    assert t["reason"] == "torn_last_line" and "removed_file" not in t
    assert [p.name for p in d.iterdir() if p.name.startswith("cut-")] == []


# ------------------------------------------------------------------ announce=False: the restart comes first


@pytest.mark.parametrize("call", ["checkpoint", "rotate", "close"])
def test_every_write_of_an_unannounced_writer_logs_the_restart_first(
    tmp_path: Path, key: Ed25519PrivateKey, call: str
) -> None:
    d = tmp_path / "log"
    w = AuditWriter.open(d, CFG, key, StepClock())
    for i in range(5):
        w.append("x", pump_id=None, course_id=None, durable=True, i=i)
    w.close()
    seg = d / "audit-000001.jsonl"
    n = len(lines_of(seg))
    w = AuditWriter.open(d, CFG, key, StepClock(), announce=False)
    getattr(w, call)()
    if call != "close":
        w.close()
    after = [r["event"] for r in lines_of(seg)[n:]]
    assert after[:2] == ["log_reopened", "checkpoint"]
    assert after.count("log_reopened") == 1
    assert verify_log(d).ok
