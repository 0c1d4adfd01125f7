"""SIGTERM stops `driverd run` even when its stderr is a closed pipe, and the `daemon_stop` record names the
pumps left running with their rate; files are created with safe modes whatever the umask, and unsafe modes of
trusted/secret files refuse a production start (bench: a warning)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from driverd.audit.reader import iter_records
from driverd.audit.segments import list_segments
from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.cli.main import app
from driverd.runtime.config import load_config
from driverd.runtime.control import request
from driverd.runtime.demo import SYRINGE, demo_schedule
from driverd.runtime.filemodes import unsafe_file_modes
from driverd.signing import generate_keypair
from drivers.base import PumpState
from simulators.clock import SystemClock
from simulators.faults import FaultPlan
from simulators.pump import PumpModel

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
TIMEOUT = 60.0


@pytest.fixture
def d() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ddsm", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def write_config(d: Path, url: str, *, trust: Path = CONFIG / "keys" / "demo" / "trusted",
                 key: Path | None = None, run_mode: str | None = None) -> Path:
    path = d / "driverd.toml"
    path.write_text(
        f'[daemon]\nprotocol = "{CONFIG}/protocols/ketamine-burst.toml"\ntrust_dir = "{trust}"\n'
        f'audit_dir = "audit"\ncontrol_socket = "ctl.sock"\npoll_period_s = 0.1\nlink_timeout_s = 5\n'
        f'deadman_s = 0\ndriver_timeout_s = 0.5\n'
        + (f'audit_key = "{key}"\n' if key else "") + (f'mode = "{run_mode}"\n' if run_mode else "")
        + f'\n[[pumps]]\nid = "bed-1"\nurl = "{url}"\n',
        encoding="utf-8",
    )
    return path


# ------------------------------------------------------------------------------------------ signals


def spawn(cfg: Path) -> subprocess.Popen[bytes]:
    """`driverd run` with its stderr on a pipe this test can close."""
    return subprocess.Popen([sys.executable, "-m", "driverd.cli.main", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigterm_with_stderr_a_closed_pipe_stops_and_records_running_pumps(d: Path) -> None:
    async def main() -> None:
        from simulators.newera import serve_newera

        model = PumpModel(SystemClock(), fill_volume_ml=Decimal("20"),
                          diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]))
        async with serve_newera(model, FaultPlan(alarm_hook=model.inject_alarm), tcp_port=0) as ep:
            cfg = write_config(d, ep.url)
            with umask(0o000):  # and the daemon's files get safe modes even so
                proc = spawn(cfg)
            try:
                assert proc.stderr is not None
                await until(lambda: (d / "ctl.sock").exists() or proc.poll() is not None, "the control socket")
                now = datetime.now(UTC).replace(microsecond=0)
                doc = demo_schedule("bed-1", 1, now - timedelta(minutes=5))
                reply = await request(d / "ctl.sock", {"op": "push", "schedule": doc})
                assert reply["ok"] is True, reply
                await until(lambda: model.status().state is PumpState.INFUSING, "the pump infusing")
                while True:  # until the daemon's own read of the pump says infusing
                    pump = (await request(d / "ctl.sock", {"op": "status"}))["pumps"][0]
                    if pump["pump_state"] == "infusing":
                        break
                    await asyncio.sleep(0.05)
                rate = pump["pump_rate_ml_per_h"]
                proc.stderr.close()  # nobody reads the daemon's stderr any more: every write is EPIPE
                # Make it write to the dead pipe before the signal too (each request is logged).
                assert (await request(d / "ctl.sock", {"op": "status"}))["ok"] is True
                proc.send_signal(signal.SIGTERM)
                await until(lambda: proc.poll() is not None, "the daemon to exit after SIGTERM")
                assert proc.returncode == 0
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(TIMEOUT)
            assert model.status().state is PumpState.INFUSING  # a clean stop leaves the course running
        records = [r for _, p in list_segments(d / "audit") for r in iter_records(p)]
        stop = [r for r in records if r["event"] == "daemon_stop"]
        assert len(stop) == 1
        assert stop[0]["left_running"] == [{"pump_id": "bed-1", "rate_ml_per_h": rate}]
        assert Decimal(rate) > 0
        assert mode(d / "audit") == 0o750
        assert all(mode(p) == 0o640 for _, p in list_segments(d / "audit"))

    asyncio.run(asyncio.wait_for(main(), 120))


# ------------------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_generated_keys_have_safe_modes_whatever_the_umask(d: Path, mask: int) -> None:
    with umask(mask):
        priv, pub = generate_keypair(d / "new" / "keys", "audit")
        result = CliRunner().invoke(app, ["keys", "generate", str(d / "cli-keys"), "--name", "signer"])
    assert result.exit_code == 0, result.output
    for key_dir, private, public in ((d / "new" / "keys", priv, pub),
                                     (d / "cli-keys", d / "cli-keys" / "signer.key", d / "cli-keys" / "signer.pub")):
        assert mode(key_dir) == 0o700
        assert mode(private) == 0o600
        assert mode(public) == 0o644
    assert mode(d / "new") == 0o700  # a missing parent too


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_audit_directory_and_segments_have_safe_modes_whatever_the_umask(d: Path, mask: int) -> None:
    with umask(mask), AuditWriter.open(d / "var" / "audit", AuditConfig(segment_max_records=3), None,
                                       lambda: datetime.now(UTC)) as w:
        for i in range(5):  # rotates: several segments
            w.append("note", pump_id=None, course_id=None, durable=True, i=i)
    assert mode(d / "var") == 0o750 and mode(d / "var" / "audit") == 0o750
    segments = list_segments(d / "var" / "audit")
    assert len(segments) > 1
    assert all(mode(p) == 0o640 for _, p in segments)


def test_unsafe_modes_refuse_production_and_warn_in_bench(d: Path) -> None:
    trust = d / "trusted"
    trust.mkdir()
    shutil.copy(CONFIG / "keys" / "demo" / "trusted" / next(
        p.name for p in (CONFIG / "keys" / "demo" / "trusted").glob("*.pub")), trust)
    key, _ = generate_keypair(d / "keys", "audit")
    cfg = write_config(d, "sim://bed-1", trust=trust, key=key)
    assert unsafe_file_modes(load_config(cfg)) == []
    os.chmod(trust, 0o777)
    os.chmod(key, 0o640)
    problems = unsafe_file_modes(load_config(cfg))
    assert any("trust_dir" in p and "world-writable" in p and "0777" in p for p in problems), problems
    assert any("audit_key" in p and "0640" in p for p in problems), problems

    res = subprocess.run([sys.executable, "-m", "driverd.cli.main", "run", "--config", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 1
    assert "cannot start in production mode" in res.stderr and "world-writable" in res.stderr
    assert not (d / "audit").exists()  # refused before anything was written
    # Bench mode: the same files only warn, and the daemon runs (stopped again by SIGTERM).
    cfg = write_config(d, "sim://bed-1", trust=trust, key=key, run_mode="bench")
    proc = subprocess.Popen([sys.executable, "-m", "driverd.cli.main", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        asyncio.run(until(lambda: (d / "ctl.sock").exists() or proc.poll() is not None, "the control socket"))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 0, err
    assert "unsafe_file_mode" in err and "world-writable" in err


def test_config_mode_must_be_production_or_bench(d: Path) -> None:
    from driverd.core.errors import ConfigError

    cfg = write_config(d, "sim://bed-1", run_mode="lenient")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert any(p.path == "daemon.mode" for p in exc.value.problems)
    assert load_config(write_config(d, "sim://bed-1")).mode == "production"
