"""The operational log (driverd.runtime.oplog): JSON lines with a journald priority, derived from the audit records;
`<N>` prefixes when stderr is the journal; stdlib logging (pymodbus, pyserial) routed through structlog; and a real
`driverd run` against the Modbus simulator whose whole stderr parses as JSON."""

from __future__ import annotations

import io
import json
import logging
import os
import re
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

from driverd.runtime import oplog
from driverd.runtime.control import request_sync
from driverd.runtime.demo import demo_schedule
from driverd.signing import key_id, load_public_key

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
TIMEOUT = 30.0


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    oplog.configure_logging(stream, json_output=True)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                       if not isinstance(h, oplog.StructlogHandler)]


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def rec(event: str, seq: int = 1, **fields: Any) -> dict[str, Any]:
    return {"event": event, "seq": seq, "pump_id": "bed-1", "course_id": "c-1", **fields}


def test_course_records_become_lines_with_priorities(out: io.StringIO) -> None:
    log = oplog.OpLog()
    for r in (rec("transition", 1, **{"from": "primed", "to": "titrating", "cause": "step"}),
              rec("setpoint", 2, setpoint_id=1, rate_ml_per_h="0.041", dose_mg_per_24h="98.4", intent="start"),
              rec("setpoint_result", 3, setpoint_id=1, readback_ml_per_h="0.0410", error=""),
              rec("setpoint", 4, setpoint_id=2, rate_ml_per_h="0.5"),
              rec("setpoint_result", 5, setpoint_id=2, readback_ml_per_h=None, error="timeout"),
              rec("alarm", 6, code="link_lost", detail="no reply"),
              rec("alarm", 7, code="unexpected_infusion", detail="pump infusing"),
              rec("notice", 8, code="alarm_cleared", detail="link_lost"),
              rec("link_lost", 9, detail="x"), rec("link_restored", 10),
              rec("refused", 11, source="clinician", reason="ceiling", detail="over"),
              rec("request_refused", 12, source="push", reason="replay", detail="v1"),
              rec("schedule_accepted", 13, schedule={"schedule_id": "s", "version": 2, "digest": "ab"}),
              rec("pump_report", 14), rec("tick", 15)):
        log.record(r)
    got = [(x["event"], x["priority"], x["audit_seq"]) for x in lines(out)]
    assert got == [("transition", "notice", 1), ("setpoint_sent", "notice", 2), ("setpoint_verified", "notice", 3),
                   ("setpoint_sent", "notice", 4), ("setpoint_not_verified", "warning", 5),
                   ("alarm_raised", "err", 6), ("alarm_raised", "crit", 7), ("alarm_cleared", "notice", 8),
                   ("link_lost", "warning", 9), ("link_restored", "notice", 10), ("refused", "warning", 11),
                   ("refused", "warning", 12), ("schedule_pushed", "notice", 13)]
    by_seq = {x["audit_seq"]: x for x in lines(out)}
    assert by_seq[6]["cause"] == "link_lost" and by_seq[8]["cause"] == "link_lost"
    assert by_seq[13]["schedule_id"] == "s" and by_seq[13]["version"] == 2
    assert by_seq[1]["from"] == "primed" and by_seq[1]["pump_id"] == "bed-1"


def test_malformed_records_never_raise(out: io.StringIO) -> None:
    log = oplog.OpLog()
    for bad in ({}, {"event": None}, {"event": "schedule_accepted", "schedule": "x"}, {"event": "alarm"},
                {"event": "setpoint_result", "readback_ml_per_h": "not a number"}, {"event": 5, "seq": "x"}):
        log.record(bad)
    for line in lines(out):
        assert line["priority"] in oplog.PRIORITIES


def test_priority_prefix_when_stderr_is_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal"
    with path.open("w", encoding="utf-8") as fh:
        st = os.fstat(fh.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert oplog.is_journal_stream(fh)
        oplog.configure_logging(fh, json_output=True)
        try:
            oplog.OpLog().record(rec("alarm", code="dose_ceiling", detail="d"))
            oplog.OpLog().record(rec("alarm", code="link_lost", detail="d"))
            oplog.emit("info", "hello")
            logging.getLogger("pymodbus.logging").error("Failed to connect %s", "x")
        finally:
            structlog.reset_defaults()
    got = path.read_text(encoding="utf-8").splitlines()
    assert len(got) == 4
    for line in got:
        m = re.fullmatch(r"<([0-7])>(\{.*\})", line)
        assert m, line
        assert int(m[1]) == oplog.PRIORITIES[json.loads(m[2])["priority"]]
    assert [line[:3] for line in got] == ["<2>", "<3>", "<6>", "<4>"]
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # another stream: not the journal
    with path.open("a", encoding="utf-8") as fh:
        assert not oplog.is_journal_stream(fh)


def test_stdlib_logging_becomes_json_and_repeats_are_folded(out: io.StringIO) -> None:
    for name in ("pymodbus.logging", "serial", "asyncio"):
        logging.getLogger(name).error("Failed to connect %s", "[Errno 111]")
        logging.getLogger(name).error("Failed to connect %s", "[Errno 111]")  # the same again: folded
    # A library's own formatting bug (straight to the handler: pytest's capture handler raises on it).
    oplog.StructlogHandler().handle(logging.LogRecord("pymodbus.logging", logging.WARNING, __file__, 1,
                                                      "bad format %d", ("x",), None))
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    got = lines(out)
    assert [x["logger"] for x in got] == ["pymodbus.logging", "serial", "asyncio", "pymodbus.logging", "asyncio"]
    assert all(x["event"] == "library_log" and x["priority"] == "warning" for x in got)
    assert "ValueError: boom" in got[-1]["exception"]


def test_startup_warnings(out: io.StringIO) -> None:
    demo = key_id(load_public_key(CONFIG / "keys" / "demo" / "trusted" / "demo-NOT-FOR-CLINICAL-USE.pub"))
    assert demo in oplog.DEMO_KEY_IDS  # the constant is the shipped demo key
    assert oplog.startup_warnings(audit_key_configured=True, trusted_key_ids=["0123456789abcdef"],
                                  mode="production") == []
    assert oplog.startup_warnings(audit_key_configured=False, trusted_key_ids=[demo], mode="bench") == [
        "audit_unsigned", "demo_key_trusted"]
    assert [(x["event"], x["priority"]) for x in lines(out)] == [("audit_unsigned", "warning"),
                                                                ("demo_key_trusted", "warning")]


# ---------------------------------------------------------------------------------------------- a real run


@pytest.fixture
def d() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dd", dir="/tmp"))  # Unix socket paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for(cond: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT} s"
        time.sleep(0.05)


def test_daemon_stderr_is_json_lines_against_the_modbus_simulator(d: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    sim = subprocess.Popen([sys.executable, "-m", "driverd.cli.main", "sim", "modbus", "--tcp", "0"], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        assert sim.stdout is not None
        port = int(sim.stdout.readline())
        cfg = d / "driverd.toml"
        cfg.write_text(
            f'[daemon]\nprotocol = "{CONFIG}/protocols/ketamine-burst.toml"\n'
            f'trust_dir = "{CONFIG}/keys/demo/trusted"\naudit_dir = "audit"\ncontrol_socket = "ctl.sock"\n'
            'poll_period_s = 0.2\nlink_timeout_s = 1\ndeadman_s = 0\ndriver_timeout_s = 0.3\nmode = "bench"\n'
            f'[[pumps]]\nid = "bed-1"\nurl = "modbus+tcp://127.0.0.1:{port}?unit=1"\n', encoding="utf-8")
        err_path = d / "stderr"
        with err_path.open("wb") as err:
            daemon = subprocess.Popen([sys.executable, "-m", "driverd.cli.main", "run", "--config", str(cfg)],
                                      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)

        def events() -> list[str]:
            whole = err_path.read_text(encoding="utf-8").split("\n")[:-1]  # not a line still being written
            return [json.loads(line)["event"] for line in whole]

        wait_for(lambda: "daemon_ready" in events(), "daemon_ready", daemon)
        # First step due now: the push primes the pump, the next poll sends the first setpoint.
        doc = demo_schedule("bed-1", 1, datetime.now(UTC) - timedelta(minutes=5, seconds=1))
        assert request_sync(d / "ctl.sock", {"op": "push", "schedule": doc}, TIMEOUT)["ok"]
        wait_for(lambda: "setpoint_verified" in events(), "setpoint_verified", daemon)
        sim.send_signal(signal.SIGTERM)  # the pump goes away mid-course: link lost, an alarm
        sim.wait(TIMEOUT)
        wait_for(lambda: "alarm_raised" in events(), "alarm_raised", daemon)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(TIMEOUT) == 0
        records = [json.loads(line) for line in err_path.read_text(encoding="utf-8").splitlines()]  # every line
    finally:
        for p in (daemon, sim):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    by_event = {r["event"]: r for r in records}
    for name in ("audit_unsigned", "demo_key_trusted", "schedule_pushed", "transition", "setpoint_sent",
                 "setpoint_verified", "link_lost", "alarm_raised"):
        assert name in by_event, name
    alarm = by_event["alarm_raised"]
    assert alarm["priority"] == "err" and alarm["cause"] == "link_lost" and alarm["pump_id"] == "bed-1"
    assert all(r["priority"] in oplog.PRIORITIES for r in records)
