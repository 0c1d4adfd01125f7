"""Audit verify and replay throughput (records/s, MB/s) vs `sha256sum` over the same files, side by side in one run.

Goals (issue #12, item 3): `audit verify` >= 200,000 records/s and >= 0.3 of sha256sum; `audit replay` >= 100,000
records/s.

The log is real: one `driverd demo` run on sim:// with P pumps (default 7: about 50k records, 19 MB), i.e. whole
5-day courses with signed checkpoints. It is generated once and kept in --log DIR for reuse. All files are read
once first, so every contender reads from the page cache. Every contender is timed in the same round, rounds
interleaved; medians of --rounds. CPU seconds (this process and its children) are shown next to wall time: on a
shared machine wall time also measures the neighbours.

Rows: sha256sum (the reference); verify_log in this process (workers=1) and with --jobs worker processes (what
`driverd audit verify` does); the `driverd audit verify` command itself (interpreter start and imports included);
decoding alone (iter_lines: the parse replay pays); replay (iter_lines + replay_lines); parallel replay
(replay_log with --replay-jobs worker processes, what `driverd audit replay --jobs` runs: the log cut at state
snapshots). Then an "anatomy" of the per-line work of verify: reading lines, SHA-256 per line, parsing, the
canonical-form check, the content hash. Last, a "replay anatomy" (this checkout, and --before's): CPU per record of
decoding, event_from_record, the core's fold, the report builder, replay with and without the snapshot checks, and
the whole `audit replay`.

With --before DIR (a checkout of an earlier version, e.g. `git archive 0ed788e | tar -x -C DIR`), that version's
verify_log and replay are timed in the same rounds, in a subprocess (its own imports excluded from the timing).

usage: python bench/verify_replay.py [--log DIR] [--pumps P] [--rounds R] [--jobs J] [--replay-jobs J]
                                    [--replay-only] [--before DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, say, sha256sum_seconds, table, warm

from driverd.audit.canonical import _FAST_CODEC, _parse, _reference_dumps, line_content_hash, loads_line, record_hash
from driverd.audit.reader import iter_lines
from driverd.audit.replay import replay_lines
from driverd.audit.replay_parallel import ReplayInfo, replay_log
from driverd.audit.segments import list_segments
from driverd.audit.verify import default_workers, verify_log

ROOT = Path(__file__).resolve().parent.parent


def make_log(directory: Path, pumps: int) -> None:
    from driverd.runtime.demo import DemoOptions, run_demo

    t0 = time.perf_counter()
    result = asyncio.run(run_demo(DemoOptions(driver="sim", pumps=pumps, audit_dir=directory)))
    say(f"generated {directory} with {pumps} pumps in {time.perf_counter() - t0:.1f} s "
        f"(phases: {sorted({p['phase'] for p in result.pumps})})")


def anatomy(files: list[Path]) -> dict[str, float]:
    """Cumulative per-line work, each stage on its own pass (so each figure is that stage plus the ones above)."""
    out: dict[str, float] = {}

    def run(label: str, per_line: Any) -> None:
        t0 = time.perf_counter()
        for p in files:
            with p.open("rb") as f:
                for raw in f:
                    per_line(raw[:-1])
        out[label] = time.perf_counter() - t0

    def ref_loads(line: bytes) -> Any:
        obj = _parse(line)
        assert _reference_dumps(obj) == line
        return obj

    run("read lines", lambda line: None)
    run("+ sha256 per line", lambda line: hashlib.sha256(line).hexdigest())
    run("+ json.loads (stdlib)", lambda line: (hashlib.sha256(line).hexdigest(), json.loads(line)))
    run("+ stdlib canonical check (json.loads + json.dumps): before",
        lambda line: (hashlib.sha256(line).hexdigest(), ref_loads(line)))
    run("+ stdlib record_hash (2nd dumps + sha256): the per-line core before",
        lambda line: (hashlib.sha256(line).hexdigest(), record_hash(ref_loads(line))))
    if _FAST_CODEC is not None:
        decode, _ = _FAST_CODEC
        run("+ msgspec decode", lambda line: (hashlib.sha256(line).hexdigest(), decode(line)))
    run("+ loads_line (msgspec decode + encode + compare)",
        lambda line: (hashlib.sha256(line).hexdigest(), loads_line(line)))

    def core(line: bytes) -> Any:
        rec = loads_line(line)
        return hashlib.sha256(line).hexdigest(), line_content_hash(line, rec)

    run("+ line_content_hash (cut from the line, 1 sha256): the per-line core after", core)
    return out


def cpu_s() -> float:
    """CPU seconds of this process and of its waited-for children (worker processes, sha256sum, the CLI)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Any) -> tuple[float, float, Any]:
    c0, t0 = cpu_s(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, cpu_s() - c0, out


def cli_verify(log: Path, jobs: int) -> None:
    run = "import sys; from driverd.cli.main import main; sys.argv = ['driverd', *sys.argv[1:]]; main()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-c", run, "audit", "verify", str(log), "--jobs", str(jobs)], check=True,
                   stdout=subprocess.DEVNULL, env=env)


BEFORE_SNIPPET = """
import json, resource, sys, time
from pathlib import Path
from driverd.audit.reader import iter_lines
from driverd.audit.replay import replay_lines
from driverd.audit.verify import verify_log

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

log, out = Path(sys.argv[1]), {}
c, t = cpu(), time.perf_counter()
ok = verify_log(log).ok
out["verify"] = [time.perf_counter() - t, cpu() - c, ok]
c, t = cpu(), time.perf_counter()
ok = replay_lines(iter_lines(log)).ok
out["replay"] = [time.perf_counter() - t, cpu() - c, ok]
print(json.dumps(out))
"""


REPLAY_ANATOMY_SNIPPET = """
import gc, json, resource, sys, time
from pathlib import Path
from driverd.audit.reader import iter_lines
from driverd.audit.replay import replay_lines, replay_records
from driverd.audit.report import ReportBuilder
from driverd.core import machine, records

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

log, rounds = Path(sys.argv[1]), int(sys.argv[2])
recs = [line.record for line in iter_lines(log)]
proto = machine.parse_protocol(next(r for r in recs if r["event"] == "library_loaded")["text"]) \
    if hasattr(machine, "parse_protocol") else None
if proto is None:
    from driverd.core.protocol import parse_protocol
    proto = parse_protocol(next(r for r in recs if r["event"] == "library_loaded")["text"])
inputs = [r for r in recs if r.get("event") in records.INPUT_EVENTS]
events = [(r["pump_id"], records.event_from_record(r)) for r in inputs]
no_snapshots = [r for r in recs if r.get("event") not in ("state_snapshot", "state_delta")]

def decode():
    for _ in iter_lines(log):
        pass

def to_events():
    for r in inputs:
        records.event_from_record(r)

def fold():
    states = {}
    for pump, event in events:
        state = states.get(pump)
        states[pump], _ = machine.step(state if state is not None else machine.initial_state(pump), event, proto)

def report():
    b = ReportBuilder()
    for r in recs:
        b.add(r)

def from_decoded():
    assert replay_records(recs).ok

def no_snaps():
    assert replay_records(no_snapshots).ok

def whole():
    assert replay_lines(iter_lines(log)).ok

stages = {"decode (iter_lines)": decode, "event_from_record (inputs)": to_events, "core fold (machine.step)": fold,
          "report builder alone": report, "replay of decoded records, snapshots left out": no_snaps,
          "replay of decoded records": from_decoded, "audit replay (decode + replay)": whole}
best = {k: float("inf") for k in stages}
for _ in range(rounds):
    for k, fn in stages.items():
        gc.collect()
        c = cpu()
        fn()
        best[k] = min(best[k], cpu() - c)
print(json.dumps({"records": len(recs), "inputs": len(inputs), "best": best}))
"""


def replay_anatomy(src: Path, log: Path, rounds: int) -> dict[str, Any]:
    """Where replay's time goes, per record (CPU, best of rounds), for the checkout in src, in a subprocess."""
    done = subprocess.run([sys.executable, "-c", REPLAY_ANATOMY_SNIPPET, str(log), str(rounds)], cwd=src,
                          env={**os.environ, "PYTHONPATH": str(src)}, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def before_round(src: Path, log: Path) -> dict[str, list[Any]]:
    """One verify and one replay by the checkout in src, timed inside its own process."""
    done = subprocess.run([sys.executable, "-c", BEFORE_SNIPPET, str(log)], cwd=src, env={**os.environ,
                          "PYTHONPATH": str(src)}, check=True, capture_output=True, text=True)
    result: dict[str, list[Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["verify"][2] and result["replay"][2], result
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "driverd-bench-verify-log")
    ap.add_argument("--pumps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=default_workers())
    ap.add_argument("--replay-jobs", type=int, default=2, help="worker processes of the parallel replay row")
    ap.add_argument("--replay-only", action="store_true",
                    help="only sha256sum and the two replay rows (no verify rows, no anatomies): a short run")
    ap.add_argument("--before", type=Path, help="an earlier checkout to time side by side")
    args = ap.parse_args()
    say("machine:", machine(args.log.parent))
    say(f"msgspec fast path: {'on' if _FAST_CODEC is not None else 'OFF (msgspec not installed)'}; jobs {args.jobs}")
    if not (args.log.is_dir() and list_segments(args.log)):
        make_log(args.log, args.pumps)
    files = [p for _, p in list_segments(args.log)]
    size = warm(files)
    records = verify_log(args.log).records

    def sha() -> None:
        sha256sum_seconds(files)

    def ver1() -> None:
        rep = verify_log(args.log)
        assert rep.ok and rep.records == records, rep.failure

    def verj() -> None:
        rep = verify_log(args.log, workers=args.jobs)
        assert rep.ok and rep.records == records, rep.failure

    def decode() -> None:
        for _ in iter_lines(args.log):
            pass

    replay_ok: list[bool] = []

    def replay() -> None:
        replay_ok.append(replay_lines(iter_lines(args.log)).ok)

    # The parallel replay must give the sequential result exactly, and run in parallel (not fall back).
    info = ReplayInfo()
    par = replay_log(args.log, jobs=args.replay_jobs, info=info)
    same = par.as_dict() == replay_lines(iter_lines(args.log)).as_dict()
    say(f"parallel replay, --jobs {args.replay_jobs}: {info.mode} {info.reason}, cut at snapshot seq(s) {info.slices}; "
        f"result equal to the sequential one: {same}")
    assert same and info.mode == "parallel", info

    par_cpu: list[tuple[float, list[float]]] = []  # (this process, each worker) per round

    def replay_par() -> None:
        got = ReplayInfo()
        replay_ok.append(replay_log(args.log, jobs=args.replay_jobs, info=got).ok)
        assert got.mode == "parallel", got
        par_cpu.append((got.cpu_parent, got.cpu_workers))

    contenders: dict[str, Any] = {
        "sha256sum (coreutils, whole files)": sha,
        "verify_log, 1 process": ver1,
        f"verify_log, --jobs {args.jobs} (what `audit verify` runs)": verj,
        f"`driverd audit verify --jobs {args.jobs}` (whole command: interpreter, imports)":
            lambda: cli_verify(args.log, args.jobs),
        "decode only (iter_lines)": decode,
        "`audit replay` (iter_lines + replay_lines)": replay,
        f"`audit replay --jobs {args.replay_jobs}` (replay_log: cut at snapshots)": replay_par,
    }
    if args.replay_only:
        contenders = {k: v for k, v in contenders.items() if "replay" in k or k.startswith("sha256sum")}
    walls: dict[str, list[float]] = {k: [] for k in contenders}
    cpus: dict[str, list[float]] = {k: [] for k in contenders}
    before_labels = {"verify": f"before ({args.before}): verify_log", "replay": f"before ({args.before}): replay"}
    if args.before:
        for label in before_labels.values():
            walls[label], cpus[label] = [], []
    for _ in range(args.rounds):
        for label, fn in contenders.items():
            w, c, _ = timed(fn)
            walls[label].append(w)
            cpus[label].append(c)
        if args.before:
            for what, (w, c, _) in before_round(args.before, args.log).items():
                walls[before_labels[what]].append(w)
                cpus[before_labels[what]].append(c)
    t0 = time.perf_counter()
    for p in files:
        hashlib.sha256(p.read_bytes()).hexdigest()
    t_hashlib = time.perf_counter() - t0
    mb = size / 1e6
    ref = median(walls["sha256sum (coreutils, whole files)"])
    say(f"\nlog: {args.log}, {len(files)} segment(s), {records:,} records, {mb:.1f} MB "
        f"({size / records:.0f} B/record); replay ok: {all(replay_ok)}; median of {args.rounds}\n")
    rows = []
    for label in walls:
        w, c = median(walls[label]), median(cpus[label])
        rows.append([label, f"{w:.3f}", f"{c:.3f}", f"{records / w:,.0f}", f"{mb / w:.1f}", f"{ref / w:.3f}"])
    rows.insert(1, ["hashlib.sha256 (whole files, in-process)", f"{t_hashlib:.3f}", "", f"{records / t_hashlib:,.0f}",
                    f"{mb / t_hashlib:,.0f}", f"{ref / t_hashlib:.3f}"])
    say(table(["", "wall s", "CPU s", "records/s", "MB/s", "speed vs sha256sum"], rows))
    seq_w = median(walls["`audit replay` (iter_lines + replay_lines)"])
    par_w = median(walls[f"`audit replay --jobs {args.replay_jobs}` (replay_log: cut at snapshots)"])
    parent = median([p for p, _ in par_cpu])
    workers = [median([w[k] for _, w in par_cpu]) for k in range(len(par_cpu[0][1]))]
    seq_cpu = median(cpus["`audit replay` (iter_lines + replay_lines)"])
    # With as many idle cores as processes, the wall is the slowest process; on 2 cores, at least half the CPU.
    ideal = max([parent, *workers, (parent + sum(workers)) / os.cpu_count()])  # type: ignore[operator]
    say(f"\nparallel replay, --jobs {args.replay_jobs}: wall {par_w / seq_w:.2f} x the sequential replay's in the "
        f"same rounds; CPU (median) this process {parent:.2f} s (plan, report, merge), workers "
        f"{', '.join(f'{w:.2f}' for w in workers)} s; sequential {seq_cpu:.2f} s. On {os.cpu_count()} idle cores "
        f"(from the CPU figures, not measured): {ideal:.2f} s = {records / ideal:,.0f} records/s, "
        f"{seq_cpu / ideal:.2f} x the sequential replay's CPU")
    if args.replay_only:
        say("\nload at end:", machine())
        return
    say("\nanatomy of the per-line work (one pass each, cumulative):\n")
    an = anatomy(files)
    say(table(["stage", "seconds", "records/s", "speed vs sha256sum"],
              [[k, f"{v:.3f}", f"{records / v:,.0f}", f"{ref / v:.4f}"] for k, v in an.items()]))
    say("\nreplay anatomy: CPU per record, best of rounds, each stage its own pass (this checkout"
        f"{' | before' if args.before else ''}):\n")
    mine = replay_anatomy(ROOT, args.log, args.rounds)
    theirs = replay_anatomy(args.before, args.log, args.rounds) if args.before else None
    n = mine["records"]
    head = ["stage", "us/record", "records/s by CPU"] + (["before us/record", "before records/s"] if theirs else [])
    arows = []
    for k, v in mine["best"].items():
        row = [k, f"{v / n * 1e6:.2f}", f"{n / v:,.0f}"]
        if theirs:
            b = theirs["best"][k]
            row += [f"{b / n * 1e6:.2f}", f"{n / b:,.0f}"]
        arows.append(row)
    say(table(head, arows))
    say(f"({n:,} records, {mine['inputs']:,} of them core inputs; per-record figures divide by all records)")
    say("\nload at end:", machine())


if __name__ == "__main__":
    main()
