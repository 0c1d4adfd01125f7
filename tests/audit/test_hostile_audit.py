"""`driverd audit verify | replay | export | report` on garbage files (issue #11 item 5): exit 1 with the file
and line named, never a traceback; the readers raise AuditError (or report a failed verification) only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from driverd.audit.reader import MAX_LINE_BYTES, iter_lines
from driverd.audit.verify import verify_log
from driverd.cli.main import app
from driverd.core.errors import AuditError

runner = CliRunner()

GARBAGE: dict[str, bytes] = {
    "random": bytes(range(256)) * 40,
    "invalid-utf8": b'{"seq": 1, "x": "\xff\xfe"}\n',
    "deep-array": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "deep-object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n",
    "huge-exponent": b'{"seq": 1e999999999999999999999, "a": 1E+999999999}\n',
    "huge-integer": b'{"seq": ' + b"9" * 10_000 + b"}\n",
    "nul-bytes": b"\x00" * 1000,
    "not-an-object": b"[1, 2, 3]\n",
    "torn": b'{"seq": 1',
    "over-long-line": b"x" * (MAX_LINE_BYTES + 10),
}


def segment(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "audit-000001.jsonl"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", list(GARBAGE))
@pytest.mark.parametrize("command", ["verify", "replay", "export", "report"])
def test_audit_commands_on_garbage_exit_1_naming_the_file(name: str, command: str, tmp_path: Path) -> None:
    path = segment(tmp_path, GARBAGE[name])
    for target in (path, tmp_path):  # one segment file, and the directory
        res = runner.invoke(app, ["audit", command, str(target)])
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert res.exit_code == 1, res.output
        assert "Traceback" not in res.output
        assert str(path) in res.output
        res = runner.invoke(app, ["audit", command, str(target), "--json"])
        assert res.exit_code == 1 and json.loads(res.stdout)["ok"] is False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=200), st.sampled_from(list(GARBAGE.values())[:-1])), max_size=5))
def test_readers_only_raise_audit_error(tmp_path: Path, lines: list[bytes]) -> None:
    path = segment(tmp_path, b"\n".join(lines))
    report = verify_log(path)
    assert report.ok is False or os.path.getsize(path) == 0 or report.records > 0
    try:
        for _ in iter_lines(path):
            pass
    except AuditError as exc:
        assert str(path) in str(exc)
