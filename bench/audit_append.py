"""Audit append: the writer with group commit vs raw os.write + fdatasync of the SAME bytes in the SAME batching.

1. Throughput. The writer appends N telemetry records (pump_report/tick pairs, durable=False, signed checkpoints
   every 1000 records) with group commit every B records (the time trigger is set out of reach so batching is
   deterministic). A deterministic clock makes the output byte-identical from run to run, so an untimed first
   run records the file offset at every fdatasync; the reference then writes the same lines (one os.write per
   line, as the writer does) and fdatasyncs at the same offsets. ratio = reference time / writer time
   (= writer throughput / raw throughput; goal >= 0.8). Also on tmpfs (/dev/shm), where fdatasync is nearly
   free: that is the writer's CPU ceiling.
2. Durable latency: durable=True appends (write + fdatasync before returning), each timed, p50/p99, vs a raw
   os.write + fdatasync of the same line; interleaved in rounds so drift hits both alike.

usage: python bench/audit_append.py [--records N] [--dir PATH] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import StepClock, machine, median, percentile, say, table, telemetry_records
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import driverd.audit.writer as writer_mod
from driverd.audit.writer import AuditConfig, AuditWriter

# A fixed key: Ed25519 signatures are deterministic, so the log bytes repeat exactly.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def write_log(directory: Path, records: list[tuple[str, dict[str, Any]]], batch: int) -> None:
    cfg = AuditConfig(group_commit_records=batch, group_commit_ms=3_600_000, checkpoint_every_records=1000,
                      checkpoint_every_s=10**9)
    w = AuditWriter.open(directory, cfg, KEY, StepClock())
    for name, fields in records:
        w.append(name, pump_id="bed-1", course_id="demo-bed-1", durable=False, **fields)
    w.close()


class _RecordingOs:
    """Stands in for `os` inside the writer module during the untimed run: notes the offset of each sync."""

    def __init__(self) -> None:
        self.offsets: list[int] = []

    def fdatasync(self, fd: int) -> None:
        self.offsets.append(os.lseek(fd, 0, os.SEEK_END))
        os.fdatasync(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def sync_offsets(directory: Path, records: list[tuple[str, dict[str, Any]]], batch: int) -> tuple[bytes, list[int]]:
    rec = _RecordingOs()
    writer_mod.os = rec  # type: ignore[assignment]
    try:
        write_log(directory, records, batch)
    finally:
        writer_mod.os = os
    data = b"".join(p.read_bytes() for p in sorted(directory.glob("audit-*.jsonl")))
    return data, rec.offsets


def raw_write(path: Path, lines: list[bytes], offsets: list[int]) -> None:
    """Same lines, one os.write each, fdatasync at the writer's offsets; create + dir fsync like the writer."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
    os.fsync(dir_fd)
    at, k = 0, 0
    for line in lines:
        os.write(fd, line)
        at += len(line)
        while k < len(offsets) and offsets[k] == at:
            os.fdatasync(fd)
            k += 1
    os.close(fd)
    os.close(dir_fd)


def throughput(base: Path, n: int, batches: list[int], rounds: int) -> list[list[Any]]:
    rows = []
    for batch in batches:
        # Small batches are slow (one fdatasync per B records): fewer records keep the run short.
        records = telemetry_records(min(n, 2000 * batch))
        ref_dir = base / f"rec-{batch}"
        data, offsets = sync_offsets(ref_dir, records, batch)
        lines = data.splitlines(keepends=True)
        t_w, t_r = [], []
        for r in range(rounds):
            d = base / f"w-{batch}-{r}"
            t0 = time.perf_counter()
            write_log(d, records, batch)
            t_w.append(time.perf_counter() - t0)
            got = b"".join(p.read_bytes() for p in sorted(d.glob("audit-*.jsonl")))
            assert got == data, "writer output differs between runs: batching would not be the same"
            shutil.rmtree(d)
            p = base / f"raw-{batch}-{r}.jsonl"
            t0 = time.perf_counter()
            raw_write(p, lines, offsets)
            t_r.append(time.perf_counter() - t0)
            p.unlink()
        shutil.rmtree(ref_dir)
        w, raw = median(t_w), median(t_r)
        rows.append([batch, len(lines), len(offsets), f"{len(data) / len(lines):.0f}",
                     f"{len(lines) / w:,.0f}", f"{len(lines) / raw:,.0f}", f"{raw / w:.3f}",
                     f"{w / len(lines) * 1e6:.1f}", f"{raw / len(lines) * 1e6:.1f}"])
    return rows


def durable_latency(base: Path, n: int, rounds: int) -> list[list[Any]]:
    records = telemetry_records(n)
    cfg = AuditConfig(checkpoint_every_records=1000, checkpoint_every_s=10**9)
    w = AuditWriter.open(base / "durable", cfg, KEY, StepClock())
    raw_path = base / "durable-raw.jsonl"
    fd = os.open(raw_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    t_w: list[float] = []
    t_r: list[float] = []
    chunk = max(1, n // rounds)
    try:
        for start in range(0, n, chunk):
            lines = []
            for name, fields in records[start:start + chunk]:
                t0 = time.perf_counter()
                rec = w.append(name, pump_id="bed-1", course_id="demo-bed-1", durable=True, **fields)
                t_w.append(time.perf_counter() - t0)
                lines.append(rec)
            seg = max((base / "durable").glob("audit-*.jsonl"))
            tail = seg.read_bytes().splitlines(keepends=True)[-len(lines):]
            for line in tail:
                t0 = time.perf_counter()
                os.write(fd, line)
                os.fdatasync(fd)
                t_r.append(time.perf_counter() - t0)
    finally:
        w.close()
        os.close(fd)
    rows = []
    for label, vals in (("writer append(durable=True)", t_w), ("raw os.write + fdatasync", t_r)):
        rows.append([label, len(vals), f"{percentile(vals, 50) * 1e3:.3f}", f"{percentile(vals, 99) * 1e3:.3f}",
                     f"{max(vals) * 1e3:.3f}"])
    rows.append(["ratio raw/writer (p50, p99)", "",
                 f"{percentile(t_r, 50) / percentile(t_w, 50):.3f}", f"{percentile(t_r, 99) / percentile(t_w, 99):.3f}",
                 ""])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--durable", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: the system temp dir)")
    ap.add_argument("--no-tmpfs", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-audit-", dir=args.dir))
    headers = ["batch B", "lines", "fdatasyncs", "bytes/line", "writer rec/s", "raw rec/s", "ratio raw/writer",
               "writer us/rec", "raw us/rec"]
    try:
        say("machine:", machine(base))
        say(f"\n## Throughput, {args.records} records, group commit every B (disk: {base})\n")
        say(table(headers, throughput(base, args.records, [1, 16, 64, 256, 1024], args.rounds)))
        if not args.no_tmpfs and Path("/dev/shm").is_dir():
            shm = Path(tempfile.mkdtemp(prefix="bench-audit-", dir="/dev/shm"))
            try:
                say(f"\n## Same on tmpfs ({shm}): fdatasync ~free, i.e. the writer's CPU cost\n")
                say(table(headers, throughput(shm, args.records, [256], args.rounds)))
            finally:
                shutil.rmtree(shm, ignore_errors=True)
        say(f"\n## Durable appends: per-record latency, {args.durable} records (disk)\n")
        say(table(["", "n", "p50 ms", "p99 ms", "max ms"], durable_latency(base, args.durable, 10)))
        say("\nload at end:", machine())
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
