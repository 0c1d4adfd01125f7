"""SIGHUP reload (driverd.runtime.reload): the trust store and the live settings change, everything else is reported
and kept, a bad new config changes nothing; and `driverd run --speed N` only on a bench config."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from typer.testing import CliRunner

from driverd.cli.main import app
from driverd.runtime import oplog
from driverd.runtime.clock import ScaledClock
from driverd.runtime.config import load_config
from driverd.runtime.control import ControlServer
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import demo_schedule
from driverd.runtime.reload import LIVE, plan, reload
from driverd.runtime.service import ControlLoop, Reloader, serve, serve_config
from driverd.signing import generate_keypair, sign_document
from simulators.world import World

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
START = datetime(2026, 12, 1, 8, 55, tzinfo=UTC)
TIMEOUT = 30.0


@pytest.fixture
def d() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dd", dir="/tmp"))  # Unix socket paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    oplog.configure_logging(stream, json_output=True)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                       if not isinstance(h, oplog.StructlogHandler)]


def config_text(trust: Path = CONFIG / "keys" / "demo" / "trusted", *, poll: float = 0.1, audit: str = "audit",
                pumps: tuple[str, ...] = ("bed-1",), mode: str = "bench", extra: str = "") -> str:
    entries = "".join(f'\n[[pumps]]\nid = "{p}"\nurl = "sim://{p}"\n' for p in pumps)
    return (f'[daemon]\nprotocol = "{CONFIG}/protocols/ketamine-burst.toml"\ntrust_dir = "{trust}"\n'
            f'audit_dir = "{audit}"\ncontrol_socket = "ctl.sock"\npoll_period_s = {poll}\nlink_timeout_s = 5\n'
            f'deadman_s = 0\ndriver_timeout_s = 0.5\nmode = "{mode}"\n{extra}{entries}')


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_plan_applies_only_the_live_settings(d: Path) -> None:
    path = d / "driverd.toml"
    path.write_text(config_text(), encoding="utf-8")
    running = load_config(path)
    path.write_text(config_text(d, poll=0.5, audit="elsewhere", pumps=("bed-1", "bed-2"),
                                extra="clock_step_tolerance_s = 3\n"), encoding="utf-8")
    merged, applied, held = plan(running, load_config(path))
    assert set(applied) == {"trust_dir", "poll_period_s", "clock_step_tolerance_s"} <= set(LIVE)
    assert set(held) == {"audit_dir", "pumps"}
    assert merged.poll_period_s == 0.5 and merged.trust_dir == d and merged.clock_step_tolerance_s == 3
    assert merged.audit_dir == running.audit_dir and merged.pumps == running.pumps


async def run_service(path: Path, scenario: Callable[[Daemon, ControlServer, ControlLoop], Any]) -> int:
    config = load_config(path)
    stop = asyncio.Event()
    ready: asyncio.Future[tuple[Daemon, ControlServer, ControlLoop]] = asyncio.get_running_loop().create_future()
    clock = ScaledClock(START, 1.0)
    task = asyncio.create_task(serve_config(
        config, clock, world=World(clock), stop_event=stop, install_signal_handlers=False,
        on_ready=lambda *parts: ready.set_result(parts), ping_every_s=0.01, stall_after_s=5.0))
    try:
        done, _ = await asyncio.wait({ready, task}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        assert ready in done, "daemon did not become ready"
        await scenario(*ready.result())
    finally:
        stop.set()
    return await asyncio.wait_for(task, TIMEOUT)


def test_reload_switches_the_trust_store_and_live_settings_and_keeps_the_rest(d: Path, out: io.StringIO) -> None:
    path = d / "driverd.toml"
    path.write_text(config_text(), encoding="utf-8")
    ward = d / "ward-trust"
    ward.mkdir()
    key, pub = generate_keypair(d / "keys", "pharmacy")
    shutil.copy(pub, ward / pub.name)

    async def scenario(daemon: Daemon, _server: ControlServer, _control: ControlLoop) -> None:
        before = daemon.config
        trust_before = daemon.trust
        # Bad new configs: an error line each, nothing changes.
        for bad in ("[daemon]\npoll_period_s = \"fast\"\n", config_text(d / "missing"),
                    config_text(poll=0.1).replace("[[pumps]]", "[[pumps]]\nsurprise = 1")):
            path.write_text(bad, encoding="utf-8")
            result = reload(daemon, path)
            assert not result.ok and result.problems
            assert daemon.config is before and daemon.trust is trust_before
        # A good one: new trust store, new poll period; a new audit dir and a new pump only reported.
        path.write_text(config_text(ward, poll=0.3, audit="elsewhere", pumps=("bed-1", "bed-2")), encoding="utf-8")
        result = reload(daemon, path)
        assert result.ok and set(result.applied) == {"trust_dir", "poll_period_s"}
        assert set(result.not_applied) == {"audit_dir", "pumps"}
        ch = daemon.channels["bed-1"]
        assert ch.poll_period == timedelta(seconds=0.3)
        assert list(daemon.channels) == ["bed-1"] and daemon.config.audit_dir == before.audit_dir
        assert daemon.audit is not None and daemon.audit.seq > 0
        # Only the ward's key is trusted now: a demo-signed schedule is refused, the pharmacy's accepted.
        doc = demo_schedule("bed-1", 1, START)
        refused = await daemon.push_schedule(doc)
        assert refused["ok"] is False and refused["refusals"][0]["reason"] == "unknown_key", refused
        accepted = await daemon.push_schedule(sign_document({k: v for k, v in doc.items() if k != "signature"}, key))
        assert accepted["refusals"] == [], accepted

    assert asyncio.run(run_service(path, scenario)) == 0
    events = lines(out)
    failed = [e for e in events if e["event"] == "config_reload_failed"]
    assert len(failed) == 3 and all(e["priority"] == "err" for e in failed)
    assert any("missing" in p for p in failed[1]["problems"]) and any("surprise" in p for p in failed[2]["problems"])
    reloaded = next(e for e in events if e["event"] == "config_reloaded")
    assert sorted(reloaded["applied"]) == ["poll_period_s", "trust_dir"]
    held = next(e for e in events if e["event"] == "config_reload_not_applied")
    assert held["priority"] == "warning" and sorted(held["not_applied"]) == ["audit_dir", "pumps"]
    audit = [json.loads(line) for f in sorted((d / "audit").glob("*.jsonl")) for line in f.read_text().splitlines()]
    record = next(r for r in audit if r["event"] == "config_reloaded")
    assert record["not_applied"] == ["audit_dir", "pumps"] and len(record["trust_keys"]) == 1


def test_reload_refuses_a_poll_period_the_running_deadman_cannot_take(d: Path, out: io.StringIO) -> None:
    path = d / "driverd.toml"
    path.write_text(config_text().replace("deadman_s = 0", "deadman_s = 1"), encoding="utf-8")

    async def scenario(daemon: Daemon, _server: ControlServer, _control: ControlLoop) -> None:
        before = daemon.config
        # Valid on its own (the new dead-man would allow it), but the dead-man changes only at a restart.
        path.write_text(config_text(poll=2.0).replace("deadman_s = 0", "deadman_s = 10"), encoding="utf-8")
        result = reload(daemon, path)
        assert not result.ok and "daemon.poll_period_s" in result.problems[0]
        assert daemon.config is before and daemon.channels["bed-1"].poll_period == timedelta(seconds=0.1)

    assert asyncio.run(run_service(path, scenario)) == 0


def test_sighup_reloads_a_running_daemon(d: Path) -> None:
    path = d / "driverd.toml"
    path.write_text(config_text(), encoding="utf-8")
    err_path = d / "stderr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    with err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "driverd.cli.main", "run", "--config", str(path)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=err)

    def events() -> list[dict[str, Any]]:
        return [json.loads(line) for line in err_path.read_text(encoding="utf-8").split("\n")[:-1]]

    def wait_for(name: str, count: int = 1) -> None:
        deadline = time.monotonic() + TIMEOUT
        while sum(e["event"] == name for e in events()) < count:
            assert proc.poll() is None, f"exited {proc.returncode} before {name}"
            assert time.monotonic() < deadline, f"no {name} within {TIMEOUT} s"
            time.sleep(0.05)

    try:
        wait_for("daemon_ready")
        path.write_text(config_text(poll=0.2, pumps=("bed-1", "bed-9")), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for("config_reloaded")
        path.write_text("[daemon\n", encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for("config_reload_failed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    by_event = {e["event"]: e for e in events()}
    assert by_event["config_reloaded"]["applied"] == ["poll_period_s"]
    assert by_event["config_reload_not_applied"]["not_applied"] == ["pumps"]
    assert by_event["config_reload_failed"]["priority"] == "err"


# ---------------------------------------------------------------------------------------------- run --speed


def test_speed_is_refused_on_a_config_that_is_not_a_bench(d: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = d / "driverd.toml"
    path.write_text(config_text(mode="production"), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--speed", "60"])
    assert result.exit_code == 1, result.output
    err = capfd.readouterr().err + result.output
    assert "daemon.mode" in err and "bench" in err and "--speed 60 refused" in err
    assert not (d / "audit").exists()  # refused before anything started


@pytest.mark.parametrize("speed", ["0", "-5", "nan", "inf", "2000000", "fast"])
def test_speed_out_of_range_is_a_usage_error(d: Path, speed: str) -> None:
    path = d / "driverd.toml"
    path.write_text(config_text(), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--speed", speed])
    assert result.exit_code == 2, result.output
    assert not (d / "audit").exists()


def test_speed_on_a_bench_config_runs_a_scaled_clock(d: Path, out: io.StringIO) -> None:
    path = d / "driverd.toml"
    path.write_text(config_text(), encoding="utf-8")
    seen: list[Daemon] = []
    stop = asyncio.Event()

    def ready(daemon: Daemon, _server: ControlServer, _control: ControlLoop) -> None:
        seen.append(daemon)
        stop.set()

    code = asyncio.run(asyncio.wait_for(serve(path, install_signal_handlers=False, stop_event=stop, on_ready=ready,
                                              speed=600), TIMEOUT))
    assert code == 0
    clock = seen[0].clock
    assert isinstance(clock, ScaledClock) and clock.speed == 600
    audit = [json.loads(line) for f in sorted((d / "audit").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert next(r for r in audit if r["event"] == "daemon_start")["clock_speed"] == "600"
    assert any(e["event"] == "clock_scaled" and e["speed"] == 600 for e in lines(out))


def test_sighup_while_starting_is_ignored_with_a_line(d: Path, out: io.StringIO) -> None:
    hup = Reloader(d / "driverd.toml")
    hup()  # no daemon yet: nothing to reload, and the process must not die of it
    assert hup.results == []
    assert [(e["event"], e["priority"]) for e in lines(out)] == [("config_reload_ignored", "warning")]
