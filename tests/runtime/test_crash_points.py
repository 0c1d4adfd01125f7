"""Every crash point restarts (SQLite's bar): start-up on every record boundary of a real log, and on torn cuts
inside the last line.

A real log is made by the daemon on the real driver path (Modbus/TCP simulators, virtual time) with pushes, a
pushed version that lowers the maximum, steps, an occlusion, a lost link, clinician commands and resumes, a stop
and a taper, across several segments. While it runs, the live state of every channel after each input is kept.
Then, for every prefix of the log at a record boundary (and cut inside the next line), start-up (`open_log`, what
`Daemon.start` runs) must succeed, and the state it recovers must equal the live state at that point. After a
start on a prefix the kernel must not let any pump be commanded above its last verified rate.
"""

from __future__ import annotations

import json
import random
import shutil
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.audit.segments import list_segments, segment_name
from driverd.audit.verify import verify_log
from driverd.audit.writer import AuditConfig
from driverd.core.kernel import Proposal, Setpoint, gate
from driverd.core.machine import initial_state
from driverd.core.protocol import parse_protocol
from driverd.core.records import INPUT_EVENTS, OUTPUT_EVENTS
from driverd.core.state import CourseState
from driverd.runtime.channel import Channel
from driverd.runtime.clock import VirtualClock
from driverd.runtime.config import AuditSettings, DaemonConfig, PumpConfig
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import CONFIG_DIR, DEMO_KEY, DEMO_TRUST, START, SYRINGE, demo_schedule
from driverd.runtime.recovery import open_log
from driverd.signing import TrustStore, load_private_key, sign_document
from drivers.base import AlarmKind
from simulators.world import World
from tests.runtime.e2e import Timing, rig, run

TRUST = TrustStore.load(DEMO_TRUST)
PROTOCOL = parse_protocol((CONFIG_DIR / "protocols" / "ketamine-burst.toml").read_text(encoding="utf-8"))
POLL = timedelta(seconds=3600)
OFF = timedelta(minutes=7)  # instants between polls


def _at(hours: float) -> Any:
    return START + timedelta(hours=hours) + OFF


async def _scenario(work: Path, live: list[tuple[int, str, CourseState]]) -> None:
    """A course on two pumps with every kind of input; `live` gets (input seq, pump, state after the input)."""
    orig_log_input = Channel._log_input
    orig_feed = Channel.feed

    def log_input(self: Channel, event: Any) -> None:
        appended: list[int] = []
        orig_append = self.audit.append

        def append(*args: Any, **kwargs: Any) -> Any:
            record = orig_append(*args, **kwargs)
            appended.append(record["seq"])  # the input's own seq (a checkpoint may follow it)
            return record

        self.audit.append = append  # type: ignore[method-assign]
        try:
            orig_log_input(self, event)
        finally:
            del self.audit.append
        self._test_input_seq = appended[0]  # type: ignore[attr-defined]

    def feed(self: Channel, event: Any) -> Any:
        self._test_input_seq = None  # type: ignore[attr-defined]
        cmds = orig_feed(self, event)
        seq = self._test_input_seq  # type: ignore[attr-defined]
        if seq is not None:
            live.append((seq, self.pump_id, self.state))
        return cmds

    Channel._log_input = log_input  # type: ignore[method-assign]
    Channel.feed = feed  # type: ignore[method-assign]
    try:
        timing = Timing(poll_s=int(POLL.total_seconds()), deadman_s=0, driver_timeout_s=1.0)
        audit = AuditSettings(checkpoint_every_records=50, checkpoint_every_s=3600, segment_max_records=120)
        async with rig("modbus-tcp", work, ("bed-1", "bed-2"), timing=timing, audit=audit) as r:
            assert (await r.push("bed-1"))["ok"]
            assert (await r.push("bed-2"))["ok"]
            await r.advance_to(_at(30))  # both titrating at 300 mg/24h
            r.model("bed-1").inject_alarm(AlarmKind.OCCLUSION)
            await r.advance_to(_at(33))
            assert (await r.command("bed-1", "resume", reason="line flushed"))["ok"]
            lowered = demo_schedule("bed-2", 2, START)
            lowered["version"] = 2
            lowered["steps"] = lowered["steps"][:2]  # maximum 300 mg/24h
            lowered.pop("signature")
            assert (await r.push("bed-2", sign_document(lowered, DEMO_KEY)))["ok"]
            await r.advance_to(_at(50))
            r.faults("bed-1").drop_next(1_000_000)
            await r.advance_to(_at(54))
            r.faults("bed-1").clear()
            await r.advance_to(_at(56))
            assert (await r.command("bed-1", "resume", reason="pump checked"))["ok"]
            await r.restart(silent_for=timedelta(minutes=20))  # a clean restart in the middle: segments go on
            await r.advance_to(_at(60))
            await r.command("bed-2", "reduce", reason="drowsy")
            await r.command("bed-2", "escalate", reason="not yet due")  # refused: logged
            await r.advance_to(_at(64))
            assert (await r.command("bed-2", "stop", reason="course done"))["ok"]
            assert (await r.command("bed-1", "taper", reason="pain settled"))["ok"]
            await r.advance_to(_at(80))
    finally:
        Channel._log_input = orig_log_input  # type: ignore[method-assign]
        Channel.feed = orig_feed  # type: ignore[method-assign]


def _lines(audit: Path) -> list[tuple[int, bytes]]:
    """(segment number, line with its newline) for the whole log, in order."""
    out = []
    for number, path in list_segments(audit):
        out.extend((number, line) for line in path.read_bytes().splitlines(keepends=True))
    return out


def _write_prefix(lines: list[tuple[int, bytes]], k: int, tail: bytes, dest: Path) -> None:
    """The log as a crash after line k left it (plus `tail`, a torn part of line k+1, in line k+1's segment)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    segs: dict[int, bytearray] = {}
    for number, line in lines[:k]:
        segs.setdefault(number, bytearray()).extend(line)
    if k < len(lines):
        segs.setdefault(lines[k][0], bytearray()).extend(tail)
    for number, data in segs.items():
        (dest / segment_name(number)).write_bytes(bytes(data))


def _expected(live: list[tuple[int, str, CourseState]], seq: int) -> dict[str, CourseState]:
    out: dict[str, CourseState] = {}
    for s, pump, state in live:
        if s <= seq:
            out[pump] = state
    return out


def _start(dest: Path, key: Any) -> dict[str, CourseState]:
    writer, recovered = open_log(dest, AuditConfig(), key, lambda: START + timedelta(days=30), TRUST)
    writer.close()
    report = verify_log(dest)
    assert report.ok, report.failure
    return recovered.states


async def _daemon_restarts(dest: Path, key_path: Path) -> None:
    """The whole start-up on this log (sim pumps), a few polls, a clean stop: then start-up succeeds again. This
    crosses the crash boundary the way a restarted daemon does (it logs on after the cut)."""
    clock = VirtualClock(START + timedelta(days=30))
    world = World(clock)
    for name in ("bed-1", "bed-2"):
        world.pump(name, diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]), fill_volume_ml=Decimal(20))
    config = DaemonConfig(
        path=dest / "driverd.toml", sha256="t", protocol=CONFIG_DIR / "protocols" / "ketamine-burst.toml",
        audit_dir=dest, audit_key=key_path, trust_dir=DEMO_TRUST, control_socket=dest / "ctl.sock",
        socket_mode=0o600, poll_period_s=3600.0, link_timeout_s=7200.0, deadman_s=0, driver_timeout_s=1.0,
        pumps=(PumpConfig("bed-1", "sim://bed-1"), PumpConfig("bed-2", "sim://bed-2")),
    )
    clock.register()
    daemon = Daemon(config, clock, world=world)
    await daemon.start()
    caps = {name: ch.state.verified_run_rate for name, ch in daemon.channels.items()}  # before any poll
    try:
        await clock.sleep_until(clock.now() + timedelta(hours=2, minutes=7))
    finally:
        clock.unregister()
        await daemon.stop()
    for name in ("bed-1", "bed-2"):
        # Nothing after a restart raises a pump above the rate it last verified before the crash.
        history = world.pump(name).rate_history()
        assert all(rate <= caps[name] for _, rate in history), (name, caps[name], history, daemon.channels[name].state)


def _never_above_verified(states: dict[str, CourseState]) -> None:
    """After a restart nothing can raise a pump above its last verified rate (resume is capped there)."""
    for state in states.values():
        if state.schedule is None or state.resolution is None:
            continue
        verdict = gate(state, PROTOCOL, Proposal(state.level_mg_per_24h, "resume", "recovery", "t"),
                       START + timedelta(days=30))
        if isinstance(verdict, Setpoint):
            assert verdict.rate_ml_per_h <= state.verified_run_rate


@pytest.fixture(scope="module")
def course_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[int, bytes]], list[Any], Path]:
    work = tmp_path_factory.mktemp("crashpoints")
    live: list[tuple[int, str, CourseState]] = []
    run(_scenario(work, live), timeout=240)
    lines = _lines(work / "audit")
    assert len({n for n, _ in lines}) >= 3, "the log should span several segments"
    return lines, live, work / "keys" / "audit.key"


def _seq_of(line: bytes) -> int:
    return int(json.loads(line)["seq"])


def test_start_at_every_boundary_and_torn_cut(course_log: Any, tmp_path: Path) -> None:
    lines, live, key_path = course_log
    key = load_private_key(key_path)
    rng = random.Random(9)
    started = torn_started = 0
    dest = tmp_path / "audit"
    for k in range(1, len(lines) + 1):
        last_seq = _seq_of(lines[k - 1][1])
        expected = _expected(live, last_seq)
        _write_prefix(lines, k, b"", dest)
        states = _start(dest, key)
        for pump, state in expected.items():
            assert states.get(pump, initial_state(pump)) == state, f"boundary after seq {last_seq}, {pump}"
        _never_above_verified(states)
        started += 1
        if k < len(lines):
            nxt = lines[k][1]
            cut = rng.randrange(1, len(nxt))  # 1..len-1: never the whole line with its newline
            _write_prefix(lines, k, nxt[:cut], dest)
            torn = _start(dest, key)
            assert torn == states, f"torn cut inside seq {last_seq + 1} recovered another state"
            torn_started += 1
    assert started == len(lines) and torn_started == len(lines) - 1
    print(f"crash points: {started} record boundaries started, {torn_started} torn cuts started, "
          f"{len({n for n, _ in lines})} segments")


def test_daemon_restarts_and_logs_on_at_boundaries(course_log: Any, tmp_path: Path) -> None:
    """At every boundary inside an input's group of decisions (and every 10th other one) the real daemon starts,
    logs on past the crash boundary, stops, and starts again."""
    lines, _live, key_path = course_log
    dest = tmp_path / "audit"
    tried = 0
    for k in range(1, len(lines) + 1):
        event = json.loads(lines[k - 1][1])["event"]
        nxt = json.loads(lines[k][1])["event"] if k < len(lines) else ""
        if not (event in INPUT_EVENTS and nxt in OUTPUT_EVENTS) and k % 10:
            continue
        _write_prefix(lines, k, b"", dest)
        run(_daemon_restarts(dest, key_path), timeout=60)
        writer, _ = open_log(dest, AuditConfig(), load_private_key(key_path), lambda: START + timedelta(days=40),
                             TRUST)
        writer.close()
        assert verify_log(dest).ok
        tried += 1
    assert tried > 40
    print(f"daemon restarts at {tried} boundaries: all started, logged on and started again")
