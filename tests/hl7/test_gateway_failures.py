"""A configured HL7 gateway that cannot start (its port is taken, its queue is damaged) does not keep the pumps
unsupervised: the daemon starts, runs the course, and says loudly what is wrong (status, audit, crit log)."""

from __future__ import annotations

import socket
from pathlib import Path

from driverd.hl7.settings import Address, Hl7Settings
from tests.hl7.receiver import free_port
from tests.runtime.e2e import RUNNING_AT, events, rig, run


def _check_running_without_gateway(tmp_path: Path, settings: Hl7Settings, why: str) -> None:
    async def body() -> None:
        async with rig("newera-tcp", tmp_path, hl7=settings) as r:
            assert r.daemon.gateway is None
            assert why in r.daemon.gateway_error
            status = r.daemon.status()
            assert why in status["hl7"]["error"]
            assert (await r.push("bed-1"))["ok"] is True
            await r.advance_to(RUNNING_AT)
            assert r.channel("bed-1").state.verified_rate == r.rate(100)  # supervised and running
            (rec,) = events(r.records(), "hl7_gateway_failed")
            assert why in rec["error"]

    run(body())


def test_order_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Hl7Settings(queue_dir=tmp_path / "hl7", orders_listen=Address("127.0.0.1", port),
                               observations_to=Address("127.0.0.1", free_port()))
        _check_running_without_gateway(tmp_path, settings, "OSError")


def test_damaged_outbox(tmp_path: Path) -> None:
    from driverd.hl7.outbox import Outbox

    queue = tmp_path / "hl7"
    box = Outbox.open(queue / "outbox")
    box.put("X1", "MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|X1|P|2.6\r", kind="ORU^R01", pump_id="bed-1")
    box.put("X2", "MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|X2|P|2.6\r", kind="ORU^R01", pump_id="bed-1")
    path = box.path
    box.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"X1", b"Y1")  # a damaged middle record: its checksum no longer matches
    path.write_bytes(b"".join(lines))
    settings = Hl7Settings(queue_dir=queue, observations_to=Address("127.0.0.1", free_port()))
    _check_running_without_gateway(tmp_path, settings, "StoreCorrupt")
