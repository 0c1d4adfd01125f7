"""Malformed-schedule cases shared by the parser tests and the schema-agreement tests.

Each case: (id, mutation applied to a fresh copy of the valid example, expected (path, rule)).
STRUCTURAL cases are ones the JSON Schema must reject too; SEMANTIC ones need the drug library.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

Doc = dict[str, Any]
Mutation = Callable[[Doc], None]


def _split(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in path.strip("/").split("/")]


def set_at(path: str, value: object) -> Mutation:
    def apply(doc: Doc) -> None:
        *parents, last = _split(path)
        node: Any = doc
        for p in parents:
            node = node[p]
        node[last] = value

    return apply


def del_at(path: str) -> Mutation:
    def apply(doc: Doc) -> None:
        *parents, last = _split(path)
        node: Any = doc
        for p in parents:
            node = node[p]
        del node[last]

    return apply


def rename(path: str, new: str) -> Mutation:
    def apply(doc: Doc) -> None:
        *parents, last = _split(path)
        node: Any = doc
        for p in parents:
            node = node[p]
        node[new] = node.pop(last)

    return apply


def steps_at(*hours_and_doses: tuple[int, str]) -> Mutation:
    def apply(doc: Doc) -> None:
        start = datetime(2026, 12, 1, 9, tzinfo=UTC)
        doc["steps"] = [
            {"dose_mg_per_24h": dose, "not_before": (start + timedelta(hours=h)).isoformat(), "auto": True}
            for h, dose in hours_and_doses
        ]

    return apply


def step_times(*stamps: str) -> Mutation:
    def apply(doc: Doc) -> None:
        doc["steps"] = [
            {"dose_mg_per_24h": d, "not_before": t, "auto": True}
            for d, t in zip(("100", "300", "500"), stamps, strict=True)
        ]

    return apply


SIG = {"key_id": "0123456789abcdef", "alg": "ed25519", "value": "A" * 86 + "=="}

STRUCTURAL: list[tuple[str, Mutation, tuple[str, str]]] = [
    # missing fields
    ("missing-schedule-id", del_at("/schedule_id"), ("/schedule_id", "required")),
    ("missing-expires", del_at("/expires_at"), ("/expires_at", "required")),
    ("missing-drug-name", del_at("/drug/name"), ("/drug/name", "required")),
    ("missing-step-auto", del_at("/steps/0/auto"), ("/steps/0/auto", "required")),
    ("missing-approval-id", del_at("/approved_by/1/id"), ("/approved_by/1/id", "required")),
    # unknown fields, top level and nested
    ("unknown-top", set_at("/colour", "blue"), ("/colour", "unknown-field")),
    ("unknown-drug", set_at("/drug/units", "mg"), ("/drug/units", "unknown-field")),
    ("unknown-syringe", set_at("/syringe/brand", "BD"), ("/syringe/brand", "unknown-field")),
    ("unknown-step", set_at("/steps/1/rate_ml_per_h", "1"), ("/steps/1/rate_ml_per_h", "unknown-field")),
    ("unknown-approval", set_at("/approved_by/0/name", "Dr X"), ("/approved_by/0/name", "unknown-field")),
    ("unknown-signature", set_at("/signature", {**SIG, "x": 1}), ("/signature/x", "unknown-field")),
    ("unknown-key-escaped", lambda d: d.__setitem__("a/b~c", 1), ("/a~1b~0c", "unknown-field")),
    # wrong units: a field renamed to another unit
    ("dose-per-hour", rename("/steps/0/dose_mg_per_24h", "dose_mg_per_h"), ("/steps/0/dose_mg_per_h", "unknown-field")),
    (
        "dose-per-hour-required",
        rename("/steps/0/dose_mg_per_24h", "dose_mg_per_h"),
        ("/steps/0/dose_mg_per_24h", "required"),
    ),
    (
        "conc-per-litre",
        rename("/drug/concentration_mg_per_ml", "concentration_mg_per_l"),
        ("/drug/concentration_mg_per_l", "unknown-field"),
    ),
    # wrong types
    ("root-array", lambda d: d.clear(), ("/schedule_id", "required")),
    ("version-string", set_at("/version", "1"), ("/version", "type")),
    ("version-decimal", set_at("/version", Decimal("1.0")), ("/version", "type")),
    ("version-bool", set_at("/version", True), ("/version", "type")),
    ("version-zero", set_at("/version", 0), ("/version", "range")),
    ("version-huge", set_at("/version", 2**60), ("/version", "range")),
    ("schedule-id-number", set_at("/schedule_id", 5), ("/schedule_id", "type")),
    ("drug-array", set_at("/drug", []), ("/drug", "type")),
    ("steps-string", set_at("/steps", "100,300,500"), ("/steps", "type")),
    ("steps-object", set_at("/steps", {"0": {}}), ("/steps", "type")),
    ("step-not-object", set_at("/steps/1", 300), ("/steps/1", "type")),
    ("auto-string", set_at("/steps/0/auto", "yes"), ("/steps/0/auto", "type")),
    ("dose-null", set_at("/steps/0/dose_mg_per_24h", None), ("/steps/0/dose_mg_per_24h", "type")),
    ("dose-bool", set_at("/steps/0/dose_mg_per_24h", True), ("/steps/0/dose_mg_per_24h", "type")),
    ("hold-list", set_at("/hold_days", [3]), ("/hold_days", "type")),
    ("approved-by-object", set_at("/approved_by", {"role": "prescriber"}), ("/approved_by", "type")),
    ("timestamp-number", set_at("/approved_at", 20261120), ("/approved_at", "type")),
    # bad timestamps
    ("ts-naive", set_at("/steps/1/not_before", "2026-12-02T09:00:00"), ("/steps/1/not_before", "format")),
    ("ts-garbage", set_at("/expires_at", "next tuesday"), ("/expires_at", "format")),
    ("ts-date-only", set_at("/expires_at", "2027-06-30"), ("/expires_at", "format")),
    ("ts-space", set_at("/approved_at", "2026-11-20 10:00:00Z"), ("/approved_at", "format")),
    ("ts-month-13", set_at("/approved_at", "2026-13-20T10:00:00Z"), ("/approved_at", "format")),
    ("ts-hour-24", set_at("/approved_at", "2026-11-20T24:00:00Z"), ("/approved_at", "format")),
    ("ts-leap-second", set_at("/approved_at", "2026-11-20T10:00:60Z"), ("/approved_at", "format")),
    ("ts-offset-no-colon", set_at("/approved_at", "2026-11-20T10:00:00+0100"), ("/approved_at", "format")),
    ("ts-trailing-newline", set_at("/approved_at", "2026-11-20T10:00:00Z\n"), ("/approved_at", "format")),
    ("ts-lowercase", set_at("/approved_at", "2026-11-20t10:00:00z"), ("/approved_at", "format")),
    ("ts-nanos", set_at("/approved_at", "2026-11-20T10:00:00.123456789Z"), ("/approved_at", "format")),
    ("ts-unicode-digits", set_at("/approved_at", "٢٠٢٦-11-20T10:00:00Z"), ("/approved_at", "format")),
    # numbers: huge, negative, NaN/Infinity, bad spellings
    ("dose-huge-string", set_at("/steps/2/dose_mg_per_24h", "1000000"), ("/steps/2/dose_mg_per_24h", "format")),
    ("dose-huge-number", set_at("/steps/2/dose_mg_per_24h", Decimal("1E+400")), ("/steps/2/dose_mg_per_24h", "range")),
    ("dose-huge-int", set_at("/steps/2/dose_mg_per_24h", 10**50), ("/steps/2/dose_mg_per_24h", "range")),
    ("dose-negative", set_at("/steps/0/dose_mg_per_24h", -100), ("/steps/0/dose_mg_per_24h", "range")),
    (
        "dose-negative-decimal",
        set_at("/steps/0/dose_mg_per_24h", Decimal("-0.5")),
        ("/steps/0/dose_mg_per_24h", "range"),
    ),
    ("dose-negative-string", set_at("/steps/0/dose_mg_per_24h", "-100"), ("/steps/0/dose_mg_per_24h", "format")),
    ("dose-nan-string", set_at("/steps/0/dose_mg_per_24h", "NaN"), ("/steps/0/dose_mg_per_24h", "format")),
    ("dose-inf-string", set_at("/steps/0/dose_mg_per_24h", "Infinity"), ("/steps/0/dose_mg_per_24h", "format")),
    ("dose-exp-string", set_at("/steps/0/dose_mg_per_24h", "1e2"), ("/steps/0/dose_mg_per_24h", "format")),
    ("dose-units-string", set_at("/steps/0/dose_mg_per_24h", "100 mg"), ("/steps/0/dose_mg_per_24h", "format")),
    ("dose-leading-zero", set_at("/steps/0/dose_mg_per_24h", "0100"), ("/steps/0/dose_mg_per_24h", "format")),
    ("dose-newline", set_at("/steps/0/dose_mg_per_24h", "100\n"), ("/steps/0/dose_mg_per_24h", "format")),
    ("dose-too-precise", set_at("/steps/0/dose_mg_per_24h", "100.1234567"), ("/steps/0/dose_mg_per_24h", "format")),
    ("dose-tiny-number", set_at("/hold_days", Decimal("1E-999999")), ("/hold_days", "range")),
    (
        "conc-precise-number",
        set_at("/drug/concentration_mg_per_ml", Decimal("50.0000001")),
        ("/drug/concentration_mg_per_ml", "range"),
    ),
    # sizes and characters
    (
        "too-many-steps-absurd",
        set_at("/steps", [{"dose_mg_per_24h": "100", "not_before": "2026-12-01T09:00:00Z", "auto": True}] * 65),
        ("/steps", "size"),
    ),
    ("no-steps", set_at("/steps", []), ("/steps", "size")),
    ("id-control-char", set_at("/pump_id", "bed\x001"), ("/pump_id", "format")),
    ("id-newline", set_at("/pump_id", "bed-1\n"), ("/pump_id", "format")),
    ("id-space", set_at("/patient_ref", "John Smith"), ("/patient_ref", "format")),
    ("id-empty", set_at("/schedule_id", ""), ("/schedule_id", "length")),
    ("id-too-long", set_at("/schedule_id", "x" * 129), ("/schedule_id", "length")),
    ("text-too-long", set_at("/drug/name", "k" * 257), ("/drug/name", "length")),
    ("text-bidi-line-sep", set_at("/syringe/model", "BD\u2028Plastipak"), ("/syringe/model", "format")),
    ("text-lone-surrogate", set_at("/drug/name", "ket\ud800amine"), ("/drug/name", "format")),
    # taper, approvals, signature shapes
    ("taper-empty", set_at("/taper", []), ("/taper", "size")),
    ("taper-word", set_at("/taper", "none"), ("/taper", "enum")),
    ("taper-number", set_at("/taper", 0), ("/taper", "type")),
    ("taper-step-missing", set_at("/taper", [{"dose_mg_per_24h": "0"}]), ("/taper/0/after_hours", "required")),
    ("role-unknown", set_at("/approved_by/1/role", "nurse"), ("/approved_by/1/role", "enum")),
    (
        "approvals-absurd",
        set_at("/approved_by", [{"role": "prescriber", "id": f"p{i}"} for i in range(17)]),
        ("/approved_by", "size"),
    ),
    ("sig-alg", set_at("/signature", {**SIG, "alg": "rsa"}), ("/signature/alg", "enum")),
    ("sig-key-id", set_at("/signature", {**SIG, "key_id": "XYZ"}), ("/signature/key_id", "format")),
    ("sig-value", set_at("/signature", {**SIG, "value": "abc"}), ("/signature/value", "format")),
    (
        "sig-missing-value",
        set_at("/signature", {"key_id": SIG["key_id"], "alg": "ed25519"}),
        ("/signature/value", "required"),
    ),
    ("sig-string", set_at("/signature", "signed"), ("/signature", "type")),
    # syringe supply (issue 13)
    ("syringes-string", set_at("/syringes", "daily"), ("/syringes", "type")),
    ("syringes-number", set_at("/syringes", 24), ("/syringes", "type")),
    ("syringes-empty-list", set_at("/syringes", []), ("/syringes", "size")),
    ("syringes-too-many", set_at("/syringes", [{"fill_volume_ml": "17"}] * 65), ("/syringes", "size")),
    ("syringes-unknown", set_at("/syringes", {"change_every_hours": "24", "every": "day"}),
     ("/syringes/every", "unknown-field")),
    ("syringes-no-hours", set_at("/syringes", {}), ("/syringes/change_every_hours", "required")),
    ("syringes-hours-negative", set_at("/syringes/change_every_hours", "-24"),
     ("/syringes/change_every_hours", "format")),
    ("syringes-hours-float-text", set_at("/syringes/change_every_hours", "24h"),
     ("/syringes/change_every_hours", "format")),
    ("syringe-fill-missing", set_at("/syringes", [{"concentration_mg_per_ml": "50"}]),
     ("/syringes/0/fill_volume_ml", "required")),
    ("syringe-fill-unknown", set_at("/syringes", [{"fill_volume_ml": "17", "units": "mL"}]),
     ("/syringes/0/units", "unknown-field")),
    ("syringe-fill-bool", set_at("/syringes", [{"fill_volume_ml": True}]), ("/syringes/0/fill_volume_ml", "type")),
    ("syringe-fill-not-object", set_at("/syringes", ["17"]), ("/syringes/0", "type")),
    # handover note (issue 13, part 5)
    ("handover-number", set_at("/handover_note", 7), ("/handover_note", "type")),
    ("handover-empty", set_at("/handover_note", ""), ("/handover_note", "length")),
    ("handover-too-long", set_at("/handover_note", "x" * 257), ("/handover_note", "length")),
    ("handover-control", set_at("/handover_note", "oral\nketamine"), ("/handover_note", "format")),
    # exposure override (issue 13, part 4)
    ("override-string", set_at("/exposure_override", "yes"), ("/exposure_override", "type")),
    ("override-no-reason", set_at("/exposure_override", {"approved_by": []}),
     ("/exposure_override/reason", "required")),
    ("override-unknown", set_at("/exposure_override", {"reason": "r", "approved_by": [], "by": "x"}),
     ("/exposure_override/by", "unknown-field")),
    ("override-role", set_at("/exposure_override", {"reason": "r", "approved_by": [{"role": "nurse", "id": "n"}]}),
     ("/exposure_override/approved_by/0/role", "enum")),
]

SEMANTIC: list[tuple[str, Mutation, tuple[str, str]]] = [
    ("protocol", set_at("/protocol", "morphine-csci"), ("/protocol", "protocol")),
    ("drug", set_at("/drug/name", "morphine"), ("/drug/name", "drug")),
    (
        "concentration",
        set_at("/drug/concentration_mg_per_ml", "20"),
        ("/drug/concentration_mg_per_ml", "concentration"),
    ),
    ("syringe-model", set_at("/syringe/model", "Acme 20 mL"), ("/syringe/model", "syringe")),
    ("syringe-diameter", set_at("/syringe/inner_diameter_mm", "19.12"), ("/syringe/inner_diameter_mm", "syringe")),
    ("fill-over", set_at("/syringe/fill_volume_ml", "18"), ("/syringe/fill_volume_ml", "fill-volume")),
    ("fill-zero", set_at("/syringe/fill_volume_ml", "0"), ("/syringe/fill_volume_ml", "fill-volume")),
    ("above-ceiling", set_at("/steps/2/dose_mg_per_24h", "550"), ("/steps/2/dose_mg_per_24h", "ceiling")),
    (
        "above-ceiling-number",
        set_at("/steps/2/dose_mg_per_24h", Decimal("500.000001")),
        ("/steps/2/dose_mg_per_24h", "ceiling"),
    ),
    ("not-allowed", set_at("/steps/1/dose_mg_per_24h", "275"), ("/steps/1/dose_mg_per_24h", "allowed-dose")),
    ("zero-dose", set_at("/steps/0/dose_mg_per_24h", "0"), ("/steps/0/dose_mg_per_24h", "allowed-dose")),
    ("start-too-high", set_at("/steps/0/dose_mg_per_24h", "150"), ("/steps/0/dose_mg_per_24h", "start-dose")),
    ("dose-not-increasing", set_at("/steps/1/dose_mg_per_24h", "100"), ("/steps/1/dose_mg_per_24h", "order")),
    ("step-too-big", set_at("/steps/1/dose_mg_per_24h", "150"), ("/steps/2/dose_mg_per_24h", "max-step")),
    ("steps-too-close", set_at("/steps/1/not_before", "2026-12-01T20:00:00Z"), ("/steps/1/not_before", "interval")),
    (
        "steps-close-offset",
        set_at("/steps/1/not_before", "2026-12-02T09:00:00+01:00"),
        ("/steps/1/not_before", "interval"),
    ),
    ("steps-same-time", set_at("/steps/1/not_before", "2026-12-01T09:00:00Z"), ("/steps/1/not_before", "order")),
    ("steps-backwards", set_at("/steps/2/not_before", "2026-11-30T09:00:00Z"), ("/steps/2/not_before", "order")),
    (
        "too-many-steps",
        steps_at((0, "30"), (24, "50"), (48, "100"), (72, "150"), (96, "200"), (120, "250")),
        ("/steps", "step-count"),
    ),
    ("hold-zero", set_at("/hold_days", "0"), ("/hold_days", "hold-days")),
    ("hold-too-long", set_at("/hold_days", "3.5"), ("/hold_days", "hold-days")),
    (
        "taper-no-stop",
        set_at(
            "/taper", [{"dose_mg_per_24h": "250", "after_hours": "0"}, {"dose_mg_per_24h": "100", "after_hours": "12"}]
        ),
        ("/taper/1/dose_mg_per_24h", "taper"),
    ),
    (
        "taper-increasing",
        set_at(
            "/taper",
            [
                {"dose_mg_per_24h": "100", "after_hours": "0"},
                {"dose_mg_per_24h": "250", "after_hours": "12"},
                {"dose_mg_per_24h": "0", "after_hours": "24"},
            ],
        ),
        ("/taper/1/dose_mg_per_24h", "order"),
    ),
    (
        "taper-at-top",
        set_at(
            "/taper", [{"dose_mg_per_24h": "500", "after_hours": "0"}, {"dose_mg_per_24h": "0", "after_hours": "12"}]
        ),
        ("/taper/0/dose_mg_per_24h", "taper"),
    ),
    (
        "taper-time-backwards",
        set_at(
            "/taper", [{"dose_mg_per_24h": "250", "after_hours": "12"}, {"dose_mg_per_24h": "0", "after_hours": "6"}]
        ),
        ("/taper/1/after_hours", "order"),
    ),
    (
        "taper-too-long",
        set_at(
            "/taper", [{"dose_mg_per_24h": "250", "after_hours": "0"}, {"dose_mg_per_24h": "0", "after_hours": "49"}]
        ),
        ("/taper/1/after_hours", "taper"),
    ),
    (
        "course-too-long",
        step_times("2026-12-01T09:00:00Z", "2026-12-05T09:00:00Z", "2026-12-08T09:00:00Z"),
        ("", "course-length"),
    ),
    (
        "no-pharmacist",
        set_at("/approved_by", [{"role": "prescriber", "id": "demo-prescriber-01"}]),
        ("/approved_by", "approvals"),
    ),
    (
        "no-prescriber",
        set_at("/approved_by", [{"role": "pharmacist", "id": "demo-pharmacist-01"}]),
        ("/approved_by", "approvals"),
    ),
    ("no-approvals", set_at("/approved_by", []), ("/approved_by", "approvals")),
    ("same-person", set_at("/approved_by/1/id", "demo-prescriber-01"), ("/approved_by/1/id", "approvals")),
    ("approved-after-expiry", set_at("/approved_at", "2027-07-01T00:00:00Z"), ("/expires_at", "order")),
    ("ts-feb-30", set_at("/approved_at", "2026-02-30T10:00:00Z"), ("/approved_at", "format")),
    ("ts-year-9999", set_at("/expires_at", "9999-12-31T23:59:59-05:00"), ("/expires_at", "range")),
    ("ts-year-0", set_at("/approved_at", "0000-01-01T00:00:00Z"), ("/approved_at", "range")),
    # volume planning (issue 13): the shipped example needs about 38 mL; its 17 mL syringe is changed daily
    ("no-syringe-supply", del_at("/syringes"), ("/syringes", "volume-plan")),
    ("changes-too-rare", set_at("/syringes/change_every_hours", "48"), ("/syringes/change_every_hours", "volume-plan")),
    ("changes-too-often", set_at("/syringes/change_every_hours", "0.5"), ("/syringes/change_every_hours", "syringes")),
    ("changes-beyond-course", set_at("/syringes/change_every_hours", "217"),
     ("/syringes/change_every_hours", "syringes")),
    ("fills-short", set_at("/syringes", [{"fill_volume_ml": "17"}]), ("/syringes", "volume-plan")),
    ("fills-over-max", set_at("/syringes", [{"fill_volume_ml": "18"}, {"fill_volume_ml": "17"}]),
     ("/syringes/0/fill_volume_ml", "fill-volume")),
    ("fills-zero", set_at("/syringes", [{"fill_volume_ml": "0"}]), ("/syringes/0/fill_volume_ml", "fill-volume")),
    ("fills-concentration", set_at("/syringes", [{"fill_volume_ml": "17", "concentration_mg_per_ml": "20"}]),
     ("/syringes/0/concentration_mg_per_ml", "concentration")),
    ("override-one-person", set_at("/exposure_override", {"reason": "second burst agreed", "approved_by": [
        {"role": "prescriber", "id": "dr-a"}, {"role": "prescriber", "id": "dr-a"}]}),
     ("/exposure_override/approved_by", "approvals")),
    ("override-no-prescriber", set_at("/exposure_override", {"reason": "second burst agreed", "approved_by": [
        {"role": "pharmacist", "id": "ph-a"}, {"role": "pharmacist", "id": "ph-b"}]}),
     ("/exposure_override/approved_by", "approvals")),
    ("override-alone", set_at("/exposure_override", {"reason": "second burst agreed", "approved_by": [
        {"role": "prescriber", "id": "dr-a"}]}), ("/exposure_override/approved_by", "approvals")),
]
