"""Kill -9 campaign on the real daemon process (issue #11): SIGKILL `driverd run` 0-20 ms after a control request,
restart it on the same audit log, repeat; the simulated pumps (New Era over TCP, Modbus/TCP) live in this process
and outlive every daemon, as real pumps do.

Every start must reach "ready" (0 refusals to start). Every reply received before a kill names its request's audit
record by `seq`: that record must be in the final log and be that request's (nothing acknowledged is lost, no seq
reused). The final log verifies (`driverd audit verify --key`) and replays without divergence (decisions cut off by
a kill are `interrupted`); seqs have no gaps. From the pump side: every rate a pump accepted was logged first, no
rate ever exceeded the ceiling, and after a restart no rate went above the last verified one (a resume never goes
above the course's last verified rate, a reduce or taper never raises what the pump had).

Time: the daemon and the pumps share a scaled clock (SPEED x real, anchored on CLOCK_MONOTONIC), so a poll is
50 ms real and the pumps' dead-man (2 min of virtual time) stops them while a daemon is down. Seeded:
KILL9_SEED=<n> (and KILL9_KILLS=<n>) reproduce or vary a campaign.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.audit.reader import iter_records
from driverd.audit.replay import Replayer
from driverd.audit.segments import list_segments
from driverd.audit.verify import verify_log
from driverd.cli.main import app
from driverd.runtime.control import MAX_REPLY_BYTES, decode_reply, encode_request
from driverd.runtime.demo import CONCENTRATION, CONFIG_DIR, DEMO_KEY, DEMO_TRUST, START, SYRINGE, demo_schedule
from driverd.signing import generate_keypair, load_public_key, sign_document
from drivers.base import PumpState
from drivers.modbus.regmap import load_map
from simulators.faults import FaultPlan
from simulators.modbus import SIM_FIRMWARE, SIM_MODEL, serve_modbus
from simulators.newera import serve_newera
from simulators.world import World
from tests.runtime.e2e import FIRST_STEP, Timing, rig
from tests.runtime.e2e import run as run_bounded
from tests.runtime.kill9_daemon import anchored_clock

SCRIPT = Path(__file__).with_name("kill9_daemon.py")
ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("KILL9_SEED", "62304"))
KILLS = int(os.environ.get("KILL9_KILLS", "30"))
SPEED = 120.0  # virtual seconds per real second
POLL_S, LINK_TIMEOUT_S, DEADMAN_S = 6, 30, 60  # virtual seconds: 50 ms, 250 ms, 500 ms real
SKEW = timedelta(seconds=1)  # virtual: the two processes' anchored clocks agree to well within this
BOUND_S = 30.0  # real seconds any single wait may take before the test fails (never a timing assertion)
NEWERA, MODBUS = "bed-1", "bed-2"
PUMPS = (NEWERA, MODBUS)
# 500 mg/24h (the library's hard ceiling) at the demo concentration, unquantized: nothing may exceed it.
CEILING_ML_PER_H = Decimal(500) / Decimal(CONCENTRATION) / 24
ACTIONS = ("hold", "reduce", "resume", "escalate", "stop")
ACTION_WEIGHTS = (3, 3, 6, 2, 0.4)  # a stop ends the course (a new one is pushed later): rare, so courses run


@dataclass
class Sent:
    """One control request and the reply received for it (None: the kill cut it off)."""

    payload: dict[str, Any]
    expect: str  # the audit event its record must be: clinician_command, request_refused, push, or "" (status)
    incarnation: int
    reply: dict[str, Any] | None = None


@dataclass
class Figures:
    kills: int = 0
    starts: int = 0
    requests: int = 0
    replies: int = 0
    acknowledged: int = 0  # replies carrying a seq, each checked against the final log
    cut_off: int = 0  # no reply: the kill came first
    malformed: int = 0  # refused by the control API before the daemon (bad field): nothing logged
    in_flight: int = 0  # requests sent 0-20 ms before a kill
    in_flight_answered: int = 0
    interrupted: int = 0
    pump_rates: int = 0  # rates the pumps accepted, each traced to its logged setpoint
    after_restart: int = 0  # of those, sent by a restarted daemon and checked against the last verified rate

    def line(self) -> str:
        return (f"kill9 seed={SEED}: {self.kills} kills, {self.starts} starts ({self.starts - 1} restarts, 0 refused), "
                f"{self.requests} requests, {self.replies} replies ({self.malformed} malformed), "
                f"{self.acknowledged} acknowledged records "
                f"checked, {self.in_flight} in flight at a kill ({self.in_flight_answered} answered, "
                f"{self.cut_off} cut off), {self.interrupted} interrupted decisions, "
                f"{self.pump_rates} pump rates traced ({self.after_restart} after a restart)")


# ------------------------------------------------------------------------------------------------ requests


class Stream:
    """Seeded control requests, valid and invalid, steered by what the replies say (phase per pump)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.phase = dict.fromkeys(PUMPS, "idle")
        self.docs = {p: demo_schedule(p, i + 1, START) for i, p in enumerate(PUMPS)}
        self.courses = dict.fromkeys(PUMPS, 1)
        self.n = 0

    def first(self) -> list[Sent]:
        return [Sent({"op": "push", "schedule": self.docs[p]}, "push", 0) for p in PUMPS]

    def next(self, incarnation: int) -> Sent:
        rng = self.rng
        self.n += 1
        pump = rng.choice(PUMPS)
        r = rng.random()
        if self.phase[pump] == "stopped" and r < 0.5:
            return Sent({"op": "push", "schedule": self._new_course(pump)}, "push", incarnation)
        if r < 0.10:
            return Sent({"op": "status"}, "", incarnation)
        if r < 0.15:  # the accepted version again: a replay, refused (or accepted if it never reached the log)
            return Sent({"op": "push", "schedule": self.docs[pump]}, "push", incarnation)
        by = rng.choice(("nurse-a", "dr-b"))
        reason = f"k9-{self.n}"  # unique: the record found at the reply's seq must be this very request
        if r < 0.27:
            bad = rng.choice(({"pump_id": "bed-9"}, {"action": "bolus"}, {"reason": "  "}, {"by": "x" * 300},
                              {"dose_mg_per_24h": "-5"}, {"dose_mg_per_24h": "lots"}))
            payload = {"op": "command", "pump_id": pump, "action": "hold", "by": by, "reason": reason, **bad}
            return Sent(payload, "request_refused", incarnation)
        action = rng.choices(ACTIONS, ACTION_WEIGHTS)[0]
        payload = {"op": "command", "pump_id": pump, "action": action, "by": by, "reason": reason}
        if action == "reduce":
            dose = rng.choice((None, "50", "30"))
            if dose is not None:
                payload["dose_mg_per_24h"] = dose
        return Sent(payload, "clinician_command", incarnation)

    def _new_course(self, pump: str) -> dict[str, Any]:
        self.courses[pump] += 1
        doc = {k: v for k, v in demo_schedule(pump, PUMPS.index(pump) + 1, START).items() if k != "signature"}
        doc["schedule_id"] = f"kill9-{pump}-{self.courses[pump]}"
        self.docs[pump] = sign_document(doc, DEMO_KEY)
        self.phase[pump] = "idle"
        return self.docs[pump]

    def saw(self, sent: Sent) -> None:
        reply = sent.reply
        if reply is None:
            return
        if sent.payload["op"] == "status" and reply.get("ok"):
            for p in reply["pumps"]:
                self.phase[p["pump_id"]] = p["phase"]
        elif "phase" in reply:
            pump = sent.payload.get("pump_id") or sent.payload["schedule"]["pump_id"]
            self.phase[pump] = reply["phase"]


async def send(path: Path, sent: Sent) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and write the whole request (it is sent when this returns)."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=MAX_REPLY_BYTES), BOUND_S)
    writer.write(encode_request(sent.payload))
    await asyncio.wait_for(writer.drain(), BOUND_S)
    return reader, writer


async def answer(sent: Sent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), BOUND_S)
    except (ConnectionError, ValueError):
        line = b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    sent.reply = decode_reply(line) if line else None


# ------------------------------------------------------------------------------------------------ the daemon


def write_config(work: Path, urls: dict[str, str]) -> tuple[Path, Path, Path, Path]:
    key, pub = generate_keypair(work / "keys", "audit")
    sock = Path(f"/tmp/k9-{os.getpid()}-{SEED}.sock")  # Unix socket paths are short (<= 107 bytes)
    pumps = "".join(f'\n[[pumps]]\nid = "{p}"\nurl = "{u}"\n' for p, u in urls.items())
    config = work / "driverd.toml"
    config.write_text(
        f'[daemon]\nprotocol = "{CONFIG_DIR / "protocols" / "ketamine-burst.toml"}"\naudit_dir = "{work / "audit"}"\n'
        f'audit_key = "{key}"\ntrust_dir = "{DEMO_TRUST}"\ncontrol_socket = "{sock}"\nsocket_mode = "0600"\n'
        f"poll_period_s = {POLL_S}\nlink_timeout_s = {LINK_TIMEOUT_S}\ndeadman_s = {DEADMAN_S}\n"
        "driver_timeout_s = 0.4\n\n[audit]\ncheckpoint_every_records = 200\ncheckpoint_every_s = 3600\n"
        f"group_commit_ms = 200\ngroup_commit_records = 256\n{pumps}",
        encoding="utf-8",
    )
    return config, work / "audit", pub, sock


class Daemons:
    """Starts daemon processes through the fork server (tests/runtime/kill9_daemon.py), signals and reaps them."""

    def __init__(self, server: asyncio.subprocess.Process, logs: Path) -> None:
        self.server = server
        self.logs = logs
        self.pid = 0
        self.n = -1

    @classmethod
    async def open(cls, config: Path, t0: float, logs: Path) -> Daemons:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["PYTHONPATH"] = str(ROOT)
        with (logs / "fork-server.stderr").open("wb") as err:
            server = await asyncio.create_subprocess_exec(
                sys.executable, str(SCRIPT), "--fork-server", str(config), START.isoformat(), repr(t0), str(SPEED),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        return cls(server, logs)

    async def _say(self, line: str) -> None:
        assert self.server.stdin is not None
        self.server.stdin.write(line.encode() + b"\n")
        await self.server.stdin.drain()

    async def _hear(self) -> str:
        assert self.server.stdout is not None
        line = await asyncio.wait_for(self.server.stdout.readline(), BOUND_S)
        assert line, f"fork server gone: {(self.logs / 'fork-server.stderr').read_text()[-3000:]}"
        return line.decode().strip()

    async def start(self) -> None:
        """A new daemon process; it must reach "ready": a refusal to start fails the campaign."""
        self.n += 1
        await self._say(f"start {self.stderr}")
        self.pid = int((await self._hear()).removeprefix("pid "))
        said = await self._hear()
        if said != "ready":
            await self.reap()
            raise AssertionError(f"start {self.n} refused ({said}): {self.stderr.read_text()[-3000:]}")

    @property
    def stderr(self) -> Path:
        return self.logs / f"daemon-{self.n:02d}.stderr"

    async def kill(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)
        if sig is signal.SIGTERM:
            assert await self._hear() == "exit 0", self.stderr.read_text()[-3000:]
        await self.reap()

    async def reap(self) -> None:
        await self._say(f"wait {self.pid}")
        assert (await self._hear()).startswith(f"exited {self.pid} ")
        self.pid = 0

    async def close(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            await self.reap()
        assert self.server.stdin is not None
        self.server.stdin.close()
        await asyncio.wait_for(self.server.wait(), BOUND_S)


# ------------------------------------------------------------------------------------------------ campaign


@dataclass
class Campaign:
    audit: Path
    pub: Path
    world: World
    sent: list[Sent] = field(default_factory=list)
    figures: Figures = field(default_factory=Figures)


async def campaign(work: Path) -> Campaign:
    rng = random.Random(SEED)
    t0 = time.monotonic()
    world = World(anchored_clock(START, t0, SPEED))  # the pumps' physics run on the daemon's time base
    syringe = {"diameter_mm": Decimal(SYRINGE["inner_diameter_mm"]),
               "fill_volume_ml": Decimal(SYRINGE["fill_volume_ml"])}
    world.pump(NEWERA, **syringe)
    world.pump(MODBUS, model=SIM_MODEL, firmware=SIM_FIRMWARE, rate_resolution=load_map().rate_resolution(), **syringe)
    logs = work / "logs"
    logs.mkdir(parents=True)
    async with (serve_newera(world.pump(NEWERA), world.faults(NEWERA), tcp_port=0) as ne,
                serve_modbus(world, {1: MODBUS}, {1: FaultPlan()}, tcp_port=0) as mb):
        config, audit, pub, sock = write_config(work, {NEWERA: ne.url, MODBUS: mb.url(1)})
        run = Campaign(audit, pub, world)
        stream = Stream(rng)
        daemons = await Daemons.open(config, t0, logs)
        try:
            for n in range(KILLS + 1):
                await daemons.start()
                run.figures.starts += 1
                serial = stream.first() if n == 0 else []
                serial += [stream.next(n) for _ in range(rng.randint(1, 4))]
                for sent in serial:
                    await answer(sent, *await send(sock, sent))
                    assert sent.reply is not None, f"daemon {n} closed a connection without replying: {sent.payload}"
                    stream.saw(sent)
                    run.sent.append(sent)
                if n == KILLS:
                    await daemons.kill(signal.SIGTERM)  # the last one stops cleanly (and must)
                    break
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # polls, steps and read-backs run meanwhile
                # The kill: 1-3 requests in flight, SIGKILL 0-20 ms after the last one was sent.
                last = [stream.next(n) for _ in range(rng.randint(1, 3))]
                conns = [await send(sock, s) for s in last]
                await asyncio.sleep(rng.uniform(0.0, 0.020))
                await daemons.kill(signal.SIGKILL)
                run.figures.kills += 1
                for s, (reader, writer) in zip(last, conns, strict=True):
                    await answer(s, reader, writer)  # a reply already in the socket is still read after the kill
                    stream.saw(s)
                    run.sent.append(s)
                    run.figures.in_flight += 1
                    run.figures.in_flight_answered += s.reply is not None
        finally:
            await daemons.close()
            with contextlib.suppress(OSError):
                sock.unlink()
    return run


# ------------------------------------------------------------------------------------------------ checks


def records_of(audit: Path) -> list[dict[str, Any]]:
    return [r for _, p in list_segments(audit) for r in iter_records(p)]


def check_acknowledged(run: Campaign, by_seq: dict[int, dict[str, Any]]) -> None:
    """Every reply's seq names its own request's record in the final log; no seq is claimed twice."""
    claimed: dict[int, dict[str, Any]] = {}
    f = run.figures
    for s in run.sent:
        f.requests += 1
        if s.reply is None:
            f.cut_off += 1
            continue
        f.replies += 1
        reply, payload = s.reply, s.payload
        if not s.expect:
            assert reply["ok"] is True and "seq" not in reply, reply
            continue
        if "field" in reply and "refusals" not in reply:
            # Not a request the daemon could act on (the control API names the bad field): nothing was logged or
            # changed, so there is no record to name.
            assert reply["ok"] is False, reply
            f.malformed += 1
            continue
        assert "seq" in reply, f"reply without seq to {payload}: {reply}"
        seq = reply["seq"]
        assert reply["durable_seq"] >= seq, reply
        assert seq not in claimed, f"seq {seq} claimed by {claimed.get(seq)} and {payload}"
        claimed[seq] = payload
        rec = by_seq.get(seq)
        assert rec is not None, f"acknowledged seq {seq} lost: {payload} -> {reply}"
        if s.expect == "request_refused":
            assert "phase" not in reply, (payload, reply)  # invalid: must never reach a channel
        if "phase" not in reply:  # refused by the daemon before any channel saw it
            assert s.expect in ("request_refused", "push"), (payload, reply)
            assert rec["event"] == "request_refused", (rec, payload, reply)
            assert rec["source"] == ("push" if s.expect == "push" else "clinician"), rec
            assert [rec["reason"]] == [r["reason"] for r in reply["refusals"]], (rec, reply)
        elif s.expect == "push":
            assert rec["event"] == "schedule_accepted", (rec, payload)
            sched = payload["schedule"]
            assert (rec["schedule"]["schedule_id"], rec["schedule"]["version"], rec["pump_id"]) == (
                sched["schedule_id"], sched["version"], sched["pump_id"]), rec
        else:
            assert s.expect == "clinician_command", (payload, reply)
            assert rec["event"] == "clinician_command", (rec, payload)
            got = (rec["pump_id"], rec["action"], rec["by"], rec["reason"], rec["dose_mg_per_24h"])
            want = (payload["pump_id"], payload["action"], payload["by"], payload["reason"],
                    payload.get("dose_mg_per_24h"))
            assert got == want, (rec, payload)
        f.acknowledged += 1


def check_pump_rates(run: Campaign, records: list[dict[str, Any]]) -> None:
    """From the pumps' side: each accepted rate traced to the latest setpoint with that rate logged before it
    (write-ahead), under the ceiling; after a restart a resume never above the course's last verified rate (the
    replayed state the kernel saw), a reduce or taper never above what the pump had."""
    replayer = Replayer()
    before: dict[str, Any] = {}  # pump -> course state before its latest input (what the kernel decided from)
    setpoints: dict[str, list[tuple[datetime, dict[str, Any], Any, int]]] = {p: [] for p in PUMPS}
    starts = 0
    for rec in records:
        if rec["event"] == "daemon_start":
            starts += 1
        pump = rec.get("pump_id")
        if rec["event"] in ("tick", "pump_report", "setpoint_result", "clinician_command", "schedule_accepted",
                            "pump_verified", "link_lost", "link_restored") and pump in PUMPS:
            before[pump] = replayer.states().get(pump)
        if rec["event"] == "setpoint" and Decimal(rec["rate_ml_per_h"]) > 0:
            setpoints[pump].append((datetime.fromisoformat(rec["ts"]), rec, before.get(pump), starts))
        replayer.add(rec)
    for pump in PUMPS:
        previous = Decimal(0)
        for at, rate in run.world.pump(pump).rate_history():
            assert rate <= CEILING_ML_PER_H, f"{pump} accepted {rate} mL/h above the ceiling"
            logged = [sp for sp in setpoints[pump] if Decimal(sp[1]["rate_ml_per_h"]) == rate and sp[0] <= at + SKEW]
            assert logged, f"{pump} accepted {rate} mL/h at {at} with no setpoint logged before it (write-ahead)"
            _, rec, state, incarnation = logged[-1]
            run.figures.pump_rates += 1
            if incarnation > 1:
                run.figures.after_restart += 1
                intent = rec["intent"]
                if intent == "resume":
                    assert state is not None and rate <= state.verified_run_rate, (
                        f"{pump} resumed at {rate} mL/h above the last verified {state and state.verified_run_rate}")
                elif intent in ("reduce", "taper"):
                    assert rate <= previous, f"{pump}: a {intent} raised the pump from {previous} to {rate} mL/h"
                else:
                    assert intent in ("start", "escalate"), rec  # a scheduled step: the kernel's own checks
            previous = rate


@pytest.mark.slow
def test_kill9_campaign(tmp_path: Path) -> None:
    run = asyncio.run(asyncio.wait_for(campaign(tmp_path), timeout=KILLS * 10 + 60))
    f = run.figures
    assert (f.kills, f.starts) == (KILLS, KILLS + 1)
    records = records_of(run.audit)
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(1, len(seqs) + 1)), "gap or duplicate in seq"
    assert sum(r["event"] == "daemon_start" for r in records) == KILLS + 1
    report = verify_log(run.audit, public_key=load_public_key(run.pub))
    assert report.ok, report.failure
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "verify", str(run.audit), "--key", str(run.pub), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["audit", "replay", str(run.audit), "--json"])
    assert res.exit_code == 0, res.output[-3000:]
    replayed = json.loads(res.stdout)
    assert replayed["divergences"] == []
    f.interrupted = len(replayed["interrupted"])
    check_acknowledged(run, {r["seq"]: r for r in records})
    check_pump_rates(run, records)
    print(f.line())
    assert f.acknowledged > KILLS, f.line()  # the campaign did exercise acknowledged requests


# ------------------------------------------------------------------------------------------------ found by it


async def _restart_with_link_down(work: Path) -> None:
    timing = Timing(poll_s=60, deadman_s=0, link_timeout_s=120, driver_timeout_s=0.25)
    async with rig("newera-tcp", work, timing=timing) as r:
        assert (await r.push(NEWERA))["ok"] is True
        await r.advance_to(FIRST_STEP + timedelta(hours=1, seconds=30))
        verified = r.channel(NEWERA).state.verified_rate
        assert verified > 0
        r.faults(NEWERA).drop_next(1_000_000)
        await r.wait_until(lambda: r.channel(NEWERA).link_lost, step=timedelta(minutes=1),
                           limit=r.clock.now() + timedelta(minutes=30))
        assert r.channel(NEWERA).state.phase.value == "alarm"
        # The pump answers again just as the daemon restarts (crashed while the link was down).
        r.faults(NEWERA).clear()
        await r.restart(silent_for=timedelta(minutes=5))
        await r.advance_to(r.clock.now() + timedelta(minutes=5))
        ch = r.channel(NEWERA)
        assert ch.state.link_up, "the pump answers every poll, but the recovered course still has its link down"
        reply = await r.command(NEWERA, "resume", reason="pump checked after restart")
        assert reply["ok"] is True, reply
        pump = r.model(NEWERA).status()
        assert pump.state is PumpState.INFUSING and pump.rate_ml_per_h == verified


def test_course_recovered_with_link_down_can_be_resumed_once_the_pump_answers(tmp_path: Path) -> None:
    """Found by the campaign: a daemon restarted with a course whose link was down (lost before the crash, or
    an unverified setpoint at start-up) never saw the link restored, so every resume was refused for ever."""
    run_bounded(_restart_with_link_down(tmp_path))
