"""Bounded state snapshots (issue 12): a daemon restarted from snapshots whose exposure ledger was pruned accepts
and refuses exactly what one restarted from the whole ledger does, over the daemon's push path with sim:// pumps.

The same scenario runs twice in virtual time: as shipped (the ledger pruned at every snapshot and delta), and with
pruning turned off (`LedgerBuilder.prune` only marks the fields: the "whole history" daemon). The library's gap
is the largest a library may set (365 days), so pushes just before and after the horizon differ in outcome.
Pushed: a new course for a patient whose old burst is a year old (just inside, then just outside the gap), the
old course's signed document again (expired), the same version re-signed (replay), the old course id with a new
version (a reused id: the pruned ledger keeps its first start), courses for the same patient while it is pending
and after it ran. Every reply, and every record other than the snapshots and the writer's own, must be equal;
the pruned log passes `audit verify --full` (every snapshot and delta equal to replay), and the last snapshot of
the pruned run has retired the old bursts that the other still carries."""

from __future__ import annotations

import asyncio
import json
import tarfile
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.audit.exposure import LedgerBuilder
from driverd.audit.reader import iter_records
from driverd.audit.replay import replay_records
from driverd.audit.segments import list_segments
from driverd.audit.writer import WRITER_EVENTS
from driverd.cli.main import app
from driverd.core.records import fmt_time
from driverd.runtime.clock import VirtualClock
from driverd.runtime.config import DaemonConfig, PumpConfig
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import CONFIG_DIR, DEMO_KEY, DEMO_TRUST, START, SYRINGE, demo_schedule
from driverd.signing import generate_keypair, sign_document
from simulators.world import World
from tests.runtime.e2e import run

PUMPS = ("bed-1", "bed-2")
#: This scenario's log as the code before pruning wrote it (no `retired` in its ledgers), with its audit key.
PREPRUNING = Path(__file__).resolve().parents[1] / "audit" / "data" / "prepruning-log.tar.gz"
DAY = timedelta(days=1)
OFF = timedelta(seconds=30)  # off the 600-s poll grid


def _library(work: Path) -> Path:
    text = (CONFIG_DIR / "protocols" / "ketamine-burst.toml").read_text(encoding="utf-8")
    assert 'min_gap_days = "28"' in text
    path = work / "ketamine-gap365.toml"
    path.write_text(text.replace('min_gap_days = "28"', 'min_gap_days = "365"'), encoding="utf-8")
    return path


def _course(pump: str, patient: int, start: datetime, *, sid: str | None = None, version: int = 1,
            expires: timedelta = 30 * DAY) -> dict[str, Any]:
    doc = demo_schedule(pump, patient, start)
    doc.pop("signature")
    if sid is not None:
        doc["schedule_id"] = sid
    doc["version"] = version
    doc["expires_at"] = fmt_time(start + expires)
    return sign_document(doc, DEMO_KEY)


class World2:
    """Two sim:// pumps on one virtual clock; daemons started and stopped on one audit log."""

    def __init__(self, work: Path) -> None:
        self.clock = VirtualClock(START)
        self.clock.register()
        self.world = World(self.clock)
        for name in PUMPS:
            self.world.pump(name, diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]), fill_volume_ml=Decimal(20))
        key, self.pub = work / "keys" / "audit.key", work / "keys" / "audit.pub"
        if not key.exists():  # a log brought along (the fixture) keeps the key it is signed with
            key, self.pub = generate_keypair(work / "keys", "audit")
        self.config = DaemonConfig(
            path=work / "driverd.toml", sha256="t", protocol=_library(work), audit_dir=work / "audit",
            audit_key=key, trust_dir=DEMO_TRUST, control_socket=work / "ctl.sock", socket_mode=0o600,
            poll_period_s=600.0, link_timeout_s=1200.0, deadman_s=0, driver_timeout_s=1.0,
            pumps=tuple(PumpConfig(n, f"sim://{n}") for n in PUMPS))
        self.daemon: Daemon | None = None
        self.replies: list[Any] = []

    async def start(self, at: datetime) -> None:
        await self.clock.sleep_until(at)
        self.daemon = Daemon(self.config, self.clock, world=self.world)
        await asyncio.wait_for(self.daemon.start(), 60)

    async def stop(self) -> None:
        assert self.daemon is not None
        await asyncio.wait_for(self.daemon.stop(), 60)
        self.daemon = None

    async def advance(self, by: timedelta) -> None:
        """Let time run (the runtime's audit timer each 10 minutes: group commit, snapshot or delta when due)."""
        assert self.daemon is not None
        end = self.clock.now() + by
        while self.clock.now() < end:
            await self.clock.sleep_until(min(end, self.clock.now() + timedelta(minutes=10)))
            self.daemon.tick_audit()

    async def push(self, doc: dict[str, Any]) -> None:
        assert self.daemon is not None
        reply = await asyncio.wait_for(self.daemon.push_schedule(doc), 60)
        self.replies.append((doc["schedule_id"], doc["version"], reply["ok"], reply.get("refusals")))

    async def stop_course(self, pump: str) -> None:
        assert self.daemon is not None
        reply = await asyncio.wait_for(self.daemon.command(pump, "stop", "nurse-1", "end of burst"), 60)
        assert reply["ok"] is True, reply


async def _scenario(work: Path) -> World2:
    w = World2(work)
    try:
        await _body(w)
    finally:
        w.clock.unregister()
        if w.daemon is not None:
            await w.stop()
    return w


async def _body(w: World2) -> None:
    old_a = _course("bed-1", 1, START)  # patient 1
    await w.start(START)
    await w.push(old_a)
    await w.push(_course("bed-2", 2, START))  # patient 2
    await w.advance(timedelta(hours=2))
    for pump in PUMPS:  # both bursts ran about two hours: then stopped (course_summary)
        assert w.daemon is not None and w.daemon.channels[pump].state.started_at is not None
        await w.stop_course(pump)
    await w.advance(timedelta(hours=1))
    await w.stop()

    # Just inside the horizon: patient 1's burst ended 364 days ago, the gap is 365 days.
    t = START + 364 * DAY + OFF
    await w.start(t)
    await w.advance(timedelta(hours=2))
    await w.push(_course("bed-1", 1, w.clock.now(), sid="p1-day364"))
    # Other patients' short courses: the pumps move on, so the old courses are held by no pump.
    await w.push(_course("bed-1", 3, w.clock.now(), sid="p3-day364"))
    await w.push(_course("bed-2", 4, w.clock.now(), sid="p4-day364"))
    await w.advance(timedelta(hours=2))
    for pump in PUMPS:
        await w.stop_course(pump)
    await w.advance(timedelta(hours=1))
    await w.stop()

    # Just outside: the daemon prunes at its hourly delta once the newest event is 365 days after the ends.
    t = START + 366 * DAY + OFF
    await w.start(t)
    await w.advance(timedelta(hours=2))
    await w.stop()  # a full snapshot
    await w.start(w.clock.now() + timedelta(minutes=10) + OFF)  # restarted from it
    now = w.clock.now()
    await w.push(old_a)  # the old signed document: expired
    await w.push(_course("bed-1", 1, START, expires=800 * DAY))  # its version again, still valid: a replay
    await w.push(_course("bed-2", 2, now, sid="p2-day366"))  # patient 2, whose burst is 366 days old
    await w.push(_course("bed-1", 1, now, sid=str(old_a["schedule_id"]), version=2))  # the old course id again
    await w.push(_course("bed-2", 1, now, sid="p1-while-pending"))  # patient 1 has a course pending
    await w.advance(timedelta(hours=2))
    assert w.daemon is not None and w.daemon.channels["bed-1"].state.started_at is not None
    await w.stop_course("bed-1")
    await w.stop_course("bed-2")
    await w.advance(timedelta(hours=1))
    await w.push(_course("bed-1", 1, w.clock.now(), sid="p1-after-rerun"))  # the reused id's burst just ended
    await w.stop()

    # 100 days later (a restart from the snapshot): the 90-day burst count sees the reused id's first start.
    await w.start(w.clock.now() + 100 * DAY + OFF)
    await w.advance(timedelta(hours=2))
    await w.push(_course("bed-1", 2, w.clock.now(), sid="p2-day466"))
    await w.push(_course("bed-1", 1, w.clock.now(), sid="p1-day466"))


def _decisions(audit: Path) -> list[dict[str, Any]]:
    """Every record but the snapshots, deltas and the writer's own, less the chain fields."""
    skip = {"state_snapshot", "state_delta", *WRITER_EVENTS}
    return [{k: v for k, v in r.items() if k not in ("prev", "hash", "seq")}
            for _, p in list_segments(audit) for r in iter_records(p) if r["event"] not in skip]


def _pushes(audit: Path) -> list[tuple[Any, ...]]:
    """Every push's outcome as logged: accepted (schedule id, version) or refused (reason, detail), and overrides."""
    out: list[tuple[Any, ...]] = []
    for _, p in list_segments(audit):
        for r in iter_records(p):
            if r["event"] == "schedule_accepted":
                out.append((r["event"], r["pump_id"], r["schedule"]["schedule_id"], r["schedule"]["version"]))
            elif r["event"] in ("request_refused", "exposure_override"):
                out.append((r["event"], r["pump_id"], r.get("reason"), r.get("detail"), r.get("breaches")))
    return out


def _last_snapshot_ledger(audit: Path) -> dict[str, Any]:
    snaps = [r for _, p in list_segments(audit) for r in iter_records(p) if r["event"] == "state_snapshot"]
    return dict(snaps[-1]["ledger"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[World2, World2, Path, Path]:
    pruned_dir = tmp_path_factory.mktemp("pruned")
    pruned = run(_scenario(pruned_dir), timeout=600)
    whole_dir = tmp_path_factory.mktemp("whole")
    mp = pytest.MonkeyPatch()
    mp.setattr(LedgerBuilder, "prune", lambda self, held: setattr(self, "pruned", True))
    try:
        whole = run(_scenario(whole_dir), timeout=600)
    finally:
        mp.undo()
    return pruned, whole, pruned_dir, whole_dir


def test_pruned_and_whole_ledger_daemons_decide_the_same(runs: Any) -> None:
    pruned, whole, pruned_dir, whole_dir = runs
    assert pruned.replies == whole.replies
    outcomes = {(sid, v): (ok, refusals[0]["reason"] if refusals else None) for sid, v, ok, refusals in pruned.replies}
    assert outcomes[("p1-day364", 1)] == (False, "exposure_gap")  # 364 days after the end: inside the gap
    old = [r[0]["reason"] if r else None for s, v, _, r in pruned.replies if (s, v) == ("demo-bed-1-20261201", 1)]
    assert old == [None, "invalid", "replay"]  # accepted once; a year later its document is expired; a replay
    assert outcomes[("p2-day366", 1)] == (True, None)  # patient 2's burst, 366 days old, no longer counts
    assert outcomes[("demo-bed-1-20261201", 2)] == (True, None)  # the old course id, a new version
    assert outcomes[("p1-while-pending", 1)] == (False, "exposure_gap")
    assert outcomes[("p1-after-rerun", 1)] == (False, "exposure_gap")
    assert _decisions(pruned_dir / "audit") == _decisions(whole_dir / "audit")
    # What differs is the snapshot: the pruned one has retired both year-old bursts (the reused id keeps its
    # first start), the other keeps every burst whole.
    p, w = _last_snapshot_ledger(pruned_dir / "audit"), _last_snapshot_ledger(whole_dir / "audit")
    assert "demo-bed-2-20261201" in w["started"] and "demo-bed-2-20261201" not in p["started"]
    assert set(p["retired"]) == {"demo-bed-1-20261201", "demo-bed-2-20261201"}
    assert "demo-bed-2-20261201" not in p["patients"] and "demo-bed-2-20261201" not in p["ended"]
    assert w["retired"] == {}
    assert len(json.dumps(p)) < len(json.dumps(w))


def test_the_pruned_log_verifies_in_full_and_replays(runs: Any) -> None:
    pruned, _, pruned_dir, _ = runs
    records = [r for _, p in list_segments(pruned_dir / "audit") for r in iter_records(p)]
    result = replay_records(records)
    assert result.ok, result.divergences[:3]
    out = CliRunner().invoke(app, ["audit", "verify", str(pruned_dir / "audit"), "--full", "--trust",
                                   str(DEMO_TRUST), "--key", str(pruned.pub), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["full"]["ok"] is True


def _verify_full(audit: Path, pub: Path) -> dict[str, Any]:
    out = CliRunner().invoke(app, ["audit", "verify", str(audit), "--full", "--trust", str(DEMO_TRUST), "--key",
                                   str(pub), "--json"])
    assert out.exit_code == 0, out.output
    report: dict[str, Any] = json.loads(out.output)
    assert report["ok"] is True and report["full"]["ok"] is True, report
    return report


def test_a_log_written_before_pruning_verifies_decides_the_same_and_carries_on(runs: Any, tmp_path: Path) -> None:
    """prepruning-log.tar.gz: this module's scenario written by the code before pruning (whole ledgers, no
    `retired`). It verifies in full, its push outcomes are those of the pruned run, and a daemon of today started on it
    recovers from its last (unpruned) snapshot, prunes at its own, and the mixed log verifies in full."""
    _, _, pruned_dir, _ = runs
    with tarfile.open(PREPRUNING) as tar:
        tar.extractall(tmp_path, filter="data")
    audit = tmp_path / "audit"
    records = [r for _, p in list_segments(audit) for r in iter_records(p)]
    assert not any("retired" in r["ledger"] for r in records if r["event"] == "state_snapshot")
    _verify_full(audit, tmp_path / "keys" / "audit.pub")
    # The push outcomes are those of today's pruned run (other records may have gained fields since).
    assert _pushes(audit) == _pushes(pruned_dir / "audit")

    async def carry_on() -> None:
        w = World2(tmp_path)
        try:
            await w.start(datetime.fromisoformat(records[-1]["ts"]) + timedelta(minutes=10) + OFF)
            await w.advance(timedelta(hours=2))
            await w.push(_course("bed-2", 2, w.clock.now(), sid="p2-after-upgrade"))
            await w.stop()
        finally:
            w.clock.unregister()
        assert w.replies[0][2] is False and w.replies[0][3][0]["reason"] == "exposure_gap"

    run(carry_on(), timeout=300)
    report = _verify_full(audit, tmp_path / "keys" / "audit.pub")
    assert report["full"]["snapshots"] > sum(r["event"] == "state_snapshot" for r in records)
    ledger = _last_snapshot_ledger(audit)
    assert set(ledger["retired"]) == {"demo-bed-2-20261201"}  # bed-1 still holds the reused id: kept whole
    assert "demo-bed-1-20261201" in ledger["started"]
