"""The signed-schedule check on `schedule_accepted` records (driverd.audit.schedules), record by record.

The records are built as the daemon builds them (`event_to_record` of the ScheduleAccepted it folds, with the
pushed document in canonical form); the end-to-end version, on a log the daemon wrote, is
tests/runtime/test_signed_recovery.py."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from driverd.audit.schedules import UntrustedSchedule, check_schedule_records
from driverd.core.canonical import canonical_bytes
from driverd.core.events import ScheduleAccepted
from driverd.core.protocol import parse_protocol
from driverd.core.records import event_to_record
from driverd.core.schedule_parse import parse_schedule
from driverd.runtime.demo import CONFIG_DIR, DEMO_KEY, DEMO_TRUST, START, demo_schedule
from driverd.signing import TrustStore, generate_keypair, sign_document

PROTOCOL_TEXT = (CONFIG_DIR / "protocols" / "ketamine-burst.toml").read_text(encoding="utf-8")
PROTOCOL = parse_protocol(PROTOCOL_TEXT)
TRUST = TrustStore.load(DEMO_TRUST)
AT = START + timedelta(minutes=1)


def library(seq: int = 1) -> dict[str, Any]:
    return {"seq": seq, "event": "library_loaded", "pump_id": None, "text": PROTOCOL_TEXT}


def accepted(doc: dict[str, Any], *, seq: int = 2, fields_from: dict[str, Any] | None = None,
             document: str | None = "canonical", pump_id: str | None = None) -> dict[str, Any]:
    """A schedule_accepted record as the daemon logs it for `doc` (fields parsed from `fields_from` or doc)."""
    sched = parse_schedule(fields_from or doc, PROTOCOL)
    text = canonical_bytes(doc).decode("utf-8") if document == "canonical" else document
    name, fields = event_to_record(ScheduleAccepted(AT, sched, text))
    return {"seq": seq, "event": name, "pump_id": pump_id or sched.pump_id, "course_id": None, **fields}


def check(*records: dict[str, Any]) -> int:
    return check_schedule_records(records, TRUST)


def refused(*records: dict[str, Any]) -> str:
    with pytest.raises(UntrustedSchedule) as info:
        check(*records)
    return str(info.value)


def test_a_schedule_signed_by_a_trusted_key_passes() -> None:
    assert check(library(), accepted(demo_schedule("bed-1", 1, START))) == 1


def test_a_document_written_differently_from_the_logged_fields_still_passes() -> None:
    # JSON numbers with trailing zeros, times with offsets and fractions, "stop": the logged fields normalise all
    # of them (which is why the fields alone cannot be re-verified), yet they are the same schedule.
    doc = demo_schedule("bed-1", 1, START)
    doc.pop("signature")
    doc["hold_days"] = Decimal("3.00")
    doc["syringe"] = {**doc["syringe"], "fill_volume_ml": Decimal("22.0")}
    first = datetime.fromisoformat(doc["steps"][0]["not_before"])
    doc["steps"][0]["not_before"] = (first + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000+01:00")
    signed = sign_document(doc, DEMO_KEY)
    rec = accepted(signed)
    assert rec["schedule"]["hold_days"] == "3.00" and '"hold_days":3,' in rec["document"]
    assert check(library(), rec) == 1


def test_no_document_is_refused_naming_the_seq() -> None:
    msg = refused(library(), accepted(demo_schedule("bed-1", 1, START), seq=7, document=None))
    assert "seq 7" in msg and "no signed `document`" in msg and "'bed-1'" in msg


def test_a_key_not_in_the_trust_store_is_refused(tmp_path: Path) -> None:
    key, _ = generate_keypair(tmp_path, "rogue")
    doc = demo_schedule("bed-1", 1, START)
    msg = refused(library(), accepted(sign_document(doc, key), seq=9))
    assert "seq 9" in msg and "[unknown_key]" in msg


def test_a_document_changed_after_signing_is_refused() -> None:
    doc = demo_schedule("bed-1", 1, START)
    doc["steps"][2]["dose_mg_per_24h"] = "400"  # fields parsed from the same altered document: they agree
    msg = refused(library(), accepted(doc, seq=4))
    assert "seq 4" in msg and "[bad_signature]" in msg


def test_fields_that_differ_from_the_signed_document_are_refused() -> None:
    doc = demo_schedule("bed-1", 1, START)
    other = copy.deepcopy(doc)
    other["steps"][1]["auto"] = False
    other["hold_days"] = "2"
    msg = refused(library(), accepted(doc, seq=5, fields_from=other))
    assert "seq 5" in msg and "differs from its signed document" in msg and "steps, hold_days, digest" in msg


def test_a_signed_document_logged_for_another_pump_is_refused() -> None:
    msg = refused(library(), accepted(demo_schedule("bed-1", 1, START), seq=6, pump_id="bed-2"))
    assert "seq 6" in msg and "signed document is for pump 'bed-1'" in msg


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"a": 1, "a": 2}'])
def test_a_document_that_is_not_a_json_object_is_refused(text: str) -> None:
    msg = refused(library(), accepted(demo_schedule("bed-1", 1, START), seq=3, document=text))
    assert "seq 3" in msg and "its document is not" in msg


def test_a_schedule_before_any_drug_library_is_refused() -> None:
    msg = refused(accepted(demo_schedule("bed-1", 1, START), seq=2))
    assert "seq 2" in msg and "no library_loaded record before it" in msg


def test_only_the_first_untrusted_schedule_is_reported() -> None:
    good = accepted(demo_schedule("bed-1", 1, START), seq=2)
    bad = accepted(demo_schedule("bed-2", 2, START), seq=3, document=None)
    also_bad = accepted(demo_schedule("bed-3", 3, START), seq=4, document=None)
    msg = refused(library(), good, bad, also_bad)
    assert "seq 3" in msg and "seq 4" not in msg


def test_verify_with_trust_on_a_log_without_schedules_and_usage_errors(generic_log: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from driverd.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["audit", "verify", str(generic_log), "--trust", str(DEMO_TRUST)])
    assert res.exit_code == 0 and "schedules: 0 accepted schedule(s)" in res.stdout, res.output
    res = runner.invoke(app, ["audit", "verify", str(generic_log), "--trust", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not a directory" in res.output and "Traceback" not in res.output
