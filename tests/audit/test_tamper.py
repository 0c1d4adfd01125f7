"""Tamper evidence: every single-byte change, deleted/duplicated/swapped line, mid-line truncation and an
edited line with its own hash recomputed must be detected by verify. Systematic where cheap, else hypothesis."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driverd.audit.canonical import dumps, loads_line, record_hash
from driverd.audit.verify import verify_log

from .conftest import write_generic_log


class Log:
    """A closed real log plus helpers to apply one tampering at a time and undo it."""

    def __init__(self, directory: Path, key: Ed25519PrivateKey) -> None:
        self.dir = directory
        self.key = key
        self.segments = sorted(directory.glob("audit-*.jsonl"))
        self.original = {p: p.read_bytes() for p in self.segments}
        self.lines = [(p, line) for p in self.segments for line in self.original[p].split(b"\n")[:-1]]

    @contextmanager
    def mutated(self, new: dict[Path, bytes]) -> Iterator[None]:
        try:
            for p, data in new.items():
                p.write_bytes(data)
            yield
        finally:
            for p in new:
                p.write_bytes(self.original[p])

    def with_lines(self, lines: list[tuple[Path, bytes]]) -> dict[Path, bytes]:
        out = {p: b"" for p in self.segments}
        for p, line in lines:
            out[p] += line + b"\n"
        return out

    def detected(self, new: dict[Path, bytes]) -> bool:
        with self.mutated(new):
            report = verify_log(self.dir)
        return not report.ok and report.failure is not None

    def intact(self) -> bool:
        return verify_log(self.dir).ok


@pytest.fixture
def small(tmp_path: Path, key: Ed25519PrivateKey) -> Log:
    return Log(write_generic_log(tmp_path / "small", key, n=4, segment_max_records=4), key)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Log:
    key = Ed25519PrivateKey.generate()
    return Log(write_generic_log(tmp_path_factory.mktemp("big") / "log", key, n=30), key)


def test_fixture_logs_verify(small: Log, big: Log) -> None:
    assert small.intact() and big.intact()
    assert len(small.segments) >= 2 and len(big.segments) >= 3


def test_every_single_byte_change_detected(small: Log) -> None:
    # Exhaustive over every byte of a real multi-segment log, two kinds of change per byte
    # (test_random_byte_change_detected covers arbitrary values).
    for seg in small.segments:
        data = small.original[seg]
        for i in range(len(data)):
            for flip in (0x01, 0x80):
                mutated = data[:i] + bytes([data[i] ^ flip]) + data[i + 1 :]
                assert small.detected({seg: mutated}), (seg.name, i, flip)
    assert small.intact()


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(pos=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_random_byte_change_detected(big: Log, pos: int, value: int) -> None:
    total = sum(len(d) for d in big.original.values())
    pos %= total
    for seg in big.segments:
        data = big.original[seg]
        if pos < len(data):
            if data[pos] == value:
                return  # not a change
            assert big.detected({seg: data[:pos] + bytes([value]) + data[pos + 1 :]})
            return
        pos -= len(data)


def test_every_deleted_line_detected(small: Log) -> None:
    n = len(small.lines)
    for i in range(n - 1):
        assert small.detected(small.with_lines(small.lines[:i] + small.lines[i + 1 :])), i
    # Deleting the last line (the closing checkpoint) is a truncation: it leaves an unsealed tail,
    # which verify reports, and --require-sealed turns into a failure.
    with small.mutated(small.with_lines(small.lines[:-1])):
        report = verify_log(small.dir)
        assert report.unsealed_records >= 1 and any("unsealed tail" in n for n in report.notes)
        assert not verify_log(small.dir, require_sealed=True).ok


def test_every_duplicated_line_detected(small: Log) -> None:
    for i in range(len(small.lines)):
        lines = small.lines[: i + 1] + small.lines[i:]
        assert small.detected(small.with_lines(lines)), i


def test_every_swap_detected(small: Log) -> None:
    n = len(small.lines)
    for i in range(n):
        for j in range(i + 1, n):
            lines = list(small.lines)
            # swap the contents, keep each position's segment file
            lines[i], lines[j] = (lines[i][0], small.lines[j][1]), (lines[j][0], small.lines[i][1])
            assert small.detected(small.with_lines(lines)), (i, j)


def test_truncation_mid_line_detected(small: Log) -> None:
    last = small.segments[-1]
    data = small.original[last]
    for cut in range(len(data)):
        if cut == 0 or data[cut - 1 : cut] == b"\n":
            continue  # line boundaries: see test_truncation_at_line_boundary
        assert small.detected({last: data[:cut]}), cut


def test_truncation_at_line_boundary(small: Log) -> None:
    # Cutting whole lines off the end leaves a valid prefix: only the seal shows it. With --require-sealed
    # every cut that does not land right after a checkpoint fails; a cut after a checkpoint is a shorter,
    # sealed log that only an out-of-band record of the head/count can tell apart (documented).
    last = small.segments[-1]
    data = small.original[last]
    full = verify_log(small.dir)
    boundaries = [i + 1 for i, b in enumerate(data) if b == 0x0A][:-1]
    for cut in boundaries:
        with small.mutated({last: data[:cut]}):
            report = verify_log(small.dir, require_sealed=True)
            prev_line = data[:cut].split(b"\n")[-2]
            if loads_line(prev_line)["event"] == "checkpoint":
                assert report.ok and report.last_seq is not None and full.last_seq is not None
                assert report.last_seq < full.last_seq
            else:
                assert not report.ok and report.failure is not None
                assert "unsealed" in report.failure.reason


def _edit_and_rehash(line: bytes) -> bytes:
    rec = loads_line(line)
    rec["pump_id"] = "bed-X" if rec.get("pump_id") != "bed-X" else "bed-Y"
    rec["hash"] = record_hash(rec)
    return dumps(rec)


def test_every_line_edited_with_own_hash_recomputed_detected(small: Log, big: Log) -> None:
    for log in (small, big):
        for i in range(len(log.lines)):
            lines = list(log.lines)
            lines[i] = (lines[i][0], _edit_and_rehash(lines[i][1]))
            assert log.detected(log.with_lines(lines)), i


def test_failure_names_first_bad_seq(small: Log) -> None:
    lines = list(small.lines)
    lines[3] = (lines[3][0], _edit_and_rehash(lines[3][1]))
    with small.mutated(small.with_lines(lines)):
        report = verify_log(small.dir)
    assert report.failure is not None
    assert report.failure.seq == 5 and "prev" in report.failure.reason  # record 4 edited: 5's link breaks
    assert report.last_seq == 4


def test_whole_segment_removed_or_key_swapped(small: Log, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small.dir, copy)
    (copy / "audit-000001.jsonl").unlink()
    assert not verify_log(copy).ok
    other = Ed25519PrivateKey.generate()
    assert not verify_log(small.dir, public_key=other.public_key()).ok
    assert verify_log(small.dir, public_key=small.key.public_key()).ok
