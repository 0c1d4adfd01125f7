"""`driverd pump probe` against the Modbus simulator over loopback TCP: reads only, the watchdog left as it is.

The simulator runs in its own thread and event loop (the CLI runs ``asyncio.run`` itself).
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
from simulators.modbus import serve_modbus
from simulators.world import World
from tests.modbus.test_contract import record_pdu

runner = CliRunner()


@contextlib.contextmanager
def modbus_over_tcp(world: World, log: RequestLog) -> Iterator[str]:
    """Serve pump "bed-1" of `world` as Modbus unit 1 on a loopback port in a background thread; yield its URL."""
    ready: queue.Queue[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]] = queue.Queue()

    async def serve() -> None:
        stop = asyncio.Event()
        async with serve_modbus(world, {1: "bed-1"}, tcp_port=0, on_request=record_pdu(log)) as endpoint:
            ready.put((endpoint.url(1), asyncio.get_running_loop(), stop))
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


def test_probe_reads_a_pump_in_alarm_and_leaves_watchdog_and_alarm_as_they_were() -> None:
    world = World(ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
    log = RequestLog()
    with modbus_over_tcp(world, log) as url:
        model = world.pump("bed-1")
        model.set_deadman(8)
        model.set_rate(Decimal("0.75"))
        model.run()
        model.inject_alarm(AlarmKind.OCCLUSION)
        text = runner.invoke(app, ["pump", "probe", url, "--timeout", "1"])
        as_json = runner.invoke(app, ["pump", "probe", url, "--json", "--timeout", "1"])
    assert text.exit_code == 0, text.output
    lines = dict(line.split(None, 1) for line in text.stdout.splitlines())
    assert lines["state"] == "alarm" and lines["alarms"] == "occlusion" and lines["dead-man"] == "8 s"
    assert lines["acked"] == "none" and lines["model"] == "DRV-MB1"  # a Modbus read acknowledges nothing
    assert as_json.exit_code == 0, as_json.output
    info = json.loads(as_json.stdout)
    assert info["state"] == "alarm" and info["alarms"] == ["occlusion"] and info["acknowledged_alarms"] == []
    assert info["deadman_s"] == 8 and info["rate_ml_per_h"] == "0.750"
    assert log.entries and [r.text for r in log.entries if not r.query] == []
    s = model.status()
    assert s.deadman_s == 8 and s.state is PumpState.ALARM and AlarmKind.OCCLUSION in s.unacknowledged
