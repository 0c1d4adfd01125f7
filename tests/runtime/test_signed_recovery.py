"""Recovery trusts only signed schedules (issue #10 item 7), on logs the daemon wrote over a real transport.

A `schedule_accepted` record appended by hand with a correct hash chain (and the outputs the core would give,
so chain verification and replay both pass) is refused at startup, naming its seq, and no pump is started
from it; unless its signed document verifies against the daemon's trust store and matches the logged fields.
A properly signed push recovers; removing its key from the trust store between runs refuses the restart."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driverd.audit.canonical import canonicalize, hashed_line, loads_line, sha256_hex
from driverd.audit.replay import Replayer, replay_records
from driverd.audit.segments import list_segments
from driverd.cli.main import app
from driverd.core.canonical import canonical_bytes
from driverd.core.errors import AuditError
from driverd.core.events import ScheduleAccepted
from driverd.core.machine import initial_state, step
from driverd.core.protocol import parse_protocol
from driverd.core.records import command_to_record, event_to_record
from driverd.core.schedule_parse import parse_schedule
from driverd.runtime.daemon import Daemon
from driverd.runtime.demo import DEMO_TRUST, START, demo_schedule
from driverd.signing import generate_keypair, sign_document
from drivers.base import PumpState
from tests.runtime.e2e import BOUND_S, FIRST_STEP, Rig, rig, run

NAME = "bed-1"
TRANSPORT = "newera-tcp"
HALF = timedelta(seconds=30)  # polls every 60 s on whole minutes: +30 s is between two polls


def forge_schedule(audit_dir: Path, doc: dict[str, Any], *, fields_from: dict[str, Any] | None = None,
                   document: str | None = "canonical") -> int:
    """Append a schedule_accepted for `doc` and the outputs the core gives for it, chained exactly as the writer
    chains (prev = SHA-256 of the previous line, hash = SHA-256 of the record without it). Returns its seq."""
    records = [loads_line(line) for _, p in list_segments(audit_dir) for line in p.read_bytes().splitlines()]
    replayer = Replayer()
    for rec in records:
        replayer.add(rec)
    state = replayer.states().get(NAME) or initial_state(NAME)
    library = next(r for r in reversed(records) if r["event"] == "library_loaded")
    protocol = parse_protocol(library["text"])
    at = datetime.fromisoformat(records[-1]["ts"])
    text = canonical_bytes(doc).decode("utf-8") if document == "canonical" else document
    event = ScheduleAccepted(at, parse_schedule(fields_from or doc, protocol), text)
    after, cmds = step(state, event, protocol)
    entries = [(*event_to_record(event), state.course_id), *((*command_to_record(c), after.course_id) for c in cmds)]
    last_path = list_segments(audit_dir)[-1][1]
    last_line = last_path.read_bytes().splitlines()[-1]
    seq, prev, out = records[-1]["seq"], sha256_hex(last_line), b""
    for name, fields, course_id in entries:
        seq += 1
        envelope = {"seq": seq, "ts": records[-1]["ts"], "event": name, "pump_id": NAME, "course_id": course_id,
                    "prev": prev}
        body = canonicalize(fields)
        assert isinstance(body, dict)
        line, _ = hashed_line({**envelope, **body})
        prev, out = sha256_hex(line), out + line + b"\n"
    with last_path.open("ab") as fh:
        fh.write(out)
    return records[-1]["seq"] + 1


async def stop(r: Rig) -> None:
    await asyncio.wait_for(r.daemon.stop(), timeout=BOUND_S)
    r.stopped = True


async def restart(r: Rig, **config_changes: Any) -> None:
    """A new daemon on the same log (and the same config but for `config_changes`)."""
    assert r.config is not None
    r.config = dataclasses.replace(r.config, **config_changes)
    r.daemon = Daemon(r.config, r.clock, world=r.world)
    await asyncio.wait_for(r.daemon.start(), timeout=BOUND_S)
    r.stopped = False


def forgeries(tmp: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """name -> (forge_schedule kwargs: doc, fields_from, document; the expected refusal text)."""
    genuine = demo_schedule(NAME, 1, START)
    rogue_key, _ = generate_keypair(tmp / "rogue", "rogue")
    altered = copy.deepcopy(genuine)
    altered["steps"][0]["auto"] = False
    other = copy.deepcopy(genuine)
    other["hold_days"] = "2"
    return {
        "no-document": ({"doc": genuine, "document": None}, {"text": "no signed `document`"}),
        "key-not-trusted": ({"doc": sign_document(genuine, rogue_key)}, {"text": "[unknown_key]"}),
        "signature-over-other-content": ({"doc": altered}, {"text": "[bad_signature]"}),
        "fields-differ-from-document": ({"doc": genuine, "fields_from": other},
                                        {"text": "differs from its signed document"}),
    }


FORGERIES = ("no-document", "key-not-trusted", "signature-over-other-content", "fields-differ-from-document")


async def _forged(tmp_path: Path, kind: str) -> None:
    kwargs, expect = forgeries(tmp_path)[kind]
    async with rig(TRANSPORT, tmp_path) as r:
        await r.advance_to(START + timedelta(minutes=2) + HALF)  # the daemon ran (polled the idle pump), no push
        await stop(r)
        seq = forge_schedule(r.audit_dir, **kwargs)
        # The forgery is invisible to the chain check and to replay: only the signature check can catch it.
        assert r.verify().ok
        assert replay_records(r.records()).ok
        before = r.records()
        await r.advance_to(FIRST_STEP + HALF)  # the forged course's first step is due
        with pytest.raises(AuditError) as info:
            await restart(r)
        assert f"seq {seq}:" in str(info.value) and expect["text"] in str(info.value), str(info.value)
        # Refused before any pump was opened: nothing reached the pump, and the log is as it was (the writer logs
        # its reopening only once the log verified: a refused start appends nothing).
        await r.advance_to(FIRST_STEP + timedelta(minutes=30) + HALF)
        assert r.model(NAME).status().state is not PumpState.INFUSING
        assert r.wire_rates(NAME) == []
        _unchanged(before, r.records())
        # `driverd audit verify --trust` applies the same check offline.
        res = CliRunner().invoke(app, ["audit", "verify", str(r.audit_dir), "--trust", str(DEMO_TRUST), "--json"])
        assert res.exit_code == 1, res.output
        payload = json.loads(res.stdout)
        assert payload["ok"] is False and payload["schedules"]["seq"] == seq
        assert runner_ok(r.audit_dir)  # without --trust the chain alone verifies



def _unchanged(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    assert after == before

@pytest.mark.parametrize("kind", FORGERIES)
def test_a_forged_schedule_record_is_refused_at_startup_and_starts_no_pump(tmp_path: Path, kind: str) -> None:
    run(_forged(tmp_path, kind))


async def _appended_but_signed(tmp_path: Path) -> None:
    # The control for the test above: the same hand-appended record, with a genuinely signed document that
    # matches its fields, is adopted (so it is the signature check, not the appending, that refuses them).
    async with rig(TRANSPORT, tmp_path) as r:
        await r.advance_to(START + timedelta(minutes=2) + HALF)
        await stop(r)
        forge_schedule(r.audit_dir, demo_schedule(NAME, 1, START))
        await r.advance_to(FIRST_STEP - timedelta(minutes=1) + HALF)
        await restart(r)
        await r.advance_to(FIRST_STEP + timedelta(minutes=10) + HALF)
        assert r.model(NAME).status().state is PumpState.INFUSING
        assert r.wire_rates(NAME) == [r.rate(100)]


def test_a_hand_appended_schedule_with_a_valid_signed_document_is_adopted(tmp_path: Path) -> None:
    run(_appended_but_signed(tmp_path))


async def _signed_push(tmp_path: Path) -> None:
    async with rig(TRANSPORT, tmp_path) as r:
        assert (await r.push(NAME))["ok"] is True
        await r.advance_to(FIRST_STEP + timedelta(hours=1) + HALF)
        assert r.model(NAME).status().state is PumpState.INFUSING
        [accepted] = [rec for rec in r.records() if rec["event"] == "schedule_accepted"]
        assert accepted["document"] == canonical_bytes(demo_schedule(NAME, 1, START)).decode("utf-8")
        await stop(r)
        await r.advance_to(r.clock.now() + timedelta(minutes=1))
        await restart(r)
        ch = r.channel(NAME)
        assert ch.state.course_id == accepted["schedule"]["schedule_id"] and ch.state.phase.value != "idle"
        # The recovered course goes on: the next step reaches the pump on time.
        await r.advance_to(FIRST_STEP + timedelta(days=1, minutes=10) + HALF)
        assert ch.state.phase.value == "titrating" and ch.state.level_mg_per_24h == 300
        assert r.wire_rates(NAME) == [r.rate(100), r.rate(300)]
    assert r.verify().ok and r.replay().ok
    res = CliRunner().invoke(app, ["audit", "verify", str(r.audit_dir), "--trust", str(DEMO_TRUST)])
    assert res.exit_code == 0 and "schedules: 1 accepted schedule(s), each signed by a key in" in res.stdout


def runner_ok(audit_dir: Path) -> bool:
    return CliRunner().invoke(app, ["audit", "verify", str(audit_dir)]).exit_code == 0


def test_a_properly_signed_push_recovers(tmp_path: Path) -> None:
    run(_signed_push(tmp_path))


async def _key_removed(tmp_path: Path) -> None:
    # A key rotation that drops the key a running course was signed with: the course is not resumed silently.
    trust = tmp_path / "trust-after-rotation"
    shutil.copytree(DEMO_TRUST, trust)
    for pub in trust.glob("*.pub"):
        pub.unlink()
    generate_keypair(tmp_path / "new-keys", "ward-2027")
    shutil.copy(tmp_path / "new-keys" / "ward-2027.pub", trust)
    async with rig(TRANSPORT, tmp_path) as r:
        assert (await r.push(NAME))["ok"] is True
        await r.advance_to(FIRST_STEP + timedelta(hours=1) + HALF)
        [accepted] = [rec for rec in r.records() if rec["event"] == "schedule_accepted"]
        await stop(r)
        sent = r.wire_rates(NAME)
        before = r.records()
        with pytest.raises(AuditError) as info:
            await restart(r, trust_dir=trust)
        msg = str(info.value)
        assert f"seq {accepted['seq']}:" in msg and "is not in the trust store [unknown_key]" in msg, msg
        await r.advance_to(r.clock.now() + timedelta(minutes=30))
        assert r.wire_rates(NAME) == sent  # nothing sent by the refused daemon
        _unchanged(before, r.records())
        # Putting the key back (the operator's fix) lets the course recover.
        await restart(r, trust_dir=DEMO_TRUST)
        assert r.channel(NAME).state.course_id == accepted["schedule"]["schedule_id"]


def test_a_key_removed_from_the_trust_store_between_runs_refuses_the_restart(tmp_path: Path) -> None:
    run(_key_removed(tmp_path))
