"""Replay: a correct course log replays with no divergence; an altered setpoint (re-chained and re-signed with
the key, so verify passes) is caught and named."""

from __future__ import annotations

import json
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from driverd.audit.reader import iter_lines, iter_records
from driverd.audit.replay import Replayer, replay_lines, replay_records
from driverd.audit.verify import verify_log
from driverd.cli.main import app
from driverd.core.rules import RULES_VERSION

from .conftest import rechain
from .course import write_course_log

runner = CliRunner()


@pytest.fixture(scope="module")
def course_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def course_dir(tmp_path_factory: pytest.TempPathFactory, course_key: Ed25519PrivateKey) -> Path:
    return write_course_log(tmp_path_factory.mktemp("course") / "log", course_key)


def test_correct_course_replays_clean(course_dir: Path) -> None:
    assert verify_log(course_dir).ok
    result = replay_lines(iter_lines(course_dir))
    assert result.ok, result.divergences[:3]
    assert result.inputs > 200 and result.outputs_checked > 5
    (course,) = [c for c in result.report.courses.values() if c.course_id == "S-1"]
    # 100 -> 300 -> 500 mg/24h at 50 mg/mL, quantized down for the pump, then the stop after a 1-day hold
    assert [r for _, r, _ in course.setpoints] == [D("0.083"), D("0.250"), D("0.416"), D("0")]
    assert [s for _, s in course.states] == ["primed", "titrating", "holding", "stopped"]
    assert any(r["reason"] for r in course.refusals if r["source"] == "clinician")
    d = course.as_dict()
    assert d["commanded_mg"] == d["reported_mg"]  # the exact test pump delivers what was commanded, to the mg


def test_cli_replay_exit_0_and_json(course_dir: Path) -> None:
    res = runner.invoke(app, ["audit", "replay", str(course_dir), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["ok"] is True and payload["divergences"] == []
    text = runner.invoke(app, ["audit", "replay", str(course_dir)])
    assert text.exit_code == 0 and "replay OK" in text.stdout and "pump bed-1" in text.stdout


def _alter_first_setpoint(rec: dict[str, Any], done: list[bool]) -> dict[str, Any]:
    if rec["event"] == "setpoint" and not done and rec["rate_ml_per_h"] != "0":
        done.append(True)
        rec = {**rec, "rate_ml_per_h": "0.5"}  # someone rewrote what was commanded
    return rec


def test_altered_setpoint_rechained_is_caught(tmp_path: Path, course_key: Ed25519PrivateKey) -> None:
    d = write_course_log(tmp_path / "log", course_key, hours=30)
    done: list[bool] = []
    rechain(d, course_key, lambda r: _alter_first_setpoint(r, done))
    assert done
    assert verify_log(d, public_key=course_key.public_key()).ok  # the chain and signatures hold
    result = replay_records(iter_records(d))
    assert not result.ok
    first = result.divergences[0]
    assert first.kind == "different" and "rate_ml_per_h" in first.detail
    assert first.found is not None and first.found["rate_ml_per_h"] == "0.5"
    assert first.expected is not None and first.expected["rate_ml_per_h"] != "0.5"
    res = runner.invoke(app, ["audit", "replay", str(d)])
    assert res.exit_code == 1
    assert f"DIVERGENCE at seq {first.seq}" in res.stdout and "rate_ml_per_h" in res.stdout


def test_deleted_and_extra_outputs_are_divergences(tmp_path: Path, course_key: Ed25519PrivateKey) -> None:
    d = write_course_log(tmp_path / "log", course_key, hours=6)
    recs = list(iter_records(d))
    i = next(k for k, r in enumerate(recs) if r["event"] == "transition")
    missing = replay_records(recs[:i] + recs[i + 1 :])
    assert [x.kind for x in missing.divergences][:1] in (["missing"], ["different"])
    extra = replay_records([*recs[: i + 1], {**recs[i], "seq": -1}, *recs[i + 1 :]])
    assert any(x.kind in ("unexpected", "different") for x in extra.divergences)
    no_lib = replay_records([r for r in recs if r["event"] != "library_loaded"])
    assert no_lib.divergences[0].kind == "no_library"
    bad_lib = replay_records([{**r, "text": "[library"} if r["event"] == "library_loaded" else r for r in recs])
    assert bad_lib.divergences[0].kind == "no_library" and "parse" in bad_lib.divergences[0].detail


def test_malformed_input_record_is_a_divergence(tmp_path: Path, course_key: Ed25519PrivateKey) -> None:
    d = write_course_log(tmp_path / "log", course_key, hours=3)
    recs = list(iter_records(d))
    recs = [{**r, "at": "yesterday"} if r["event"] == "tick" else r for r in recs]
    result = replay_records(recs)
    assert any(x.kind == "input" and "at" in x.detail for x in result.divergences)


def test_comparison_logic_with_a_fake_core() -> None:
    # The comparison alone, with a toy core: each "in" input with value v must be followed by "out" v*2.
    fake = Replayer(
        initial_state=lambda pump: 0,
        reduce=lambda s, ev, proto: (s + 1, (ev * 2,)),
        event_from_record=lambda r: r["v"],
        command_to_record=lambda c: ("out", {"v": c}),
        input_events=frozenset({"in"}),
        output_events=frozenset({"out"}),
    )
    lib = {"seq": 1, "event": "library_loaded", "pump_id": None, "course_id": None,
           "text": (Path(__file__).resolve().parents[2] / "config/protocols/ketamine-burst.toml").read_text()}
    recs = [
        lib,
        {"seq": 2, "event": "in", "pump_id": "p", "course_id": "c", "v": 1},
        {"seq": 3, "event": "out", "pump_id": "p", "course_id": "c", "v": 2},
        {"seq": 4, "event": "in", "pump_id": "p", "course_id": "c", "v": 5},
        {"seq": 5, "event": "out", "pump_id": "p", "course_id": "c", "v": 11},
        {"seq": 6, "event": "in", "pump_id": "p", "course_id": "c", "v": 7},
        {"seq": 7, "event": "in", "pump_id": "p", "course_id": "c", "v": 8},
        {"seq": 8, "event": "out", "pump_id": "p", "course_id": "c", "v": 16},
        {"seq": 9, "event": "in", "pump_id": "p", "course_id": "c", "v": 9},
        {"seq": 10, "event": "log_reopened", "pump_id": None, "course_id": None},  # a crash came before the output
        {"seq": 11, "event": "in", "pump_id": "p", "course_id": "c", "v": 10},
    ]
    result = replay_records(recs, fake)
    # An output missing before the next input of the same process is a divergence; one cut off by a crash (before
    # the writer's restart marker, or at the end of the log) is `interrupted`: recomputed, never logged, never sent.
    assert [(d.seq, d.kind) for d in result.divergences] == [(5, "different"), (6, "missing")]
    assert [(i.input_seq, i.outputs) for i in result.interrupted] == [(9, ({"event": "out", "v": 18},)),
                                                                      (11, ({"event": "out", "v": 20},))]


def _toy_replayer() -> Replayer:
    return Replayer(
        initial_state=lambda pump: 0,
        reduce=lambda s, ev, proto: (s + 1, (ev * 2,)),
        event_from_record=lambda r: r["v"],
        command_to_record=lambda c: ("out", {"v": c}),
        input_events=frozenset({"in"}),
        output_events=frozenset({"out"}),
    )


@pytest.mark.parametrize("rules", ["absent", RULES_VERSION - 1, RULES_VERSION])
def test_a_divergence_names_the_rules_that_decided_its_stretch(rules: object) -> None:
    """A log written by a release with other decision rules (or one that did not record them) diverges where the
    rules changed: the divergence stays a divergence (replay fails), and says which rules decided that stretch;
    under this replay's own rules it says nothing more."""
    lib = {"seq": 1, "event": "library_loaded", "pump_id": None, "course_id": None,
           "text": (Path(__file__).resolve().parents[2] / "config/protocols/ketamine-burst.toml").read_text()}
    start = {"seq": 2, "event": "daemon_start", "pump_id": None, "course_id": None, "version": "0.1.0",
             **({} if rules == "absent" else {"rules": rules})}
    recs = [lib, start,
            {"seq": 3, "event": "in", "pump_id": "p", "course_id": "c", "v": 1},
            {"seq": 4, "event": "out", "pump_id": "p", "course_id": "c", "v": 3},  # the toy core says 2
            {"seq": 5, "event": "in", "pump_id": "p", "course_id": "c", "v": 4}]  # and 8 is missing after it
    result = replay_records(recs, _toy_replayer())
    assert [(d.seq, d.kind) for d in result.divergences] == [(4, "different")]
    assert result.rules == [{"seq": 2, "rules": None if rules == "absent" else rules}]
    detail = result.detail(result.divergences[0])
    assert result.as_dict()["divergences"][0]["detail"] == detail
    text = "\n".join(result.text_lines())
    if rules == RULES_VERSION:
        assert "decided by" not in detail and "decided by" not in text and result.other_rules == []
    else:
        named = "did not record" if rules == "absent" else f"decision rules {rules},"
        assert named in detail and f"this replay runs decision rules {RULES_VERSION}" in detail
        assert "the log from seq 2 was decided by" in text
    assert result.as_dict()["replay_rules"] == RULES_VERSION and not result.ok

