"""Regenerate tests/audit/data/golden-log: python tests/audit/data/make_golden_log.py tests/audit/data/golden-log

The committed log was written by the writer as it was before the performance work (commit 1aeeb2f): the
tests check that today's writer produces the same bytes from the same inputs and that verify accepts it.
"""
import shutil, sys
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from driverd.audit.writer import AuditConfig, AuditWriter

def inputs():
    t = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    for i in range(40):
        yield "pump_report", False, {"alarms": ["near_end"] if i % 7 == 0 else [], "at": t + timedelta(seconds=60 * i),
               "delivered_ml": Decimal("0.0035") * i, "rate_ml_per_h": Decimal("0.208"), "state": "infusing"}
        yield "tick", False, {"at": t + timedelta(seconds=60 * i, microseconds=i)}
    yield "setpoint", True, {"id": 3, "rate_ml_per_h": Decimal("0.250"), "detail": "naïve → ünïcode \"quoted\" \\ tab\t",
           "nested": {"hash": "x", "a": [1, None, True, {"z": Decimal("1E+2")}]}, "zz": None, "aa": "first",
           "when": datetime(2026, 12, 1, 10, 0, tzinfo=timezone(timedelta(hours=2)))}

out = Path(sys.argv[1]); shutil.rmtree(out, ignore_errors=True)
key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ts = [datetime(2026, 12, 1, 9, 0, tzinfo=UTC)]
def clock():
    ts[0] += timedelta(seconds=30, microseconds=7)
    return ts[0]
w = AuditWriter.open(out, AuditConfig(segment_max_records=50, checkpoint_every_records=16, group_commit_records=8), key, clock)
for name, durable, fields in inputs():
    w.append(name, pump_id="bed-1", course_id="c-1", durable=durable, **fields)
w.close()
