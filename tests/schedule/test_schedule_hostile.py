"""Hostile schedule documents (issue #11 item 5): huge exponents, huge numbers and strings, NUL bytes, lone
surrogates, invalid UTF-8 and deep nesting are ValidationErrors from the parser, and exit code 1 with a clear
message from `driverd schedule validate | sign | push`, never an uncaught exception."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from driverd.cli.main import app
from driverd.core.errors import ValidationError
from driverd.core.protocol import ProtocolSpec
from driverd.core.schedule_parse import load_json, parse_schedule
from driverd.runtime.service import configure_logging

from .conftest import CONFIG, DEMO_KEY, EXAMPLE, NOW

HOLE = "@@hostile@@"

# JSON literals (bytes) that a parser must survive.
HOSTILE_LITERALS: dict[str, bytes] = {
    "huge-exponent": b"1e999999999",
    "huge-negative-exponent": b"1e-999999999",
    "zero-tiny-exponent": b"0e-999999999",
    "negative-huge": b"-1e999999999",
    "beyond-decimal-range": b"1E+999999999999999999999",
    "5000-digit-integer": b"9" * 5000,
    "5000-digit-fraction": b"0." + b"0" * 5000 + b"1",
    "nul-string": b'"\\u0000"',
    "lone-surrogate": b'"\\ud800"',
    "huge-string": b'"' + b"x" * 500_000 + b'"',
    "deep-array": b"[" * 100_000 + b"]" * 100_000,
    "deep-object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "nan": b"NaN",
    "duplicate-keys": b'{"a": 1, "a": 2}',
}

# Where in the example schedule the literal goes (JSON pointer-ish: keys and list indexes).
FIELDS: list[tuple[str | int, ...]] = [
    ("version",), ("pump_id",), ("hold_days",), ("drug", "concentration_mg_per_ml"),
    ("syringe", "inner_diameter_mm"), ("syringe", "fill_volume_ml"), ("steps", 0, "dose_mg_per_24h"),
    ("steps", 0, "not_before"), ("steps",), ("taper",), ("approved_by", 0, "id"), ("expires_at",),
    ("patient_ref",),
]

# Raw files that are not even JSON text.
GARBAGE_FILES: dict[str, bytes] = {
    "invalid-utf8": b'{"schedule_id": "\xff\xfe"}',
    "overlong-utf8": b'{"schedule_id": "\xc0\xaf"}',
    "nul-bytes": b"\x00" * 64,
    "bom": b"\xef\xbb\xbf{}",
    "too-large": b'{"pad": "' + b"x" * (2 << 20) + b'"}',
    "empty": b"",
}


def _example_text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


def with_literal(where: tuple[str | int, ...], literal: bytes) -> bytes:
    doc: Any = json.loads(_example_text())
    target = doc
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = HOLE
    return json.dumps(doc, indent=2).encode().replace(f'"{HOLE}"'.encode(), literal, 1)


def hostile_documents() -> Iterator[tuple[str, bytes]]:
    for name, literal in HOSTILE_LITERALS.items():
        for where in FIELDS:
            yield f"{'.'.join(map(str, where))}={name}", with_literal(where, literal)
    yield from GARBAGE_FILES.items()


DOCUMENTS = dict(hostile_documents())


def parse_bytes(data: bytes, spec: ProtocolSpec) -> None:
    """Load and parse: returns normally (a valid schedule) or raises ValidationError; nothing else."""
    doc = load_json(data)
    if not isinstance(doc, dict):
        return
    parse_schedule(doc, spec, now=NOW)


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_hostile_document_is_a_validation_error(name: str, spec: ProtocolSpec) -> None:
    with pytest.raises(ValidationError) as info:
        parse_bytes(DOCUMENTS[name], spec)
    assert info.value.problems and all(p.rule and p.detail for p in info.value.problems)
    assert len(str(info.value)) < 20_000  # the message names the problem; it does not echo the input


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_a_validation_error_or_a_value(data: bytes) -> None:
    try:
        load_json(data)
    except ValidationError as exc:
        assert exc.problems


def _json_values() -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=30)
               | st.decimals(allow_nan=False, allow_infinity=False) | st.sampled_from(list(HOSTILE_LITERALS)))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                      max_size=4), max_leaves=15)


@settings(max_examples=300, deadline=None)
@given(where=st.sampled_from(FIELDS), value=_json_values(), literal=st.sampled_from(list(HOSTILE_LITERALS.values())),
       use_literal=st.booleans())
def test_any_value_anywhere_is_parsed_or_a_validation_error(
    where: tuple[str | int, ...], value: Any, literal: bytes, use_literal: bool, spec: ProtocolSpec
) -> None:
    if use_literal:
        data = with_literal(where, literal)
    else:
        doc: Any = json.loads(_example_text())
        target = doc
        for key in where[:-1]:
            target = target[key]
        target[where[-1]] = value
        data = json.dumps(doc, default=str).encode("utf-8", "surrogatepass")
    try:
        parse_bytes(data, spec)
    except ValidationError as exc:
        assert exc.problems


# ------------------------------------------------------------------------------------------------ CLI

runner = CliRunner()

CLI_CASES = [name for name in DOCUMENTS if name.startswith(("hold_days=", "steps=", "patient_ref="))
             or "=" not in name]


def run(*args: str | Path) -> Result:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_validate_and_sign_exit_1_with_a_clear_message(name: str, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(DOCUMENTS[name])
    res = run("schedule", "validate", path, "--now", "2026-11-22T12:00:00Z")
    assert res.exit_code == 1 and "INVALID" in res.output
    res = run("schedule", "validate", path, "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["ok"] is False
    res = run("schedule", "sign", path, "--key", DEMO_KEY, "--out", tmp_path / "out.json")
    assert res.exit_code == 1 and "INVALID" in res.output
    assert not (tmp_path / "out.json").exists()


def test_cli_push_of_hostile_documents_exit_1_and_the_daemon_keeps_running(tmp_path: Path) -> None:
    from tests.runtime.test_control import BEFORE_FIRST_STEP, IDLE, LiveDaemon, short_dir

    configure_logging(sys.__stderr__, json_output=True)  # the daemon's logs off the CLI's stdout
    with short_dir() as d, LiveDaemon(d, BEFORE_FIRST_STEP) as live:
        for name in CLI_CASES:
            path = tmp_path / "s.json"
            path.write_bytes(DOCUMENTS[name])
            res = run("schedule", "push", path, "--socket", live.socket, "--json")
            assert res.exit_code == 1, (name, res.output)
            assert json.loads(res.stdout)["ok"] is False
        assert live.courses() == IDLE
        # The genuine schedule is still accepted afterwards.
        res = run("schedule", "push", CONFIG / "schedules" / "example.signed.json", "--socket", live.socket)
        assert res.exit_code == 0, res.output
    structlog.reset_defaults()
