"""config/schemas/schedule.schema.json (via jsonschema) and the pure structural checks agree.

The daemon core uses the pure mirror (mypy --strict, no untyped dependency); these tests prove that the
published schema accepts and rejects exactly the same documents.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core import schedule_parse as sp
from driverd.core.schedule_parse import check_structure, load_json

from .cases import SEMANTIC, STRUCTURAL, Mutation
from .conftest import CONFIG

MakeDoc = Callable[[], dict[str, Any]]
SCHEMA = json.loads((CONFIG / "schemas" / "schedule.schema.json").read_text(encoding="utf-8"), parse_float=Decimal)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def schema_accepts(doc: object) -> bool:
    return not any(True for _ in VALIDATOR.iter_errors(doc))


def test_schema_is_valid_2020_12() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_schema_patterns_are_the_pure_patterns() -> None:
    defs = SCHEMA["$defs"]
    assert defs["id"]["pattern"] == f"^{sp.ID_PATTERN}$"
    assert defs["timestamp"]["pattern"] == f"^{sp.TIMESTAMP_PATTERN}$"
    assert defs["quantity"]["anyOf"][0]["pattern"] == f"^{sp.QUANTITY_PATTERN}$"
    assert defs["id"]["maxLength"] == sp.MAX_ID and defs["text"]["maxLength"] == sp.MAX_TEXT
    assert SCHEMA["properties"]["steps"]["maxItems"] == sp.MAX_STEPS
    assert SCHEMA["required"] == list(sp.TOP_REQUIRED)
    sig = SCHEMA["properties"]["signature"]["properties"]
    assert sig["key_id"]["pattern"] == f"^{sp.KEY_ID_PATTERN}$"
    assert sig["value"]["pattern"] == f"^{sp.SIGNATURE_VALUE_PATTERN}$"


@pytest.mark.parametrize(
    "name", ["example.json", "example-confirm.json", "example.signed.json", "example-confirm.signed.json"]
)
def test_examples_pass_both(name: str) -> None:
    doc = load_json((CONFIG / "schedules" / name).read_bytes())
    assert schema_accepts(doc)
    assert check_structure(doc) == []


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in STRUCTURAL], ids=[c[0] for c in STRUCTURAL])
def test_malformed_rejected_by_both(make_doc: MakeDoc, mutate: Mutation, expected: tuple[str, str]) -> None:
    doc = make_doc()
    mutate(doc)
    assert not schema_accepts(doc)
    assert check_structure(doc)
    # The schema's errors point at the same field, or at an enclosing one (a missing member is reported on
    # its object; a failed `oneOf` on the field holding it) - never somewhere unrelated.
    paths = {"".join(f"/{p}" for p in e.absolute_path) for e in VALIDATOR.iter_errors(doc)}
    want = expected[0]
    parent = want.rsplit("/", 1)[0]
    raw_want = want.replace("~1", "/").replace("~0", "~")
    assert any(p in (want, raw_want, parent) or (p and want.startswith(p + "/")) for p in paths), paths


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in SEMANTIC], ids=[c[0] for c in SEMANTIC])
def test_semantic_cases_pass_both_structurally(make_doc: MakeDoc, mutate: Mutation, expected: tuple[str, str]) -> None:
    doc = make_doc()
    mutate(doc)
    assert schema_accepts(doc)
    assert check_structure(doc) == []


# --- property: random damage is judged the same way by both ------------------------------------------------

_interesting_strings = st.sampled_from(
    [
        "stop",
        "100",
        "0",
        "0.5",
        "19.13",
        "999999.999999",
        "1000000",
        "1.1234567",
        "01",
        "-1",
        "NaN",
        "1e2",
        "100\n",
        "2026-12-01T09:00:00Z",
        "2026-12-01T09:00:00+01:00",
        "2026-12-01T09:00:00",
        "2026-02-30T09:00:00Z",
        "2026-12-01T09:00:00Z\n",
        "ketamine",
        "prescriber",
        "pharmacist",
        "nurse",
        "ed25519",
        "0123456789abcdef",
        "A" * 86 + "==",
        "bed-1",
        "bed 1",
        "",
        "x" * 300,
        "a\x00b",
        "\u2028",
    ]
)
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.decimals(allow_nan=False, allow_infinity=False).filter(lambda d: -30 < d.adjusted() < 30),
    st.decimals(min_value=0, max_value=1000, places=7),
    st.text(max_size=12),
    _interesting_strings,
)
_value = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "role", "id", "x"]), inner),
    max_leaves=6,
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


@settings(max_examples=300)
@given(data=st.data())
def test_random_damage_same_verdict(make_doc: MakeDoc, data: st.DataObject) -> None:
    doc = make_doc()
    if data.draw(st.booleans()):
        doc["signature"] = {"key_id": "0123456789abcdef", "alg": "ed25519", "value": "A" * 86 + "=="}
    for _ in range(data.draw(st.integers(1, 2))):
        paths = _paths(doc)[1:]
        path = data.draw(st.sampled_from(paths))
        node: Any = doc
        for p in path[:-1]:
            node = node[p]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[path[-1]] = data.draw(_value)
        elif action == "delete":
            del node[path[-1]]
        elif isinstance(node, dict):
            node[data.draw(st.sampled_from(["extra", "dose_mg_per_h", "role", "auto", "signature"]))] = data.draw(
                _value
            )
        else:
            node.append(data.draw(_value))
    assert schema_accepts(doc) == (check_structure(doc) == []), check_structure(doc)
