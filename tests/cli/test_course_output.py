"""Clinician commands say what the pump now runs (rate and dose from the read-back) and the audit record's seq;
`stop` on a stopped course is idempotent."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from typer.testing import CliRunner

from driverd.cli.main import app
from driverd.runtime.service import configure_logging
from tests.runtime.test_control import AFTER_FIRST_STEP, SIGNED, LiveDaemon, short_dir


@pytest.fixture(autouse=True)
def _ops_logs_to_stderr() -> Iterator[None]:
    configure_logging(sys.__stderr__, json_output=True)
    yield
    structlog.reset_defaults()


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_commands_print_the_read_back_and_the_seq_and_stop_is_idempotent() -> None:
    with short_dir() as d, LiveDaemon(d, AFTER_FIRST_STEP) as live:
        sock = ("--socket", str(live.socket))
        who = ("--by", "dr-a", "--reason", "test")
        assert _cli("schedule", "push", str(SIGNED), *sock).exit_code == 0
        live.wait_phase("bed-1", "titrating")

        res = _cli("course", "hold", "bed-1", *who, *sock)
        assert res.exit_code == 0, res.output
        m = re.search(r"pump runs ([0-9.]+) mL/h \(([0-9.]+) mg/24h\), verified; course level 100 mg/24h; "
                      r"record seq (\d+)", res.stdout)
        assert m, res.stdout
        status = json.loads(_cli("status", "--json", *sock).stdout)
        bed1 = next(p for p in status["pumps"] if p["pump_id"] == "bed-1")
        assert m.group(1) == bed1["reported_ml_per_h"] == bed1["verified_ml_per_h"]
        assert 99 < float(m.group(2)) <= 100  # the read-back rate's dose: quantized toward less drug
        record = next(r for r in live.audit_records() if r["seq"] == int(m.group(3)))
        assert (record["event"], record["action"], record["by"]) == ("clinician_command", "hold", "dr-a")

        res = _cli("course", "stop", "bed-1", *who, *sock)
        assert res.exit_code == 0, res.output
        assert "phase stopped; pump runs 0 mL/h (0 mg/24h), verified" in res.stdout

        again = _cli("course", "stop", "bed-1", *who, *sock)
        assert again.exit_code == 0, again.output
        assert "already stopped" in again.stdout and "pump runs 0 mL/h" in again.stdout
        body = json.loads(_cli("course", "stop", "bed-1", *who, *sock, "--json").stdout)
        assert body["ok"] is True and body["already_stopped"] is True and body["phase"] == "stopped"
        assert "refusals" not in body

        # Nothing to stop on a pump without a course: that is a refusal, not "already stopped".
        idle = _cli("course", "stop", "bed-2", *who, *sock)
        assert idle.exit_code == 1 and "illegal_transition" in idle.output

        # A refused command says what the pump still runs (on stderr, with the refusal).
        refused = _cli("course", "resume", "bed-1", *who, *sock)
        assert refused.exit_code == 1
        assert "REFUSED" in refused.stderr and "pump runs 0 mL/h" in refused.stderr
