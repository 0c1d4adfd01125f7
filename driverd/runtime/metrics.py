"""The optional Prometheus endpoint ([metrics] in driverd.toml; off unless present, loopback unless `host` says).

Pump gauges are read from the live course states at scrape time (a collector, no second copy of the state to keep
in step); the poll and audit-fsync latencies are histograms fed by the channel's and the writer's hooks. Values
are for dashboards and alerting, never for a decision: floats are fine here (the core's numbers stay Decimal).
The HTTP server (prometheus_client's, in its own thread) only reads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from driverd.core.state import Phase
from driverd.runtime.config import MetricsSettings

if TYPE_CHECKING:
    from driverd.runtime.daemon import Daemon

POLL_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FSYNC_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _f(value: Decimal | None) -> float:
    return float("nan") if value is None else float(value)


class PumpCollector(Collector):
    """Per-pump gauges from each channel's course state and last status read, at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        label = ["pump_id"]
        commanded = GaugeMetricFamily("driverd_pump_commanded_rate_ml_per_h", "Rate the course commands", labels=label)
        reported = GaugeMetricFamily("driverd_pump_reported_rate_ml_per_h",
                                     "Rate the pump reports delivering at its last status read (NaN: none yet)",
                                     labels=label)
        verified = GaugeMetricFamily("driverd_pump_verified_rate_ml_per_h", "Rate last read back as set",
                                     labels=label)
        dose = GaugeMetricFamily("driverd_pump_dose_mg_per_24h", "Course dose level", labels=label)
        delivered_ml = GaugeMetricFamily("driverd_pump_delivered_ml",
                                         "Volume delivered in this course (pump read-backs)", labels=label)
        delivered_mg = GaugeMetricFamily("driverd_pump_delivered_mg",
                                         "Drug delivered in this course (pump read-backs)", labels=label)
        phase = GaugeMetricFamily("driverd_pump_phase", "1 for the course's current phase", labels=["pump_id", "phase"])
        alarms = GaugeMetricFamily("driverd_pump_alarms_active", "Active alarm causes", labels=label)
        alarm = GaugeMetricFamily("driverd_pump_alarm_active", "1 for each active alarm cause",
                                  labels=["pump_id", "cause"])
        link = GaugeMetricFamily("driverd_pump_link_up", "1 while the pump answers", labels=label)
        for pid, ch in list(self.daemon.channels.items()):
            s, st = ch.state, ch.last_status
            commanded.add_metric([pid], _f(s.commanded_rate))
            reported.add_metric([pid], _f(st.delivering_ml_per_h if st is not None else None))
            verified.add_metric([pid], _f(s.verified_rate))
            dose.add_metric([pid], _f(s.level_mg_per_24h))
            delivered_ml.add_metric([pid], _f(s.delivered_ml))
            delivered_mg.add_metric([pid], _f(s.delivered_mg))
            for p in Phase:
                phase.add_metric([pid, p.value], 1.0 if s.phase is p else 0.0)
            alarms.add_metric([pid], float(len(s.alarm_causes)))
            for cause in s.alarm_causes:
                alarm.add_metric([pid, cause], 1.0)
            link.add_metric([pid], 0.0 if ch.link_lost or not ch.connected else 1.0)
        yield from (commanded, reported, verified, dose, delivered_ml, delivered_mg, phase, alarms, alarm, link)
        audit = self.daemon.audit
        dead = GaugeMetricFamily("driverd_audit_dead", "1 once the audit log cannot be written (fail-safe)")
        dead.add_metric([], 1.0 if self.daemon.failsafe.active or (audit is not None and audit.dead) else 0.0)
        yield dead
        if audit is not None:
            seq = GaugeMetricFamily("driverd_audit_seq", "Sequence number of the last audit record")
            seq.add_metric([], float(audit.seq))
            yield seq


class MetricsExporter:
    """Registry, hooks and the HTTP endpoint for one running daemon."""

    def __init__(self, daemon: Daemon, settings: MetricsSettings) -> None:
        self.daemon = daemon
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(PumpCollector(daemon))
        self.poll_latency = Histogram("driverd_poll_latency_seconds", "Real time of one pump status read",
                                      ["pump_id"], registry=self.registry, buckets=POLL_BUCKETS)
        self.fsync_latency = Histogram("driverd_audit_fsync_seconds", "Real time of one audit fdatasync",
                                       registry=self.registry, buckets=FSYNC_BUCKETS)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Hook the channels and the writer, then listen. Returns the bound (host, port). Raises OSError."""
        for pid, ch in self.daemon.channels.items():
            ch.on_poll_latency = self.poll_latency.labels(pid).observe
        if self.daemon.audit is not None:
            self.daemon.audit.on_sync = self.fsync_latency.observe
        self._server, self._thread = start_http_server(self.settings.port, self.settings.host, self.registry)
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        for ch in self.daemon.channels.values():
            ch.on_poll_latency = None
        if self.daemon.audit is not None:
            self.daemon.audit.on_sync = None
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()
                self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
