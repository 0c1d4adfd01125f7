"""`driverd audit report`: who ordered each change and why, mg totals (never null), volume not counted while the
pump was stopped in alarm, alarm periods, refusals under their course, --tz, and the --png/--svg plots (their data
tested as data). The log is tests/audit/scenario.py's: the real core, the real writer."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from driverd.audit.reader import iter_records
from driverd.audit.report import CourseSummary, Report, build_report, plot_data, report_lines
from driverd.audit.timezones import UnknownZone, parse_zone
from driverd.cli.main import app

from .course import START
from .scenario import COMMANDED_MG, COMMANDED_ML, NOT_COUNTED_MG, NOT_COUNTED_ML, write_scenario_log

runner = CliRunner()
H = timedelta(hours=1)
D = Decimal


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scenario_log(tmp_path_factory.mktemp("scenario") / "log", None)


@pytest.fixture(scope="module")
def rep(log: Path) -> Report:
    return build_report(iter_records(log))


def course(rep: Report, course_id: str | None) -> CourseSummary:
    (c,) = [c for c in rep.courses.values() if c.course_id == course_id]
    return c


def test_totals_commanded_reported_and_not_counted(rep: Report) -> None:
    d = course(rep, "S-1").totals()
    # The occlusion hour (pump stopped, course in alarm) is left out of the commanded volume; the link-loss hour
    # (pump still infusing by its reports) is counted. mg at 50 mg/mL, then 100 mg/mL after the syringe change.
    assert (d["commanded_ml"], d["commanded_mg"]) == (COMMANDED_ML, COMMANDED_MG)
    assert (d["not_counted_ml"], d["not_counted_mg"]) == (NOT_COUNTED_ML, NOT_COUNTED_MG)
    assert (d["reported_ml"], d["reported_mg"]) == (COMMANDED_ML, COMMANDED_MG)  # the exact pump delivered it
    assert d["mg_complete"] is True and d["mg_note"] is None
    # the core's own handover figure leaves out every alarm hour (also the link loss): reported beside ours
    assert D(course(rep, "S-1").handover["commanded_mg"]) == COMMANDED_MG - NOT_COUNTED_MG  # type: ignore[index]


def test_every_course_has_mg_numbers_never_null(log: Path) -> None:
    res = runner.invoke(app, ["audit", "report", str(log), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert [c["course_id"] for c in payload["courses"]] == [None, "S-1", "S-2"]
    for c in payload["courses"]:
        for k in ("commanded_ml", "commanded_mg", "reported_ml", "reported_mg", "not_counted_ml", "not_counted_mg"):
            assert isinstance(c[k], str) and D(c[k]) >= 0, (c["course_id"], k)
    s1 = payload["courses"][1]
    assert s1["commanded_mg"] == str(COMMANDED_MG) and s1["reported_mg"] == str(COMMANDED_MG)
    assert datetime.fromisoformat(s1["first_at"]).utcoffset() == timedelta(0)


def test_who_ordered_each_change_and_why(rep: Report) -> None:
    orders = course(rep, "S-1").orders
    by_at = {(o.at, o.action): o for o in orders}
    push = by_at[(START - timedelta(minutes=5), "push S-1 v1")]
    assert push.source == "ward" and "prescriber dr-a, pharmacist ph-b" in push.actor and push.outcome == "applied"
    start = by_at[(START, "start")]
    assert start.source == "schedule" and "v1 approved by prescriber dr-a" in start.actor and start.reason == "step_due"
    assert start.setpoints[0]["rate_ml_per_h"] == D("0.083")
    refused = by_at[(START + 3 * H, "escalate")]
    assert (refused.source, refused.actor, refused.reason, refused.outcome) == ("clinician", "dr-a", "pain score 8",
                                                                                "refused")
    resume = by_at[(START + 6 * H, "resume")]
    assert (resume.actor, resume.reason) == ("nurse-1", "line flushed") and resume.transitions[0]["to"] == "titrating"
    # after the v2 push the schedule's steps are ordered by v2's approvers; the refused v1 re-push changes nothing
    step = by_at[(START + 24 * H, "escalate")]
    assert step.source == "schedule" and "v2 approved by prescriber dr-c, pharmacist ph-d" in step.actor
    # the resume after the syringe change follows nurse-1's change_syringe
    after_change = [o for o in orders if o.at == START + 26 * H and o.action == "resume"]
    assert after_change[0].actor == "nurse-1" and after_change[0].setpoints[0]["rate_ml_per_h"] == D("0.125")
    stop = by_at[(START + 30 * H, "stop")]
    assert (stop.actor, stop.reason, stop.setpoints[0]["rate_ml_per_h"]) == ("dr-a", "patient comfortable", D(0))


def test_alarm_periods_with_causes_and_who_cleared_them(rep: Report) -> None:
    alarms = course(rep, "S-1").alarms
    assert [(a.code, a.raised_at, a.cleared_at) for a in alarms] == [
        ("pump_alarm:occlusion", START + 5 * H, START + 6 * H),
        ("link_lost", START + 10 * H, START + 11 * H),
    ]
    assert "nurse-1" in (alarms[0].cleared_by or "") and "line flushed" in (alarms[0].cleared_by or "")
    assert alarms[1].detail == "no reply"


def test_refusals_listed_under_their_course(rep: Report) -> None:
    s1 = [(r["source"], r["reason"]) for r in course(rep, "S-1").refusals]
    # the core's refusals, a refused re-push of S-1, and a daemon-level refusal logged without a course id
    assert s1 == [("clinician", "not_before"), ("push", "version"), ("clinician", "malformed")]
    assert course(rep, "S-1").refusals[0]["by"] == "dr-a"
    # a push of another course, refused while S-1 runs, is listed under the course it pushed
    assert [(r["source"], r["reason"]) for r in course(rep, "S-2").refusals] == [("push", "course_active")]
    assert rep.unattributed_refusals == []


def test_human_report_in_a_zone(log: Path) -> None:
    res = runner.invoke(app, ["audit", "report", str(log), "--tz", "America/New_York"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "times ISO 8601 in America/New_York" in text
    assert "alarm pump_alarm:occlusion: raised 2026-03-02T09:00:00-05:00" in text  # 14:00 UTC
    assert f"delivered: commanded {COMMANDED_ML} mL = {COMMANDED_MG} mg; pump-reported {COMMANDED_ML} mL" in text
    assert "clinician dr-a: escalate \"pain score 8\" -> REFUSED not_before" in text
    utc = runner.invoke(app, ["audit", "report", str(log), "--tz", "utc"]).stdout
    assert "raised 2026-03-02T14:00:00Z" in utc


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "../etc/passwd", "UTC+25"])
def test_unknown_zone_is_a_usage_error_and_writes_nothing(log: Path, tmp_path: Path, tz: str) -> None:
    with pytest.raises(UnknownZone):
        parse_zone(tz)
    png = tmp_path / "x.png"
    res = runner.invoke(app, ["audit", "report", str(log), "--tz", tz, "--png", str(png)])
    assert res.exit_code == 2 and "--tz" in res.stderr and res.stdout == "" and not png.exists()
    res = runner.invoke(app, ["audit", "report", str(log), "--tz", tz, "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["ok"] is False


def test_local_zone_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    zone = parse_zone("local")
    assert zone.name == "local (Asia/Kolkata)" and zone.iso(START) == "2026-03-02T14:30:00+05:30"


def test_plot_data(rep: Report) -> None:
    (s1,) = [d for d in plot_data(rep) if d.label == "bed-1 S-1"]
    assert [(t, v) for t, v in s1.dose] == [(START, D("99.600")), (START + 6 * H, D("99.600")),
                                            (START + 11 * H, D("99.600")), (START + 24 * H, D("300.000")),
                                            (START + 26 * H, D("300.000")), (START + 30 * H, D("0")),
                                            (START + 30 * H + timedelta(minutes=1), D("0"))]
    assert s1.steps == [(START, "99.600 mg/24h"), (START + 24 * H, "300.000 mg/24h"), (START + 30 * H, "0 mg/24h")]
    assert s1.alarms == [(START + 5 * H, START + 6 * H, "pump_alarm:occlusion"),
                         (START + 10 * H, START + 11 * H, "link_lost")]
    cum = dict(s1.commanded_mg)
    assert cum[START + 5 * H] == cum[START + 6 * H]  # flat while the pump was stopped in alarm
    assert cum[START + 11 * H] - cum[START + 10 * H] == D("0.083") * 50  # counted while it kept infusing
    assert s1.commanded_mg[-1][1] == COMMANDED_MG and s1.reported_mg[-1][1] == COMMANDED_MG
    values = [v for _, v in s1.commanded_mg]
    assert values == sorted(values) and [t for t, _ in s1.commanded_mg] == sorted(t for t, _ in s1.commanded_mg)
    # the pump before any course and the refused push of S-2 draw nothing
    assert [d.label for d in plot_data(rep)] == ["bed-1 S-1"]


def test_png_and_svg_are_written_and_valid(log: Path, tmp_path: Path) -> None:
    png, svg = tmp_path / "c.png", tmp_path / "c.svg"  # matplotlib is in the test extra: this always runs
    res = runner.invoke(app, ["audit", "report", str(log), "--png", str(png), "--svg", str(svg),
                              "--tz", "Europe/Paris"])
    assert res.exit_code == 0, res.output
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 10_000
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = svg.read_text(encoding="utf-8")
    assert "Europe/Paris" in text and "pump-reported" in text  # the time axis names its zone; the legend
    payload = json.loads(runner.invoke(app, ["audit", "report", str(log), "--svg", str(svg), "--json"]).stdout)
    assert payload["svg"] == str(svg)


def test_plot_needs_matplotlib(log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "x.png"
    res = runner.invoke(app, ["audit", "report", str(log), "--png", str(png)])
    assert res.exit_code == 1 and "needs matplotlib: pip install 'driverd[plot]'" in res.stderr and not png.exists()


def test_plot_path_errors(log: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["audit", "report", str(log), "--svg", str(tmp_path / "no" / "dir.svg")])
    assert res.exit_code == 2 and "existing directory" in res.stderr and res.stdout == ""
    res = runner.invoke(app, ["audit", "report", str(log), "--png", str(tmp_path)])
    assert res.exit_code == 2


def test_a_segment_alone_states_why_mg_is_incomplete(log: Path) -> None:
    """A later segment on its own lacks the push (the concentration): mg is a number with a stated reason."""
    seg = sorted(log.glob("audit-*.jsonl"))[1]
    rep = build_report(iter_records(seg))
    (c,) = [c for c in rep.courses.values() if c.course_id == "S-1"]
    d = c.totals()
    # only the 0.5 mL after the syringe change (its command names 100 mg/mL) converts to mg
    assert d["commanded_ml"] > D("0.5") and d["commanded_mg"] == D("50.000") and d["mg_complete"] is False
    assert "concentration is not known" in (d["mg_note"] or "")
    assert any("note: the concentration is not known" in line for line in report_lines(rep))


# ----------------------------------------------------------------------------------- a real daemon's log


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`driverd demo --faults`: the real daemon, driver and simulated pump; an occlusion (the pump stops) and a
    cut cable for 10 minutes (the pump's dead-man stops it); segments that each start with a signed state
    snapshot."""
    log = tmp_path_factory.mktemp("demo") / "log"
    res = runner.invoke(app, ["demo", "--faults", "--json", "--audit", str(log)])
    assert res.exit_code == 0, res.stdout[-2000:]
    return log


def test_demo_course_report(demo_log: Path) -> None:
    (c,) = [c for c in build_report(iter_records(demo_log)).courses.values() if c.course_id is not None]
    d = c.totals()
    # Left out, the pump stopped and saying so: the occlusion (1 h at 0.125 mL/h), and from the first report after
    # the cable is back (60 h 10 min) to the clinician's resume (61 h), 50 min at 500 mg/24h = 0.2083 mL/h.
    assert d["not_counted_ml"] == D("0.125") + D("0.173")
    # While the cable is cut nobody sees the pump: the commanded rate counts until its next report, but its
    # dead-man stopped it within minutes. So commanded exceeds pump-reported by at most the 10-min cut at
    # 20.833 mg/h, plus the counter's display step read at both ends (0.01 mL at 100 mg/mL).
    gap = d["commanded_mg"] - d["reported_mg"]
    assert -2 * D("0.01") * 100 <= gap <= D("20.834") * 10 / 60 + 2 * D("0.01") * 100 and d["mg_complete"]
    assert d["reported_mg"] == D(c.handover["delivered_mg"])  # type: ignore[index]  # the core's own count
    assert [a.code for a in c.alarms] == ["pump_alarm:occlusion", "link_lost", "pump_alarm:safe_mode_timeout"]
    assert all(a.cleared_at is not None and "demo-nurse" in (a.cleared_by or "") for a in c.alarms)
    sources = {o.source for o in c.orders}
    assert {"ward", "schedule", "clinician", "machine"} <= sources


def test_each_segment_alone_starts_from_its_snapshot(demo_log: Path) -> None:
    """A segment read on its own takes its courses from the state snapshot it starts with: mg are complete, and
    the pump-reported volumes of the segments add up exactly to the whole log's. A segment that opens with a state
    delta is not self-contained (the delta holds only what changed): it is read with the segments before it, back
    to one that opens with a full snapshot."""
    (whole,) = [c for c in build_report(iter_records(demo_log)).courses.values() if c.course_id is not None]
    total = D(0)
    runs: list[list[Path]] = []
    for seg in sorted(demo_log.glob("audit-*.jsonl")):
        if not runs or b'"event":"state_delta"' not in b"".join(seg.read_bytes().splitlines(keepends=True)[:4]):
            runs.append([])
        runs[-1].append(seg)
    assert len(runs) > 5
    for run in runs:
        for c in build_report(rec for seg in run for rec in iter_records(seg)).courses.values():
            if c.course_id is not None:
                t = c.totals()
                assert t["mg_complete"], run
                total += t["reported_ml"]
    assert total == whole.totals()["reported_ml"]


def test_refusals_without_a_pump() -> None:
    ts = "2026-03-02T09:00:00Z"
    recs = [
        {"seq": 1, "ts": ts, "event": "request_refused", "pump_id": None, "course_id": None, "source": "push",
         "reason": "malformed", "detail": "schedule must be a JSON object"},
        {"seq": 2, "ts": ts, "event": "request_refused_summary", "pump_id": None, "course_id": None,
         "peer": "uid 1000", "refused": 7, "reasons": {"malformed": 7}, "note": "..."},
    ]
    rep = build_report(recs)
    assert [(x["source"], x["reason"]) for x in rep.unattributed_refusals] == [("push", "malformed"),
                                                                               ("control (uid 1000)", "over_budget")]
    lines = report_lines(rep)
    assert "refusals not tied to a pump:" in lines
    assert "  refused @2026-03-02T09:00:00Z [control (uid 1000)] over_budget: 7 refusal(s) not logged one by one: " \
           "{'malformed': 7}" in lines
