"""The outbox: order, durability, bounds, bad input, torn tails, every crash point, disk failures, and a
stateful model test including reopen."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from driverd.core.errors import DriverdError
from driverd.hl7.journal import StoreCorrupt, StoreError, StoreIOError, encode_line
from driverd.hl7.outbox import FILE_NAME, Item, Outbox, OutboxError, OutboxFull
from tests.hl7.store_faults import Crash, crash_matrix, install


def msg(cid: str, extra: str = "") -> str:
    return f"MSH|^~\\&|DRIVERD|WARD|||20260302120000||ORU^R01^ORU_R01|{cid}|P|2.6\rOBX|1|NM|rate||{extra}1\r"


def ids(box: Outbox) -> list[str]:
    return [i.control_id for i in box.pending()]


def put(box: Outbox, cid: str, pump: str | None = "bed-1") -> Item:
    return box.put(cid, msg(cid), kind="ORU^R01", pump_id=pump)


# ------------------------------------------------------------------------------------------------ basics


def test_put_head_done_keep_order(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")
    assert box.head() is None and box.pending() == []
    a = put(box, "A")
    put(box, "B", None)
    put(box, "C")
    assert a == Item("A", msg("A"), "ORU^R01", "bed-1")
    assert ids(box) == ["A", "B", "C"] and box.head() == a
    box.done("A", "AA")
    assert ids(box) == ["B", "C"]
    assert box.pending()[0].pump_id is None
    box.close()


def test_reopen_keeps_items_done_markers_state_and_counter(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")
    numbers = [box.next_number() for _ in range(3)]
    assert numbers == [1, 2, 3]
    for c in "ABCD":
        put(box, c)
    box.done("A", "AA")
    box.done("B", "AR")
    box.set_state("alerts", {"bed-1": {"occlusion": "X7"}})
    box.set_state("instance", "F00D")
    box.set_state("gone", 1)
    box.delete_state("gone")
    box.close()
    box = Outbox.open(tmp_path / "ob")
    assert ids(box) == ["C", "D"] and box.pending()[0] == Item("C", msg("C"), "ORU^R01", "bed-1")
    assert box.state == {"alerts": {"bed-1": {"occlusion": "X7"}}, "instance": "F00D"}
    n = box.next_number()
    assert n > 3  # only grows across restarts (with a gap: a block is reserved per sync)
    assert box.repaired_bytes == 0
    box.close()
    box = Outbox.open(tmp_path / "ob")
    assert box.next_number() > n
    box.close()


def test_private_modes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        box = Outbox.open(tmp_path / "a" / "b" / "ob")
        put(box, "A")
        box.compact()
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "ob"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in (tmp_path / "a" / "b" / "ob").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    box.close()


def test_one_process_at_a_time(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")
    with pytest.raises(StoreError, match="in use"):
        Outbox.open(tmp_path / "ob")
    box.close()
    Outbox.open(tmp_path / "ob").close()


def test_duplicate_control_id_is_refused_and_nothing_written(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")
    put(box, "A")
    put(box, "B")
    box.done("A", "AA")
    before = (tmp_path / "ob" / FILE_NAME).read_bytes()
    for dup in ("A", "B"):  # done, pending
        with pytest.raises(OutboxError, match="already in the outbox") as exc:
            put(box, dup)
        assert exc.value.field == "control_id"
    assert (tmp_path / "ob" / FILE_NAME).read_bytes() == before
    assert ids(box) == ["B"]
    box.close()


def test_only_the_head_can_be_done(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")
    with pytest.raises(OutboxError, match="queue is empty"):
        box.done("A", "AA")
    put(box, "A")
    put(box, "B")
    before = (tmp_path / "ob" / FILE_NAME).read_bytes()
    with pytest.raises(OutboxError, match="head is 'A'"):
        box.done("B", "AA")
    with pytest.raises(OutboxError, match="outcome"):
        box.done("A", "")
    assert ids(box) == ["A", "B"]
    assert (tmp_path / "ob" / FILE_NAME).read_bytes() == before
    box.close()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"control_id": ""}, "control_id"),
        ({"control_id": "A\rB"}, "control_id"),
        ({"control_id": "é"}, "control_id"),
        ({"control_id": "X" * 200}, "control_id"),
        ({"control_id": 7}, "control_id"),
        ({"text": ""}, "text"),
        ({"text": "MSH|\ud800"}, "text"),
        ({"text": b"MSH"}, "text"),
        ({"kind": ""}, "kind"),
        ({"kind": "ORU\n"}, "kind"),
        ({"pump_id": ""}, "pump_id"),
        ({"pump_id": 3}, "pump_id"),
    ],
)
def test_bad_put_names_the_field_and_changes_nothing(tmp_path: Path, kwargs: dict[str, Any], field: str) -> None:
    box = Outbox.open(tmp_path / "ob")
    put(box, "A")
    before = (tmp_path / "ob" / FILE_NAME).read_bytes()
    args: dict[str, Any] = {"control_id": "B", "text": msg("B"), "kind": "ORU^R01", "pump_id": "bed-1", **kwargs}
    with pytest.raises(OutboxError) as exc:
        box.put(args.pop("control_id"), args.pop("text"), **args)
    assert exc.value.field == field
    assert isinstance(exc.value, DriverdError)
    assert (tmp_path / "ob" / FILE_NAME).read_bytes() == before and ids(box) == ["A"]
    box.close()


def test_state_is_plain_json_durable_and_copied(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")
    box.set_state("alerts", {"bed-1": {"x": "C1"}})
    snapshot = box.state
    snapshot["alerts"]["bed-1"]["y"] = "C2"  # a copy: changes nothing
    assert box.state == {"alerts": {"bed-1": {"x": "C1"}}}
    for bad in ((1, 2), float("nan"), {1: "a"}, {"a": object()}, b"x"):
        with pytest.raises(OutboxError) as exc:
            box.set_state("k", bad)
        assert exc.value.field == "state.k"
    with pytest.raises(OutboxError, match="key"):
        box.set_state("", 1)
    box.set_state("k", [None, True, 1.5, "é"])
    box.delete_state("absent")
    box.close()
    box = Outbox.open(tmp_path / "ob")
    assert box.state == {"alerts": {"bed-1": {"x": "C1"}}, "k": [None, True, 1.5, "é"]}
    box.close()


def test_full_by_items_and_by_bytes_raises_and_queues_nothing(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob", max_pending=3)
    for c in "ABC":
        put(box, c)
    before = (tmp_path / "ob" / FILE_NAME).read_bytes()
    with pytest.raises(OutboxFull, match="'D' NOT queued"):
        put(box, "D")
    assert (tmp_path / "ob" / FILE_NAME).read_bytes() == before and ids(box) == ["A", "B", "C"]
    box.done("A", "AA")
    put(box, "D")
    box.close()
    size = len(msg("A").encode())
    box = Outbox.open(tmp_path / "ob2", max_pending_bytes=2 * size + 5)
    put(box, "A")
    put(box, "B")
    with pytest.raises(OutboxFull):
        put(box, "C")
    assert box.pending_bytes == 2 * size
    box.close()


@pytest.mark.parametrize("kwargs", [{"max_pending": 0}, {"max_pending_bytes": True}, {"compact_after": "9"}])
def test_bad_limits_refused(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(OutboxError):
        Outbox.open(tmp_path / "ob", **kwargs)


def test_compaction_keeps_pending_counter_and_state_and_bounds_the_file(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob", compact_after=10)
    box.set_state("instance", "AB")
    n = 0
    for _ in range(30):
        for _ in range(4):
            n = box.next_number()
            put(box, f"N{n}")
        for _ in range(3):
            head = box.head()
            assert head is not None
            box.done(head.control_id, "AA")
        box.set_state("round", n)
    lines = (tmp_path / "ob" / FILE_NAME).read_bytes().count(b"\n")
    # 30 pending + format + reserve + 2 state keys live; fewer than 2 x live + compact_after dead lines may wait
    assert lines <= 2 * 34 + 10
    expected = ids(box)
    assert len(expected) == 30
    box.close()
    box = Outbox.open(tmp_path / "ob", compact_after=10)
    assert ids(box) == expected and box.state == {"instance": "AB", "round": n}
    assert box.next_number() > n
    box.compact()
    data = (tmp_path / "ob" / FILE_NAME).read_bytes()
    assert data.count(b"\n") == 1 + 1 + 2 + 30
    box.close()


def test_wait_wakes_the_sender_when_an_item_is_put(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")

    async def main() -> None:
        waiter = asyncio.create_task(box.wait())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        put(box, "A")
        await asyncio.wait_for(waiter, 10)
        await asyncio.wait_for(box.wait(), 10)  # returns at once while something is pending

    asyncio.run(main())
    asyncio.run(asyncio.wait_for(box.wait(), 10))  # wait() is not bound to the first event loop
    box.close()


# ------------------------------------------------------------------------------------------ damaged files


def _build_kinds(directory: Path, last: str) -> tuple[Outbox, dict[str, Any]]:
    """An outbox whose last record is of kind `last`; returns it and the expected state before that record."""
    box = Outbox.open(directory)
    box.next_number()
    put(box, "A")
    put(box, "B")
    box.done("A", "AA")
    box.set_state("s", {"k": [1, 2]})
    before = {"ids": ids(box), "state": box.state, "reserved_next": None}
    if last == "put":
        box.put("C", msg("C", "é\\X0D\\"), kind="ORU^R40", pump_id="bed-2")
    elif last == "done":
        box.done("B", "AR")
    elif last == "state":
        box.set_state("t", "v")
    elif last == "unset":
        box.delete_state("s")
    elif last == "reserve":
        for _ in range(1000):
            box.next_number()
    return box, before


@pytest.mark.parametrize("last", ["put", "done", "state", "unset", "reserve"])
def test_torn_tail_at_every_byte_offset_of_the_last_record(tmp_path: Path, last: str) -> None:
    src = tmp_path / "src"
    box, before = _build_kinds(src, last)
    after = {"ids": ids(box), "state": box.state}
    box.close()
    data = (src / FILE_NAME).read_bytes()
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    variants: list[tuple[bytes, int]] = [(data[:cut], cut - start) for cut in range(start + 1, len(data))]
    # Power lost before the sync: the length made it to disk but the data did not (zeros, with or without LF).
    variants.append((data[:start] + b"\0" * (len(data) - start), len(data) - start))
    variants.append((data[:start] + b"\0" * (len(data) - start - 1) + b"\n", len(data) - start))
    for i, (content, cut_bytes) in enumerate(variants):
        d = tmp_path / f"cut{i}"
        d.mkdir(mode=0o700)
        (d / FILE_NAME).write_bytes(content)
        box = Outbox.open(d)
        assert box.repaired_bytes == cut_bytes, i
        assert ids(box) == before["ids"] and box.state == before["state"], i
        assert box.next_number() >= 2
        put(box, "Z")  # usable, and the repair is durable
        box.close()
        box = Outbox.open(d)
        assert box.repaired_bytes == 0 and ids(box) == [*before["ids"], "Z"]
        box.close()
    d = tmp_path / "whole"
    d.mkdir()
    (d / FILE_NAME).write_bytes(data)
    box = Outbox.open(d)
    assert box.repaired_bytes == 0 and ids(box) == after["ids"] and box.state == after["state"]
    box.close()


def test_a_damaged_line_in_the_middle_is_an_error_naming_it_and_the_file_is_untouched(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")
    for c in "ABCDE":
        put(box, c)
    box.close()
    path = tmp_path / "ob" / FILE_NAME
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"OBX", b"OBY")  # line 4: a bit flip inside the JSON
    damaged = b"\n".join(lines)
    path.write_bytes(damaged)
    with pytest.raises(StoreCorrupt) as exc:
        Outbox.open(tmp_path / "ob")
    assert exc.value.line == 4 and "checksum" in exc.value.rule and FILE_NAME in str(exc.value)
    assert path.read_bytes() == damaged
    lines[3] = b""  # an empty line
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(StoreCorrupt) as exc:
        Outbox.open(tmp_path / "ob")
    assert exc.value.line == 4


@pytest.mark.parametrize(
    ("record", "rule"),
    [
        ({"op": "done", "id": "B", "outcome": "AA"}, "not the head"),
        ({"op": "put", "id": "A", "kind": "K", "pump": None, "text": "x"}, "queued twice"),
        ({"op": "put", "id": "", "kind": "K", "pump": None, "text": "x"}, "control_id"),
        ({"op": "put", "id": "Q", "kind": "K", "pump": 5, "text": "x"}, "'pump'"),
        ({"op": "put", "id": "Q", "kind": "K", "text": "x"}, "unknown record"),
        ({"op": "reserve", "upto": 1}, "does not grow"),
        ({"op": "reserve", "upto": True}, "'upto'"),
        ({"op": "explode"}, "unknown record"),
    ],
)
def test_records_that_break_the_rules_are_errors_naming_the_line(tmp_path: Path, record: dict[str, Any],
                                                                    rule: str) -> None:
    box = Outbox.open(tmp_path / "ob")
    box.next_number()
    put(box, "A")
    put(box, "B")
    box.close()
    path = tmp_path / "ob" / FILE_NAME
    damaged = path.read_bytes() + encode_line(record) + encode_line({"op": "state", "key": "k", "value": 1})
    path.write_bytes(damaged)
    with pytest.raises(StoreCorrupt, match=rule) as exc:
        Outbox.open(tmp_path / "ob")
    assert exc.value.line == 5
    assert path.read_bytes() == damaged


def test_a_line_with_a_valid_checksum_but_not_json_is_refused(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")
    put(box, "A")
    box.close()
    path = tmp_path / "ob" / FILE_NAME
    for body in (b'{"op":"state","key":"k","value":NaN}', b"[1,2]", b"{not json"):
        damaged = path.read_bytes() + b"%08x %s\n" % (zlib.crc32(body), body) + encode_line({"op": "unset", "key": "k"})
        d = tmp_path / body.hex()[:16]
        d.mkdir()
        (d / FILE_NAME).write_bytes(damaged)
        with pytest.raises(StoreCorrupt) as exc:
            Outbox.open(d)
        assert exc.value.line == 3 and (d / FILE_NAME).read_bytes() == damaged


@pytest.mark.parametrize("content", [b"hello\nworld\n", b"{}", b"\x00" * 40, encode_line({"format": "other/1"})])
def test_a_file_that_is_not_an_outbox_is_refused_untouched(tmp_path: Path, content: bytes) -> None:
    d = tmp_path / "ob"
    d.mkdir()
    (d / FILE_NAME).write_bytes(content)
    with pytest.raises(StoreCorrupt) as exc:
        Outbox.open(d)
    assert exc.value.line == 1
    assert (d / FILE_NAME).read_bytes() == content


def test_leftover_temp_file_of_an_interrupted_compaction_is_removed(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "ob")
    put(box, "A")
    box.close()
    (tmp_path / "ob" / f"{FILE_NAME}.tmp").write_bytes(b"half a compaction")
    box = Outbox.open(tmp_path / "ob")
    assert ids(box) == ["A"] and not (tmp_path / "ob" / f"{FILE_NAME}.tmp").exists()
    box.close()


# ----------------------------------------------------------------------------------------- crash points


def _setup(d: Path, compact_after: int = 1000) -> Outbox:
    box = Outbox.open(d, compact_after=compact_after)
    for _ in range(5):
        box.next_number()
    for c in "ABCD":
        put(box, c)
    box.done("A", "AA")
    box.set_state("alerts", {"bed-1": {"x": "B"}})
    return box


BASE = ["B", "C", "D"]
BASE_STATE = {"alerts": {"bed-1": {"x": "B"}}}


def _reopen_and_check(d: Path, allowed_ids: list[list[str]], allowed_states: list[dict[str, Any]],
                      numbers_above: int = 5, compact_after: int = 1000) -> None:
    box = Outbox.open(d, compact_after=compact_after)
    assert ids(box) in allowed_ids, ids(box)
    assert box.state in allowed_states, box.state
    assert box.next_number() > numbers_above
    # still usable, and what it says is durable
    put(box, "Z")
    head = box.head()
    assert head is not None
    box.done(head.control_id, "AA")
    expect = ids(box)
    box.close()
    box = Outbox.open(d, compact_after=compact_after)
    assert ids(box) == expect and not (d / f"{FILE_NAME}.tmp").exists()
    box.close()


def test_crash_at_every_point_of_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    runs = crash_matrix(tmp_path, faulty, _setup, lambda b: put(b, "E"),
                        lambda d: _reopen_and_check(d, [BASE, [*BASE, "E"]], [BASE_STATE]))
    assert runs >= 5  # write (before/after/half-way), fdatasync (before/after)


def test_crash_at_every_point_of_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    crash_matrix(tmp_path, faulty, _setup, lambda b: b.done("B", "AE"),
                 lambda d: _reopen_and_check(d, [BASE, BASE[1:]], [BASE_STATE]))


def test_crash_at_every_point_of_set_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    crash_matrix(tmp_path, faulty, _setup, lambda b: b.set_state("alerts", {}),
                 lambda d: _reopen_and_check(d, [BASE], [BASE_STATE, {"alerts": {}}]))
    crash_matrix(tmp_path / "del", faulty, _setup, lambda b: b.delete_state("alerts"),
                 lambda d: _reopen_and_check(d, [BASE], [BASE_STATE, {}]))


def test_crash_at_every_point_of_a_counter_reservation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)

    def op(b: Outbox) -> None:
        for _ in range(996):  # past the first block of 1000: one reservation record
            b.next_number()

    crash_matrix(tmp_path, faulty, _setup, op,
                 lambda d: _reopen_and_check(d, [BASE], [BASE_STATE], numbers_above=1000))


def test_crash_at_every_point_of_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    runs = crash_matrix(tmp_path, faulty, _setup, lambda b: b.compact(),
                        lambda d: _reopen_and_check(d, [BASE], [BASE_STATE]))
    assert runs >= 9  # open tmp, write, fsync, replace, fsync dir, reopen


def test_crash_at_every_point_of_a_done_that_compacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)

    def setup(d: Path) -> Outbox:
        box = _setup(d, compact_after=2)
        assert (d / FILE_NAME).read_bytes().count(b"\n") == 8  # not compacted yet
        return box

    def op(b: Outbox) -> None:
        b.done("B", "AA")
        b.done("C", "AA")  # 6 dead lines >= 4 live: compacts
        assert b.compaction_error is None
        assert (b.path).read_bytes().count(b"\n") == 4

    crash_matrix(tmp_path, faulty, setup, op,
                 lambda d: _reopen_and_check(d, [BASE, BASE[1:], BASE[2:]], [BASE_STATE], compact_after=2))


def test_crash_while_creating_a_new_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    Outbox.open(tmp_path / "probe").close()
    faulty.reset()
    Outbox.open(tmp_path / "probe2").close()
    n = len(faulty.calls)
    assert n >= 8
    for k in range(n):
        for mode in ("before", "after", "partial"):
            d = tmp_path / f"new{k}{mode}"
            faulty.reset()
            faulty.crash_at, faulty.mode = k, mode
            with pytest.raises(Crash):
                Outbox.open(d)
            faulty.reset()
            faulty.kill()
            box = Outbox.open(d)
        assert box.pending() == [] and box.state == {}
        put(box, "A")
        box.close()


# ---------------------------------------------------------------------------------------- disk failures


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EIO])
@pytest.mark.parametrize("short", [False, True])
def test_write_failure_on_put_raises_and_leaves_the_queue_unchanged_and_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, short: bool
) -> None:
    faulty = install(monkeypatch)
    box = _setup(tmp_path / "ob")
    before = (tmp_path / "ob" / FILE_NAME).read_bytes()
    if short:
        faulty.short_write_then = err  # half the line reaches the file first
    else:
        faulty.fail = {"write": err}
    with pytest.raises(StoreIOError) as exc:
        put(box, "E")
    faulty.reset()
    assert exc.value.errno == err and not exc.value.broken and "nothing was stored" in str(exc.value)
    assert (tmp_path / "ob" / FILE_NAME).read_bytes() == before
    assert ids(box) == BASE and box.broken is None
    put(box, "E")  # the same id again: it was never queued
    box.done("B", "AA")
    box.close()
    box = Outbox.open(tmp_path / "ob")
    assert ids(box) == ["C", "D", "E"] and box.repaired_bytes == 0
    box.close()


@pytest.mark.parametrize("op", ["done", "set_state", "next_number"])
def test_enospc_on_the_other_writes_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    op: str) -> None:
    faulty = install(monkeypatch)
    box = _setup(tmp_path / "ob")
    for _ in range(995):
        box.next_number()  # the next call needs a reservation
    before = (tmp_path / "ob" / FILE_NAME).read_bytes()
    faulty.fail = {"write": errno.ENOSPC}
    with pytest.raises(StoreIOError):
        {"done": lambda: box.done("B", "AA"), "set_state": lambda: box.set_state("alerts", {}),
         "next_number": box.next_number}[op]()
    faulty.reset()
    assert (tmp_path / "ob" / FILE_NAME).read_bytes() == before
    assert ids(box) == BASE and box.state == BASE_STATE
    assert box.next_number() == 1001
    box.done("B", "AA")
    box.close()


def test_a_failed_sync_breaks_the_outbox_until_it_is_reopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    box = _setup(tmp_path / "ob")
    faulty.fail = {"fdatasync": errno.EIO}
    with pytest.raises(StoreIOError) as exc:
        put(box, "E")
    faulty.reset()
    assert exc.value.broken and box.broken is not None
    assert ids(box) == BASE  # not in memory: put raised
    for call in (lambda: put(box, "F"), lambda: box.done("B", "AA"), lambda: box.set_state("k", 1), box.compact):
        with pytest.raises(StoreIOError, match="reopen"):
            call()
    box.close()
    box = Outbox.open(tmp_path / "ob")
    assert ids(box) in (BASE, [*BASE, "E"])  # a put that raised may or may not be on disk; never half
    box.close()


def test_a_failed_compaction_is_reported_and_retried_and_the_done_stands(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    box = _setup(tmp_path / "ob", compact_after=2)
    faulty.fail = {"replace": errno.ENOSPC}
    box.done("B", "AA")
    box.done("C", "AA")  # durable; the compaction it triggers fails
    assert isinstance(box.compaction_error, StoreIOError) and box.broken is None
    assert not (tmp_path / "ob" / f"{FILE_NAME}.tmp").exists()
    faulty.reset()
    put(box, "E")
    assert ids(box) == ["D", "E"]
    box.done("D", "AA")  # enough new dead lines: compaction is tried again, and works
    assert box.compaction_error is None
    assert (tmp_path / "ob" / FILE_NAME).read_bytes().count(b"\n") == 1 + 1 + 1 + 1
    box.close()
    box = Outbox.open(tmp_path / "ob")
    assert ids(box) == ["E"] and box.state == BASE_STATE
    box.close()


def test_a_failed_directory_sync_after_the_rename_breaks_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    box = _setup(tmp_path / "ob")
    faulty.reset()
    box.compact()
    calls = faulty.calls
    dir_sync = len(calls) - 1 - calls[::-1].index("fsync")
    box.close()
    box = _setup(tmp_path / "ob2")
    faulty.reset()
    faulty.fail_once_at = (dir_sync, errno.EIO)
    with pytest.raises(StoreIOError) as exc:
        box.compact()
    assert exc.value.broken
    faulty.reset()
    box.close()
    box = Outbox.open(tmp_path / "ob2")
    assert ids(box) == BASE and box.state == BASE_STATE
    box.close()


# ------------------------------------------------------------------------------------ SIGKILL, for real

WORKER = Path(__file__).with_name("outbox_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _run_and_kill(directory: Path, run: int, kill_after: int) -> list[list[str]]:
    """Start the worker, read acknowledgements until kill_after of them (or 30 s), SIGKILL it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(directory), str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[bytes] = []
    buf = b""
    deadline = time.monotonic() + 30
    try:
        while len(lines) < kill_after and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += done
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        lines += (buf + proc.stdout.read()).split(b"\n")[:-1]  # printed before it died: acknowledged too
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
    assert lines, f"worker acknowledged nothing: {err.decode(errors='replace')}"
    return [line.decode().split() for line in lines]


def test_sigkill_at_random_points_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(20260302)
    directory = tmp_path / "ob"
    acked_put: list[str] = []
    acked_done: set[str] = set()
    last_state: list[int] | None = None
    torn = 0
    for run in range(12):
        for rec in _run_and_kill(directory, run, rng.randint(5, 400)):
            if rec[0] == "put":
                acked_put.append(rec[1])
            elif rec[0] == "done":
                acked_done.add(rec[1])
            else:
                last_state = [int(rec[1]), int(rec[2])]
        if run % 2:
            # Power loss can also leave a partial line (a killed process cannot: its write() completes).
            with (directory / FILE_NAME).open("ab") as f:
                f.write(encode_line({"op": "done", "id": "N", "outcome": "AA"})[: rng.randint(1, 30)])
        box = Outbox.open(directory, compact_after=5)
        torn += box.repaired_bytes > 0
        pending = ids(box)
        assert pending == sorted(set(pending)), "in order (ids grow), none twice"
        must = [c for c in acked_put if c not in acked_done]
        # One operation was in flight at the kill: its put may be there unacknowledged, or its done (of the head)
        # may have happened unacknowledged. Nothing else may differ.
        missing = [c for c in must if c not in pending]
        assert missing == must[: len(missing)] and len(missing) <= 1, f"acknowledged puts lost: {missing}"
        extra = [c for c in pending if c not in acked_put]
        assert extra == pending[len(pending) - len(extra):] and len(extra) <= 1, f"unexpected items: {extra}"
        assert not (missing and extra)
        assert not set(pending) & acked_done, "an acknowledged done came back"
        acked_done.update(missing)
        acked_put += extra
        if last_state is not None:
            assert box.state["k"] >= last_state
        box.close()
    assert torn >= 1


# ------------------------------------------------------------------------------------- stateful model


class OutboxModel(RuleBasedStateMachine):
    """The outbox against a plain list + dict, with reopen (clean, and after a torn tail) and compaction."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.box = Outbox.open(self.dir, max_pending=12, compact_after=3)
        self.queue: list[Item] = []
        self.state_model: dict[str, Any] = {}
        self.numbers: list[int] = []
        self.made = 0

    def _reopen(self) -> None:
        self.box.close()
        self.box = Outbox.open(self.dir, max_pending=12, compact_after=3)

    @rule(text=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40),
          pump=st.none() | st.sampled_from(["bed-1", "bed-2"]))
    def put(self, text: str, pump: str | None) -> None:
        self.made += 1
        cid = f"C{self.made}"
        if len(self.queue) >= 12:
            with pytest.raises(OutboxFull):
                self.box.put(cid, text, kind="ORU^R01", pump_id=pump)
            return
        item = self.box.put(cid, text, kind="ORU^R01", pump_id=pump)
        assert item == Item(cid, text, "ORU^R01", pump)
        self.queue.append(item)

    @rule()
    def put_duplicate(self) -> None:
        # (a done id is refused too until a compaction forgets it: when that happens is not the model's business)
        if not self.queue:
            return
        cid = self.queue[-1].control_id
        with pytest.raises(OutboxError):
            self.box.put(cid, "x", kind="K", pump_id=None)

    @rule(outcome=st.sampled_from(["AA", "CA", "AR", "AE", "CR", "CE"]))
    def done_head(self, outcome: str) -> None:
        if not self.queue:
            with pytest.raises(OutboxError):
                self.box.done("C0", outcome)
            return
        self.box.done(self.queue.pop(0).control_id, outcome)

    @rule()
    def done_not_head(self) -> None:
        if len(self.queue) < 2:
            return
        with pytest.raises(OutboxError):
            self.box.done(self.queue[1].control_id, "AA")

    @rule(key=st.sampled_from(["alerts", "instance", "x"]),
          value=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                             lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                             max_leaves=6))
    def set_state(self, key: str, value: Any) -> None:
        self.box.set_state(key, value)
        self.state_model[key] = value

    @rule(key=st.sampled_from(["alerts", "instance", "x"]))
    def delete_state(self, key: str) -> None:
        self.box.delete_state(key)
        self.state_model.pop(key, None)

    @rule(count=st.integers(1, 700))
    def next_numbers(self, count: int) -> None:
        got = [self.box.next_number() for _ in range(count)]
        assert got == sorted(set(got)) and (not self.numbers or got[0] > self.numbers[-1])
        self.numbers.append(got[-1])

    @rule()
    def reopen(self) -> None:
        self._reopen()
        assert self.box.repaired_bytes == 0

    @rule(cut=st.integers(1, 60))
    def reopen_after_a_torn_write(self, cut: int) -> None:
        with self.box.path.open("ab") as f:
            f.write(encode_line({"op": "put", "id": "T", "kind": "K", "pump": None, "text": "t" * 50})[:cut])
        self._reopen()
        assert self.box.repaired_bytes == cut

    @rule()
    def compact(self) -> None:
        self.box.compact()
        lines = self.box.path.read_bytes().count(b"\n")
        assert lines == 1 + (1 if self.numbers else 0) + len(self.state_model) + len(self.queue)

    @invariant()
    def matches_the_model(self) -> None:
        assert self.box.pending() == self.queue
        assert self.box.head() == (self.queue[0] if self.queue else None)
        assert self.box.state == self.state_model
        assert self.box.pending_count == len(self.queue)

    def teardown(self) -> None:
        self.box.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestOutboxModel = OutboxModel.TestCase
