"""Parallel `audit replay`: the log is cut at full state snapshots and each slice is replayed by its own process;
the result is the one `replay_lines` gives in one pass (docs/audit.md, "Parallel replay").

A `state_snapshot` holds every pump's course state, the library, the schedule versions and the exposure ledger,
and sequential replay checks each one against its own states (`Replayer._check_snapshot`). So the slice that ends
with snapshot k checks it, and the next slice starts from it (its states decoded, as start-up does): the chain of
proof is the sequential one, only folded in parallel. Slice 0 starts where the log starts (seq 1, or the snapshot
an archived log starts from). What a snapshot does not hold is carried or checked:

- the schedule index (every `schedule_accepted` record seen, by digest): read before the workers start, from the
  lines whose bytes name that event (canonical JSON writes `"event":"schedule_accepted"` so), and handed to each
  slice as it stands at the slice's first snapshot;
- the rest of the replayer's state at a cut (its pumps, segment, library, versions, ledger, schedule index) is
  compared between the slice that ends at the snapshot and the one that starts from it;
- the order of the pumps (which orders the `interrupted` outputs at a crash boundary) is known only after the
  slices before: the parent puts each crash boundary's entries back in the sequential order;
- the per-course report (`ReportBuilder`, a fold whose state no snapshot holds) is built by the parent over its
  own pass of the log while the workers replay.

Anything unusual in a worker (a divergence at a cut, outputs still pending at a cut, a state that differs across a
cut, seqs that do not increase, a line that does not parse, an error, a worker that dies) and the whole log is
replayed again in this process, sequentially, and that result (or error) is returned: a parallel replay never says
more or less than the sequential one.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Final

from driverd.audit.canonical import loads_line
from driverd.audit.reader import MAX_LINE_BYTES, iter_lines
from driverd.audit.replay import (
    CRASH_BOUNDARIES,
    WRITER_RECORDS,
    Divergence,
    Interrupted,
    Replayer,
    ReplayResult,
    _collector_paused,
    replay_lines,
    replay_records,
)
from driverd.audit.report import Report, ReportBuilder
from driverd.audit.segments import resolve_log
from driverd.audit.snapshot import DELTA_EVENT, SNAPSHOT_EVENT, read_snapshot
from driverd.audit.verify import _line_batches

#: Below this many bytes the log is replayed in this process (starting workers would cost more than it saves).
PARALLEL_MIN_BYTES: Final = 2 << 20
_SNAPSHOT: Final = b'"event":"state_snapshot"'
_ACCEPTED: Final = b'"event":"schedule_accepted"'
_BLOCK: Final = 1 << 20


@dataclass(slots=True)
class ReplayInfo:
    """How a replay ran (for the CLI, tests and the bench): `parallel`, or `sequential` and why."""

    mode: str = "sequential"
    reason: str = ""
    slices: list[int] = field(default_factory=list)  # seqs of the snapshots the log was cut at
    snapshots: int = 0  # state_snapshot records replayed (checked, or seeded from at an archived log's start)
    deltas: int = 0  # state_delta records replayed
    # CPU seconds of this process (plan, report, merge) and of each worker (for the bench: the critical path).
    cpu_parent: float = 0.0
    cpu_workers: list[float] = field(default_factory=list)


class _Unusual(Exception):
    """Something a slice cannot vouch for: the log is replayed sequentially instead."""


class BadSplit(ValueError):
    """`split_seqs` names a seq where there is no state snapshot to cut at."""


# ------------------------------------------------------------------------------------------------ planning


@dataclass(slots=True)
class _Hit:
    file: int
    start: int  # byte offset of the line in its file
    end: int  # just past its newline
    rec: dict[str, Any] | None  # parsed: accepted schedules at once, snapshots only when cut at (they are large)


@dataclass(frozen=True, slots=True)
class _Slice:
    index: int
    ranges: tuple[tuple[str, int, int | None], ...]  # (file, first byte, end byte; None: to the end of the file)
    seed: tuple[str, int, int] | None  # the snapshot line this slice starts from (file, start, end)
    seed_seq: int | None
    seed_segment: Any  # the segment replay is in at the seed (the `segment` of its file's segment_start)
    end_seq: int | None  # the snapshot this slice ends with and checks (None: the last slice)
    accepted: tuple[dict[str, Any], ...]  # the records replay's schedule index holds at the seed, in log order


@dataclass(frozen=True, slots=True)
class _Plan:
    slices: tuple[_Slice, ...]
    start_seed: int | None  # seq of the snapshot sequential replay starts from (an archived log), else None


def _scan(path: Path, index: int) -> tuple[list[_Hit], list[_Hit]]:
    """The lines whose bytes name a state snapshot, and the accepted schedules (parsed: a nested "event" key is
    told apart), in file order. Accepted schedules that do not parse are left out (the replay meets them)."""
    snaps: list[_Hit] = []
    accepted: list[_Hit] = []
    with path.open("rb") as f:
        base, rest = 0, b""
        while block := f.read(_BLOCK):
            buf = rest + block
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) > MAX_LINE_BYTES:
                    raise _Unusual(f"{path}: a line longer than {MAX_LINE_BYTES} bytes")
                rest = buf
                continue
            for needle, out in ((_SNAPSHOT, snaps), (_ACCEPTED, accepted)):
                i = buf.find(needle, 0, cut)
                while i >= 0:
                    s = buf.rfind(b"\n", 0, i) + 1
                    e = buf.index(b"\n", i) + 1
                    rec = None
                    if out is accepted:
                        try:
                            rec = loads_line(buf[s:e - 1])
                        except ValueError:
                            rec = None
                        if rec is None or rec.get("event") != "schedule_accepted":
                            i = buf.find(needle, e, cut)
                            continue
                    out.append(_Hit(index, base + s, base + e, rec))
                    i = buf.find(needle, e, cut)
            base += cut
            rest = buf[cut:]
    return snaps, accepted


def _snapshot_at(files: list[Path], hit: _Hit) -> dict[str, Any]:
    """The snapshot record of a hit (read and parsed now), or _Unusual."""
    if hit.rec is None:
        with files[hit.file].open("rb") as f:
            f.seek(hit.start)
            raw = f.read(hit.end - hit.start)
        try:
            hit.rec = loads_line(raw[:-1])
        except ValueError as exc:
            raise _Unusual(f"{files[hit.file]}: a snapshot line does not parse: {exc}") from None
    if hit.rec.get("event") != SNAPSHOT_EVENT or type(hit.rec.get("seq")) is not int:
        raise _Unusual(f"{files[hit.file]}: a line naming state_snapshot is not one")
    return hit.rec


def _first_records(files: list[Path], limit: int = 64) -> list[dict[str, Any]]:
    """The log's first records, up to and including its first one that is not the writer's own."""
    out: list[dict[str, Any]] = []
    for path in files:
        with path.open("rb") as f:
            for raw in f:
                rec = loads_line(raw.rstrip(b"\n"))
                out.append(rec)
                if rec.get("event") not in WRITER_RECORDS or len(out) >= limit:
                    return out
    return out


def _segment_of(path: Path) -> Any:
    """What replay's segment is after this file's first line: its `segment` if it is a segment_start with an
    integer one (Replayer._see), else unknown (the file cannot start a slice)."""
    with path.open("rb") as f:
        raw = f.readline(MAX_LINE_BYTES + 1)
    try:
        rec = loads_line(raw.rstrip(b"\n"))
    except ValueError:
        return None
    seg = rec.get("segment")
    return seg if rec.get("event") == "segment_start" and isinstance(seg, int) else None


def _plan(files: list[Path], jobs: int, split_seqs: Sequence[int] | None) -> _Plan:
    sizes = [p.stat().st_size for p in files]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    snaps: list[_Hit] = []
    schedules: list[_Hit] = []
    for i, p in enumerate(files):
        a, b = _scan(p, i)
        snaps += a
        schedules += b
    if len(snaps) < 2:
        raise _Unusual("fewer than two state snapshots: nothing to cut at")
    # Does sequential replay start from the log's first snapshot (a log after `audit archive`)? Replayer.add: the
    # first record is not seq 1 and the first record with course data is that snapshot.
    head = _first_records(files)
    start_seed: int | None = None
    accepted: list[dict[str, Any]] = []
    if head and head[0].get("seq") != 1 and head[-1].get("event") == SNAPSHOT_EVENT:
        try:
            accepted = list(read_snapshot(head[-1]).schedules)
        except Exception as exc:
            raise _Unusual(f"the snapshot the log starts from does not read: {exc}") from None
        start_seed = head[-1]["seq"] if isinstance(head[-1].get("seq"), int) else None
    # The first snapshot is never a cut: an archived log's replay starts from it instead of checking it.
    candidates = snaps[1:]
    if split_seqs is not None:
        by_seq = {_snapshot_at(files, h)["seq"]: h for h in candidates}
        missing = [s for s in split_seqs if s not in by_seq]
        if missing:
            raise BadSplit(f"no state snapshot to cut at, at seq {missing}")
        cuts = [by_seq[s] for s in sorted(set(split_seqs))]
    else:
        cuts = []
        for i in range(1, max(1, jobs)):
            target = total * i / jobs  # slices of about equal bytes: the cut nearest each target
            best = min(candidates, key=lambda h: abs(offsets[h.file] + h.start - target), default=None)
            if best is not None and best not in cuts:
                cuts.append(best)
        cuts.sort(key=lambda h: (h.file, h.start))
    if not cuts:
        raise _Unusual("no state snapshot to cut at")
    segments = []
    for h in cuts:
        rec = _snapshot_at(files, h)
        if start_seed is not None and rec["seq"] <= start_seed:
            raise _Unusual("a cut at or before the snapshot the log starts from")
        segments.append(_segment_of(files[h.file]))
        if segments[-1] is None:
            raise _Unusual(f"{files[h.file]}: does not begin with a segment_start: no cut in it")
    slices: list[_Slice] = []
    bounds: list[_Hit | None] = [None, *cuts, None]
    for k in range(len(bounds) - 1):
        begin, end = bounds[k], bounds[k + 1]
        f0, b0 = (begin.file, begin.end) if begin is not None else (0, 0)
        ranges: list[tuple[str, int, int | None]] = []
        last_file = end.file if end is not None else len(files) - 1
        for fi in range(f0, last_file + 1):
            start = b0 if fi == f0 else 0
            stop = end.end if end is not None and fi == last_file else None
            ranges.append((str(files[fi]), start, stop))
        known: tuple[dict[str, Any], ...] = ()
        if begin is not None:
            known = (*accepted, *(h.rec for h in schedules if h.rec is not None
                                   and (h.file, h.start) < (begin.file, begin.start)))
        slices.append(_Slice(
            k, tuple(ranges),
            (str(files[begin.file]), begin.start, begin.end) if begin is not None else None,
            begin.rec["seq"] if begin is not None and begin.rec is not None else None,
            segments[k - 1] if begin is not None else None,
            end.rec["seq"] if end is not None and end.rec is not None else None, known))
    return _Plan(tuple(slices), start_seed)


# ------------------------------------------------------------------------------------------------ a worker


@dataclass(slots=True)
class _SliceResult:
    records: int = 0  # records replayed (the seed snapshot is not one: the slice before replays it)
    last_seq: int | None = None
    inputs: int = 0
    outputs_checked: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    interrupted: list[Interrupted] = field(default_factory=list)
    crash_seqs: list[int] = field(default_factory=list)  # the crash boundaries read (interrupted outputs' groups)
    seeded_from: int | None = None
    rules: list[dict[str, Any]] = field(default_factory=list)  # the daemon starts read (ReplayResult.rules)
    start: str | None = None  # the replayer's state after the seed (compared with the slice before's end)
    end: str | None = None  # ... after the snapshot the slice ends with
    pumps: list[str] = field(default_factory=list)  # the replayer's pumps at the end, in its order
    seeded: list[str] = field(default_factory=list)  # ... right after the seed
    snapshots: int = 0
    deltas: int = 0
    cpu: float = 0.0  # CPU seconds of the worker


def _index(accepted: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Replay's schedule index from these records, as Replayer.add and Replayer.seed build it."""
    out: dict[str, dict[str, Any]] = {}
    for rec in accepted:
        if isinstance(rec.get("schedule"), dict):
            out[str(rec["schedule"].get("digest"))] = rec
    return out


def _state_print(r: Replayer) -> str:
    """What the replayer carries past a snapshot that the snapshot check does not compare, and what it does."""
    return json.dumps([sorted(r._pumps), r._segment, r.library_text, r._versions, r._ledger.to_fields(),
                       r._accepted], sort_keys=True, default=repr)


def _resume(r: Replayer, rec: dict[str, Any], sl: _Slice) -> None:
    """Put `r` where sequential replay is just after checking the snapshot `rec`: its states, library, versions
    and ledger (Replayer.seed), the schedule index as the log has it there, the segment, and the snapshot as the
    parent of the next state delta, encoded from replay's own view as _mark_chain does after a check."""
    try:
        snap = read_snapshot(rec)
    except Exception as exc:
        raise _Unusual(f"the snapshot at seq {sl.seed_seq} does not read: {exc}") from None
    r.seed(snap)
    r._accepted = _index(sl.accepted)
    r._segment = sl.seed_segment
    r._mark_chain(rec)


def _replay_slice(sl: _Slice, done: Any = None) -> _SliceResult:
    cpu = time.process_time()
    out = _SliceResult()
    r = Replayer(report=False)
    if sl.seed is not None:
        path, start, end = sl.seed
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        rec = loads_line(raw[:-1])
        if rec.get("seq") != sl.seed_seq or rec.get("event") != SNAPSHOT_EVENT:
            raise _Unusual(f"the snapshot at seq {sl.seed_seq} is not where it was found")
        _resume(r, rec, sl)
        if r.result.divergences:
            raise _Unusual(f"the snapshot at seq {sl.seed_seq} does not seed replay")
        out.start, out.seeded = _state_print(r), list(r._pumps)
    res = replay_records(_records(sl, out, done), r)
    out.inputs, out.outputs_checked = res.inputs, res.outputs_checked
    out.divergences, out.interrupted, out.seeded_from = res.divergences, res.interrupted, res.seeded_from
    out.rules = res.rules
    out.pumps = list(r._pumps)
    if sl.end_seq is not None:
        if out.last_seq != sl.end_seq:
            raise _Unusual(f"slice {sl.index} did not end at the snapshot at seq {sl.end_seq}")
        if any(d.seq == sl.end_seq for d in out.divergences):
            raise _Unusual(f"the snapshot at seq {sl.end_seq} differs from replay")
        flushed = max([sl.seed_seq or 0, *out.crash_seqs])
        if any(i.input_seq > flushed for i in out.interrupted):  # finish() found outputs still to come
            raise _Unusual(f"outputs pending at the snapshot at seq {sl.end_seq}")
        out.end = _state_print(r)
    out.cpu = time.process_time() - cpu
    return out


def _records(sl: _Slice, out: _SliceResult, done: Any) -> Iterator[dict[str, Any]]:
    last = sl.seed_seq
    crash = out.crash_seqs
    read = 0
    for path, start, end in sl.ranges:
        with open(path, "rb") as f:
            f.seek(start)
            for batch, torn in _line_batches(f, None if end is None else end - start):
                if torn is not None:
                    raise _Unusual(f"{path}: torn last line")
                for line in batch:
                    rec = loads_line(line)
                    seq = rec.get("seq")
                    # Seqs must increase (the cuts and the crash groups rely on it; verify checks it, replay not).
                    if type(seq) is not int or (last is not None and seq <= last):
                        raise _Unusual(f"{path}: seq {seq!r} does not follow {last!r}")
                    last = seq
                    event = rec.get("event")
                    if event in CRASH_BOUNDARIES:
                        crash.append(seq)
                    elif event == SNAPSHOT_EVENT:
                        out.snapshots += 1
                    elif event == DELTA_EVENT:
                        out.deltas += 1
                    yield rec
                out.records += len(batch)
                out.last_seq = last
                if done is not None:
                    read += sum(map(len, batch)) + len(batch)
                    done[sl.index] = read


def _child(sl: _Slice, conn: Any, done: Any) -> None:
    try:
        conn.send(("ok", _replay_slice(sl, done)))
    except _Unusual as exc:
        conn.send(("unusual", str(exc)))
    except BaseException as exc:  # any failure: the parent replays sequentially (and meets it itself)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------ the parent


def replay_log(
    path: Path,
    *,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
    segments: Sequence[Path] | None = None,
    report: bool = True,
    split_seqs: Sequence[int] | None = None,
    min_bytes: int = PARALLEL_MIN_BYTES,
    info: ReplayInfo | None = None,
) -> ReplayResult:
    """`replay_lines(iter_lines(path))`, with the work split across `jobs` processes when the log is large
    enough (min_bytes) and has state snapshots to cut at. `segments`: replay exactly these files in this order
    (e.g. archived segments followed by the live log). `report=False`: no per-course report (verify --full).
    `split_seqs`: cut at exactly the snapshots with these seqs, whatever the size (for tests). Raises what the
    sequential replay raises (AuditError for a damaged line)."""
    info = info if info is not None else ReplayInfo()
    cpu = time.process_time()
    files = list(segments) if segments is not None else [p for _, p in resolve_log(path)]
    reason = ""
    if jobs <= 1 and split_seqs is None:
        reason = "one job"
    elif split_seqs is None and sum(p.stat().st_size for p in files if p.exists()) < min_bytes:
        reason = f"log under {min_bytes} bytes"
    else:
        try:
            plan = _plan(files, jobs, split_seqs)
            info.slices = [s.seed_seq for s in plan.slices if s.seed_seq is not None]
            result = _run(plan, files, progress, report, info)
        except BadSplit:
            raise
        except _Unusual as exc:
            reason = str(exc)
        except Exception as exc:  # a damaged log, a worker's error: the sequential replay meets it itself
            reason = f"{type(exc).__name__}: {exc}"
        else:
            info.mode, info.reason, info.cpu_parent = "parallel", "", time.process_time() - cpu
            return result
    info.mode, info.reason, info.slices = "sequential", reason, []
    return _sequential(files, progress, report, info)


def _sequential(files: list[Path], progress: Callable[[int], None] | None, report: bool,
                info: ReplayInfo) -> ReplayResult:
    def counted(lines: Iterator[Any]) -> Iterator[Any]:
        for line in lines:
            event = line.record.get("event")
            info.snapshots += event == SNAPSHOT_EVENT
            info.deltas += event == DELTA_EVENT
            yield line

    info.snapshots = info.deltas = 0
    lines = chain.from_iterable(iter_lines(f, progress) for f in files)
    # Counted only without the report (verify --full shows the counts; `audit replay` does not).
    return replay_lines(lines if report else counted(lines), Replayer(report=report))


def _context() -> Any:
    # fork is the cheapest start (the workers inherit the imported modules), and safe while this is the only
    # thread (as verify.py); with other threads (rich's progress bar), workers start from a clean interpreter.
    method = "fork" if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _run(plan: _Plan, files: list[Path], progress: Callable[[int], None] | None, report: bool,
         info: ReplayInfo) -> ReplayResult:
    ctx = _context()
    done = ctx.Array("q", len(plan.slices), lock=False) if progress is not None else None
    shown = 0

    def poll() -> None:
        nonlocal shown
        if done is not None and progress is not None:
            now = sum(done)
            if now > shown:
                progress(now - shown)
                shown = now

    procs, conns = [], []
    try:
        for sl in plan.slices:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(sl, child, done), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        rep, count, last = _report_pass(files, poll) if report else (Report(), None, None)
        results: list[_SliceResult] = []
        for conn in conns:
            while not conn.poll(0.2):
                poll()
            try:
                status, payload = conn.recv()
            except EOFError:
                raise _Unusual("a replay worker died") from None
            if status != "ok":
                raise _Unusual(f"a replay worker stopped: {payload}")
            results.append(payload)
        poll()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        for conn in conns:
            conn.close()
    result = _merge(plan, results, rep)
    if count is not None and (count != sum(r.records for r in results) or last != results[-1].last_seq):
        raise _Unusual("the log changed while it was replayed")
    info.snapshots = sum(r.snapshots for r in results)
    info.cpu_workers = [r.cpu for r in results]
    info.deltas = sum(r.deltas for r in results)
    return result


def _report_pass(files: list[Path], poll: Callable[[], None]) -> tuple[Report, int, Any]:
    """The per-course report over every record, as Replayer.add feeds it (in this process, while the workers
    replay); also the record count and the last seq, to check that the slices covered the same log."""
    b = ReportBuilder()
    add = b.add
    count, rec = 0, None
    with _collector_paused():
        for path in files:
            with path.open("rb") as f:
                for batch, torn in _line_batches(f, None):
                    if torn is not None:
                        raise _Unusual(f"{path}: torn last line")
                    for line in batch:
                        rec = loads_line(line)
                        add(rec)
                    count += len(batch)
                    poll()
    return b.report, count, rec.get("seq") if rec is not None else None


def _merge(plan: _Plan, results: list[_SliceResult], rep: Report) -> ReplayResult:
    out = ReplayResult(report=rep)
    if results[0].seeded_from != plan.start_seed:
        raise _Unusual("replay did not start from the snapshot the log starts from")
    order: list[str] = []  # sequential replay's pumps, in its order, at the current cut
    for k, res in enumerate(results):
        interrupted = res.interrupted
        if k:
            if res.start != results[k - 1].end or sorted(order) != sorted(res.seeded):
                raise _Unusual(f"replay's state at the snapshot at seq {plan.slices[k].seed_seq} differs across "
                               "the cut")
            seeded = set(res.seeded)
            order = order + [p for p in res.pumps if p not in seeded]
            pos = {p: i for i, p in enumerate(order)}
            crash = res.crash_seqs
            # Each crash boundary's entries follow the replayer's pump order: here the sequential one.
            interrupted = sorted(interrupted, key=lambda i: (bisect_right(crash, i.input_seq), pos[i.pump_id]))
        else:
            order = list(res.pumps)
        out.divergences.extend(res.divergences)
        out.rules.extend(res.rules)  # the slices are disjoint and in log order: every daemon start, in order
        out.interrupted.extend(interrupted)
        out.inputs += res.inputs
        out.outputs_checked += res.outputs_checked
    out.seeded_from = results[0].seeded_from
    return out
