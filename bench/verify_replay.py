"""Audit verify and replay throughput (records/s, MB/s) vs `sha256sum` over the same files (goal verify >= 0.3).

The log is real: one `driverd demo` run on sim:// with P pumps (default 7: about 100k records, two segments),
i.e. whole 5-day courses with signed checkpoints. It is generated once (about 30 s) and kept in --log DIR for
reuse. All files are read once first, so every contender reads from the page cache.

Besides verify and replay, an "anatomy" of the per-line work shows where the floor is: reading lines,
json.loads, the canonical-form check (a json.dumps), SHA-256 per line.

usage: python bench/verify_replay.py [--log DIR] [--pumps P] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, say, sha256sum_seconds, table, warm

from driverd.audit.canonical import loads_line, record_hash
from driverd.audit.reader import iter_lines
from driverd.audit.replay import replay_lines
from driverd.audit.segments import list_segments
from driverd.audit.verify import verify_log


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

    run("read lines", lambda line: None)
    run("+ sha256 per line", lambda line: hashlib.sha256(line).hexdigest())
    run("+ json.loads", lambda line: (hashlib.sha256(line).hexdigest(), json.loads(line)))
    run("+ canonical check (loads_line: 1 dumps)", lambda line: (hashlib.sha256(line).hexdigest(), loads_line(line)))
    run("+ record_hash (2nd dumps + sha256): verify's per-line core",
        lambda line: (hashlib.sha256(line).hexdigest(), record_hash(loads_line(line))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "driverd-bench-verify-log")
    ap.add_argument("--pumps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    say("machine:", machine(args.log.parent))
    if not (args.log.is_dir() and list_segments(args.log)):
        make_log(args.log, args.pumps)
    files = [p for _, p in list_segments(args.log)]
    size = warm(files)
    t_sha, t_ver, t_rep = [], [], []
    records = 0
    replay_ok = None
    for _ in range(args.rounds):
        t_sha.append(sha256sum_seconds(files))
        t0 = time.perf_counter()
        rep = verify_log(args.log)
        t_ver.append(time.perf_counter() - t0)
        assert rep.ok, rep.failure
        records = rep.records
        t0 = time.perf_counter()
        res = replay_lines(iter_lines(args.log))
        t_rep.append(time.perf_counter() - t0)
        replay_ok = res.ok
    sha, ver, rpl = median(t_sha), median(t_ver), median(t_rep)
    t0 = time.perf_counter()
    for p in files:
        hashlib.sha256(p.read_bytes()).hexdigest()
    t_hashlib = time.perf_counter() - t0
    mb = size / 1e6
    say(f"\nlog: {args.log}, {len(files)} segment(s), {records:,} records, {mb:.1f} MB "
        f"({size / records:.0f} B/record); replay ok: {replay_ok}; median of {args.rounds}\n")
    rows = [
        ["sha256sum (coreutils, whole files)", f"{sha:.3f}", f"{records / sha:,.0f}", f"{mb / sha:,.0f}", "1"],
        ["hashlib.sha256 (whole files, in-process)", f"{t_hashlib:.3f}", f"{records / t_hashlib:,.0f}",
         f"{mb / t_hashlib:,.0f}", f"{sha / t_hashlib:.3f}"],
        ["driverd audit verify (verify_log)", f"{ver:.3f}", f"{records / ver:,.0f}", f"{mb / ver:.1f}",
         f"{sha / ver:.4f}"],
        ["driverd audit replay (iter_lines + replay_lines)", f"{rpl:.3f}", f"{records / rpl:,.0f}",
         f"{mb / rpl:.1f}", f"{sha / rpl:.4f}"],
    ]
    say(table(["", "seconds", "records/s", "MB/s", "speed vs sha256sum"], rows))
    say("\nanatomy of the per-line work (one pass each, cumulative):\n")
    an = anatomy(files)
    say(table(["stage", "seconds", "records/s", "speed vs sha256sum"],
              [[k, f"{v:.3f}", f"{records / v:,.0f}", f"{sha / v:.4f}"] for k, v in an.items()]))
    say("\nload at end:", machine())


if __name__ == "__main__":
    main()
