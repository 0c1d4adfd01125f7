"""Log size, restart time and verify time before and after `driverd audit archive` (issue 12, item 2).

Makes logs with the real demo path (tests/audit/archive_log.py: `run_demo`'s 5-day course on N sim pumps, then a
daemon restarted on the same log with a new course on bed-1, still running), archives everything whose courses
have ended, and times in the same run, before and after: `recover()` as shipped (from the newest snapshot), the
same from the live log's first record (snapshots ignored: the cost that grows with history), and `verify_log`.
Asserts that recovery gives the same states, versions and ledger before and after.

usage: python bench/archive.py [--pumps 2 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.audit.archive_log makes the logs

from common import machine, median, say, table

from driverd.audit.archive import archive_log, parse_before
from driverd.audit.reader import iter_lines
from driverd.audit.segments import list_segments, segment_number
from driverd.audit.snapshot import SNAPSHOT_EVENT, read_snapshot
from driverd.audit.verify import verify_log
from driverd.runtime import recovery
from driverd.runtime.demo import DEMO_TRUST
from driverd.signing import TrustStore, load_private_key, load_public_key
from tests.audit.archive_log import make_log


def timed(fn, rounds: int):  # type: ignore[no-untyped-def]
    walls, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
    return median(walls), out


def measure(audit: Path, trust: TrustStore, rounds: int) -> tuple[int, float, float, float, recovery.Recovered]:
    size = sum(p.stat().st_size for _, p in list_segments(audit))
    shipped, rec = timed(lambda: recovery.recover(audit, trust), rounds)
    # From the live log's first snapshot (before archiving: the one written at the first start, seq ~4; after:
    # the one the live log opens with), as if no later snapshot existed: the cost that grows with history.
    line = next(x for x in iter_lines(audit) if x.record["event"] == SNAPSHOT_EVENT)
    number = segment_number(line.file) or 1
    # A fresh Snapshot per call: recovery keeps (and extends) the ledger of the one it is given.
    with mock.patch.object(recovery, "newest_snapshot", lambda _d: read_snapshot(line.record, number)):
        whole, rec2 = timed(lambda: recovery.recover(audit, trust), rounds)
    assert rec2.states == rec.states
    ver, report = timed(lambda: verify_log(audit), rounds)
    assert report.ok
    return size, shipped, whole, ver, rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pumps", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="driverd-archive-"))
    say("machine:", machine(work))
    trust = TrustStore.load(DEMO_TRUST)
    rows = []
    for pumps in sorted(args.pumps):
        made = make_log(work / f"p{pumps}", pumps=pumps)
        b_size, b_ship, b_whole, b_ver, before = measure(made.audit, trust, args.rounds)
        t0 = time.perf_counter()
        res = archive_log(made.audit, parse_before("2027-01-01"), work / f"p{pumps}" / "archive",
                          load_private_key(made.key), public_key=load_public_key(made.pub))
        took = time.perf_counter() - t0
        a_size, a_ship, a_whole, a_ver, after = measure(made.audit, trust, args.rounds)
        assert after.states == before.states and after.versions == before.versions
        assert after.ledger.to_fields() == before.ledger.to_fields()
        rows.append([pumps, f"{len(res.archived)} of {len(res.archived) + len(list_segments(made.audit))}",
                     f"{b_size / 1e6:.1f} MB → {a_size / 1e6:.2f} MB", f"{took:.2f} s",
                     f"{b_ship:.3f} s → {a_ship:.3f} s", f"{b_whole:.2f} s → {a_whole:.3f} s",
                     f"{b_ver:.2f} s → {a_ver:.3f} s"])
        say(rows[-1])
    say()
    say(table(["pumps", "segments archived", "live log", "archive run", "restart as shipped (newest snapshot)",
               "recover from the live log's first record", "audit verify"], rows))
    say("load at end:", machine())


if __name__ == "__main__":
    main()
