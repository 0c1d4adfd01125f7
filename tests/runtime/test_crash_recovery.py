"""SIGKILL the daemon at random points of a virtual-time course, restart it from its audit log, and check:
audit verify and replay pass, nothing acknowledged is lost, no rate ever above the last verified one after a
restart, the ceiling holds, and the taper lock (stopped course) is never undone."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

from driverd.audit.reader import iter_records
from driverd.audit.replay import replay_records
from driverd.audit.segments import list_segments
from driverd.audit.verify import verify_log
from driverd.signing import generate_keypair, load_public_key

SCRIPT = Path(__file__).with_name("crash_daemon.py")
ROOT = Path(__file__).resolve().parents[2]
CEILING_RATE = Decimal("0.208")  # 500 mg/24h at 100 mg/mL, quantized down


def _run(audit: Path, keys: Path, kill_after: float | None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(audit), str(keys)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if kill_after is None:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        return out
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "ready": the daemon has started
    assert line.strip() == "ready" or time.monotonic() > deadline, line
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return ""


def _records(audit: Path) -> list[dict]:
    return [r for _, p in list_segments(audit) for r in iter_records(p)]


def test_sigkill_at_random_points_then_recover(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CRASH_SEED", "62304")))
    midcourse = 0
    for trial in range(3):
        audit = tmp_path / f"audit-{trial}"
        keys = tmp_path / f"keys-{trial}"
        generate_keypair(keys, "audit")
        for _ in range(2):
            _run(audit, keys, kill_after=rng.uniform(0.5, 3.5))
        out = _run(audit, keys, kill_after=None)
        assert "done" in out
        report = verify_log(audit, public_key=load_public_key(keys / "audit.pub"))
        assert report.ok, report.failure
        records = _records(audit)
        result = replay_records(records)
        assert result.ok, [d.as_dict() for d in result.divergences][:3]
        _check_invariants(records)
        starts = [r for r in records if r["event"] == "daemon_start"]
        assert len(starts) == 3
        stop_seq = next(r["seq"] for r in records if r["event"] == "transition" and r["to"] == "stopped")
        midcourse += any(r["seq"] < stop_seq for r in starts[1:])
    assert midcourse >= 1, "no SIGKILL landed mid-course"


def _check_invariants(records: list[dict]) -> None:
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(1, len(seqs) + 1)), "gap or duplicate in seq"
    verified = Decimal(0)
    sent: dict[int, Decimal] = {}
    restarted = False
    stopped = False
    for r in records:
        ev = r["event"]
        if ev == "daemon_start":
            restarted = seqs[0] != r["seq"]
        elif ev == "setpoint":
            rate = Decimal(r["rate_ml_per_h"])
            assert rate <= CEILING_RATE
            sent[r["setpoint_id"]] = rate
            if stopped:
                assert rate == 0, "rate raised after the course stopped (taper lock)"
            if restarted and r["intent"] == "resume":
                assert rate <= verified, f"resumed at {rate} above last verified {verified}"
        elif ev == "setpoint_result" and r.get("readback_ml_per_h") is not None:
            rb = Decimal(r["readback_ml_per_h"])
            if sent.get(r["setpoint_id"]) == rb and rb > 0:
                verified = rb
        elif ev == "transition" and r["to"] == "stopped":
            stopped = True
    assert stopped, "course never finished"
