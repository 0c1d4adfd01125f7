"""Start-up (`open_log`) after a power cut that lost an unsynced page in the middle of the log's tail, on a real log
(bench/synth_log.py: a course on a model pump through the daemon): it starts, recovers the state the log had
before the lost records, and starts again after that. A start refused for real damage appends nothing: a daemon
restarted in a loop on a damaged log leaves it as it found it."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest

from driverd.audit.canonical import loads_line
from driverd.audit.segments import list_segments
from driverd.audit.verify import verify_log
from driverd.audit.writer import AuditConfig, AuditWriter
from driverd.core.errors import AuditError
from driverd.runtime.channel import BULK_EVENTS
from driverd.runtime.demo import DEMO_TRUST, START
from driverd.runtime.recovery import open_log, recover
from driverd.signing import TrustStore, load_private_key

BENCH = Path(__file__).resolve().parents[2] / "bench" / "synth_log.py"
TRUST = TrustStore.load(DEMO_TRUST)
PAGE = 4096
LATER = START + timedelta(days=30)


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synth_log", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synth_log"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    asyncio.run(_module().generate(out, pumps=1, days=0.2, poll_s=60, faults=0.0, restart_at=[], seed=3, sync=False))
    return out


def _copy(made: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(made / "audit", tmp_path / "audit")
    return tmp_path / "audit", made / "keys" / "audit.key"


def _files(audit: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for _, p in list_segments(audit)}


def _start(audit: Path, key: Path) -> tuple[AuditWriter, object]:
    # The daemon's writer settings as Daemon.start passes them (bulk_events: the channel's own set).
    return open_log(audit, AuditConfig(bulk_events=BULK_EVENTS), load_private_key(key), lambda: LATER, TRUST)


def _power_cut(audit: Path, key: Path, then: str | None = None,
               bulk: tuple[str, ...] = ("pump_report",)) -> tuple[Path, bytearray]:
    """The daemon restarts and logs telemetry it has not synced yet (group commit not due) when the power goes
    (`then`: a durable record after it). The rewrite of the last synced page is lost: it reads back as it was,
    zeros after the synced end, and every record written since lies at or after the zeros."""
    w = AuditWriter.open(audit, AuditConfig(group_commit_ms=10**9, checkpoint_every_s=10**6), load_private_key(key),
                         lambda: LATER)
    seg = list_segments(audit)[-1][1]
    synced = seg.stat().st_size
    for i in range(40):
        w.append(bulk[i % len(bulk)], pump_id="bed-1", course_id=None, durable=False, i=i, detail="x" * 200)
    if then is not None:
        w.append(then, pump_id=None, course_id=None, durable=True, control_id="m1")
    w._release()
    data = bytearray(seg.read_bytes())
    page = (synced // PAGE + 1) * PAGE
    assert page + PAGE < len(data) and synced % 512
    data[synced:page] = bytes(page - synced)
    seg.write_bytes(bytes(data))
    return seg, data


def test_a_lost_unsynced_page_starts_and_restarts(made: Path, tmp_path: Path) -> None:
    audit, key = _copy(made, tmp_path)
    before = recover(audit, TRUST)
    seg, data = _power_cut(audit, key)
    line_start = bytes(data).find(b"\x00")

    writer, recovered = _start(audit, key)
    writer.close()
    assert recovered.states == before.states  # the cut records were telemetry: the courses are as they were
    assert seg.read_bytes()[:line_start] == bytes(data[:line_start])
    recs = [loads_line(x) for x in seg.read_bytes().split(b"\n")[:-1]]
    torn = [r for r in recs if r["event"] == "torn_tail_truncated"]
    assert len(torn) == 1 and torn[0]["reason"] == "lost_unsynced_page" and torn[0]["offset"] == line_start
    assert (audit / torn[0]["removed_file"]).read_bytes() == bytes(data[line_start:])
    assert verify_log(audit).ok

    writer, again = _start(audit, key)  # and the next start verifies and replays as usual
    writer.close()
    assert again.states == before.states
    assert verify_log(audit).ok


def test_a_durable_record_after_the_lost_page_refuses_the_start_untouched(made: Path, tmp_path: Path) -> None:
    """A durable record (an HL7 order's hl7_in) after the zeros was fdatasync'd: the zeros are real damage, and
    start-up must not cut the record it may have acted on."""
    audit, key = _copy(made, tmp_path)
    seg, data = _power_cut(audit, key, then="hl7_in")
    for _ in range(2):
        with pytest.raises(AuditError, match="does not verify"):
            _start(audit, key)
        assert seg.read_bytes() == bytes(data)
    assert [p.name for p in audit.iterdir() if p.name.startswith("cut-")] == []


@pytest.mark.parametrize("torn_tail", [False, True])
def test_refused_starts_append_nothing(made: Path, tmp_path: Path, torn_tail: bool) -> None:
    audit, key = _copy(made, tmp_path)
    seg = list_segments(audit)[-1][1]
    data = bytearray(seg.read_bytes())
    data[PAGE : PAGE + 512] = bytes(512)  # zeros before later checkpoints: real damage
    if torn_tail:
        data += b'{"course_id":null,"ev'  # and a crash mid-write
    seg.write_bytes(bytes(data))
    with pytest.raises(AuditError, match="does not verify"):
        _start(audit, key)
    after_first = _files(audit)
    if torn_tail:  # the torn line is cut and the cut logged, once
        assert after_first[seg.name].startswith(bytes(data[: len(data) - 21]))
    else:
        assert after_first[seg.name] == bytes(data)
    for _ in range(3):
        with pytest.raises(AuditError, match="does not verify"):
            _start(audit, key)
        assert _files(audit) == after_first


@pytest.mark.parametrize("bulk", [("pump_report",), ("pump_report", "hl7_out", "hl7_acked")])
def test_the_daemon_itself_cuts_a_lost_page_of_telemetry(made: Path, tmp_path: Path, bulk: tuple[str, ...]) -> None:
    """Daemon.start gives the writer the channel's bulk events and the HL7 gateway's (else it would make no
    lost-page cut and refuse every start): a lost page of telemetry and HL7 traffic records is cut."""
    synth = _module()
    out = tmp_path / "run"
    out.mkdir()
    audit, key = _copy(made, out)
    before = recover(audit, TRUST)
    seg, data = _power_cut(audit, key, bulk=bulk)
    line_start = bytes(data).find(b"\x00")
    config = synth.config_for(out, ["bed-1"], 60, key)
    clock = synth.StepClock(LATER)

    async def run() -> None:
        with synth.model_pumps(clock, {}):
            daemon = synth.Daemon(config, clock)
            await daemon.start()
            assert daemon.audit is not None
            await daemon.stop()

    asyncio.run(run())
    recs = [loads_line(x) for x in seg.read_bytes().split(b"\n")[:-1]]
    torn = [r for r in recs if r["event"] == "torn_tail_truncated"]
    assert len(torn) == 1 and torn[0]["reason"] == "lost_unsynced_page" and torn[0]["offset"] == line_start
    assert recover(audit, TRUST).states.keys() == before.states.keys()
    assert verify_log(audit).ok
