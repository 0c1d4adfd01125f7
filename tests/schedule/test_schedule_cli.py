"""CLI: `driverd schedule validate|sign` and `driverd keys generate` through typer's CliRunner."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from driverd.cli.main import app
from driverd.core.canonical import to_json_text
from driverd.signing import TrustStore

from .conftest import CONFIG, DEMO_KEY, DEMO_TRUST

EXAMPLE = CONFIG / "schedules" / "example.json"
SIGNED = CONFIG / "schedules" / "example.signed.json"
NOW = "2026-11-22T12:00:00Z"

runner = CliRunner()


def run(*args: str | Path) -> Result:
    result = runner.invoke(app, [str(a) for a in args])
    # Never a traceback: every failure is a clean exit code.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def out_json(result: Result) -> Any:
    return json.loads(result.stdout)


def write(tmp_path: Path, doc: dict[str, Any], name: str = "s.json") -> Path:
    path = tmp_path / name
    path.write_text(to_json_text(doc), encoding="utf-8")
    return path


# --- validate -----------------------------------------------------------------------------------------------


def test_validate_ok_text() -> None:
    r = run("schedule", "validate", EXAMPLE, "--now", NOW)
    assert r.exit_code == 0
    assert "VALID" in r.stdout
    assert "500 mg/24h -> 0.416 mL/h" in r.stdout  # quantized toward less drug
    assert "unsigned" in r.stdout


def test_validate_ok_json_shape() -> None:
    r = run("schedule", "validate", SIGNED, "--json", "--now", NOW, "--trust", DEMO_TRUST)
    assert r.exit_code == 0
    body = out_json(r)
    assert body["ok"] is True
    assert [s["dose_mg_per_24h"] for s in body["steps"]] == ["100", "300", "500"]
    assert [s["rate_ml_per_h"] for s in body["steps"]] == ["0.083", "0.25", "0.416"]
    assert [s["delivered_mg_per_24h"] for s in body["steps"]] == ["99.6", "300", "499.2"]
    assert body["hold_days"] == "3" and body["taper"] == "stop" and body["course_length_days"] == "5"
    assert body["signature"]["status"] == "verified"
    assert body["signature"]["key_id"] in TrustStore.load(DEMO_TRUST).keys
    assert len(body["digest"]) == 64
    assert {a["role"] for a in body["approved_by"]} == {"prescriber", "pharmacist"}


def test_validate_default_now_is_current_time() -> None:
    # Without --now the real clock decides; the example is valid until its expiry, then "expired".
    r = run("schedule", "validate", EXAMPLE, "--json")
    if datetime.now(UTC) < datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC):
        assert r.exit_code == 0 and out_json(r)["ok"] is True
    else:
        assert r.exit_code == 1 and out_json(r)["problems"][0]["rule"] == "expired"


def test_validate_invalid_lists_every_problem(tmp_path: Path) -> None:
    doc = json.loads(EXAMPLE.read_text(), parse_float=Decimal)
    doc["steps"][2]["dose_mg_per_24h"] = "600"
    doc["approved_by"] = doc["approved_by"][:1]
    doc["colour"] = "red"
    r = run("schedule", "validate", write(tmp_path, doc), "--json", "--now", NOW)
    assert r.exit_code == 1
    body = out_json(r)
    assert body["ok"] is False
    found = {(p["path"], p["rule"]) for p in body["problems"]}
    assert {
        ("/steps/2/dose_mg_per_24h", "ceiling"),
        ("/approved_by", "approvals"),
        ("/colour", "unknown-field"),
    } <= found
    assert all(set(p) == {"path", "rule", "detail"} for p in body["problems"])
    r = run("schedule", "validate", write(tmp_path, doc), "--now", NOW)
    assert r.exit_code == 1 and "[ceiling]" in r.stdout and "[approvals]" in r.stdout


def test_validate_expired(tmp_path: Path) -> None:
    r = run("schedule", "validate", EXAMPLE, "--json", "--now", "2027-07-01T00:00:00Z")
    assert r.exit_code == 1
    assert {(p["path"], p["rule"]) for p in out_json(r)["problems"]} == {("/expires_at", "expired")}


def test_validate_trust_unsigned_fails() -> None:
    r = run("schedule", "validate", EXAMPLE, "--json", "--now", NOW, "--trust", DEMO_TRUST)
    assert r.exit_code == 1
    assert ("/signature", "unsigned") in {(p["path"], p["rule"]) for p in out_json(r)["problems"]}


def test_validate_trust_altered_fails(tmp_path: Path) -> None:
    doc = json.loads(SIGNED.read_text(), parse_float=Decimal)
    doc["hold_days"] = "2"  # still clinically valid, but not what was signed
    r = run("schedule", "validate", write(tmp_path, doc), "--json", "--now", NOW, "--trust", DEMO_TRUST)
    assert r.exit_code == 1
    assert {(p["path"], p["rule"]) for p in out_json(r)["problems"]} == {("/signature", "bad_signature")}


def test_validate_trust_wrong_key(tmp_path: Path) -> None:
    r = run("keys", "generate", tmp_path / "k", "--name", "other", "--json")
    assert r.exit_code == 0
    other = tmp_path / "k" / "other.key"
    signed = tmp_path / "signed.json"
    assert run("schedule", "sign", EXAMPLE, "--key", other, "--out", signed).exit_code == 0
    r = run("schedule", "validate", signed, "--json", "--now", NOW, "--trust", DEMO_TRUST)
    assert r.exit_code == 1
    assert ("/signature", "unknown_key") in {(p["path"], p["rule"]) for p in out_json(r)["problems"]}


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        (b"", "json"),
        (b"{", "json"),
        (b'{"a": 1,}', "json"),
        (b"\xff\xfe\x00garbage\x00\x01", "encoding"),
        (bytes(range(256)) * 4, "encoding"),
        (b'{"hold_days": NaN}', "json"),
        (b'{"hold_days": Infinity}', "json"),
        (b'{"a": 1, "a": 2}', "duplicate-key"),
        (b"[" * 100_000, "json"),
        (b"1" * 5000, "range"),
        (b"[]", "type"),
        (b'"just a string"', "type"),
    ],
)
def test_validate_garbage_input(tmp_path: Path, content: bytes, rule: str) -> None:
    path = tmp_path / "garbage.json"
    path.write_bytes(content)
    for extra in ([], ["--json"]):
        r = run("schedule", "validate", path, "--now", NOW, *extra)
        assert r.exit_code == 1
    problems = out_json(r)["problems"]
    assert problems[0]["rule"] == rule


def test_validate_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "schedule_id": "x",\n  "version": ,\n}\n')
    r = run("schedule", "validate", path, "--json", "--now", NOW)
    assert r.exit_code == 1
    assert "line 3 column 14" in out_json(r)["problems"][0]["detail"]


def test_validate_huge_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with path.open("wb") as fh:
        fh.write(b'{"pad": "')
        fh.write(b"x" * (2 << 20))
        fh.write(b'"}')
    r = run("schedule", "validate", path, "--json", "--now", NOW)
    assert r.exit_code == 1
    assert out_json(r)["problems"][0]["rule"] == "size"


@pytest.mark.parametrize(
    "args",
    [
        ["schedule", "validate"],
        ["schedule", "validate", "/nonexistent/schedule.json"],
        ["schedule", "validate", str(EXAMPLE), "--now", "yesterday"],
        ["schedule", "validate", str(EXAMPLE), "--now", "2026-11-22T12:00:00"],
        ["schedule", "validate", str(EXAMPLE), "--bogus-option"],
        ["schedule", "sign", str(EXAMPLE)],
        ["schedule", "sign", str(EXAMPLE), "--key", "/nonexistent.key"],
        ["keys", "generate"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    r = run(*args)
    assert r.exit_code == 2


@pytest.mark.parametrize("args", [["--trust", "/nonexistent/dir"], ["--protocol", "/nonexistent.toml"]])
def test_missing_configuration_exits_1(args: list[str]) -> None:
    """The drug library and the trust store are configuration: missing or invalid is exit 1 in every command."""
    r = run("schedule", "validate", str(EXAMPLE), *args, "--json")
    assert r.exit_code == 1
    assert out_json(r)["error"]["code"] == "config"


def test_usage_error_json_shape() -> None:
    r = run("schedule", "validate", "/nonexistent/schedule.json", "--json")
    assert r.exit_code == 2
    body = out_json(r)
    assert body["ok"] is False and body["usage"] is True and "cannot read" in body["error"]["message"]


def test_validate_directory_is_usage_error(tmp_path: Path) -> None:
    assert run("schedule", "validate", tmp_path).exit_code == 2


def test_validate_bad_protocol_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("[library]\nid = 1\n")
    r = run("schedule", "validate", EXAMPLE, "--protocol", bad, "--json")
    assert r.exit_code == 1 and "invalid protocol" in out_json(r)["error"]["message"]


# --- sign ---------------------------------------------------------------------------------------------------


def test_sign_to_stdout_by_default_and_never_in_place() -> None:
    before = EXAMPLE.read_bytes()
    r = run("schedule", "sign", EXAMPLE, "--key", DEMO_KEY)
    assert r.exit_code == 0
    assert EXAMPLE.read_bytes() == before
    doc = json.loads(r.stdout, parse_float=Decimal)
    assert TrustStore.load(DEMO_TRUST).verify(doc)
    assert r.stdout == SIGNED.read_text(encoding="utf-8")  # the committed signed example is reproducible


def test_sign_out_file_then_validate(tmp_path: Path) -> None:
    out = tmp_path / "signed.json"
    r = run("schedule", "sign", EXAMPLE, "--key", DEMO_KEY, "--out", out, "--json")
    assert r.exit_code == 0
    body = out_json(r)
    assert body["ok"] is True and body["out"] == str(out) and len(body["key_id"]) == 16
    r = run("schedule", "validate", out, "--json", "--now", NOW, "--trust", DEMO_TRUST)
    assert r.exit_code == 0 and out_json(r)["signature"]["status"] == "verified"
    assert out_json(r)["digest"] == body["digest"]


def test_sign_json_to_stdout_keeps_numbers(tmp_path: Path) -> None:
    doc = json.loads((CONFIG / "schedules" / "example-confirm.json").read_text(), parse_float=Decimal)
    r = run("schedule", "sign", write(tmp_path, doc), "--key", DEMO_KEY, "--json")
    assert r.exit_code == 0
    body = json.loads(r.stdout, parse_float=Decimal)
    assert body["document"]["syringe"]["inner_diameter_mm"] == Decimal("21.59")  # a number, not "21.59"
    assert TrustStore.load(DEMO_TRUST).verify(body["document"]) == body["key_id"]


def test_sign_refuses_invalid_schedule(tmp_path: Path) -> None:
    doc = json.loads(EXAMPLE.read_text(), parse_float=Decimal)
    doc["steps"][2]["dose_mg_per_24h"] = "600"
    out = tmp_path / "signed.json"
    r = run("schedule", "sign", write(tmp_path, doc), "--key", DEMO_KEY, "--out", out, "--json")
    assert r.exit_code == 1
    assert ("/steps/2/dose_mg_per_24h", "ceiling") in {(p["path"], p["rule"]) for p in out_json(r)["problems"]}
    assert not out.exists()


def test_sign_garbage_input(tmp_path: Path) -> None:
    path = tmp_path / "bin"
    path.write_bytes(os.urandom(64) + b"\xff")
    r = run("schedule", "sign", path, "--key", DEMO_KEY)
    assert r.exit_code == 1


# --- keys ---------------------------------------------------------------------------------------------------


def test_keys_generate_text_and_refuse_overwrite(tmp_path: Path) -> None:
    r = run("keys", "generate", tmp_path, "--name", "ward")
    assert r.exit_code == 0 and "key id" in r.stdout
    assert (tmp_path / "ward.key").exists() and (tmp_path / "ward.pub").exists()
    r = run("keys", "generate", tmp_path, "--name", "ward", "--json")
    assert r.exit_code == 1
    assert "already exists" in out_json(r)["error"]["message"]


def test_keys_generate_bad_name(tmp_path: Path) -> None:
    r = run("keys", "generate", tmp_path, "--name", "../x", "--json")
    assert r.exit_code == 1 and out_json(r)["ok"] is False


# --- volume plan (issue 13, part 1) -------------------------------------------------------------------------


def test_validate_shows_the_volume_plan(tmp_path: Path) -> None:
    r = run("schedule", "validate", EXAMPLE, "--now", NOW)
    assert r.exit_code == 0
    assert "volume plan (a fresh syringe every 24 h" in r.stdout
    assert "course 37.944 mL (1897.2 mg), 4 syringe change(s)" in r.stdout
    body = out_json(run("schedule", "validate", EXAMPLE, "--now", NOW, "--json"))
    plan = body["volume_plan"]
    assert plan["supply"] == {"change_every_hours": "24"} and plan["deliverable"] is True
    assert [d["volume_ml"] for d in plan["days"]] == ["1.992", "6", "9.984", "9.984", "9.984"]
    assert [s["ends"] for s in plan["syringes"]] == ["change"] * 4 + ["course_end"]
    assert plan["syringe_changes"] == 4


def test_validate_refuses_a_course_the_syringes_cannot_deliver(tmp_path: Path) -> None:
    doc = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    del doc["syringes"]  # the 17 mL syringe alone: empty on day 3
    r = run("schedule", "validate", write(tmp_path, doc), "--now", NOW, "--json")
    assert r.exit_code == 1
    body = out_json(r)
    assert [(p["path"], p["rule"]) for p in body["problems"]] == [("/syringes", "volume-plan")]
    assert "runs empty at 2026-12-04T06:39" in body["problems"][0]["detail"]
    assert body["volume_plan"]["deliverable"] is False
    text = run("schedule", "validate", write(tmp_path, doc), "--now", NOW)
    assert "runs empty (change it then) at 2026-12-04T06:39" in text.stdout
    # and sign refuses it too
    assert run("schedule", "sign", write(tmp_path, doc), "--key", DEMO_KEY).exit_code == 1


def test_shipped_examples_are_deliverable() -> None:
    for name in ("example.json", "example-confirm.json", "example.signed.json", "example-confirm.signed.json"):
        body = out_json(run("schedule", "validate", CONFIG / "schedules" / name, "--now", NOW, "--json"))
        assert body["ok"] is True and body["volume_plan"]["deliverable"] is True, name
    confirm = out_json(run("schedule", "validate", CONFIG / "schedules" / "example-confirm.json", "--now", NOW,
                           "--json"))["volume_plan"]
    assert [s["concentration_mg_per_ml"] for s in confirm["syringes"]] == ["50", "100"]


def test_handover_note_is_kept(tmp_path: Path) -> None:
    from driverd.cli.schedule import DEFAULT_PROTOCOL
    from driverd.core.protocol import parse_protocol
    from driverd.core.schedule_parse import load_json, parse_schedule

    doc = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    doc["handover_note"] = "oral ketamine 50 mg qds from day 7 (prescribed by the GP)"
    assert run("schedule", "validate", write(tmp_path, doc), "--now", NOW).exit_code == 0
    sched = parse_schedule(load_json(write(tmp_path, doc).read_bytes()), parse_protocol(DEFAULT_PROTOCOL.read_text()))
    assert sched.handover_note == doc["handover_note"]
