"""Shared helpers for the bench scripts: machine description, percentiles, a markdown table, realistic records.

Benchmarks report ratios against a reference measured in the same run, so every script prints the machine and
the load average at its start and end (other engineers run test suites on the same 2 cores).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any


def fs_type(path: Path) -> str:
    """Filesystem type holding `path` (from /proc/mounts: the longest mount point that prefixes it)."""
    path = path.resolve()
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine(work_dir: Path | None = None) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = math.nan
    where = f", work dir {work_dir} on {fs_type(work_dir)}" if work_dir is not None else ""
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}{where}, load {loadavg()}"
    )


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (pastes straight into bench/README.md)."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def sha256sum_seconds(files: Sequence[Path]) -> float:
    """Wall time of the coreutils `sha256sum` over `files` (one process; spawn included, it is ~1 ms)."""
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def warm(files: Sequence[Path]) -> int:
    """Read files once so every contender reads from the page cache. Returns their total size."""
    total = 0
    for p in files:
        total += len(p.read_bytes())
    return total


class StepClock:
    """A deterministic audit clock: each call is `step` later (identical bytes from run to run)."""

    def __init__(self, start: datetime = datetime(2026, 12, 1, 9, 0, tzinfo=UTC), step_s: float = 1.0) -> None:
        self._t = start
        self._step = timedelta(seconds=step_s)

    def __call__(self) -> datetime:
        self._t += self._step
        return self._t


def telemetry_records(n: int, pump_id: str = "bed-1") -> list[tuple[str, dict[str, Any]]]:
    """n (event, fields) pairs shaped like a course's bulk traffic: alternating pump_report and tick.

    Built with the core's own event_to_record, so field names and types are exactly what the daemon logs.
    """
    from driverd.core.events import PumpReport, Tick
    from driverd.core.records import event_to_record

    t0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    out: list[tuple[str, dict[str, Any]]] = []
    delivered = Decimal("0")
    rate = Decimal("0.208")
    for i in range(n):
        at = t0 + timedelta(seconds=60 * (i // 2))
        if i % 2 == 0:
            delivered += Decimal("0.0035")
            out.append(event_to_record(PumpReport(at, "infusing", rate, delivered, ())))
        else:
            out.append(event_to_record(Tick(at)))
    return out


def say(*parts: object) -> None:
    print(*parts, flush=True)
    sys.stdout.flush()
