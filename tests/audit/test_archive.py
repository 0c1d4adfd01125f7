"""`driverd audit archive` (issue 12, item 2) on a log made by the real demo path: two finished courses, then a
live one. The archived segments leave the live log; verify, verify --full, replay, report, export and start-up
recovery still work on what is left (the archive anchor + the state snapshot account for the prefix); a crash at
every step boundary, a full disk and a torn copy each leave a log that verifies and recovers, and running archive
again finishes the job."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.audit import archive as archive_mod
from driverd.audit.archive import ArchiveRefused, archive_log, parse_before, read_anchor
from driverd.audit.reader import iter_records
from driverd.audit.segments import ANCHOR_NAME, list_segments, segment_name
from driverd.audit.verify import verify_log
from driverd.audit.writer import AuditConfig
from driverd.cli.main import app
from driverd.core.errors import AuditError
from driverd.runtime.demo import DEMO_TRUST, START
from driverd.runtime.recovery import open_log, recover
from driverd.signing import TrustStore, load_private_key, load_public_key
from tests.audit.archive_log import LIVE_START, ArchiveLog, make_log, run_daemon

TRUST = TrustStore.load(DEMO_TRUST)
BEFORE_LIVE = parse_before("2026-12-08")  # after the demo's courses and the live course's push
FAR = parse_before("2027-01-01")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> ArchiveLog:
    return make_log(tmp_path_factory.mktemp("archive-src"))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> ArchiveLog:
    """The same story with fewer segments (a snapshot every 2 days, no deltas): for the crash
    campaign, which archives a copy of it once per step boundary."""
    return make_log(tmp_path_factory.mktemp("archive-small"), snapshot_every=timedelta(days=2), deltas=False)


@pytest.fixture
def log(made: ArchiveLog, tmp_path: Path) -> Path:
    """A fresh copy of the made log (its own directory)."""
    dest = tmp_path / "audit"
    shutil.copytree(made.audit, dest)
    return dest


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def _state(audit: Path, made: ArchiveLog) -> tuple[dict[str, str], Any, dict[str, int]]:
    r = recover(audit, TRUST, load_public_key(made.pub))
    return {p: repr(s) for p, s in r.states.items()}, r.ledger.to_fields(), r.versions


def _key(made: ArchiveLog) -> Any:
    return load_private_key(made.key)


def _archive(log: Path, dest: Path, made: ArchiveLog, before: Any = BEFORE_LIVE, **kw: Any) -> Any:
    return archive_log(log, before, dest, _key(made), public_key=load_public_key(made.pub), **kw)


def _assert_live_log_works(log: Path, made: ArchiveLog, want: Any) -> None:
    pub = load_public_key(made.pub)
    report = verify_log(log, public_key=pub)
    assert report.ok, report.failure
    assert _state(log, made) == want  # start-up recovery from the live log alone: the same states and ledger


# ------------------------------------------------------------------------------------------- the happy path


def test_archive_leaves_a_live_log_that_verifies_replays_and_recovers(made: ArchiveLog, log: Path,
                                                                      tmp_path: Path) -> None:
    want = _state(log, made)
    before_bytes = sum(p.stat().st_size for _, p in list_segments(log))
    whole = [r["seq"] for r in iter_records(log)]
    dest = tmp_path / "archive"
    res = _cli("audit", "archive", log, dest, "--before", "2026-12-08", "--key", made.key, "--json")
    assert res.exit_code == 0, res.stdout
    out = json.loads(res.stdout)
    live = list_segments(log)
    assert out["archived"] == list(range(1, live[0][0])) and out["signed"] is True
    assert [n for n, _ in list_segments(dest)] == out["archived"]
    after_bytes = sum(p.stat().st_size for _, p in live)
    assert after_bytes < before_bytes / 3
    anchor = read_anchor(log)
    assert anchor is not None and anchor.first_segment == live[0][0] and anchor.sig is not None
    records = list(iter_records(log))
    assert records[0]["seq"] == anchor.last_seq + 1 and records[1]["event"] == "state_snapshot"
    # The live course is whole in the live log; every course in the archive had ended.
    accepted = [r["schedule"]["schedule_id"] for r in records if r["event"] == "schedule_accepted"]
    assert accepted == [made.live_course]
    archived_courses = {r["course_id"] for r in iter_records(dest) if r.get("course_id")}
    assert made.live_course not in archived_courses and len(archived_courses) == 2
    # Every reader on the live log.
    _assert_live_log_works(log, made, want)
    for args in (("verify", log, "--key", made.pub), ("verify", log, "--full"),
                 ("verify", log, "--archive", dest, "--key", made.pub, "--full"), ("verify", dest, "--key", made.pub),
                 ("verify", log, "--trust", DEMO_TRUST), ("verify", log, "--all", "--key", made.pub)):
        res = _cli("audit", *args, "--json")
        assert res.exit_code == 0, (args, res.stdout[-2000:])
        v = json.loads(res.stdout)
        assert v["ok"] and (v.get("full") is None or v["full"]["ok"])
    snapshots = sum(r["event"] == "state_snapshot" for r in iter_records(made.audit))
    full = json.loads(_cli("audit", "verify", log, "--archive", dest, "--full", "--json").stdout)["full"]
    assert full["ok"] and full["snapshots"] == snapshots  # replayed from seq 1 through the live log
    whole_chain = json.loads(_cli("audit", "verify", log, "--archive", dest, "--json").stdout)
    assert (whole_chain["first_seq"], whole_chain["last_seq"], whole_chain["records"]) == (1, whole[-1], len(whole))
    live_only = json.loads(_cli("audit", "verify", log, "--json").stdout)
    assert live_only["first_seq"] == anchor.last_seq + 1 and live_only["archived"]["signed"] is True
    res = _cli("audit", "replay", log, "--json")
    assert res.exit_code == 0
    replayed = json.loads(res.stdout)
    assert replayed["ok"] and replayed["seeded_from"] == anchor.snapshot_seq and replayed["outputs_checked"] > 0
    res = _cli("audit", "report", log, "--json")
    assert res.exit_code == 0
    rep = json.loads(res.stdout)
    assert any(c["course_id"] == made.live_course for c in rep["courses"])
    assert rep["carried_from"] == anchor.snapshot_seq
    bursts = {b["course_id"]: b for bs in rep["exposure"].values() for b in bs}
    assert {c for c, b in bursts.items() if b.get("archived")} == archived_courses  # carried from the snapshot
    whole_report = json.loads(_cli("audit", "report", dest, "--json").stdout)["exposure"]
    for bs in whole_report.values():
        for b in bs:
            assert (b["started_at"], b["ended_at"], b["delivered_mg"]) == (
                bursts[b["course_id"]]["started_at"], bursts[b["course_id"]]["ended_at"],
                bursts[b["course_id"]]["delivered_mg"])
    res = _cli("audit", "export", log, "--format", "jsonl")
    assert res.exit_code == 0 and [json.loads(x)["seq"] for x in res.stdout.splitlines()] == [r["seq"] for r in records]
    # The real daemon starts on the archived log (recovery from its snapshot), runs the live course on, and stops.
    asyncio.run(run_daemon(log, made.key, 2, LIVE_START + timedelta(days=1), 2, push=False))
    assert verify_log(log, public_key=load_public_key(made.pub), require_sealed=True).ok
    assert _cli("audit", "replay", log).exit_code == 0
    assert _cli("audit", "verify", log, "--archive", dest, "--full").exit_code == 0


def test_a_tail_cut_side_file_stays_in_the_live_log(made: ArchiveLog, log: Path, tmp_path: Path) -> None:
    """The bytes a start-up tail cut saved (writer.cut_file_name) are not a segment: archive neither moves nor
    refuses over them; they stay in the live log directory, which still verifies and recovers."""
    want = _state(log, made)
    side = log / "cut-000001-1234-0123456789abcdef.bin"
    side.write_bytes(b'{"course_id":null,"event":"pump_report"\x00\x00\n')
    res = _archive(log, tmp_path / "archive", made)
    assert res.archived and side.read_bytes().startswith(b'{"course_id"')
    assert not (tmp_path / "archive" / side.name).exists()
    _assert_live_log_works(log, made, want)


def test_archive_runs_again_later_and_keeps_one_anchor(made: ArchiveLog, log: Path, tmp_path: Path) -> None:
    want = _state(log, made)
    dest = tmp_path / "archive"
    first = _archive(log, dest, made, parse_before("2026-12-07"))  # up to the snapshot at the demo's stop
    second = _archive(log, dest, made)
    assert first.archived and second.archived[0] == first.archived[-1] + 1
    anchor = read_anchor(log)
    assert anchor is not None and [s.segment for s in anchor.segments] == list(range(1, second.first_segment))
    _assert_live_log_works(log, made, want)
    assert _cli("audit", "verify", log, "--archive", dest, "--full").exit_code == 0
    assert _cli("audit", "replay", log).exit_code == 0


def test_an_unsigned_log_is_never_archived(tmp_path: Path) -> None:
    from driverd.audit.writer import AuditWriter
    from tests.audit.conftest import StepClock, append_snapshot_segments, small_config

    append_snapshot_segments(AuditWriter.open(tmp_path / "log", small_config(), None, StepClock()), 3)
    assert len(list_segments(tmp_path / "log")) == 3
    with pytest.raises(ArchiveRefused) as refused:  # an unsigned log has no checkpoint: nothing is sealed
        archive_log(tmp_path / "log", FAR, tmp_path / "arch", None)
    assert refused.value.reason == "unsealed"


# ------------------------------------------------------------------------------------------- refusals


def test_segments_of_a_live_course_are_never_archived(made: ArchiveLog, log: Path, tmp_path: Path) -> None:
    dest = tmp_path / "archive"
    res = _archive(log, dest, made, FAR)  # everything is before that date, but one course is live
    records = list(iter_records(log))
    assert any(r["event"] == "schedule_accepted" for r in records)  # the live course's push stays live
    assert res.first_segment == list_segments(log)[0][0]
    res2 = _cli("audit", "archive", log, dest, "--before", "2027-01-01", "--key", made.key, "--json")
    assert res2.exit_code == 0  # nothing more may go while the course runs: not a failure (a cron job's next run)
    out = json.loads(res2.stdout)
    assert out["ok"] and out["archived"] == [] and out["nothing_to_archive"]["reason"] == "course_active"
    assert made.live_course in out["nothing_to_archive"]["detail"]


@pytest.mark.parametrize(("args", "reason"), [
    (("--before", "2026-12-01"), "not_before_date"),
    (("--before", "2026-12-08"), "key_required"),
])
def test_refusals_name_the_reason_and_move_nothing(made: ArchiveLog, log: Path, tmp_path: Path,
                                                   args: tuple[str, ...], reason: str) -> None:
    before = sorted(p.name for p in log.iterdir())
    extra = () if reason == "key_required" else ("--key", str(made.key))
    res = _cli("audit", "archive", log, tmp_path / "arch", *args, *extra, "--json")
    if reason == "not_before_date":  # nothing old enough yet: exit 0 (tests/cli/test_audit_archive.py)
        assert res.exit_code == 0, res.stdout
        assert json.loads(res.stdout)["nothing_to_archive"]["reason"] == reason
    else:
        assert res.exit_code == 1, res.stdout
        assert json.loads(res.stdout)["error"]["code"] == reason
    assert sorted(p.name for p in log.iterdir()) == before


def test_refusals_other_key_same_dir_bad_date_damaged_log(made: ArchiveLog, log: Path, tmp_path: Path) -> None:
    from driverd.signing import generate_keypair

    other, _ = generate_keypair(tmp_path / "k", "other")
    res = _cli("audit", "archive", log, tmp_path / "a", "--before", "2026-12-08", "--key", other, "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["code"] == "key_mismatch"
    res = _cli("audit", "archive", log, log, "--before", "2026-12-08", "--key", made.key, "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["code"] == "same_directory"
    for bad in ("yesterday", "2026-13-01", "2026-12-08T10:00"):  # the last has no zone
        res = _cli("audit", "archive", log, tmp_path / "a", "--before", bad, "--key", made.key)
        assert res.exit_code == 2 and "--before" in res.stderr
    seg = list_segments(log)[3][1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 1
    seg.write_bytes(bytes(data))
    res = _cli("audit", "archive", log, tmp_path / "a", "--before", "2026-12-08", "--key", made.key, "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["code"] == "does_not_verify"
    assert not (tmp_path / "a").exists() and not (log / ANCHOR_NAME).exists()


def test_an_archive_dir_holding_another_logs_segment_is_refused(made: ArchiveLog, log: Path, tmp_path: Path) -> None:
    dest = tmp_path / "arch"
    dest.mkdir()
    (dest / segment_name(2)).write_bytes(b"someone else's segment\n")
    with pytest.raises(ArchiveRefused) as refused:
        _archive(log, dest, made)
    assert refused.value.reason == "archive_conflict"
    assert not (log / ANCHOR_NAME).exists() and list_segments(log)[0][0] == 1


# ------------------------------------------------------------------------------------------- the anchor


@pytest.fixture(scope="module")
def archived(made: ArchiveLog, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The made log archived once (live log, archive): copied by the tests that only read or damage it."""
    work = tmp_path_factory.mktemp("archived")
    shutil.copytree(made.audit, work / "audit")
    _archive(work / "audit", work / "archive", made)
    return work / "audit", work / "archive"


def _archived(archived: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the archived log and of its archive."""
    log, dest = tmp_path / "audit", tmp_path / "archive"
    shutil.copytree(archived[0], log)
    shutil.copytree(archived[1], dest)
    return log, dest


@pytest.mark.parametrize(("edit", "words"), [
    (lambda a: {**a, "last_hash": "0" * 64}, "chain broken"),
    (lambda a: {**a, "snapshot_seq": a["snapshot_seq"] + 1}, "signature"),
    (lambda a: {**a, "sig": None, "public_key": None, "key_fingerprint": None}, "not signed"),
    (lambda a: {**a, "first_segment": "x"}, "first_segment"),
    (lambda a: {**a, "format": "other/9"}, "format"),
    (lambda a: {**a, "segments": a["segments"][1:]}, "segments"),
    (lambda a: {**a, "extra": 1}, "unknown field"),
    (lambda a: {**a, "last_seq": a["last_seq"] - 1}, "last_seq"),
])
def test_a_tampered_anchor_fails_verify(made: ArchiveLog, archived: tuple[Path, Path], tmp_path: Path, edit: Any,
                                        words: str) -> None:
    log, _ = _archived(archived, tmp_path)
    path = log / ANCHOR_NAME
    path.write_text(json.dumps(edit(json.loads(path.read_text())), sort_keys=True, separators=(",", ":")))
    res = _cli("audit", "verify", log, "--json")
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    reason = out["failure"]["reason"] if "failure" in out else out["error"]["message"]  # unreadable: no log to read
    assert words in reason, out
    # Start-up does not read the anchor (it starts from the newest snapshot): a damaged one does not stop it.
    assert recover(log, TRUST, load_public_key(made.pub)).snapshot_seq is not None


def test_without_its_anchor_the_live_log_does_not_verify(archived: tuple[Path, Path], tmp_path: Path) -> None:
    log, _ = _archived(archived, tmp_path)
    (log / ANCHOR_NAME).unlink()
    res = _cli("audit", "verify", log, "--json")
    assert res.exit_code == 1 and "segment 1 is missing" in json.loads(res.stdout)["failure"]["reason"]


def test_a_torn_or_missing_archived_copy_fails_whole_chain_verify(archived: tuple[Path, Path], tmp_path: Path) -> None:
    log, dest = _archived(archived, tmp_path)
    copy = dest / segment_name(3)
    copy.write_bytes(copy.read_bytes()[:1000])
    res = _cli("audit", "verify", log, "--archive", dest, "--json")
    assert res.exit_code == 1 and "torn or altered" in json.loads(res.stdout)["failure"]["reason"]
    assert _cli("audit", "verify", log).exit_code == 0  # the live log on its own still verifies
    copy.unlink()
    res = _cli("audit", "verify", log, "--archive", dest, "--json")
    assert res.exit_code == 1 and "is not in" in json.loads(res.stdout)["failure"]["reason"]


# ------------------------------------------------------------------------------------------- crash safety


class Crash(BaseException):
    """A crash at a step boundary: nothing after it runs (not an Exception: no handler catches it)."""


def _steps(made: ArchiveLog, src: Path, tmp_path: Path, before: Any) -> list[str]:
    log = tmp_path / "count" / "audit"
    shutil.copytree(src, log)
    seen: list[str] = []
    _archive(log, tmp_path / "count" / "arch", made, before, step=seen.append)
    return seen


def _crash_campaign(made: ArchiveLog, src: Path, dest_src: Path | None, tmp_path: Path, before: Any) -> int:
    """Crash at every step boundary of archiving `src` (its archive so far in dest_src) up to `before`; each
    crashed log must verify and recover, and a rerun must finish it to the same end as an uninterrupted run."""
    want = _state(src, made)
    steps = _steps(made, src, tmp_path, before)
    assert steps[-1] == "live_synced" and "anchor_renamed" in steps
    clean = tmp_path / "count"
    for i, name in enumerate(steps):
        work = tmp_path / f"crash{i}"
        log, dest = work / "audit", work / "arch"
        shutil.copytree(src, log)
        if dest_src is not None:
            shutil.copytree(dest_src, dest)
        def crash_at(step: str, i: int = i, calls: list[int] = [0]) -> None:  # noqa: B006 - one list per boundary
            calls[0] += 1
            if calls[0] == i + 1:
                raise Crash(step)

        with pytest.raises(Crash):
            _archive(log, dest, made, before, step=crash_at)
        assert verify_log(log, public_key=load_public_key(made.pub)).ok, name
        # Start-up on the crashed log (writer repair + recovery), as the daemon does; it appends to the last segment.
        writer, recovered = open_log(log, AuditConfig(), _key(made), lambda: LIVE_START + timedelta(days=2), TRUST)
        writer.close()
        assert ({p: repr(s) for p, s in recovered.states.items()}, recovered.ledger.to_fields(),
                recovered.versions) == want, name
        try:
            _archive(log, dest, made, before)  # run again: finishes the job
        except ArchiveRefused as exc:  # the crash came after the last removal: done, nothing more may go (below)
            assert name.startswith(("removed:", "live_synced")), (name, exc)
            assert exc.reason in ("not_before_date", "course_active", "live_segment"), (name, exc)
        assert list_segments(log)[0][0] == list_segments(clean / "audit")[0][0], name
        for n, p in list_segments(clean / "arch"):
            assert (dest / p.name).read_bytes() == p.read_bytes(), (name, n)
        assert not list(dest.glob("*.part")) and not (log / (ANCHOR_NAME + ".tmp")).exists()
        assert _cli("audit", "verify", log, "--archive", dest, "--key", made.pub).exit_code == 0, name
        shutil.rmtree(work)
    return len(steps)


def test_a_crash_at_every_step_boundary_leaves_a_log_that_verifies_recovers_and_finishes(
        small: ArchiveLog, tmp_path: Path) -> None:
    first = parse_before("2026-12-07")  # the demo's courses: the first archive, no anchor yet
    n1 = _crash_campaign(small, small.audit, None, tmp_path / "a", first)
    # The next archive (up to the restart's snapshot), from a log that already has an anchor.
    src, arch = tmp_path / "b-src" / "audit", tmp_path / "b-src" / "arch"
    shutil.copytree(small.audit, src)
    _archive(src, arch, small, first)
    n2 = _crash_campaign(small, src, arch, tmp_path / "b", BEFORE_LIVE)
    # copied + renamed per segment, dest_synced, anchor_tmp/renamed/synced, removed per segment, live_synced
    assert n1 >= 12 and n2 == 8, (n1, n2)


def test_a_full_disk_while_copying_or_writing_the_anchor_moves_nothing(made: ArchiveLog, log: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    want = _state(log, made)
    dest = tmp_path / "arch"
    real_write = os.write
    budget = [900_000]  # bytes the disk takes before it is full: cuts a segment copy short

    def full_disk(fd: int, data: Any) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data)[: budget[0]])
        budget[0] -= n
        return n

    monkeypatch.setattr(archive_mod.os, "write", full_disk)
    with pytest.raises(AuditError, match="No space left on device") as err:
        _archive(log, dest, made)
    assert "nothing removed" in str(err.value)
    monkeypatch.undo()
    assert not (log / ANCHOR_NAME).exists() and list_segments(log)[0][0] == 1
    assert not list(dest.glob("*.part"))  # the cut-short copy is removed
    _assert_live_log_works(log, made, want)
    # The disk fills exactly when the anchor is written: the copies are made, the anchor is not, nothing is removed.
    copies = {p.name for p in dest.iterdir()}

    def full_for_anchor(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(archive_mod.os, "write", full_for_anchor)
    with pytest.raises(AuditError, match="anchor"):
        _archive(log, dest, made)
    monkeypatch.undo()
    assert not (log / ANCHOR_NAME).exists() and not (log / (ANCHOR_NAME + ".tmp")).exists()
    assert copies <= {p.name for p in dest.iterdir()}
    _assert_live_log_works(log, made, want)
    res = _cli("audit", "archive", log, dest, "--before", "2026-12-08", "--key", made.key, "--json")  # space again
    assert res.exit_code == 0, res.stdout
    _assert_live_log_works(log, made, want)
    assert _cli("audit", "verify", log, "--archive", dest).exit_code == 0


def test_a_torn_copy_is_copied_again(made: ArchiveLog, log: Path, tmp_path: Path) -> None:
    """A copy under its final name cut short (a copy by hand, or a file system that lost its tail): before the
    anchor it is copied again; after the anchor (the live segment not yet removed) it is restored from the live
    segment before that is removed."""
    want = _state(log, made)
    dest = tmp_path / "arch"

    def crash_on(step_name: str) -> Any:
        def hook(step: str) -> None:
            if step == step_name:
                raise Crash(step)
        return hook

    with pytest.raises(Crash):
        _archive(log, dest, made, step=crash_on("dest_synced"))
    torn = dest / segment_name(2)
    torn.write_bytes(torn.read_bytes()[:5000])
    with pytest.raises(Crash):
        _archive(log, dest, made, step=crash_on("anchor_synced"))
    assert (dest / segment_name(2)).read_bytes() == (log / segment_name(2)).read_bytes()  # copied again
    torn = dest / segment_name(4)
    torn.write_bytes(torn.read_bytes()[:7000])
    _assert_live_log_works(log, made, want)
    res = _archive(log, dest, made)
    assert res.finished and 4 in res.finished
    _assert_live_log_works(log, made, want)
    assert _cli("audit", "verify", log, "--archive", dest, "--full").exit_code == 0


def test_parse_before() -> None:
    assert parse_before("2026-12-08") == START.replace(day=8, hour=0, minute=0)
    assert parse_before("2026-12-08T10:00:00+01:00") == START.replace(day=8, hour=9, minute=0)
    for bad in ("", "8 Dec", "2026-12-08T10:00", "2026-02-30"):
        with pytest.raises(ValueError, match="--before"):
            parse_before(bad)


def _anchor_fields() -> dict[str, Any]:
    seg = {"segment": 1, "first_seq": 1, "last_seq": 10, "bytes": 100, "sha256": "a" * 64, "archive": "/srv/a"}
    return {"format": "driverd-archive-anchor/1", "first_segment": 2, "last_seq": 10, "last_hash": "b" * 64,
            "snapshot_seq": 12, "segments": [seg], "archived_at": "2026-12-08T00:00:00Z", "key_fingerprint": None,
            "public_key": None, "sig": None}


@pytest.mark.parametrize(("edit", "field"), [
    (lambda a: {**a, "last_hash": "B" * 64}, "last_hash"),
    (lambda a: {**a, "snapshot_seq": 10}, "snapshot_seq"),
    (lambda a: {**a, "archived_at": "yesterday"}, "archived_at"),
    (lambda a: {**a, "first_segment": 1}, "first_segment"),
    (lambda a: {**a, "first_segment": True}, "first_segment"),
    (lambda a: {**a, "segments": [{**a["segments"][0], "sha256": "xyz"}]}, "segments[0].sha256"),
    (lambda a: {**a, "segments": [{**a["segments"][0], "archive": ""}]}, "segments[0].archive"),
    (lambda a: {**a, "segments": [{**a["segments"][0], "first_seq": 2}]}, "segments[0]"),
    (lambda a: {**a, "segments": "all"}, "segments"),
    (lambda a: {**a, "sig": "abc"}, "sig"),
    (lambda a: {**a, "key_fingerprint": 7}, "key_fingerprint"),
])
def test_read_anchor_names_the_field_and_the_rule(tmp_path: Path, edit: Any, field: str) -> None:
    from driverd.audit.canonical import dumps

    assert read_anchor(tmp_path) is None
    (tmp_path / ANCHOR_NAME).write_bytes(dumps(_anchor_fields()) + b"\n")
    assert read_anchor(tmp_path) is not None  # the unedited one parses
    (tmp_path / ANCHOR_NAME).write_bytes(dumps(edit(_anchor_fields())) + b"\n")
    with pytest.raises(AuditError) as err:
        read_anchor(tmp_path)
    assert f"{ANCHOR_NAME}: {field}: " in str(err.value)


def test_read_anchor_refuses_what_is_not_canonical_json(tmp_path: Path) -> None:
    for data in (b"", b"{not json", b'{"format": "driverd-archive-anchor/1"}', b"[1,2]"):
        (tmp_path / ANCHOR_NAME).write_bytes(data)
        with pytest.raises(AuditError, match=ANCHOR_NAME):
            read_anchor(tmp_path)


def test_segments_opened_by_size_not_by_a_snapshot_are_refused(tmp_path: Path, key: Any) -> None:
    from tests.audit.conftest import write_generic_log

    log = write_generic_log(tmp_path / "log", key, n=40)  # segments rotated by size: none opens with a snapshot
    assert len(list_segments(log)) >= 3
    with pytest.raises(ArchiveRefused) as refused:
        archive_log(log, FAR, tmp_path / "arch", key)
    assert refused.value.reason == "no_snapshot" and "segment 2" in refused.value.detail
    assert not (tmp_path / "arch").exists() and list_segments(log)[0][0] == 1


def test_archive_while_the_daemon_writes(made: ArchiveLog, log: Path, tmp_path: Path) -> None:
    """The daemon's writer holds the log (and its lock) and appends while archive runs: archive neither reads nor
    moves the segment being written, and the log verifies afterwards with the daemon's later records."""
    writer, _ = open_log(log, AuditConfig(), _key(made), lambda: LIVE_START + timedelta(days=2), TRUST)
    try:
        writer.append("daemon_note", pump_id=None, course_id=None, durable=True, text="before")
        res = _archive(log, tmp_path / "arch", made, step=lambda _s: writer.append(
            "daemon_note", pump_id=None, course_id=None, durable=False, text="during"))
        writer.append("daemon_note", pump_id=None, course_id=None, durable=True, text="after")
    finally:
        writer.close()
    assert res.archived
    assert verify_log(log, public_key=load_public_key(made.pub), require_sealed=True).ok
    assert _cli("audit", "verify", log, "--archive", tmp_path / "arch", "--full").exit_code == 0
