"""Patient-level exposure limits through the daemon (issue 13, part 4): a second burst for the same patient too
soon is refused with its dates; an override signed into the schedule by two approvers is accepted and logged;
the ledger comes from the audit log, so a restarted daemon refuses the same."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from driverd.core.records import fmt_time
from driverd.runtime.demo import DEMO_KEY, START, demo_schedule
from driverd.signing import sign_document
from tests.runtime.e2e import FIRST_STEP, Timing, audit_ok, events, rig, run

NAME = "bed-1"
H = timedelta(hours=1)


def later_course(days: int, override: bool = False) -> dict[str, Any]:
    """The same patient's next burst, `days` after the demo course's start (approved now, valid for 30 days)."""
    start = START + timedelta(days=days)
    doc = demo_schedule(NAME, 1, start)
    doc.pop("signature")
    doc["approved_at"] = fmt_time(START + 5 * 24 * H)
    doc["expires_at"] = fmt_time(start + timedelta(days=30))
    if override:
        doc["exposure_override"] = {"reason": "second burst agreed at the pain MDT",
                                    "approved_by": [{"role": "prescriber", "id": "dr-pain-01"},
                                                    {"role": "pharmacist", "id": "ph-senior-02"}]}
    return sign_document(doc, DEMO_KEY)


async def _body(tmp_path: Path) -> None:
    async with rig("newera-tcp", tmp_path, timing=Timing(1200, 0, 3600, 1.0)) as r:
        assert (await r.push(NAME))["ok"] is True
        ch = r.channel(NAME)
        await r.advance_to(FIRST_STEP + timedelta(minutes=1))
        await r.wait_until(lambda: ch.state.phase.value == "stopped", step=6 * H, limit=FIRST_STEP + 8 * 24 * H)
        await r.advance_to(r.clock.now() + 2 * H)  # the handover record: the burst's end is in the log
        ended: datetime = ch.state.stopped_at
        refused = await r.push(NAME, later_course(10))
        assert refused["ok"] is False and refused["refusals"][0]["reason"] == "exposure_gap", refused
        assert ended.isoformat() in refused["refusals"][0]["detail"]
        assert (ended + timedelta(days=28)).isoformat() in refused["refusals"][0]["detail"]
        accepted = await r.push(NAME, later_course(10, override=True))
        assert accepted["ok"] is True, accepted
        logged = events(r.records(), "exposure_override", NAME)
        assert len(logged) == 1 and logged[0]["breaches"][0]["code"] == "exposure_gap"
        assert logged[0]["reason"] == "second burst agreed at the pain MDT"
        # after a restart the ledger is rebuilt from the log: a third course is refused the same way
        await r.restart(timedelta(minutes=7))
        again = await r.push(NAME, later_course(11))
        assert again["ok"] is False and again["refusals"][0]["reason"] == "exposure_gap", again
        audit_ok(r)
        from driverd.audit.report import build_report, report_lines

        lines = report_lines(build_report(r.records()))
        assert "exposure ledger (per patient, every course that delivered drug):" in lines
        assert any(line.startswith("  DEMO-PATIENT-0001: demo-bed-1-20261201 on bed-1") for line in lines), lines


def test_second_burst_refused_then_overridden_and_kept_across_restart(tmp_path: Path) -> None:
    run(_body(tmp_path), timeout=300)


def test_two_courses_for_one_patient_cannot_both_be_pushed_before_either_starts(tmp_path: Path) -> None:
    """A course accepted on one pump but not started yet counts (at its plan) when the same patient's next course
    is pushed to another pump: otherwise both would pass the check and both would run."""

    async def body() -> None:
        async with rig("newera-tcp", tmp_path, ("bed-1", "bed-2")) as r:
            assert (await r.push("bed-1"))["ok"] is True
            assert r.channel("bed-1").state.started_at is None  # accepted, primed, not started
            doc = demo_schedule("bed-2", 2, START)
            doc.pop("signature")
            doc["patient_ref"] = "DEMO-PATIENT-0001"  # the same patient as bed-1's course
            refused = await r.push("bed-2", sign_document(doc, DEMO_KEY))
            assert refused["ok"] is False, refused
            assert refused["refusals"][0]["reason"].startswith("exposure_"), refused
            assert r.channel("bed-2").state.schedule is None
            # Another patient on bed-2 is fine.
            assert (await r.push("bed-2"))["ok"] is True

    run(body())
