"""`driverd pump probe URL [--json]` against sim:// (in-process default world) and against bad input."""

from __future__ import annotations

import json
from decimal import Decimal

from typer.testing import CliRunner

from driverd.cli.main import app
from drivers.base import AlarmKind, PumpState
from drivers.sim import default_world

runner = CliRunner()


def test_probe_json_reports_identity_and_status_and_changes_nothing() -> None:
    pump = default_world().pump("probe-json")
    pump.set_rate(Decimal("2.083"))
    pump.inject_alarm(AlarmKind.LOW_BATTERY)
    result = runner.invoke(app, ["pump", "probe", "sim://probe-json", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info == {
        "ok": True,
        "url": "sim://probe-json",
        "model": "NE-1000",
        "firmware": "V3.928",
        "address": "probe-json",
        "state": "stopped",
        "rate_ml_per_h": "2.083",
        "diameter_mm": "19.13",
        "delivered_ml": "0",
        "alarms": ["low_battery"],
        "deadman_s": 0,
        "acknowledged_alarms": [],
    }
    s = pump.status()
    assert s.deadman_s == 0 and not s.deadman_armed  # read-only: no dead-man armed
    assert s.rate_ml_per_h == Decimal("2.083") and AlarmKind.LOW_BATTERY in s.unacknowledged


def test_probe_text_is_readable() -> None:
    result = runner.invoke(app, ["pump", "probe", "sim://probe-text"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert lines["model"] == "NE-1000" and lines["state"] == "stopped" and lines["alarms"] == "none"
    assert lines["rate"] == "0 mL/h" and lines["diameter"] == "19.13 mm" and lines["delivered"] == "0 mL"
    assert lines["dead-man"] == "off" and lines["acked"] == "none"


def test_probe_of_a_running_pump_reports_its_deadman_and_leaves_it() -> None:
    pump = default_world().pump("probe-running")
    pump.set_deadman(7)
    pump.set_rate(Decimal("1.25"))
    pump.run()
    result = runner.invoke(app, ["pump", "probe", "sim://probe-running", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["state"] == "infusing" and info["rate_ml_per_h"] == "1.25" and info["deadman_s"] == 7
    s = pump.status()
    assert s.state is PumpState.INFUSING and s.rate_ml_per_h == Decimal("1.25") and s.deadman_s == 7
    pump.stop()  # the default world is shared with other tests; its clock is the real one


def test_probe_malformed_url_exits_1_with_a_clear_message() -> None:
    for url in ("not-a-url", "sim://", "sim://bed 1", "sim://bed-1?fill=3", "BAD SCHEME://x", "nosuchdriver://x"):
        result = runner.invoke(app, ["pump", "probe", url])
        assert result.exit_code == 1, (url, result.output)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.output
    result = runner.invoke(app, ["pump", "probe", "nosuchdriver://x", "--json"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["ok"] is False and "nosuchdriver" in out["error"]["message"] and out["kind"] == "ValidationError"


def test_probe_usage_errors_exit_2() -> None:
    assert runner.invoke(app, ["pump", "probe"]).exit_code == 2
    assert runner.invoke(app, ["pump", "probe", "sim://x", "--timeout", "0"]).exit_code == 2
    assert runner.invoke(app, ["pump", "probe", "sim://x", "--timeout", "nan"]).exit_code == 2
    assert runner.invoke(app, ["pump", "probe", "sim://x", "--bogus"]).exit_code == 2


def test_probe_unreachable_pump_exits_1_without_traceback() -> None:
    import socket

    # a port that was just free: nothing listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for url in (f"newera+socket://127.0.0.1:{port}", f"modbus+tcp://127.0.0.1:{port}?unit=1"):
        result = runner.invoke(app, ["pump", "probe", url, "--timeout", "0.5"])
        assert result.exit_code == 1, (url, result.output)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.output


def test_a_driver_without_its_own_probe_refuses_rather_than_connecting() -> None:
    import asyncio

    import pytest

    from drivers.base import DriverError, DriverOptions, PumpDriver
    from drivers.registry import open_driver

    pump = default_world().pump("probe-base")
    driver = open_driver("sim://probe-base", DriverOptions(deadman_s=9))
    with pytest.raises(DriverError, match="no read-only probe"):
        asyncio.run(PumpDriver.probe(driver))  # the base class's default, as a third-party driver would inherit it
    assert pump.status().deadman_s == 0  # nothing reached the pump


def test_probe_keeps_library_logs_off_the_terminal_whatever_logging_state_it_finds() -> None:
    # The state an earlier command can leave behind (structlog reset, a library logger with no handler and no
    # propagation): Python's last resort would then print pymodbus's "Failed to connect" as raw text.
    import logging
    import socket

    lib = logging.getLogger("pymodbus")
    before = (lib.propagate, list(lib.handlers))
    lib.propagate, lib.handlers = False, []
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = runner.invoke(app, ["pump", "probe", f"modbus+tcp://127.0.0.1:{port}?unit=1", "--timeout", "0.5"])
        assert result.exit_code == 1
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert (lib.propagate, lib.handlers) == (False, [])  # put back as it was
    finally:
        lib.propagate, lib.handlers = before
