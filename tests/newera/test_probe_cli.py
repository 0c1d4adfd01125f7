"""`driverd pump probe` against a New Era pump over loopback TCP: queries only, and a latched alarm is reported.

The simulator runs in its own thread and event loop (the CLI runs ``asyncio.run`` itself), so the test can set
the pump up, inject alarms and read the pump's state directly while the CLI talks to it over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

from typer.testing import CliRunner

from driverd.cli.main import app
from drivers.base import AlarmKind, PumpState
from drivers.testing.contract import RequestLog
from simulators.clock import ManualClock
from simulators.newera import serve_newera
from simulators.pump import PumpModel
from simulators.world import World
from tests.newera.test_contract import record_frame

runner = CliRunner()


@contextlib.contextmanager
def newera_over_tcp(model: PumpModel, log: RequestLog) -> Iterator[str]:
    """Serve `model` as a New Era pump on a loopback port in a background thread; yield the driver URL."""
    ready: queue.Queue[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]] = queue.Queue()

    async def serve() -> None:
        stop = asyncio.Event()
        async with serve_newera(model, tcp_port=0) as endpoint:
            endpoint.protocol.tap = record_frame(log)
            ready.put((endpoint.url, asyncio.get_running_loop(), stop))
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    url, loop, stop = ready.get(timeout=20)
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        assert not thread.is_alive()


def _running_pump_in_safe_mode() -> PumpModel:
    model = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC))).pump("p1")
    model.set_deadman(5)
    model.set_rate(Decimal(2))
    model.run()
    return model


def test_probe_text_reports_the_latched_alarm_its_query_acknowledged() -> None:
    model = _running_pump_in_safe_mode()
    model.inject_alarm(AlarmKind.OCCLUSION)
    log = RequestLog()
    with newera_over_tcp(model, log) as url:
        first = runner.invoke(app, ["pump", "probe", url, "--timeout", "1"])
        assert first.exit_code == 0, first.output
        lines = dict(line.split(None, 1) for line in first.stdout.splitlines())
        assert lines["state"] == "alarm" and lines["alarms"] == "occlusion" and lines["dead-man"] == "5 s"
        assert lines["acked"].startswith("occlusion (the pump answered with this latched alarm")
        assert lines["rate"] == "2.000 mL/h" and lines["model"] == "NE-1000"
        # The A?S reply acknowledged it on the pump: the next probe (or the daemon) no longer sees it.
        second = runner.invoke(app, ["pump", "probe", url, "--timeout", "1"])
        assert second.exit_code == 0, second.output
        lines = dict(line.split(None, 1) for line in second.stdout.splitlines())
        assert lines["state"] == "stopped" and lines["alarms"] == "none" and lines["acked"] == "none"
    assert log.entries and [r.text for r in log.entries if not r.query] == []
    s = model.status()  # nothing changed: still in safe mode, the alarm not cleared in the model, the rate kept
    assert s.deadman_s == 5 and s.state is PumpState.ALARM and s.rate_ml_per_h == 2
    assert AlarmKind.OCCLUSION in s.unacknowledged


def test_probe_json_reports_the_latched_alarm_and_the_safe_mode_timeout() -> None:
    model = _running_pump_in_safe_mode()
    model.power_cycle()  # a pump just powered up answers A?R
    log = RequestLog()
    with newera_over_tcp(model, log) as url:
        result = runner.invoke(app, ["pump", "probe", url, "--json", "--timeout", "1"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["acknowledged_alarms"] == ["power_interrupted"] and info["alarms"] == ["power_interrupted"]
    assert info["state"] == "alarm" and info["deadman_s"] == 5 and info["rate_ml_per_h"] == "2.000"
    assert [r.text for r in log.entries] == ["SAF", "SAF", "VER", "(status)", "RAT", "DIS", "DIA"]  # A?R, resent
    assert model.status().deadman_s == 5


def test_probe_of_a_pump_in_basic_mode_reports_the_deadman_off_and_leaves_it_off() -> None:
    model = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC))).pump("p1")
    log = RequestLog()
    with newera_over_tcp(model, log) as url:
        result = runner.invoke(app, ["pump", "probe", url, "--json", "--timeout", "1"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["deadman_s"] == 0 and info["state"] == "stopped" and info["acknowledged_alarms"] == []
    assert log.entries and all(r.query for r in log.entries)
    assert model.status().deadman_s == 0
