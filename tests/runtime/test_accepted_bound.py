"""The daemon's index of accepted schedules (`Daemon._accepted`: digest -> its `schedule_accepted` record with the
signed document) stays bounded over many accepted schedules: it holds only what its one reader, the state snapshot
(`schedules_in`), can still read, the schedules of the courses it encodes, plus the one just logged. Before, it grew
by every schedule pushed for as long as the daemon ran.

Snapshots and recovery are unchanged: every snapshot holds exactly the schedules the whole log's `schedule_accepted`
records give for its states (`audit replay` checks each snapshot against them), and a restart recovers the same
courses and carries on.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from driverd.audit.snapshot import SNAPSHOT_EVENT, schedules_in
from driverd.runtime.demo import DEMO_KEY, START, demo_schedule
from driverd.signing import sign_document
from tests.runtime.e2e import FIRST_STEP, Rig, Timing, audit_ok, events, rig, run

PUMPS = ("bed-1", "bed-2")
PUSHES = 24  # versions per pump before the courses start
HALF = timedelta(seconds=30)


def version(name: str, v: int, course: str = "") -> dict[str, Any]:
    doc = demo_schedule(name, PUMPS.index(name) + 1, START)
    doc.pop("signature")
    doc["version"] = v
    if course:  # another patient's course (the same patient's would be refused its exposure gap, not logged)
        doc["schedule_id"], doc["patient_ref"] = course, f"OTHER-{course}"
    return sign_document(doc, DEMO_KEY)


def whole_log_index(r: Rig) -> dict[str, dict[str, Any]]:
    """What the unbounded index held: every `schedule_accepted` record of the log, by digest."""
    return {str(x["schedule"]["digest"]): x for x in events(r.records(), "schedule_accepted")}


def snapshot_states(r: Rig) -> dict[str, Any]:
    return {p: ch.telemetry.replayed for p, ch in r.daemon.channels.items()}


def same_snapshot_schedules(r: Rig) -> None:
    states = snapshot_states(r)
    assert schedules_in(states, r.daemon._accepted) == schedules_in(states, whole_log_index(r))
    r.daemon.write_snapshot()
    newest = events(r.records(), SNAPSHOT_EVENT)[-1]
    assert newest["schedules"] == schedules_in(states, whole_log_index(r))
    assert {s["pump_id"] for s in newest["schedules"]} == set(PUMPS)


def test_the_accepted_schedules_index_stays_bounded_and_snapshots_are_unchanged(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig("modbus-tcp", tmp_path, PUMPS, timing=Timing(poll_s=60, deadman_s=0)) as r:
            sizes = []
            for v in range(1, PUSHES + 1):  # idle courses take every new version (a new course state each)
                for name in PUMPS:
                    assert (await r.push(name, version(name, v)))["ok"] is True
                    sizes.append(len(r.daemon._accepted))
            assert max(sizes) <= len(PUMPS) + 1, sizes
            assert len(whole_log_index(r)) == PUSHES * len(PUMPS)  # what the index used to hold
            same_snapshot_schedules(r)
            await r.advance_to(FIRST_STEP + timedelta(hours=1) + HALF)
            assert all(r.channel(n).state.phase.value == "titrating" for n in PUMPS)
            # Running: updates (schedule_updated) and another course the core refuses (course_active), each logged
            # as accepted first. The refused one is held only until the next schedule is logged.
            for v in range(PUSHES + 1, PUSHES + 7):
                assert (await r.push("bed-1", version("bed-1", v)))["ok"] is True
                reply = await r.push("bed-2", version("bed-2", v, course=f"other-course-{v}"))
                assert [x["reason"] for x in reply["refusals"]] == ["course_active"], reply
                assert len(r.daemon._accepted) <= len(PUMPS) + 1
            same_snapshot_schedules(r)
            audit_ok(r)  # replay checks every snapshot's schedules against the log's schedule_accepted records
            before = {n: r.channel(n).state for n in PUMPS}
            await r.restart(timedelta(minutes=1))
            assert {n: r.channel(n).state.schedule for n in PUMPS} == {n: s.schedule for n, s in before.items()}
            assert {n: r.channel(n).state.level_mg_per_24h for n in PUMPS} == {
                n: s.level_mg_per_24h for n, s in before.items()}
            assert len(r.daemon._accepted) == len(PUMPS)  # recovery's index pruned to the recovered courses
            same_snapshot_schedules(r)
            await r.advance_to(r.clock.now() + timedelta(hours=2, seconds=10))
            assert all(r.channel(n).state.phase.value == "titrating" for n in PUMPS)
            audit_ok(r)

    run(body())
