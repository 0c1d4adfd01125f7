"""The order log: idempotency records on MSH-10, bounds by count and age, bad input, torn tails, every crash
point, disk failures, SIGKILL, and a stateful model test including reopen."""

from __future__ import annotations

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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from driverd.hl7.journal import StoreCorrupt, StoreError, StoreIOError, encode_line
from driverd.hl7.orderlog import FILE_NAME, OrderLog, OrderLogError, Prior
from tests.hl7.store_faults import crash_matrix, install

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, at: datetime = T0) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def reply(cid: str, code: str = "AA") -> str:
    return f"MSH|^~\\&|DRIVERD|WARD|||20260302||RRG^O16^RRG_O16|R{cid}|P|2.6\rMSA|{code}|{cid}\r"


def test_begin_records_once_and_returns_the_prior_entry(tmp_path: Path) -> None:
    clock = Clock()
    log = OrderLog.open(tmp_path / "ol", clock=clock)
    assert log.begin("M1", "d1") is None
    size = log.path.stat().st_size
    assert log.begin("M1", "d1") == Prior("M1", "d1", T0, False, ())
    assert log.begin("M1", "other") == Prior("M1", "d1", T0, False, ())  # the digest says it is not a resend
    assert log.path.stat().st_size == size  # a repeat writes nothing
    log.finish("M1", [reply("M1", "CA"), reply("M1")])
    assert log.begin("M1", "d1") == Prior("M1", "d1", T0, True, (reply("M1", "CA"), reply("M1")))
    log.close()


def test_reopen_keeps_entries_and_shows_unfinished_ones(tmp_path: Path) -> None:
    log = OrderLog.open(tmp_path / "ol", clock=Clock())
    log.begin("M1", "d1")
    log.finish("M1", [reply("M1")])
    log.begin("M2", "d2")  # the daemon crashed while applying this one
    log.close()
    log = OrderLog.open(tmp_path / "ol", clock=Clock())
    assert log.get("M1") == Prior("M1", "d1", T0, True, (reply("M1"),))
    assert log.unfinished() == [Prior("M2", "d2", T0, False, ())]
    assert log.begin("M2", "d2") == Prior("M2", "d2", T0, False, ())  # the gateway answers "outcome unknown"
    log.finish("M2", [reply("M2", "AE")])
    log.close()
    log = OrderLog.open(tmp_path / "ol", clock=Clock())
    assert log.unfinished() == [] and len(log) == 2
    log.close()


def test_private_modes_and_one_process_at_a_time(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        log = OrderLog.open(tmp_path / "hl7" / "orders")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hl7" / "orders").stat().st_mode) == 0o700
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    with pytest.raises(StoreError, match="in use"):
        OrderLog.open(tmp_path / "hl7" / "orders")
    log.close()


def test_finish_needs_a_begun_unfinished_entry(tmp_path: Path) -> None:
    log = OrderLog.open(tmp_path / "ol")
    with pytest.raises(OrderLogError, match="not begun"):
        log.finish("M1", [])
    log.begin("M1", "d")
    log.finish("M1", [])
    with pytest.raises(OrderLogError, match="already finished"):
        log.finish("M1", [reply("M1")])
    assert log.get("M1") is not None and log.get("M1").replies == ()  # type: ignore[union-attr]
    log.close()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda log: log.begin("", "d"), "control_id"),
        (lambda log: log.begin("A\x00", "d"), "control_id"),
        (lambda log: log.begin("X" * 200, "d"), "control_id"),
        (lambda log: log.begin("\udcff", "d"), "control_id"),
        (lambda log: log.begin(None, "d"), "control_id"),
        (lambda log: log.begin("A", ""), "digest"),
        (lambda log: log.begin("A", "not a digest"), "digest"),
        (lambda log: log.begin("A", "a" * 129), "digest"),
        (lambda log: log.finish("M0", "MSH|..."), "replies"),
        (lambda log: log.finish("M0", [""]), "replies[0]"),
        (lambda log: log.finish("M0", ["ok", 5]), "replies[1]"),
        (lambda log: log.finish("M0", ["x"] * 9), "replies"),
        (lambda log: log.finish("M0", ["\ud800"]), "replies[0]"),
    ],
)
def test_bad_input_names_the_field_and_changes_nothing(tmp_path: Path, call: Any, field: str) -> None:
    log = OrderLog.open(tmp_path / "ol")
    log.begin("M0", "d0")
    before = log.path.read_bytes()
    with pytest.raises(OrderLogError) as exc:
        call(log)
    assert exc.value.field == field
    assert log.path.read_bytes() == before and log.get("M0") == Prior("M0", "d0", log.get("M0").at, False, ())  # type: ignore[union-attr]
    log.close()


def test_a_reply_may_carry_undecodable_bytes_of_the_order_back(tmp_path: Path) -> None:
    log = OrderLog.open(tmp_path / "ol")
    log.begin("M1", "d")
    echoed = "MSH|^~\\&|X|Y\rMSA|AR|M1|bad byte \udcff\r"  # as decoded with surrogateescape
    log.finish("M1", [echoed])
    log.close()
    log = OrderLog.open(tmp_path / "ol")
    assert log.get("M1").replies == (echoed,)  # type: ignore[union-attr]
    log.close()


def test_bounded_by_count_the_oldest_go_first_and_a_forgotten_id_is_new_again(tmp_path: Path) -> None:
    log = OrderLog.open(tmp_path / "ol", max_entries=3, compact_after=2, clock=Clock())
    for i in range(1, 6):
        assert log.begin(f"M{i}", "d") is None
        log.finish(f"M{i}", [reply(f"M{i}")])
    assert len(log) == 3 and log.get("M2") is None and log.get("M3") is not None
    assert log.begin("M1", "d") is None  # forgotten: new again (documented)
    log.close()
    log = OrderLog.open(tmp_path / "ol", max_entries=3, compact_after=2, clock=Clock())
    assert [p.control_id for p in (log.get(c) for c in ("M1", "M4", "M5")) if p] == ["M1", "M4", "M5"]
    assert log.get("M3") is None and len(log) == 3
    assert log.path.read_bytes().count(b"\n") <= 1 + 2 * (1 + 6) + 2  # compacted: bounded
    log.close()


def test_bounded_by_age(tmp_path: Path) -> None:
    clock = Clock()
    log = OrderLog.open(tmp_path / "ol", max_age=timedelta(days=30), clock=clock)
    log.begin("OLD", "d")
    clock.at = T0 + timedelta(days=20)
    log.begin("MID", "d")
    clock.at = T0 + timedelta(days=31)
    log.begin("NEW", "d")
    assert log.get("OLD") is None and log.get("MID") is not None
    log.close()
    clock.at = T0 + timedelta(days=51)
    log = OrderLog.open(tmp_path / "ol", max_age=timedelta(days=30), clock=clock)
    assert log.get("MID") is None and log.get("NEW") is not None
    log.close()


@pytest.mark.parametrize("kwargs", [{"max_entries": 0}, {"compact_after": False}, {"max_age": timedelta(0)},
                                    {"max_age": 30}])
def test_bad_bounds_refused(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(OrderLogError):
        OrderLog.open(tmp_path / "ol", **kwargs)


def test_a_naive_clock_is_refused(tmp_path: Path) -> None:
    log = OrderLog.open(tmp_path / "ol", clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(OrderLogError, match="clock"):
        log.begin("M1", "d")
    log.close()


# ------------------------------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("last", ["begin", "finish"])
def test_torn_tail_at_every_byte_offset_of_the_last_record(tmp_path: Path, last: str) -> None:
    src = tmp_path / "src"
    log = OrderLog.open(src, clock=Clock())
    log.begin("M1", "d1")
    log.finish("M1", [reply("M1")])
    log.begin("M2", "d2")
    if last == "begin":
        log.begin("M3", "d3")
        before = {"M1": True, "M2": False}
    else:
        log.finish("M2", [reply("M2", "CA"), reply("M2")])
        before = {"M1": True, "M2": False}
    log.close()
    data = (src / FILE_NAME).read_bytes()
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    variants = [data[:cut] for cut in range(start + 1, len(data))]
    variants.append(data[:start] + b"\0" * (len(data) - start - 1) + b"\n")
    for i, content in enumerate(variants):
        d = tmp_path / f"cut{i}"
        d.mkdir()
        (d / FILE_NAME).write_bytes(content)
        log = OrderLog.open(d, clock=Clock())
        assert log.repaired_bytes == len(content) - start, i
        assert {p.control_id: p.finished for p in map(log.get, ("M1", "M2", "M3")) if p} == before, i
        log.begin("M9", "d9")  # usable
        log.close()


def test_a_damaged_line_in_the_middle_is_an_error_naming_it(tmp_path: Path) -> None:
    log = OrderLog.open(tmp_path / "ol")
    for i in range(4):
        log.begin(f"M{i}", "d")
    log.close()
    path = tmp_path / "ol" / FILE_NAME
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:20] + b"X" + lines[2][21:]
    damaged = b"\n".join(lines)
    path.write_bytes(damaged)
    with pytest.raises(StoreCorrupt) as exc:
        OrderLog.open(tmp_path / "ol")
    assert exc.value.line == 3 and path.read_bytes() == damaged


@pytest.mark.parametrize(
    ("record", "rule"),
    [
        ({"op": "finish", "id": "NOPE", "replies": []}, "not begun"),
        ({"op": "finish", "id": "M1", "replies": []}, "finished twice"),
        ({"op": "begin", "id": "M5", "digest": "d", "at": "yesterday"}, "'at'|at:"),
        ({"op": "begin", "id": "M5", "digest": "d", "at": "2026-03-02T12:00:00"}, "UTC offset"),
        ({"op": "begin", "id": "M5", "digest": "d d", "at": "2026-03-02T12:00:00+00:00"}, "digest"),
        ({"op": "finish", "id": "M2", "replies": [3]}, r"replies\[0\]"),
        ({"op": "begin", "id": "M5"}, "unknown record"),
    ],
)
def test_records_that_break_the_rules_are_errors_naming_the_line(tmp_path: Path, record: dict[str, Any],
                                                                    rule: str) -> None:
    log = OrderLog.open(tmp_path / "ol")
    log.begin("M1", "d")
    log.finish("M1", [])
    log.begin("M2", "d")
    log.close()
    path = tmp_path / "ol" / FILE_NAME
    damaged = path.read_bytes() + encode_line(record) + encode_line({"op": "begin", "id": "M9", "digest": "d",
                                                                     "at": "2026-03-02T12:00:00+00:00"})
    path.write_bytes(damaged)
    with pytest.raises(StoreCorrupt, match=rule) as exc:
        OrderLog.open(tmp_path / "ol")
    assert exc.value.line == 5 and path.read_bytes() == damaged


# ----------------------------------------------------------------------------------------- crash points


def _setup(d: Path, **kw: Any) -> OrderLog:
    log = OrderLog.open(d, clock=Clock(), **kw)
    log.begin("M1", "d1")
    log.finish("M1", [reply("M1")])
    log.begin("M2", "d2")
    return log


def _check(d: Path, allowed: list[dict[str, bool]], **kw: Any) -> None:
    log = OrderLog.open(d, clock=Clock(), **kw)
    seen = {c: p.finished for c in ("M1", "M2", "M3", "M4", "M5") if (p := log.get(c)) is not None}
    assert seen in allowed, seen
    if "M1" in seen:
        assert log.get("M1").replies == (reply("M1"),)  # type: ignore[union-attr]
    log.begin("M7", "d7")  # usable, and durable
    log.close()
    log = OrderLog.open(d, clock=Clock(), **kw)
    assert log.get("M7") == Prior("M7", "d7", T0, False, ()) and not (d / f"{FILE_NAME}.tmp").exists()
    log.close()


def test_crash_at_every_point_of_begin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    runs = crash_matrix(tmp_path, faulty, _setup, lambda log: log.begin("M3", "d3"),
                        lambda d: _check(d, [{"M1": True, "M2": False}, {"M1": True, "M2": False, "M3": False}]))
    assert runs >= 5


def test_crash_at_every_point_of_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    crash_matrix(tmp_path, faulty, _setup, lambda log: log.finish("M2", [reply("M2")]),
                 lambda d: _check(d, [{"M1": True, "M2": False}, {"M1": True, "M2": True}]))


def test_crash_at_every_point_of_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    runs = crash_matrix(tmp_path, faulty, _setup, lambda log: log.compact(),
                        lambda d: _check(d, [{"M1": True, "M2": False}]))
    assert runs >= 9


def test_crash_at_every_point_of_a_begin_that_evicts_and_compacts(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)

    def op(log: OrderLog) -> None:
        log.begin("M3", "d3")  # evicts M1 (max 2)
        log.finish("M3", [])
        log.begin("M4", "d4")  # evicts M2
        log.finish("M4", [])
        log.begin("M5", "d5")  # evicts M3: 5 dead lines >= 4 live: compacts
        assert log.path.read_bytes().count(b"\n") == 1 + 2 + 1

    crash_matrix(tmp_path, faulty, lambda d: _setup(d, max_entries=2, compact_after=2), op,
                 lambda d: _check(d, [{"M1": True, "M2": False}, {"M2": False, "M3": False},
                                      {"M2": False, "M3": True}, {"M3": True, "M4": False}, {"M3": True, "M4": True},
                                      {"M4": True, "M5": False}], max_entries=2, compact_after=2))


# ---------------------------------------------------------------------------------------- disk failures


@pytest.mark.parametrize("short", [False, True])
@pytest.mark.parametrize("op", ["begin", "finish"])
def test_enospc_raises_and_leaves_the_log_unchanged_and_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              op: str, short: bool) -> None:
    faulty = install(monkeypatch)
    log = _setup(tmp_path / "ol")
    before = log.path.read_bytes()
    if short:
        faulty.short_write_then = errno.ENOSPC
    else:
        faulty.fail = {"write": errno.ENOSPC}
    call = (lambda: log.begin("M3", "d3")) if op == "begin" else (lambda: log.finish("M2", [reply("M2")]))
    with pytest.raises(StoreIOError) as exc:
        call()
    faulty.reset()
    assert exc.value.errno == errno.ENOSPC and not exc.value.broken
    assert log.path.read_bytes() == before
    assert log.get("M3") is None and log.get("M2") == Prior("M2", "d2", T0, False, ())
    call()  # the same again: it was never recorded
    log.close()
    _check(tmp_path / "ol", [{"M1": True, "M2": op == "finish", **({"M3": False} if op == "begin" else {})}])


def test_a_failed_sync_breaks_the_log_until_it_is_reopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faulty = install(monkeypatch)
    log = _setup(tmp_path / "ol")
    faulty.fail = {"fdatasync": errno.EIO}
    with pytest.raises(StoreIOError) as exc:
        log.begin("M3", "d3")
    faulty.reset()
    assert exc.value.broken and log.broken is not None and log.get("M3") is None
    with pytest.raises(StoreIOError, match="reopen"):
        log.finish("M2", [])
    log.close()
    _check(tmp_path / "ol", [{"M1": True, "M2": False}, {"M1": True, "M2": False, "M3": False}])


# ------------------------------------------------------------------------------------ SIGKILL, for real

WORKER = Path(__file__).with_name("orderlog_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _run_and_kill(directory: Path, run: int, kill_after: int) -> list[list[str]]:
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
        lines += (buf + proc.stdout.read()).split(b"\n")[:-1]
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
    assert lines, f"worker acknowledged nothing: {err.decode(errors='replace')}"
    return [line.decode().split() for line in lines]


def test_sigkill_at_random_points_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(20260303)
    directory = tmp_path / "ol"
    begun: set[str] = set()
    finished: dict[str, str] = {}
    for run in range(10):
        for rec in _run_and_kill(directory, run, rng.randint(5, 300)):
            if rec[0] == "begin":
                begun.add(rec[1])
            else:
                finished[rec[1]] = rec[2]
        if run % 2:
            with (directory / FILE_NAME).open("ab") as f:
                f.write(encode_line({"op": "finish", "id": "X", "replies": []})[: rng.randint(1, 30)])
        log = OrderLog.open(directory, max_entries=50, compact_after=5)
        # The worker's bound keeps the newest 50: only those are checked (older ones may be forgotten).
        for cid in sorted(begun, key=lambda c: int(c[1:]))[-40:]:
            prior = log.get(cid)
            assert prior is not None, f"acknowledged begin {cid} lost"
            if cid in finished:
                assert prior.finished and prior.replies == (finished[cid],), cid
        log.close()


# ------------------------------------------------------------------------------------- stateful model


class OrderLogModel(RuleBasedStateMachine):
    """The order log against an ordered dict, with count eviction, reopen and torn tails."""

    MAX = 6

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="orderlog-model-"))
        self.clock = Clock()
        self.log = self._open()
        self.model: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def _open(self) -> OrderLog:
        return OrderLog.open(self.dir, max_entries=self.MAX, compact_after=3, clock=self.clock)

    @rule(n=st.integers(0, 12), digest=st.sampled_from(["d1", "d2"]))
    def begin(self, n: int, digest: str) -> None:
        cid = f"M{n}"
        prior = self.log.begin(cid, digest)
        if cid in self.model:
            d, replies = self.model[cid]
            assert prior == Prior(cid, d, T0, replies is not None, replies or ())
            return
        assert prior is None
        self.model[cid] = (digest, None)
        while len(self.model) > self.MAX:
            del self.model[next(iter(self.model))]

    @rule(n=st.integers(0, 12), replies=st.lists(st.text(min_size=1, max_size=8).filter(
        lambda s: not any("\ud800" <= c <= "\udfff" for c in s)), max_size=3))
    def finish(self, n: int, replies: list[str]) -> None:
        cid = f"M{n}"
        if cid not in self.model or self.model[cid][1] is not None:
            with pytest.raises(OrderLogError):
                self.log.finish(cid, replies)
            return
        self.log.finish(cid, replies)
        self.model[cid] = (self.model[cid][0], tuple(replies))

    @rule()
    def reopen(self) -> None:
        self.log.close()
        self.log = self._open()

    @rule(cut=st.integers(1, 40))
    def reopen_after_a_torn_write(self, cut: int) -> None:
        with self.log.path.open("ab") as f:
            f.write(encode_line({"op": "begin", "id": "T", "digest": "d", "at": T0.isoformat()})[:cut])
        self.reopen()
        assert self.log.repaired_bytes == cut

    @invariant()
    def matches_the_model(self) -> None:
        assert len(self.log) == len(self.model)
        for cid, (digest, replies) in self.model.items():
            assert self.log.get(cid) == Prior(cid, digest, T0, replies is not None, replies or ())
        assert [p.control_id for p in self.log.unfinished()] == [c for c, (_, r) in self.model.items() if r is None]

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestOrderLogModel = OrderLogModel.TestCase
