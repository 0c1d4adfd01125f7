"""The Prometheus endpoint ([metrics]): parsed strictly, off by default, on loopback; scraped over loopback TCP
during a short run on the sim driver."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from driverd.core.errors import ConfigError
from driverd.core.state import Phase
from driverd.runtime import oplog
from driverd.runtime.clock import ScaledClock
from driverd.runtime.config import MetricsSettings, load_config, parse_config
from driverd.runtime.control import ControlServer
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import demo_schedule
from driverd.runtime.service import ControlLoop, serve_config
from simulators.world import World

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
START = datetime(2026, 12, 1, 8, 55, tzinfo=UTC)
TIMEOUT = 30.0


def config_text(metrics: str = "") -> str:
    return (f'[daemon]\nprotocol = "{CONFIG}/protocols/ketamine-burst.toml"\n'
            f'trust_dir = "{CONFIG}/keys/demo/trusted"\naudit_dir = "audit"\ncontrol_socket = "ctl.sock"\n'
            'poll_period_s = 0.05\nlink_timeout_s = 5\ndeadman_s = 0\ndriver_timeout_s = 0.5\nmode = "bench"\n'
            f'{metrics}\n[[pumps]]\nid = "bed-1"\nurl = "sim://bed-1"\n[[pumps]]\nid = "bed-2"\nurl = "sim://bed-2"\n')


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as err:
        parse_config(text.encode(), Path("/etc/driverd/driverd.toml"))
    return [(p.path, p.rule) for p in err.value.problems]


def test_metrics_are_off_by_default_and_loopback_unless_configured() -> None:
    assert parse_config(config_text().encode(), Path("/x/driverd.toml")).metrics is None
    on = parse_config(config_text("[metrics]\nport = 9464\n").encode(), Path("/x/driverd.toml"))
    assert on.metrics == MetricsSettings(port=9464, host="127.0.0.1")
    anywhere = parse_config(config_text('[metrics]\nport = 9464\nhost = "::"\n').encode(), Path("/x/driverd.toml"))
    assert anywhere.metrics == MetricsSettings(port=9464, host="::")


@pytest.mark.parametrize(("section", "expected"), [
    ("[metrics]\n", ("metrics.port", "required")),
    ("[metrics]\nport = 70000\n", ("metrics.port", "range")),
    ("[metrics]\nport = -1\n", ("metrics.port", "range")),
    ("[metrics]\nport = true\n", ("metrics.port", "range")),
    ('[metrics]\nport = "9464"\n', ("metrics.port", "range")),
    ('[metrics]\nport = 9464\nhost = "prometheus.ward"\n', ("metrics.host", "address")),
    ("[metrics]\nport = 9464\nhost = 127\n", ("metrics.host", "address")),
    ('[metrics]\nport = 9464\nhost = "127.0.0.1\\u0000"\n', ("metrics.host", "address")),
    ("[metrics]\nport = 9464\npath = 1\n", ("metrics.path", "unknown-key")),
    ("metrics = 5\n", ("metrics", "type")),
])
def test_bad_metrics_settings_name_the_field(section: str, expected: tuple[str, str]) -> None:
    text = config_text().replace("[daemon]", section + "[daemon]") if section.startswith("metrics =") \
        else config_text(section)
    assert expected in problems(text)


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


def scrape(url: str) -> dict[str, list[Any]]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
        text = reply.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict[str, list[Any]], name: str, **labels: str) -> float:
    return next(float(s.value) for fam in families.values() for s in fam
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_scrape_over_loopback_during_a_run(d: Path, out: io.StringIO) -> None:
    path = d / "driverd.toml"
    path.write_text(config_text("[metrics]\nport = 0\n"), encoding="utf-8")
    config = load_config(path)

    async def main() -> tuple[dict[str, list[Any]], Daemon]:
        stop = asyncio.Event()
        ready: asyncio.Future[tuple[Daemon, ControlServer, ControlLoop]] = asyncio.get_running_loop().create_future()
        clock = ScaledClock(START, 1.0)
        task = asyncio.create_task(serve_config(
            config, clock, world=World(clock), stop_event=stop, install_signal_handlers=False,
            on_ready=lambda *parts: ready.set_result(parts), ping_every_s=0.01, stall_after_s=5.0))
        try:
            done, _ = await asyncio.wait({ready, task}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            assert ready in done, "daemon did not become ready"
            daemon = ready.result()[0]
            listening = next(e for e in map(json.loads, out.getvalue().splitlines())
                             if e["event"] == "metrics_listening")
            assert listening["host"] == "127.0.0.1"
            # The first step is due at once: bed-1 primes, then titrates at a verified rate.
            doc = demo_schedule("bed-1", 1, START - timedelta(minutes=5, seconds=1))
            assert (await daemon.push_schedule(doc))["refusals"] == []
            ch = daemon.channels["bed-1"]
            async with asyncio.timeout(TIMEOUT):
                while not (ch.state.phase is Phase.TITRATING and ch.state.pending is None
                           and ch.last_status is not None and ch.last_status.delivering_ml_per_h > 0):
                    daemon.changed.clear()
                    await daemon.changed.wait()  # set after every course step of any pump
            families = await asyncio.to_thread(scrape, listening["url"])
            return families, daemon
        finally:
            stop.set()
            assert await asyncio.wait_for(task, TIMEOUT) == 0

    families, daemon = asyncio.run(main())
    s = daemon.channels["bed-1"].state
    assert value(families, "driverd_pump_commanded_rate_ml_per_h", pump_id="bed-1") == float(s.commanded_rate) > 0
    assert value(families, "driverd_pump_reported_rate_ml_per_h", pump_id="bed-1") == float(s.commanded_rate)
    assert value(families, "driverd_pump_phase", pump_id="bed-1", phase="titrating") == 1
    assert value(families, "driverd_pump_phase", pump_id="bed-1", phase="idle") == 0
    assert value(families, "driverd_pump_phase", pump_id="bed-2", phase="idle") == 1
    assert value(families, "driverd_pump_alarms_active", pump_id="bed-1") == 0
    assert value(families, "driverd_pump_delivered_ml", pump_id="bed-1") >= 0
    assert value(families, "driverd_pump_link_up", pump_id="bed-2") == 1
    assert value(families, "driverd_poll_latency_seconds_count", pump_id="bed-1") > 0
    assert value(families, "driverd_audit_fsync_seconds_count") > 0
    assert value(families, "driverd_audit_dead") == 0


def test_a_port_in_use_is_an_error_line_not_a_failed_start(d: Path, out: io.StringIO) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = d / "driverd.toml"
        path.write_text(config_text(f"[metrics]\nport = {port}\n"), encoding="utf-8")
        config = load_config(path)

        async def main() -> int:
            stop = asyncio.Event()
            clock = ScaledClock(START, 1.0)
            return await serve_config(config, clock, world=World(clock), stop_event=stop,
                                      install_signal_handlers=False, on_ready=lambda *_: stop.set(),
                                      ping_every_s=0.01, stall_after_s=5.0)

        assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == 0
    failed = next(e for e in map(json.loads, out.getvalue().splitlines()) if e["event"] == "metrics_failed")
    assert failed["priority"] == "err" and failed["port"] == port
