"""`driverd status [--watch]` against a running daemon: every field issue 15 asks for, on real transports."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from typer.testing import CliRunner

from driverd.cli.main import app
from driverd.runtime.demo import DEMO_KEY, demo_schedule
from driverd.runtime.service import configure_logging
from driverd.signing import sign_document
from tests.runtime.e2e import FIRST_STEP, START, Timing, rig, run
from tests.runtime.test_control import AFTER_FIRST_STEP, SIGNED, LiveDaemon, short_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _ops_logs_to_stderr() -> Iterator[None]:
    # As `driverd run` does: the in-process daemon's operational log on stderr, so stdout is only the CLI's.
    configure_logging(sys.__stderr__, json_output=True)
    yield
    structlog.reset_defaults()
POLL_S = 60
BOUND_S = 60.0


def _iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_status_shows_the_next_step_and_a_step_waiting_for_confirmation(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig("newera-tcp", tmp_path, timing=Timing(POLL_S, 0, 3 * POLL_S, 1.0), control=True) as r:
            doc = demo_schedule("bed-1", 1, START)
            doc["steps"][1]["auto"] = False  # the second step needs a clinician's confirmation
            doc.pop("signature")
            assert (await r.push("bed-1", sign_document(doc, DEMO_KEY)))["ok"] is True
            await r.advance_to(FIRST_STEP + timedelta(minutes=30, seconds=30))
            p = (await r.status())["bed-1"]
            rate = str(r.rate(100))
            assert (p["phase"], p["schedule_id"], p["schedule_version"]) == ("titrating", doc["schedule_id"], 1)
            assert p["level_mg_per_24h"] == "100"
            # commanded, what the pump reports it delivers, and verified, side by side: all the kernel's rate
            assert (p["commanded_ml_per_h"], p["reported_ml_per_h"], p["verified_ml_per_h"]) == (rate, rate, rate)
            assert r.wire_rates("bed-1")[-1] == Decimal(rate)  # and that is what the pump accepted
            started = _iso(p["started_at"])
            assert p["next_step"] == {"at": (started + timedelta(hours=24)).isoformat().replace("+00:00", "Z"),
                                      "dose_mg_per_24h": "300", "kind": "escalate", "auto": False}
            assert p["pending_confirmation"] is None and p["unverified_setpoint"] is None
            assert p["alarms"] == [] and p["link"] == "up" and p["last_error"] is None
            assert p["syringe"]["remaining_ml"] and p["syringe"]["predicted_empty_at"].endswith("Z")

            due = started + timedelta(hours=24)
            await r.advance_to(due + timedelta(hours=1, seconds=30))
            p = (await r.status())["bed-1"]
            assert p["level_mg_per_24h"] == "100"  # never applied on its own
            assert p["pending_confirmation"] == {"since": p["next_step"]["at"], "dose_mg_per_24h": "300"}

            # The human view, in another zone (the CLI's blocking client runs in a thread: the loop serves it).
            res = await asyncio.to_thread(_cli, "status", "--socket", str(r.socket), "--tz", "Asia/Kolkata")
            assert res.exit_code == 0, res.output
            out = res.stdout
            local_due = due.astimezone(ZoneInfo("Asia/Kolkata")).isoformat()
            assert f"escalate 300 mg/24h at {local_due} (needs confirmation)" in out
            assert f"PENDING CONFIRMATION: step to 300 mg/24h due since {local_due}" in out
            assert f"{doc['schedule_id']} v1" in out and "+05:30" in out.splitlines()[0]
            row = next(line for line in out.splitlines() if line.startswith("bed-1"))
            assert row.split()[4:8] == ["100", rate, rate, rate]  # mg/24h, cmd, pump, ver

            reply = await asyncio.to_thread(_cli, "course", "escalate", "bed-1", "--by", "dr-a", "--reason", "ok",
                                            "--socket", str(r.socket))
            assert reply.exit_code == 0, reply.output
            rate300 = str(r.rate(300))
            assert f"pump runs {rate300} mL/h (" in reply.stdout and "verified; course level 300 mg/24h" in reply.stdout
            p = (await r.status())["bed-1"]
            assert p["pending_confirmation"] is None and p["level_mg_per_24h"] == "300"
            assert p["next_step"]["dose_mg_per_24h"] == "500"

    run(body())


def test_last_error_shows_while_the_pump_does_not_answer_and_clears_when_it_does(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig("newera-tcp", tmp_path, timing=Timing(POLL_S, 0, 3 * POLL_S, 0.3)) as r:
            await r.advance_to(START + timedelta(seconds=POLL_S + 30))
            assert (await r.status())["bed-1"]["last_error"] is None
            r.faults("bed-1").drop_all()
            await r.advance_to(START + timedelta(seconds=2 * POLL_S + 30))
            p = (await r.status())["bed-1"]
            assert p["last_error"] and p["last_error_at"].endswith("Z")
            r.faults("bed-1").clear()
            await r.advance_to(START + timedelta(seconds=4 * POLL_S + 30))
            p = (await r.status())["bed-1"]
            assert p["last_error"] is None and p["last_error_at"] is None and p["link"] == "up"

    run(body())


def test_watch_refreshes_count_times_as_text_and_json() -> None:
    with short_dir() as d, LiveDaemon(d, AFTER_FIRST_STEP) as live:
        sock = str(live.socket)
        assert _cli("schedule", "push", str(SIGNED), "--socket", sock).exit_code == 0
        live.wait_phase("bed-1", "titrating")
        res = _cli("status", "--watch", "--count", "3", "--interval", "0.05", "--socket", sock)
        assert res.exit_code == 0, res.output
        assert res.stdout.count("driverd at ") == 3
        assert res.stdout.count("\nbed-1 ") == 3
        res = _cli("status", "--watch", "--count", "2", "--interval", "0.05", "--socket", sock, "--json")
        assert res.exit_code == 0
        snapshots = [json.loads(line) for line in res.stdout.splitlines()]
        assert len(snapshots) == 2 and all(s["ok"] for s in snapshots)
        assert {p["pump_id"]: p["phase"] for p in snapshots[-1]["pumps"]} == {"bed-1": "titrating", "bed-2": "idle"}


def test_watch_on_a_terminal_is_a_live_rich_table() -> None:
    with short_dir() as d, LiveDaemon(d, AFTER_FIRST_STEP) as live:
        assert _cli("schedule", "push", str(SIGNED), "--socket", str(live.socket)).exit_code == 0
        live.wait_phase("bed-1", "titrating")
        master, slave = pty.openpty()
        env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm"}
        proc = subprocess.Popen([sys.executable, "-m", "driverd.cli.main", "status", "--watch", "--count", "2",
                                 "--interval", "0.05", "--socket", str(live.socket)],
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, cwd=REPO, env=env)
        os.close(slave)
        chunks: list[bytes] = []

        def read() -> None:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert proc.wait(timeout=BOUND_S) == 0, proc.stderr.read() if proc.stderr else ""
            reader.join(BOUND_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
        screen = b"".join(chunks).decode("utf-8", "replace")
        assert "\x1b[" in screen  # drawn with terminal control sequences (rich Live), not plain lines
        for header in ("PUMP", "PHASE", "SCHEDULE", "NEXT STEP", "bed-1", "titrating", "demo-course-0001 v1"):
            assert header in screen, (header, screen)
