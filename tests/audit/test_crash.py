"""Crash safety: SIGKILL a writer process at random points, reopen, verify; nothing acknowledged is lost."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driverd.audit.canonical import loads_line
from driverd.audit.verify import verify_log
from driverd.audit.writer import AuditWriter

from .conftest import StepClock, read_lines, small_config

SCRIPT = Path(__file__).with_name("crash_writer.py")
REPO = Path(__file__).resolve().parents[2]


def _run_and_kill(directory: Path, key_file: Path, kill_after: int) -> list[tuple[int, int]]:
    """Start the writer, read acknowledgements until kill_after of them (or 30 s), SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(directory), str(key_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    acked: list[tuple[int, int]] = []
    buf = b""
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        while len(acked) < kill_after and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            acked.extend((int(a), int(b)) for a, b in (x.split() for x in done))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # Whatever it printed before dying was acknowledged too.
        rest = buf + proc.stdout.read()
        acked.extend((int(a), int(b)) for a, b in (x.split() for x in rest.split(b"\n")[:-1]))
        proc.stdout.close()
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.stderr.close()
    assert acked, f"writer acknowledged nothing: {err.decode(errors='replace')}"
    return acked


def test_sigkill_at_random_points(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    rng = random.Random(20260302)
    directory = tmp_path / "log"
    all_acked: list[tuple[int, int]] = []
    for trial in range(6):
        all_acked += _run_and_kill(directory, key_file, rng.randint(1, 120))
        if trial % 2:
            # Power loss can also leave a partial line (a killed process cannot: write() completes).
            last = sorted(directory.glob("audit-*.jsonl"))[-1]
            with last.open("ab") as f:
                f.write(b'{"course_id":"c-1","event":"work","n":'[: rng.randint(1, 30)])
        w = AuditWriter.open(directory, small_config(), key, StepClock(start=StepClock().now.replace(year=2027)))
        w.close()
        report = verify_log(directory, public_key=key.public_key(), require_sealed=True)
        assert report.ok, report.failure
        on_disk = {}
        for _, line in read_lines(directory):
            rec = loads_line(line)
            on_disk[rec["seq"]] = rec
        for seq, n in all_acked:
            # every acknowledged (seq, n) from every run is on disk exactly as acknowledged
            assert seq in on_disk and on_disk[seq]["event"] == "work" and on_disk[seq]["n"] == n, (trial, seq, n)
    events = [loads_line(line)["event"] for _, line in read_lines(directory)]
    assert events.count("log_reopened") >= 6
    assert "torn_tail_truncated" in events
