"""`driverd demo` tells the truth: --speed N completes like the unpaced run, a course that fails makes the demo exit 1
with the reason, --faults cuts the cable for real and still ends honestly, and the temp dir with the demo's private
keys is gone at exit (also on error, Ctrl-C and SIGTERM) unless --audit keeps it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import driverd.runtime.demo as demo_mod
from driverd.cli.main import app
from tests.cli import interrupt

DRIVERD = [sys.executable, "-c", "from driverd.cli.main import main; main()"]


@pytest.fixture
def demo_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the demo makes its temp dir (tempfile's default), so a test can see what is left there."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def _left(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if p.name.startswith("driverd-demo-"))


def test_paced_speed_completes_like_the_unpaced_run(demo_tmp: Path) -> None:
    """Issue 15: `--speed 3600` used to dead-man (daemon and simulated pumps on a scaled clock drift apart). On the
    paced clock a fast pace is as clean as the unpaced run: no alarm, every step, delivery as commanded. (At
    100000x real time the pump's 180-s dead-man is 1.8 ms of real time: any drift would fire it.)"""
    res = CliRunner().invoke(app, ["demo", "--speed", "100000", "--json"])
    summary = json.loads(res.stdout)
    assert res.exit_code == 0, summary["failures"]
    assert summary["ok"] and summary["failures"] == [] and summary["speed"] == 100000
    (course,) = summary["courses"]
    assert course["phase"] == "stopped" and course["end_cause"] == "hold_complete"
    assert course["reached_steps"] == ["100", "300", "500"] and course["active_alarms"] == []
    # As the unpaced run: 1896 mg commanded; 3 syringes, each counted from a cleared counter whose last reading is
    # truncated to the display's 0.001 mL (0.1 mg at 100 mg/mL uncounted).
    assert course["delivered_mg"] == "1895.900"
    assert 5 <= summary["virtual_seconds"] / 86400 < 5.1
    assert _left(demo_tmp) == [], "no --audit: the work dir with the demo's keys is removed"


def test_a_course_left_in_alarm_fails_the_demo_with_the_reason(demo_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An induced failure: an occlusion at the pump that nobody resumes. The demo must not print OK."""
    from drivers.base import AlarmKind

    async def unattended_occlusion(daemon: Any, world: Any, clock: Any, name: str, log: list[str], **_: Any) -> None:
        clock.register()
        try:
            await clock.sleep_until(demo_mod.START + timedelta(hours=30))
            world.pump(name).inject_alarm(AlarmKind.OCCLUSION)
            log.append(f"{name}: occlusion, nobody comes")
            await clock.sleep_until(demo_mod.START + timedelta(days=30))
        finally:
            clock.unregister()

    monkeypatch.setattr(demo_mod, "_fault_script", unattended_occlusion)
    res = CliRunner().invoke(app, ["demo", "--faults"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception  # a verdict, not a crash
    out = res.stdout + res.stderr
    assert "demo: FAILED: " in out and "demo: OK" not in out
    assert "bed-1: course demo-bed-1-20261201 ended in alarm (pump_alarm:occlusion)" in out
    assert "bed-1: reached 2 of 3 planned steps (never reached: 500 mg/24h)" in out
    assert _left(demo_tmp) == []


def test_json_failure_lists_the_reasons(demo_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A course that cannot end within the demo's time limit (its steps two days late) is a failure, not an OK."""
    from driverd.core.records import fmt_time
    from driverd.signing import sign_document

    real_schedule = demo_mod.demo_schedule

    def late_steps(pump_id: str, index: int, start: Any, fill_ml: str | None = None) -> dict[str, Any]:
        doc = dict(real_schedule(pump_id, index, start, fill_ml))
        doc.pop("signature", None)
        doc["steps"] = [dict(s) for s in doc["steps"]]
        for i, day in ((1, 3), (2, 4)):
            doc["steps"][i]["not_before"] = fmt_time(start + timedelta(days=day, minutes=5))
        return sign_document(doc, demo_mod.DEMO_KEY)

    monkeypatch.setattr(demo_mod, "demo_schedule", late_steps)
    res = CliRunner().invoke(app, ["demo", "--json"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
    summary = json.loads(res.stdout)
    assert summary["ok"] is False
    assert "bed-1: course demo-bed-1-20261201 did not end (phase holding)" in summary["failures"]
    assert "gave up at the virtual time limit before every course ended" in summary["failures"]
    assert _left(demo_tmp) == []


def test_faults_cut_the_cable_and_the_demo_still_ends_honestly(demo_tmp: Path, tmp_path: Path) -> None:
    """--faults: the cut stops every request (the pump's dead-man stops it), a clinician resumes after each fault,
    and the course still reaches every step with pump-reported and commanded delivery in agreement."""
    audit = tmp_path / "log"
    res = CliRunner().invoke(app, ["demo", "--faults", "--json", "--audit", str(audit)])
    summary = json.loads(res.stdout)
    assert res.exit_code == 0, summary["failures"]
    faults = "\n".join(summary["faults"])
    assert "link cut (nothing reaches the pump or comes back)" in faults and "requests lost)" in faults
    assert faults.count("clinician resume -> ok") == 2
    alarms = [json.loads(line) for seg in sorted(audit.glob("*.jsonl")) for line in seg.read_text().splitlines()]
    codes = [r["code"] for r in alarms if r["event"] == "alarm"]
    # the pump itself saw the host go silent: its dead-man fired (the link was really cut, not just muted)
    assert "link_lost" in codes and "pump_alarm:safe_mode_timeout" in codes
    (course,) = summary["courses"]
    assert course["end_cause"] == "hold_complete" and course["reached_steps"] == ["100", "300", "500"]
    assert _left(demo_tmp) != [], "--audit keeps the run: the log's public key stays next to it"
    assert Path(summary["audit_public_key"]).is_file()


def test_the_temp_dir_goes_on_error_too(demo_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(opts: Any, progress: Any = None) -> Any:
        assert opts.work_dir is not None and opts.work_dir.is_dir()
        (opts.work_dir / "keys").mkdir()
        (opts.work_dir / "keys" / "audit.key").write_text("private")
        raise RuntimeError("simulated crash in the middle of a demo")

    monkeypatch.setattr(demo_mod, "run_demo", broken)
    res = CliRunner().invoke(app, ["demo"])
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError)
    assert _left(demo_tmp) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_temp_dir_goes_on_ctrl_c_and_sigterm(tmp_path: Path, sig: signal.Signals) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    # --speed 1: a course in real time, so the demo is surely still running when the signal comes
    proc = subprocess.Popen([*DRIVERD, "demo", "--speed", "1", "--json"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=interrupt.sigint_deliverable)
    try:
        give_up = time.monotonic() + 60  # a bound on waiting for start-up, never an assertion on speed
        while not list(tmp_path.glob("driverd-demo-*/audit/*.jsonl")):
            assert proc.poll() is None, "the demo exited before it started its course"
            assert time.monotonic() < give_up, "the demo never started"
            time.sleep(0.05)
        assert list(tmp_path.glob("driverd-demo-*/keys/*.key")), "the private demo key is there while it runs"
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not stop on {sig.name} ({interrupt.state()})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
    assert code != 0
    assert _left(tmp_path) == [], "no private demo key left behind"
