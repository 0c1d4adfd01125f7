"""`driverd audit verify|export|report`: exit codes 0/1/2, --json, no tracebacks."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from driverd.audit.canonical import loads_line
from driverd.cli.main import app

runner = CliRunner()


def test_verify_ok_text_and_json(generic_log: Path, pub_pem: Path) -> None:
    res = runner.invoke(app, ["audit", "verify", str(generic_log)])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("OK: ") and "recorded in the log" in res.stdout and "out of band" in res.stdout
    res = runner.invoke(app, ["audit", "verify", str(generic_log), "--key", str(pub_pem), "--json"])
    assert res.exit_code == 0
    payload = json.loads(res.stdout)
    assert payload["ok"] is True and payload["key_source"] == "argument" and payload["unsealed_records"] == 0
    seg = sorted(generic_log.glob("audit-*.jsonl"))[1]
    assert runner.invoke(app, ["audit", "verify", str(seg), "--key", str(pub_pem)]).exit_code == 0


def test_verify_failure_names_seq_and_reason(generic_log: Path) -> None:
    seg = generic_log / "audit-000001.jsonl"
    lines = seg.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"i":1', b'"i":2')
    seg.write_bytes(b"\n".join(lines))
    res = runner.invoke(app, ["audit", "verify", str(generic_log)])
    assert res.exit_code == 1
    assert "FAILED at seq 3" in res.stdout and "hash" in res.stdout
    payload = json.loads(runner.invoke(app, ["audit", "verify", str(generic_log), "--json"]).stdout)
    assert payload["ok"] is False and payload["failure"]["seq"] == 3 and payload["last_seq"] == 2


def test_verify_usage_errors(tmp_path: Path, generic_log: Path) -> None:
    assert runner.invoke(app, ["audit", "verify", str(tmp_path / "nope")]).exit_code == 2
    res = runner.invoke(app, ["audit", "verify", str(tmp_path / "nope"), "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["ok"] is False
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key")
    res = runner.invoke(app, ["audit", "verify", str(generic_log), "--key", str(bad_key)])
    assert res.exit_code == 2 and "PEM" in res.output
    missing = tmp_path / "missing.pub"
    assert runner.invoke(app, ["audit", "verify", str(generic_log), "--key", str(missing)]).exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["audit", "verify", str(empty)])
    assert res.exit_code == 1 and "no audit segments" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_verify_wrong_key_fails(generic_log: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = tmp_path / "other.pub"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    res = runner.invoke(app, ["audit", "verify", str(generic_log), "--key", str(other)])
    assert res.exit_code == 1 and "does not match --key" in res.stdout


def test_export_jsonl_is_exact_and_csv_parses(generic_log: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["audit", "export", str(generic_log), "--format", "jsonl"])
    assert res.exit_code == 0
    original = b"".join(p.read_bytes() for p in sorted(generic_log.glob("audit-*.jsonl")))
    assert res.stdout.encode("utf-8") == original
    out = tmp_path / "x.csv"
    res = runner.invoke(app, ["audit", "export", str(generic_log), "--format", "csv", "--out", str(out)])
    assert res.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert len(rows) == original.count(b"\n")
    first_rec = loads_line(original.split(b"\n")[1])
    assert rows[1]["seq"] == "2" and rows[1]["note"] == first_rec["note"] and rows[1]["i"] == str(first_rec["i"])
    assert runner.invoke(app, ["audit", "export", str(generic_log), "--format", "xml"]).exit_code == 2


def test_export_torn_log_fails_cleanly(generic_log: Path) -> None:
    seg = sorted(generic_log.glob("audit-*.jsonl"))[-1]
    seg.write_bytes(seg.read_bytes()[:-5])
    res = runner.invoke(app, ["audit", "export", str(generic_log), "--format", "csv", "--json"])
    assert res.exit_code == 1 and "torn" in json.loads(res.stdout)["error"]["message"]


def test_report_text_json_and_png_without_matplotlib(generic_log: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["audit", "report", str(generic_log)])
    assert res.exit_code == 0 and "pump bed-0" in res.stdout
    payload = json.loads(runner.invoke(app, ["audit", "report", str(generic_log), "--json"]).stdout)
    assert payload["ok"] is True and {c["pump_id"] for c in payload["courses"]} == {"bed-0", "bed-1"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        res = runner.invoke(app, ["audit", "report", str(generic_log), "--png", str(tmp_path / "x.png")])
        assert res.exit_code == 1 and "matplotlib" in res.output
    else:  # drawn courses: tests/audit/test_report.py
        res = runner.invoke(app, ["audit", "report", str(generic_log), "--png", str(tmp_path / "x.png")])
        assert res.exit_code == 1 and "nothing to plot" in res.output and not (tmp_path / "x.png").exists()


def test_progress_callback_sees_every_byte(generic_log: Path) -> None:
    from driverd.audit.reader import total_bytes
    from driverd.audit.verify import verify_log

    seen: list[int] = []
    assert verify_log(generic_log, progress=seen.append).ok
    assert sum(seen) == total_bytes(generic_log)


def test_report_shows_telemetry_before_any_course_as_one_line() -> None:
    from datetime import UTC, datetime

    from driverd.audit.report import build_report, report_lines

    at = datetime(2026, 12, 1, 8, 55, tzinfo=UTC).isoformat().replace("+00:00", "Z")
    rec = {"seq": 1, "ts": at, "event": "pump_report", "pump_id": "bed-1", "course_id": None, "at": at,
           "state": "stopped", "rate_ml_per_h": "0", "delivered_ml": "0", "alarms": []}
    lines = report_lines(build_report([rec]))
    assert lines[-1] == "pump bed-1  no course: 1 record(s) (2026-12-01T08:55:00Z .. 2026-12-01T08:55:00Z)"


def test_verify_jobs_gives_the_same_answer(generic_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs N farms chunks out to N processes (threshold lowered so this small log is split): same output."""
    from driverd.audit import verify

    one = runner.invoke(app, ["audit", "verify", str(generic_log), "--json", "--jobs", "1"])
    monkeypatch.setattr(verify, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(verify, "MIN_CHUNK_BYTES", 256)
    two = runner.invoke(app, ["audit", "verify", str(generic_log), "--json", "--jobs", "2"])
    assert one.exit_code == two.exit_code == 0
    assert json.loads(one.stdout) == json.loads(two.stdout)
    assert runner.invoke(app, ["audit", "verify", str(generic_log), "--jobs", "0"]).exit_code == 2
