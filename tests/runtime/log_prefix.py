"""A log cut at any record boundary, with a torn tail: the crash-point helpers the snapshot and state-delta tests
share (tests/runtime/test_snapshots.py, test_state_deltas.py)."""

from __future__ import annotations

import json
from pathlib import Path

from driverd.audit.replay import Replayer, ReplayResult
from driverd.audit.segments import list_segments, segment_name
from driverd.core.state import CourseState


def log_lines(audit: Path) -> list[tuple[int, bytes]]:
    """(segment number, line with its newline) for every line of the log, in order."""
    return [(n, line) for n, p in list_segments(audit) for line in p.read_bytes().splitlines(keepends=True)]


def write_prefix(lines: list[tuple[int, bytes]], k: int, tail: bytes, dest: Path) -> None:
    """The log as a crash after its first `k` lines leaves it: `tail` (a torn part of line k) after them."""
    for p in dest.glob("*.jsonl"):
        p.unlink()
    dest.mkdir(exist_ok=True)
    segs: dict[int, bytearray] = {}
    for number, line in lines[:k]:
        segs.setdefault(number, bytearray()).extend(line)
    if k < len(lines):
        segs.setdefault(lines[k][0], bytearray()).extend(tail)
    for number, data in segs.items():
        (dest / segment_name(number)).write_bytes(bytes(data))


def replay_prefix(lines: list[tuple[int, bytes]], k: int) -> tuple[ReplayResult, dict[str, CourseState]]:
    """Replay of the first `k` lines from the first record: its result and the states it ends with."""
    r = Replayer()
    for _, line in lines[:k]:
        r.add(json.loads(line))
    return r.finish(), r.states()
