"""`driverd audit export`: CSV with nested fields as dotted columns; --pump/--course/--since for CSV and JSONL;
malformed filters are usage errors (exit 2), an unknown pump or course exit 1, and nothing is written either way."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from driverd.audit.export import columns, flatten
from driverd.cli.main import app

from .scenario import write_scenario_log

runner = CliRunner()


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scenario_log(tmp_path_factory.mktemp("export") / "log", None)


def rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_flatten_and_column_order() -> None:
    rec = {"seq": 3, "event": "x", "schedule": {"approved_by": [{"id": "a", "role": "r"}], "v": {"w": True}},
           "empty": {}, "n": None, "hash": "h", "prev": "p", "ts": "t", "pump_id": None, "course_id": "c"}
    flat = flatten(rec)
    assert flat["schedule.approved_by"] == '[{"id":"a","role":"r"}]'  # a list stays one cell, canonical JSON
    assert flat["schedule.v.w"] == "true" and flat["empty"] == "{}" and flat["n"] == "" and flat["seq"] == "3"
    assert columns(flat) == ["seq", "ts", "event", "pump_id", "course_id", "at", "empty", "n", "schedule.approved_by",
                             "schedule.v.w", "prev", "hash"]


def test_csv_has_dotted_columns(log: Path) -> None:
    res = runner.invoke(app, ["audit", "export", str(log), "--format", "csv"])
    assert res.exit_code == 0, res.output
    table = rows(res.stdout)
    header = list(table[0])
    assert header[:6] == ["seq", "ts", "event", "pump_id", "course_id", "at"] and header[-2:] == ["prev", "hash"]
    push = next(r for r in table if r["event"] == "schedule_accepted")
    assert push["schedule.concentration_mg_per_ml"] == "50" and push["schedule.schedule_id"] == "S-1"
    assert json.loads(push["schedule.approved_by"])[0] == {"id": "dr-a", "role": "prescriber"}
    verified = next(r for r in table if r["event"] == "pump_verified")
    assert verified["resolution.decimals"] == "3" and verified["diameter_mm"] == "19.13"
    assert "fields" not in header
    assert len(table) == sum(len(p.read_bytes().splitlines()) for p in log.glob("audit-*.jsonl"))


def test_filters_pump_course_since(log: Path) -> None:
    s2 = rows(runner.invoke(app, ["audit", "export", str(log), "--format", "csv", "--course", "S-2"]).stdout)
    # the refused push of S-2 is logged under S-1 (the pump's course then), and belongs to S-2
    assert [r["event"] for r in s2] == ["schedule_accepted"] and s2[0]["schedule.schedule_id"] == "S-2"
    s1 = rows(runner.invoke(app, ["audit", "export", str(log), "--format", "csv", "--course", "S-1",
                                  "--pump", "bed-1"]).stdout)
    assert s1[0]["event"] == "schedule_accepted" and s1[0]["course_id"] == ""  # its push, logged before the course
    assert all(r["course_id"] == "S-1" for r in s1[1:]) and all(r["pump_id"] == "bed-1" for r in s1)
    every = runner.invoke(app, ["audit", "export", str(log), "--format", "jsonl"]).stdout.splitlines()
    cut = datetime.fromisoformat(json.loads(every[60])["ts"])  # --since compares `ts`, when a record was written
    since = cut.astimezone(timezone(timedelta(hours=2))).isoformat()  # the same instant with an offset
    res = runner.invoke(app, ["audit", "export", str(log), "--format", "jsonl", "--since", since])
    lines = res.stdout.splitlines()
    assert res.exit_code == 0 and lines == [x for x in every if datetime.fromisoformat(json.loads(x)["ts"]) >= cut]
    original = {x for seg in sorted(log.glob("audit-*.jsonl")) for x in seg.read_text(encoding="utf-8").splitlines()}
    assert set(lines) <= original and 0 < len(lines) < len(every)  # JSONL keeps the exact lines
    payload = json.loads(runner.invoke(app, ["audit", "export", str(log), "--course", "S-2", "--json"]).stdout)
    assert payload["ok"] is True and payload["records"] == 1


def test_a_date_alone_is_midnight_utc(log: Path) -> None:
    a = runner.invoke(app, ["audit", "export", str(log), "--since", "2026-03-02"]).stdout
    b = runner.invoke(app, ["audit", "export", str(log), "--since", "2026-03-02T00:00:00Z"]).stdout
    assert a == b and a
    res = runner.invoke(app, ["audit", "export", str(log), "--since", "2026-03-03", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["records"] == 0  # every record was written on the 2nd


@pytest.mark.parametrize("since", ["yesterday", "2026-13-01T00:00:00Z", "2026-03-03T05:00:00", "", "1e9"])
def test_bad_since_is_a_usage_error_and_writes_nothing(log: Path, tmp_path: Path, since: str) -> None:
    out = tmp_path / "x.csv"
    res = runner.invoke(app, ["audit", "export", str(log), "--format", "csv", "--since", since, "--out", str(out)])
    assert res.exit_code == 2 and "--since" in res.stderr and not out.exists() and res.stdout == ""
    res = runner.invoke(app, ["audit", "export", str(log), "--since", since, "--json"])
    assert res.exit_code == 2 and "--since" in json.loads(res.stdout)["error"]["message"]


@pytest.mark.parametrize(("flag", "value"), [("--pump", "bed-9"), ("--course", "S-9")])
def test_unknown_pump_or_course_exits_1_and_writes_nothing(log: Path, tmp_path: Path, flag: str, value: str) -> None:
    out = tmp_path / "x.jsonl"
    res = runner.invoke(app, ["audit", "export", str(log), flag, value, "--out", str(out)])
    known = "bed-1" if flag == "--pump" else "S-1, S-2"
    assert res.exit_code == 1 and f"no {flag[2:]} {value!r}" in res.stderr and known in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temp file left either
    res = runner.invoke(app, ["audit", "export", str(log), flag, value, "--format", "csv"])
    assert res.exit_code == 1 and res.stdout == ""


def test_a_damaged_log_writes_nothing(tmp_path: Path) -> None:
    log = write_scenario_log(tmp_path / "log", None)
    seg = sorted(log.glob("audit-*.jsonl"))[-1]
    seg.write_bytes(seg.read_bytes()[:-3])  # torn last line
    out = tmp_path / "out.csv"
    res = runner.invoke(app, ["audit", "export", str(log), "--format", "csv", "--out", str(out)])
    assert res.exit_code == 1 and "torn" in res.stderr and "--verified-prefix" in res.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["log"]
    res = runner.invoke(app, ["audit", "export", str(log), "--format", "jsonl"])
    assert res.exit_code == 1 and res.stdout == ""  # checked before the first line goes out
