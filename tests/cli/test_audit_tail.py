"""`driverd audit tail [-f]`: whole records in order as they are appended, across segment rotation."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest
from typer.testing import CliRunner

from driverd.audit.tail import Follower
from driverd.audit.writer import AuditWriter
from driverd.cli.main import app
from tests.audit.conftest import StepClock, small_config, write_generic_log
from tests.cli import interrupt

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 60.0  # the most any single wait may take before the test fails (a bound, not a timing assertion)


def _append(w: AuditWriter, first: int, n: int) -> None:
    for i in range(first, first + n):
        w.append("telemetry", pump_id="bed-1", course_id="c-1", durable=False, i=i)
    w.flush()


def _seqs(lines: list[dict[str, object]]) -> list[object]:
    return [r["seq"] for r in lines]


def test_follower_reads_whole_records_in_order_across_rotation(tmp_path: Path) -> None:
    log = tmp_path / "log"
    w = AuditWriter.open(log, small_config(), None, StepClock())
    try:
        f = Follower(log)
        seen = [line.record for line in f.backlog(0)]  # 0: skip what is there, follow from the end
        assert seen == []
        start_seq = w.seq
        for batch in range(6):  # small segments: several rotations happen while following
            _append(w, batch * 7, 7)
            seen += [line.record for line in f.poll()]
        assert len(list(log.glob("audit-*.jsonl"))) >= 3
        seqs = _seqs(seen)  # type: ignore[arg-type]
        assert seqs == list(range(start_seq + 1, w.seq + 1))  # nothing skipped, nothing repeated
        assert [r["i"] for r in seen if r and r["event"] == "telemetry"] == list(range(42))
    finally:
        w.close()


def test_a_line_being_written_is_read_only_once_complete(tmp_path: Path) -> None:
    log = write_generic_log(tmp_path / "log", None, n=3)
    seg = sorted(log.glob("audit-*.jsonl"))[-1]
    f = Follower(log)
    before = [line.record for line in f.backlog(100)]
    whole = seg.read_bytes().splitlines()[-1]
    with seg.open("ab") as fh:
        fh.write(whole[:20])  # half a record (the writer's next line, say)
    assert list(f.poll()) == []
    with seg.open("ab") as fh:
        fh.write(whole[20:] + b"\n")
    (line,) = list(f.poll())
    assert line.raw == whole and line.record == before[-1]


def test_tail_last_n_readable_and_json(tmp_path: Path) -> None:
    log = write_generic_log(tmp_path / "log", None, n=20)
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "tail", str(log), "-n", "3", "--json"])
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in res.stdout.splitlines()]
    all_lines = [x for seg in sorted(log.glob("audit-*.jsonl")) for x in seg.read_text("utf-8").splitlines()]
    assert res.stdout.splitlines() == all_lines[-3:]  # the exact lines of the log
    res = runner.invoke(app, ["audit", "tail", str(log), "-n", "3", "--tz", "Asia/Kolkata"])
    assert res.exit_code == 0
    text = res.stdout.splitlines()
    assert len(text) == 3
    for line, rec in zip(text, records, strict=True):
        assert line.split()[0] == str(rec["seq"]) and line.split()[2] == rec["event"]
        assert "+05:30 " in line  # the record's time in the zone asked for, with its offset
    assert runner.invoke(app, ["audit", "tail", str(tmp_path / "nope")]).exit_code == 2
    assert runner.invoke(app, ["audit", "tail", str(log), "--tz", "Mars/Olympus"]).exit_code == 2


def _reader(stream: IO[str], out: queue.Queue[str]) -> None:
    for line in stream:
        out.put(line)
    out.put("")  # EOF


def test_tail_follow_in_a_subprocess_until_interrupted(tmp_path: Path) -> None:
    log = tmp_path / "log"
    w = AuditWriter.open(log, small_config(), None, StepClock())
    _append(w, 100, 5)  # on disk before tail starts
    proc = subprocess.Popen(
        [sys.executable, "-m", "driverd.cli.main", "audit", "tail", str(log), "-f", "-n", "2", "--json",
         "--interval", "0.02"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interrupt.sigint_deliverable)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        first_seq = w.seq - 1  # -n 2: the last two records already there
        got = [json.loads(lines.get(timeout=BOUND_S)) for _ in range(2)]
        for batch in range(4):  # appended while tailing, several segment rotations among them
            _append(w, batch * 10, 10)
            while got[-1]["seq"] < w.seq:
                line = lines.get(timeout=BOUND_S)
                assert line, "tail ended early"
                got.append(json.loads(line))
        assert [r["seq"] for r in got] == list(range(first_seq, w.seq + 1))
        assert len(list(log.glob("audit-*.jsonl"))) >= 3
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tail -f did not stop on SIGINT ({interrupt.state()})")
        assert code == 0
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        w.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
