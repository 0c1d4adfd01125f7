"""`driverd audit archive`'s exit code for a run from cron: nothing to archive yet is exit 0 with a message saying
why (segments too recent, too few closed segments, a course still running), and nothing is moved; something
actually wrong (an unsigned log that can never be archived, a log that does not verify) stays exit 1."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from driverd.audit.segments import ANCHOR_NAME, list_segments
from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.cli.main import app
from driverd.signing import generate_keypair, load_private_key
from tests.audit.conftest import append_snapshot_segments

T0 = datetime(2026, 12, 1, tzinfo=UTC)


class _Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t


def _cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def _log(directory: Path, key_path: Path | None, *, segments: int) -> Path:
    """A closed log of `segments` segments, each after the first opening with a (empty) state snapshot."""
    key = None if key_path is None else load_private_key(key_path)
    append_snapshot_segments(AuditWriter.open(directory, AuditConfig(), key, _Clock()), segments)
    assert len(list_segments(directory)) == segments
    return directory


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_segments_too_recent_is_exit_0_and_moves_nothing(tmp_path: Path) -> None:
    key, _ = generate_keypair(tmp_path / "k", "audit")
    log = _log(tmp_path / "log", key, segments=3)
    before = _names(log)
    res = _cli("audit", "archive", log, tmp_path / "arch", "--before", "2026-11-01", "--key", key)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("nothing to archive (not_before_date): segment 1 has records at or after")
    assert _names(log) == before and not (tmp_path / "arch").exists() and not (log / ANCHOR_NAME).exists()
    res = _cli("audit", "archive", log, tmp_path / "arch", "--before", "2026-11-01", "--key", key, "--json")
    assert res.exit_code == 0
    out = json.loads(res.stdout)
    assert out["ok"] is True and out["archived"] == [] and out["nothing_to_archive"]["reason"] == "not_before_date"
    assert _names(log) == before


def test_a_log_of_one_segment_is_exit_0(tmp_path: Path) -> None:
    key, _ = generate_keypair(tmp_path / "k", "audit")
    log = _log(tmp_path / "log", key, segments=1)
    res = _cli("audit", "archive", log, tmp_path / "arch", "--before", "2027-01-01", "--key", key)
    assert res.exit_code == 0, res.output
    assert "nothing to archive (live_segment)" in res.stdout
    assert not (tmp_path / "arch").exists()


def test_the_same_log_with_old_enough_segments_is_archived(tmp_path: Path) -> None:
    """The control: the log above is archivable, so exit 0 above means 'nothing yet', not 'cannot'."""
    key, _ = generate_keypair(tmp_path / "k", "audit")
    log = _log(tmp_path / "log", key, segments=3)
    res = _cli("audit", "archive", log, tmp_path / "arch", "--before", "2027-01-01", "--key", key, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["archived"] and "nothing_to_archive" not in out and (log / ANCHOR_NAME).exists()


def test_something_wrong_is_still_exit_1(tmp_path: Path) -> None:
    # An unsigned log is never sealed, so it can never be archived: a person must look (exit 1, as before).
    unsigned = _log(tmp_path / "unsigned", None, segments=3)
    res = _cli("audit", "archive", unsigned, tmp_path / "arch", "--before", "2027-01-01", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["code"] == "unsealed"
    # A damaged log: does not verify.
    key, _ = generate_keypair(tmp_path / "k", "audit")
    log = _log(tmp_path / "log", key, segments=3)
    seg = list_segments(log)[0][1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 1
    seg.write_bytes(bytes(data))
    res = _cli("audit", "archive", log, tmp_path / "arch2", "--before", "2027-01-01", "--key", key, "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["code"] == "does_not_verify", res.stdout
    res = _cli("audit", "archive", log, tmp_path / "arch2", "--before", "2027-01-01", "--key", key)
    assert res.exit_code == 1 and "archive refused (does_not_verify)" in res.stderr
