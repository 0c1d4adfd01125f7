"""Run by test_crash.py in a subprocess: append records forever, printing each durably acknowledged seq."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.writer import AuditConfig, AuditWriter


def main() -> None:
    directory, key_path = Path(sys.argv[1]), Path(sys.argv[2])
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    t = [datetime(2026, 3, 2, tzinfo=UTC)]

    def clock() -> datetime:
        t[0] += timedelta(seconds=1)
        return t[0]

    cfg = AuditConfig(segment_max_records=40, checkpoint_every_records=7, group_commit_records=5, group_commit_ms=50)
    w = AuditWriter.open(directory, cfg, key, clock)
    n = 0
    while True:
        n += 1
        durable = n % 3 != 0
        rec = w.append("work", pump_id="bed-1", course_id="c-1", durable=durable, n=n, pad="x" * (n % 50) * 40)
        if durable:
            sys.stdout.write(f"{rec['seq']} {n}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
