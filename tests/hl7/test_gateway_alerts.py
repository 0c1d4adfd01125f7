"""The gateway's outbound bookkeeping, without a network: alert raise/clear pairing survives a full outbox, a
failing disk and a restart; an observation the outbox refused is tried again; an observer never raises."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hl7

from driverd.core.machine import initial_state
from driverd.hl7.gateway import Gateway
from driverd.hl7.journal import StoreIOError
from driverd.hl7.outbox import Outbox
from driverd.hl7.settings import Address, Hl7Settings

AT = datetime(2026, 12, 1, 9, tzinfo=UTC)


def _gateway(tmp_path: Path, max_pending: int) -> tuple[Gateway, Any]:
    channel = SimpleNamespace(pump_id="bed-1", state=initial_state("bed-1"), last_status=None, link_lost=False,
                              connected=True)
    daemon = SimpleNamespace(clock=SimpleNamespace(now=lambda: AT), audit=None, channels={"bed-1": channel},
                             listeners=[])
    gw = Gateway(daemon, Hl7Settings(queue_dir=tmp_path, observations_to=Address("127.0.0.1", 9)))  # type: ignore[arg-type]
    gw.outbox = Outbox.open(tmp_path / "outbox", max_pending=max_pending)
    gw.outbox.set_state("instance", "T")
    return gw, channel


def _alerts(box: Outbox) -> list[tuple[str, str, str]]:
    """(alert id, start|end, cause) of every queued ORU^R40, in order."""
    out = []
    for item in box.pending():
        if item.kind != "ORU^R40":
            continue
        msg = hl7.parse(item.text)
        obr3 = str(msg.segment("OBR")[3]).split("^")[0]
        phase = "end" if obr3.endswith(".end") else "start"
        cause = next(str(s[5]) for s in msg.segments("OBX") if "EVT" in str(s[3]) or "99DRVD" in str(s[5]))
        out.append((obr3.removesuffix(".end"), phase, cause))
    return out


def _drain(box: Outbox) -> list[Any]:
    items = box.pending()
    for item in items:
        box.done(item.control_id, "AA")
    return items


def test_pairing_holds_when_the_outbox_fills_half_way(tmp_path: Path) -> None:
    gw, ch = _gateway(tmp_path, max_pending=3)
    ch.state = replace(ch.state, alarm_causes=("link_lost", "pump_alarm:occlusion", "over_infusion"))
    gw.on_change(ch)  # room for 3 messages: 3 raises fit, the observation does not
    first = _alerts(gw.outbox)
    assert [p for _, p, _ in first] == ["start"] * 3
    assert gw.dropped == 1 and gw.full
    assert set(gw._active("bed-1").values()) == {a for a, _, _ in first}  # every queued raise is remembered
    sent = _drain(gw.outbox)
    gw.on_change(ch)  # now the observation goes, and nothing is raised twice
    assert not _alerts(gw.outbox) and not gw.full
    _drain(gw.outbox)
    ch.state = replace(ch.state, alarm_causes=())
    gw.on_change(ch)
    ends = _alerts(gw.outbox)
    assert sorted(a for a, p, _ in ends if p == "end") == sorted(a for a, _, _ in first)  # each raise cleared
    assert gw._active("bed-1") == {}
    assert len(sent) == 3


def test_a_raise_that_could_not_be_queued_is_raised_later_not_lost(tmp_path: Path) -> None:
    gw, ch = _gateway(tmp_path, max_pending=1)
    gw.outbox.put("X", "MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|X|P|2.6\r", kind="ORU^R01", pump_id="bed-1")
    ch.state = replace(ch.state, alarm_causes=("link_lost",))
    gw.on_change(ch)  # full: nothing queued, nothing remembered as raised
    assert gw._active("bed-1") == {} and gw.dropped >= 1
    _drain(gw.outbox)
    gw.on_change(ch)
    ((alert_id, phase, _),) = _alerts(gw.outbox)
    assert phase == "start" and gw._active("bed-1") == {"link_lost": alert_id}


def test_a_disk_failure_while_allocating_an_id_is_caught_and_retried(tmp_path: Path, monkeypatch: Any) -> None:
    gw, ch = _gateway(tmp_path, max_pending=100)
    real = gw.outbox.next_number
    calls = [0]

    def failing_once() -> int:
        calls[0] += 1
        if calls[0] == 1:
            raise StoreIOError("no space", 28, broken=False)
        return real()

    monkeypatch.setattr(gw.outbox, "next_number", failing_once)
    ch.state = replace(ch.state, alarm_causes=("link_lost",))
    gw.on_change(ch)  # must not raise into the channel
    gw.on_change(ch)
    kinds = [i.kind for i in gw.outbox.pending()]
    assert kinds.count("ORU^R40") == 1 and kinds.count("ORU^R01") >= 1


def test_alert_ids_survive_a_restart(tmp_path: Path) -> None:
    gw, ch = _gateway(tmp_path, max_pending=100)
    ch.state = replace(ch.state, alarm_causes=("pump_alarm:occlusion",))
    gw.on_change(ch)
    ((raised, _, _),) = _alerts(gw.outbox)
    gw.outbox.close()
    gw2, ch2 = _gateway(tmp_path, max_pending=100)  # a new process: same queue directory
    ch2.state = replace(ch2.state, alarm_causes=())
    gw2.on_change(ch2)
    ends = [(a, p) for a, p, _ in _alerts(gw2.outbox) if p == "end"]
    assert ends == [(raised, "end")]
