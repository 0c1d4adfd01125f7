"""parse_schedule: the valid example, every malformed case (right rule and path), all problems at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core.canonical import content_digest
from driverd.core.errors import DriverdError, Problem, ValidationError
from driverd.core.protocol import ProtocolSpec
from driverd.core.schedule_parse import (
    check_structure,
    course_length_days,
    load_json,
    parse_schedule,
    parse_timestamp,
    step_rate_ml_per_h,
)

from .cases import SEMANTIC, STRUCTURAL, Mutation
from .conftest import CONFIG, NOW

MakeDoc = Callable[[], dict[str, Any]]


def problems_of(doc: object, spec: ProtocolSpec, now: datetime | None = NOW) -> list[Problem]:
    with pytest.raises(ValidationError) as info:
        parse_schedule(doc, spec, now=now)  # type: ignore[arg-type]
    return list(info.value.problems)


def pairs(problems: list[Problem]) -> set[tuple[str, str]]:
    return {(p.path, p.rule) for p in problems}


# --- the valid examples -------------------------------------------------------------------------------------


def test_example_parses(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    s = parse_schedule(doc, spec, now=NOW)
    assert s.schedule_id == "demo-course-0001"
    assert s.version == 1
    assert [x.dose_mg_per_24h for x in s.steps] == [Decimal(100), Decimal(300), Decimal(500)]
    assert all(x.auto for x in s.steps)
    assert s.steps[0].not_before == datetime(2026, 12, 1, 9, tzinfo=UTC)
    assert s.taper == ()
    assert s.hold_days == Decimal(3)
    assert s.concentration_mg_per_ml == Decimal(50)
    assert s.inner_diameter_mm == Decimal("19.13")
    assert {a.role for a in s.approved_by} == {"prescriber", "pharmacist"}
    assert s.signature is None
    assert s.digest == content_digest(doc)
    assert len(s.digest) == 64
    assert course_length_days(s) == Decimal(5)


def test_second_example_with_confirmation_and_taper(spec: ProtocolSpec) -> None:
    doc = load_json((CONFIG / "schedules" / "example-confirm.json").read_bytes())
    s = parse_schedule(doc, spec, now=NOW)  # type: ignore[arg-type]
    assert [x.auto for x in s.steps] == [True, False, False]
    assert [(t.dose_mg_per_24h, t.after_hours) for t in s.taper] == [(Decimal(250), Decimal(0)), (0, 24)]
    assert course_length_days(s) == Decimal(6)


def test_now_none_skips_time_checks(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    doc["expires_at"] = "2026-11-21T00:00:00Z"
    parse_schedule(doc, spec, now=None)  # replay: expiry is not judged
    assert ("/expires_at", "expired") in pairs(problems_of(doc, spec, NOW))


def test_naive_now_is_a_programming_error(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    with pytest.raises(ValueError):
        parse_schedule(doc, spec, now=datetime(2026, 11, 22))


def test_numbers_as_strings_or_numbers_are_equivalent(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    doc["drug"]["concentration_mg_per_ml"] = Decimal("50.00")
    doc["syringe"]["inner_diameter_mm"] = Decimal("19.130")
    doc["steps"][0]["dose_mg_per_24h"] = 100
    doc["hold_days"] = Decimal("3E+0")
    s = parse_schedule(doc, spec, now=NOW)
    assert s.concentration_mg_per_ml == 50 and s.inner_diameter_mm == Decimal("19.13")


def test_drug_name_is_case_insensitive(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    doc["drug"]["name"] = "Ketamine"
    assert parse_schedule(doc, spec, now=NOW).drug_name == "Ketamine"


def test_offsets_are_honoured(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    # 10:00+01:00 is 09:00Z: exactly 24 h after the first step, so the interval is met.
    doc["steps"][1]["not_before"] = "2026-12-02T10:00:00+01:00"
    s = parse_schedule(doc, spec, now=NOW)
    assert s.steps[1].not_before - s.steps[0].not_before == timedelta(hours=24)


def test_first_step_may_be_manual(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    doc["steps"][0]["auto"] = False
    assert parse_schedule(doc, spec, now=NOW).steps[0].auto is False


def test_digest_ignores_signature_member(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    unsigned = parse_schedule(doc, spec, now=NOW).digest
    doc["signature"] = {"key_id": "0123456789abcdef", "alg": "ed25519", "value": "A" * 86 + "=="}
    signed = parse_schedule(doc, spec, now=NOW)
    assert signed.digest == unsigned
    assert signed.signature is not None and signed.signature.key_id == "0123456789abcdef"


def test_quantized_rates_round_toward_less_drug(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    assert step_rate_ml_per_h(Decimal(100), Decimal(50)) == Decimal("0.083")
    assert step_rate_ml_per_h(Decimal(500), Decimal(50)) == Decimal("0.416")
    assert step_rate_ml_per_h(Decimal(500), Decimal(10)) == Decimal("2.083")


# --- malformed documents ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in STRUCTURAL], ids=[c[0] for c in STRUCTURAL])
def test_structural_problem_reported(
    make_doc: MakeDoc, spec: ProtocolSpec, mutate: Mutation, expected: tuple[str, str]
) -> None:
    doc = make_doc()
    mutate(doc)
    found = problems_of(doc, spec)
    assert expected in pairs(found), found
    assert expected in pairs(check_structure(doc))


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in SEMANTIC], ids=[c[0] for c in SEMANTIC])
def test_semantic_problem_reported(
    make_doc: MakeDoc, spec: ProtocolSpec, mutate: Mutation, expected: tuple[str, str]
) -> None:
    doc = make_doc()
    mutate(doc)
    assert check_structure(doc) == []  # the schema alone cannot see these
    found = problems_of(doc, spec)
    assert expected in pairs(found), found


def test_expired(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    assert ("/expires_at", "expired") in pairs(problems_of(doc, spec, datetime(2027, 7, 1, tzinfo=UTC)))
    # the instant of expiry is already expired
    assert ("/expires_at", "expired") in pairs(problems_of(doc, spec, datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC)))


def test_not_yet_valid(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    found = problems_of(doc, spec, datetime(2026, 11, 20, 9, 59, 59, tzinfo=UTC))
    assert pairs(found) == {("/approved_at", "not-yet-valid")}


def test_rate_below_device_minimum(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    # With a pump whose minimum is 0.1 mL/h, 100 mg/24h at 50 mg/mL (0.083 mL/h) cannot be delivered.
    strict = dataclasses.replace(spec, min_rate_ml_per_h=Decimal("0.1"))
    assert ("/steps/0/dose_mg_per_24h", "rate") in pairs(problems_of(doc, strict))


def test_rate_above_device_maximum(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    slow = dataclasses.replace(spec, max_rate_ml_per_h=Decimal("0.3"))
    assert pairs(problems_of(doc, slow)) == {("/steps/2/dose_mg_per_24h", "rate")}


def test_non_object_documents(spec: ProtocolSpec) -> None:
    for value in ([], "schedule", 3, None, True):
        assert pairs(problems_of(value, spec)) == {("", "type")}


def test_binary_float_refused(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    doc["hold_days"] = 3.0
    assert pairs(problems_of(doc, spec)) == {("/hold_days", "type")}


def test_all_problems_at_once(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    doc["notes"] = "extra"  # structural
    doc["steps"][2]["dose_mg_per_24h"] = "450"
    doc["steps"][2]["dose_mg_per_24h"] = "600"  # semantic: ceiling (and max-step)
    doc["approved_by"] = [{"role": "prescriber", "id": "demo-prescriber-01"}]  # semantic: approvals
    found = pairs(problems_of(doc, spec))
    assert {
        ("/notes", "unknown-field"),
        ("/steps/2/dose_mg_per_24h", "ceiling"),
        ("/approved_by", "approvals"),
    } <= found


def test_problem_paths_escape_odd_keys(doc: dict[str, Any], spec: ProtocolSpec) -> None:
    doc["bad\nkey"] = 1
    doc["x" * 500] = 1
    found = problems_of(doc, spec)
    for p in found:
        assert "\n" not in p.path and len(p.path) < 100
        assert p.path.isprintable()


def test_validation_error_is_a_driverd_error() -> None:
    assert issubclass(ValidationError, DriverdError)


# --- timestamps ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01T09:00:00Z", datetime(2026, 12, 1, 9, tzinfo=UTC)),
        ("2026-12-01T10:30:00+01:30", datetime(2026, 12, 1, 9, tzinfo=UTC)),
        ("2026-12-01T04:00:00-05:00", datetime(2026, 12, 1, 9, tzinfo=UTC)),
        ("2026-12-01T09:00:00.5Z", datetime(2026, 12, 1, 9, 0, 0, 500000, tzinfo=UTC)),
        ("2026-12-01T09:00:00-00:00", datetime(2026, 12, 1, 9, tzinfo=UTC)),
    ],
)
def test_parse_timestamp(text: str, expected: datetime) -> None:
    got = parse_timestamp(text)
    assert got == expected and got.tzinfo is not None


@pytest.mark.parametrize("text", ["", "2026-12-01", "2026-12-01T09:00:00", "2026-12-01T09:00Z", "2026-02-29T00:00:00Z"])
def test_parse_timestamp_rejects(text: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_timestamp(text, "--now")
    assert info.value.problems[0].path == "--now"


# --- robustness: random damage never escapes as anything but ValidationError ------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(lambda d: abs(d.adjusted()) < 50),
    st.text(max_size=20),
    st.sampled_from(["stop", "100", "2026-12-01T09:00:00Z", "ketamine", "prescriber", "-1", "NaN", "1e999"]),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _paths(node: Any, base: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [base]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*base, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*base, i))
    return out


@settings(max_examples=150)
@given(data=st.data())
def test_random_damage_is_reported_not_raised(make_doc: MakeDoc, spec: ProtocolSpec, data: st.DataObject) -> None:
    doc = make_doc()
    path = data.draw(st.sampled_from(_paths(doc)[1:]))
    value = data.draw(_json)
    node: Any = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    try:
        parse_schedule(doc, spec, now=NOW)
    except ValidationError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.rule and p.detail
            assert p.path == "" or p.path.startswith("/")


@settings(max_examples=200)
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace"))))
def test_load_json_never_raises_anything_else(data: bytes) -> None:
    try:
        load_json(data)
    except ValidationError as exc:
        assert exc.problems and exc.problems[0].rule in {"json", "encoding", "duplicate-key", "range", "size"}
