"""The demo course's audit log, record for record, by this checkout and by an earlier one (`--before DIR`).

Runs the whole 5-day `sim://` demo course at `--poll S` (default 1 s) in virtual time in each checkout (each in
its own process, into its own directory) and compares the logs field by field, leaving out only what depends on
the run's fresh signing key (hashes, signatures, the key's fingerprint and public key, a snapshot parent's line
hash). A speed-up that changes no decision and no record leaves 0 differing records.

usage: python bench/same_log.py --before DIR [--poll S] [--hours H] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, say

RUN = """
import asyncio, sys
from datetime import timedelta
from pathlib import Path
import driverd.runtime.demo as demo
hours, poll, out = float(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
if hours > 0:
    watch = demo._watch_courses
    async def short(daemon, clock, progress, limit, total):
        return await watch(daemon, clock, progress, demo.START + timedelta(hours=hours), total)
    demo._watch_courses = short
r = asyncio.run(demo.run_demo(demo.DemoOptions(driver="sim", poll_period_s=poll, work_dir=out)))
print(r.pumps[0]["phase"], r.pumps[0]["polls"], r.audit_dir)
"""

# Fields that depend on the run's own signing key (a fresh one per demo run), not on what the course did.
KEYED = {"hash", "prev", "head", "signature", "sig", "key_fingerprint", "public_key", "prev_segment_hash",
         "line_sha256"}


def records(audit_dir: Path) -> list[dict[str, Any]]:
    out = []
    for seg in sorted(audit_dir.glob("audit-*.jsonl")):
        out.extend(json.loads(line) for line in seg.read_text().splitlines() if line.strip())
    return out


def unkeyed(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in rec.items() if k not in KEYED}
    if isinstance(out.get("parent"), dict):
        out["parent"] = {k: v for k, v in out["parent"].items() if k not in KEYED}
    return out


def run(src: Path, hours: float, poll: float, out: Path) -> str:
    done = subprocess.run([sys.executable, "-c", RUN, str(hours), str(poll), str(out)], cwd=src, check=True,
                          env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="an earlier checkout (git archive main | tar -x)")
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--hours", type=float, default=0.0, help="only the first H virtual hours (0: the whole course)")
    ap.add_argument("--work", type=Path, help="where the two runs go (default: a new temp dir)")
    args = ap.parse_args()
    say("machine:", machine())
    work = args.work or Path(tempfile.mkdtemp(prefix="same-log-"))
    here = Path(__file__).resolve().parents[1]
    logs = {}
    for name, src in (("after", here), ("before", args.before.resolve())):
        (work / name).mkdir(parents=True, exist_ok=True)
        say(f"  {name}: {run(src, args.hours, args.poll, work / name)}")
        logs[name] = records(work / name / "audit")
    a, b = logs["after"], logs["before"]
    differing = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if unkeyed(x) != unkeyed(y)]
    say(f"records: after {len(a)}, before {len(b)}; differing (keyed fields left out): {len(differing)}")
    for i in differing[:5]:
        say(f"  record {i}: after {unkeyed(a[i])}\n             before {unkeyed(b[i])}")
    say("events:", ", ".join(sorted({r["event"] for r in a})))
    say("load at end:", machine())
    sys.exit(0 if not differing and len(a) == len(b) else 1)


if __name__ == "__main__":
    main()
