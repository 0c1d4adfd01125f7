"""`driverd audit verify --all` lists every problem (seq, file:line, rule), and the first one is the failure plain
`verify` reports; `--verified-prefix` lets report and export read the part of a damaged log before it."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from driverd.audit.fsck import RULES, check_all
from driverd.audit.verify import verify_log
from driverd.cli.main import app

from .conftest import write_generic_log
from .scenario import write_scenario_log

runner = CliRunner()


def lines_of(seg: Path) -> list[bytes]:
    return seg.read_bytes().split(b"\n")[:-1]


def put(seg: Path, lines: list[bytes], torn: bool = False) -> None:
    seg.write_bytes(b"\n".join(lines) + (b"" if torn else b"\n"))


def same_as_verify(log: Path) -> None:
    """The first problem of check_all is verify's failure, field for field; none iff verify passes."""
    found = check_all(log)
    report = verify_log(log)
    if report.ok:
        assert found.ok, found.problems[:3]
        return
    f, p = report.failure, found.problems[0]
    assert f is not None
    assert (p.seq, p.file, p.line, p.reason) == (f.seq, f.file, f.line, f.reason)
    assert p.rule in RULES


def test_intact_log_has_no_problem(generic_log: Path, pub_pem: Path) -> None:
    assert check_all(generic_log).ok
    res = runner.invoke(app, ["audit", "verify", str(generic_log), "--all", "--key", str(pub_pem)])
    assert res.exit_code == 0 and res.stdout.startswith("OK: no problem in 27 line(s), 2 segment(s)"), res.output


def test_every_problem_is_listed_with_seq_file_line_and_rule(generic_log: Path) -> None:
    segs = sorted(generic_log.glob("audit-*.jsonl"))
    one = lines_of(segs[0])
    one[2] = one[2].replace(b'"i":1', b'"i":7')  # content changed, hash not recomputed
    put(segs[0], one)
    two = lines_of(segs[1])
    del two[3]  # a record deleted
    put(segs[1], two)
    found = check_all(generic_log)
    assert [(p.seq, Path(p.file).name, p.line, p.rule) for p in found.problems] == [
        (3, "audit-000001.jsonl", 3, "content_hash"),
        (19, "audit-000002.jsonl", 4, "seq"),
        (19, "audit-000002.jsonl", 4, "chain"),
    ]
    assert "expected 18, found 19" in found.problems[1].reason
    same_as_verify(generic_log)
    res = runner.invoke(app, ["audit", "verify", str(generic_log), "--all"])
    assert res.exit_code == 1
    out = res.stdout.splitlines()
    assert out[0].startswith("seq 3 (") and out[0].endswith(":3) [content_hash] hash field does not match the "
                                                             "record's content")
    assert out[-1] == "FAILED: 3 problem(s) in 26 line(s), 2 segment(s)"
    plain = runner.invoke(app, ["audit", "verify", str(generic_log)])
    assert plain.exit_code == 1 and "seq 19" not in plain.stdout  # plain verify stops at the first
    payload = json.loads(runner.invoke(app, ["audit", "verify", str(generic_log), "--all", "--json"]).stdout)
    assert payload["ok"] is False and payload["problem_count"] == 3 and payload["problems"][1]["rule"] == "seq"


def test_missing_segment_torn_tail_and_unsealed_tail(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = write_generic_log(tmp_path / "log", key, n=30)
    segs = sorted(log.glob("audit-*.jsonl"))
    assert len(segs) >= 3
    segs[1].unlink()
    last = lines_of(segs[-1])
    put(segs[-1], [*last[:-1], last[-1][:20]], torn=True)
    found = check_all(log, require_sealed=True)
    rules = [p.rule for p in found.problems]
    assert rules[0] == "segments" and "[2]" in found.problems[0].reason
    assert "torn_tail" in rules and rules[-1] == "unsealed_tail"
    # the walk went on past the gap: the next segment's link to the missing one is reported where it is
    assert any(p.rule in ("seq", "chain", "segment_start") and Path(p.file) == segs[2] for p in found.problems)
    same_as_verify(log)


def test_a_garbage_line_does_not_cascade(generic_log: Path) -> None:
    seg = sorted(generic_log.glob("audit-*.jsonl"))[0]
    lines = lines_of(seg)
    lines[4] = b"this is not json"
    put(seg, lines)
    found = check_all(generic_log)
    assert [(p.seq, p.line, p.rule) for p in found.problems] == [(5, 5, "canonical")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_first_problem_is_verifys_failure(tmp_path: Path, key: Ed25519PrivateKey, data: st.DataObject) -> None:
    work = tmp_path / "h"
    shutil.rmtree(work, ignore_errors=True)
    log = write_generic_log(work, key, n=12)
    segs = sorted(log.glob("audit-*.jsonl"))
    for _ in range(data.draw(st.integers(1, 3))):
        seg = data.draw(st.sampled_from(segs))
        raw = bytearray(seg.read_bytes())
        kind = data.draw(st.sampled_from(["flip", "delete", "duplicate", "truncate"]))
        lines = lines_of(seg)
        if not lines:
            continue
        i = data.draw(st.integers(0, len(lines) - 1))
        if kind == "flip" and raw:
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos] ^= data.draw(st.integers(1, 255))
            seg.write_bytes(bytes(raw))
        elif kind == "delete":
            put(seg, lines[:i] + lines[i + 1:])
        elif kind == "duplicate":
            put(seg, lines[: i + 1] + lines[i:])
        else:
            seg.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
    same_as_verify(log)


# ------------------------------------------------------------------------------------------- verified prefix


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, int]:
    """The scenario log with a record in its second segment edited: (log, the edited record's seq)."""
    log = write_scenario_log(tmp_path / "log", None)
    seg = sorted(log.glob("audit-*.jsonl"))[1]
    lines = lines_of(seg)
    lines[10] = lines[10].replace(b'"bed-1"', b'"bed-9"')
    put(seg, lines)
    seq = json.loads(lines[10])["seq"]
    return log, seq


def test_report_on_the_verified_prefix_warns_loudly(damaged: tuple[Path, int]) -> None:
    log, seq = damaged
    res = runner.invoke(app, ["audit", "report", str(log), "--verified-prefix"])
    assert res.exit_code == 0, res.output
    assert res.stderr.startswith(f"WARNING: the audit log does not verify: verification stopped at seq {seq} (")
    assert f"seq 1..{seq - 1} ({seq - 1} records)" in res.stderr and "audit verify --all" in res.stderr
    assert res.stdout.startswith(f"{seq - 1} records;")
    payload = json.loads(runner.invoke(app, ["audit", "report", str(log), "--verified-prefix", "--json"]).stdout)
    vp = payload["verified_prefix"]
    assert vp["complete"] is False and vp["stopped_at"]["seq"] == seq and payload["records"] == seq - 1
    assert "bed-9" not in json.dumps(payload)


def test_export_on_the_verified_prefix(damaged: tuple[Path, int], tmp_path: Path) -> None:
    log, seq = damaged
    out = tmp_path / "x.csv"
    res = runner.invoke(app, ["audit", "export", str(log), "--format", "csv", "--out", str(out), "--verified-prefix"])
    assert res.exit_code == 0 and "WARNING" in res.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [int(r["seq"]) for r in rows] == list(range(1, seq))
    res = runner.invoke(app, ["audit", "export", str(log), "--verified-prefix", "--json"])
    payload = json.loads(res.stdout)
    assert payload["records"] == seq - 1 and payload["verified_prefix"]["stopped_at"]["seq"] == seq


def test_an_intact_log_needs_no_warning(tmp_path: Path) -> None:
    log = write_scenario_log(tmp_path / "log", None)
    res = runner.invoke(app, ["audit", "report", str(log), "--verified-prefix"])
    assert res.exit_code == 0 and res.stderr == ""


def test_a_torn_line_mid_log_points_to_the_prefix(tmp_path: Path) -> None:
    log = write_scenario_log(tmp_path / "log", None)
    seg = sorted(log.glob("audit-*.jsonl"))[0]
    lines = lines_of(seg)
    lines[30] = lines[30][:25]
    put(seg, lines)
    res = runner.invoke(app, ["audit", "report", str(log)])
    assert res.exit_code == 1 and "--verified-prefix" in res.stderr and res.stdout == ""
    res = runner.invoke(app, ["audit", "report", str(log), "--verified-prefix", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["records"] == 30


def test_prefix_before_a_missing_segment(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = write_generic_log(tmp_path / "log", key, n=30)
    segs = sorted(log.glob("audit-*.jsonl"))
    assert len(segs) >= 3
    kept = len(lines_of(segs[0]))
    segs[1].unlink()
    res = runner.invoke(app, ["audit", "export", str(log), "--verified-prefix", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["records"] == kept and payload["verified_prefix"]["stopped_at"]["seq"] == kept + 1
    assert "segments missing from the sequence: [2]" in res.stderr and f"seq 1..{kept}" in res.stderr
    # damage before the gap: verification stops there
    first = lines_of(segs[0])
    i = next(i for i in range(5, len(first)) if b'"c-1"' in first[i])
    first[i] = first[i].replace(b'"c-1"', b'"c-2"')
    put(segs[0], first)
    payload = json.loads(runner.invoke(app, ["audit", "report", str(log), "--verified-prefix", "--json"]).stdout)
    assert payload["records"] == i and payload["verified_prefix"]["stopped_at"]["file"] == str(segs[0])
