"""What a state snapshot holds, field by field, and what snapshots and deltas add to the log per day (issue #12).

For each copy `bench/synth_log.py --restart-at ...` kept (OUT/at-<D>d/clean), the newest `state_snapshot`:
its line's bytes and each field's (canonical JSON, as logged), the ledger's courses (started, retired, ended,
patients) and schedule ids in `versions`; and the bytes of every `state_snapshot` and `state_delta` line of the
last 24 h of the log (what the daemon's checkpointing adds to the log per day at that age).

usage: python bench/snapshot_size.py OUT [OUT2 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

from driverd.audit.canonical import parse_ts
from driverd.audit.segments import list_segments
from driverd.core.canonical import canonical_bytes


def _snapshot_lines(audit: Path) -> list[bytes]:
    out = []
    for _, path in list_segments(audit)[-80:]:  # a segment per snapshot or delta: ~25 a day
        with path.open("rb") as f:
            for n, line in enumerate(f):
                if n > 16:
                    break  # a snapshot or delta opens its segment (writer.rotate)
                if b'"event":"state_snapshot"' in line or b'"event":"state_delta"' in line:
                    out.append(line.rstrip(b"\n"))
    return out


def measure(copy: Path) -> dict[str, Any]:
    lines = _snapshot_lines(copy)
    snaps = [line for line in lines if b'"event":"state_snapshot"' in line]
    rec = json.loads(snaps[-1])
    fields = {k: len(canonical_bytes(rec[k])) for k in ("states", "ledger", "versions", "schedules", "library")}
    ledger = rec["ledger"]
    end = parse_ts(rec["ts"])
    day = [line for line in lines if parse_ts(json.loads(line)["ts"]) > end - timedelta(hours=24)]
    return {"copy": str(copy), "snapshot_bytes": len(snaps[-1]), "fields": fields,
            "ledger": {k: len(v) for k, v in ledger.items()}, "versions": len(rec["versions"]),
            "last_24h": {"records": len(day), "bytes": sum(len(x) for x in day),
                         "deltas": sum(b'"event":"state_delta"' in x for x in day),
                         "delta_bytes": sum(len(x) for x in day if b'"event":"state_delta"' in x),
                         # format 1: `ledger` and `versions` whole; format 2: `ledger_patch`, `versions_patch`
                         "delta_ledger_bytes": _field_bytes(day, "ledger", "ledger_patch"),
                         "delta_versions_bytes": _field_bytes(day, "versions", "versions_patch")}}


def _field_bytes(lines: list[bytes], *names: str) -> int:
    """Bytes of the named fields (canonical JSON, as logged) in the delta lines."""
    recs = [json.loads(x) for x in lines if b'"event":"state_delta"' in x]
    return sum(len(canonical_bytes(r[n])) for r in recs for n in names if n in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="+", help="bench/synth_log.py output directories")
    args = ap.parse_args()
    print(machine(), flush=True)
    for out in args.out:
        for copy in sorted(out.glob("at-*d"), key=lambda p: float(p.name[3:-1])):
            print(json.dumps(measure(copy / "clean"), sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
