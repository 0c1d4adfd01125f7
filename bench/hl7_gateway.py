"""HL7 gateway throughput and order latency (issue #14), each against a reference measured in the same run.

1. DEC (PCD-01) messages per second for 256 pumps against a loopback MLLP receiver: build + durable outbox + the
   at-least-once sender (one message in flight, ACK awaited), end to end. References: the same messages sent by
   a bare python-hl7 MLLP loop (send, await ACK; no outbox, no fsync), and a raw write+fdatasync of the same
   bytes (what the outbox's durability costs at least).
2. Order latency: a PCD-03 order to a daemon running a real course on a simulated pump (real clock): time to the
   accept ACK (CA) and to the application reply (RRG^O16), p50/p99. Every order is a reduction, so every one
   goes through the kernel, write-ahead (fdatasync) and the pump's read-back. Reference: the same exchange
   against a listener that answers at once (MLLP round trip only).

    .venv/bin/python bench/hl7_gateway.py [--messages-per-pump 8] [--orders 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import hl7
from common import machine, percentile, say
from hl7.mllp import open_hl7_connection, start_hl7_server

from driverd.hl7.messages import observation_message
from driverd.hl7.mllp import Sender, serve_orders
from driverd.hl7.model import Endpoint, Observation
from driverd.hl7.outbox import Outbox

REPO = Path(__file__).resolve().parent.parent  # the order builder of the tests is reused (tests/hl7/order_text.py)

PUMPS = 256
EP = Endpoint("DRIVERD", "BENCH")


def observation(i: int, k: int) -> Observation:
    from datetime import UTC, datetime

    return Observation(at=datetime(2026, 12, 1, 9, tzinfo=UTC) + timedelta(seconds=60 * k),
                       pump_id=f"bed-{i}", pump_model="NE-1000", course_id=f"course-{i}",
                       patient_ref=f"PATIENT-{i:04d}", drug_name="ketamine",
                       concentration_mg_per_ml=Decimal(50), phase="holding", pump_state="infusing",
                       rate_ml_per_h=Decimal("0.416"), commanded_ml_per_h=Decimal("0.416"),
                       dose_mg_per_24h=Decimal(500), delivered_ml=Decimal(k) / 10, link="up")


class Receiver:
    """ACKs every message (AA, MSA-2 = its MSH-10), parsing only the MSH."""

    def __init__(self) -> None:
        self.count = 0
        self.server: Any = None

    async def start(self) -> int:
        self.server = await start_hl7_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: Any, writer: Any) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                text = (await reader.readblock()).decode()
                self.count += 1
                writer.writemessage(hl7.parse(text.split("\r", 1)[0]).create_ack("AA"))
                await writer.drain()

    async def stop(self) -> None:
        self.server.close()


async def dec_throughput(per_pump: int, work: Path) -> dict[str, float]:
    texts = [(f"B{k:04d}{i:05d}", observation(i, k)) for k in range(per_pump) for i in range(PUMPS)]
    n = len(texts)
    t0 = time.perf_counter()
    built = [(cid, observation_message(obs, cid, EP, EP)) for cid, obs in texts]
    build_s = time.perf_counter() - t0

    # Reference A: a bare MLLP loop with python-hl7 (send, await the ACK), nothing durable.
    rcv = Receiver()
    port = await rcv.start()
    reader, writer = await open_hl7_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    for _, text in built:
        writer.writeblock(text.encode())
        await writer.drain()
        await reader.readblock()
    bare_s = time.perf_counter() - t0
    writer.close()

    # Reference B: raw write + fdatasync of each message's bytes (the least a durable queue costs).
    fd = os.open(work / "raw", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    t0 = time.perf_counter()
    for _, text in built:
        os.write(fd, text.encode() + b"\n")
        os.fdatasync(fd)
    raw_s = time.perf_counter() - t0
    os.close(fd)

    # driverd: durable outbox put (as the gateway does) + the Sender until every message is ACKed.
    outbox = Outbox.open(work / "outbox", max_pending=n + 1)
    sender = Sender(outbox, "127.0.0.1", port, ack_timeout_s=10.0)
    task = asyncio.create_task(sender.run())
    t0 = time.perf_counter()
    for cid, obs in texts:
        outbox.put(cid, observation_message(obs, cid, EP, EP), kind="ORU^R01", pump_id=obs.pump_id)
        await asyncio.sleep(0)  # the gateway runs between channel steps: let the sender interleave
    put_s = time.perf_counter() - t0
    while outbox.head() is not None:  # noqa: ASYNC110  (a bench: polling is the simplest honest wait)
        await asyncio.sleep(0.001)
    ours_s = time.perf_counter() - t0
    sender.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    outbox.close()
    await rcv.stop()
    return {"messages": n, "build_per_s": n / build_s, "bare_per_s": n / bare_s, "raw_fsync_per_s": n / raw_s,
            "queued_per_s": n / put_s, "delivered_per_s": n / ours_s, "acked": sender.counters.acked}


async def order_latency(orders: int, work: Path) -> dict[str, Any]:
    from driverd.hl7.settings import Address, Hl7Settings
    from driverd.runtime.clock import RealClock
    from driverd.runtime.config import AuditSettings, DaemonConfig, PumpConfig
    from driverd.runtime.daemon import Daemon
    from driverd.runtime.demo import CONFIG_DIR, DEMO_KEY, DEMO_TRUST, demo_schedule
    from driverd.signing import generate_keypair, sign_document
    from simulators.world import World

    clock = RealClock()
    world = World(clock)
    world.pump("bed-1", diameter_mm=Decimal("21.59"), fill_volume_ml=Decimal("22"))
    key, _ = generate_keypair(work / "keys", "audit")
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    config = DaemonConfig(
        path=work / "driverd.toml", sha256="bench", protocol=CONFIG_DIR / "protocols" / "ketamine-burst.toml",
        audit_dir=work / "audit", audit_key=key, trust_dir=DEMO_TRUST, control_socket=work / "ctl.sock",
        socket_mode=0o600, poll_period_s=1.0, link_timeout_s=5.0, deadman_s=0, driver_timeout_s=1.0,
        pumps=(PumpConfig("bed-1", "sim://bed-1"),), audit=AuditSettings(), mode="bench",
        hl7=Hl7Settings(queue_dir=work / "hl7", orders_listen=Address("127.0.0.1", port)))
    daemon = Daemon(config, clock, world=world)
    await daemon.start()
    try:
        start = clock.now() - timedelta(minutes=6)
        doc = demo_schedule("bed-1", 1, start)
        doc.pop("signature")
        doc["patient_ref"] = "DEMO-PATIENT-0001"
        reply = await daemon.push_schedule(sign_document(doc, DEMO_KEY))
        assert reply.get("ok"), reply
        while daemon.channels["bed-1"].state.phase.value != "titrating":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        ours = await _exchange_many(port, orders, "L", reduce=True)
        codes = ours.pop("codes")
    finally:
        await daemon.stop()

    # Reference: an MLLP listener (the same serve_orders) that answers both replies at once.
    async def instant(text: str, send: Any) -> None:
        msh = hl7.parse(text.split("\r", 1)[0])
        await send(str(msh.create_ack("CA")))
        await send(str(msh.create_ack("AA")))

    async with await serve_orders(instant, "127.0.0.1", 0) as server:
        ref_port = server.port
        ref = await _exchange_many(ref_port, orders, "R", reduce=False)
        ref.pop("codes")
    return {"orders": orders, "ours": ours, "reference": ref, "codes": codes}


CLIENT = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
import hl7
from decimal import Decimal
from hl7.mllp import open_hl7_connection
from tests.hl7.order_text import rgv_o15

async def main(port, n, prefix, reduce):
    accept, reply, codes = [], [], {}
    reader, writer = await open_hl7_connection("127.0.0.1", port)
    for i in range(n):
        text = rgv_o15(f"{prefix}{i:05d}", rate=str(Decimal(100) - Decimal(i + 1) / 4)) if reduce else \
            rgv_o15(f"{prefix}{i:05d}")
        t0 = time.perf_counter()
        writer.writeblock(text.encode())
        await writer.drain()
        await reader.readblock()
        accept.append(time.perf_counter() - t0)
        got = (await reader.readblock()).decode()
        reply.append(time.perf_counter() - t0)
        code = str(hl7.parse(got).segment("MSA")[1])
        codes[code] = codes.get(code, 0) + 1
    writer.close()
    print(json.dumps({"accept": accept, "reply": reply, "codes": codes}))

asyncio.run(main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"))
"""


async def _exchange_many(port: int, n: int, prefix: str, reduce: bool) -> dict[str, Any]:
    """The order programmer runs in its own process (in the daemon's process its reads would wait for the
    daemon's own work, and the accept ACK would look as late as the reply)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, str(REPO), str(port), str(n), prefix,
                                                "1" if reduce else "0", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    data = json.loads(out)
    ms = 1000.0
    accept, reply = data["accept"], data["reply"]
    return {"accept_p50_ms": percentile(accept, 50) * ms, "accept_p99_ms": percentile(accept, 99) * ms,
            "reply_p50_ms": percentile(reply, 50) * ms, "reply_p99_ms": percentile(reply, 99) * ms,
            "codes": data["codes"]}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages-per-pump", type=int, default=8)
    ap.add_argument("--orders", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hl7-", dir="/tmp") as tmp:
        work = Path(tmp)
        say("machine:", machine(work))
        dec = await dec_throughput(args.messages_per_pump, _mk(work / "dec"))
        say(f"DEC, {PUMPS} pumps x {args.messages_per_pump} = {dec['messages']} messages:")
        say(f"  build (observation_message)      {dec['build_per_s']:10.0f} /s")
        say(f"  reference: bare MLLP send+ACK    {dec['bare_per_s']:10.0f} /s")
        say(f"  reference: raw write+fdatasync   {dec['raw_fsync_per_s']:10.0f} /s")
        say(f"  driverd: queued (durable put)    {dec['queued_per_s']:10.0f} /s")
        say(f"  driverd: delivered (ACKed)       {dec['delivered_per_s']:10.0f} /s   "
            f"= {dec['delivered_per_s'] / dec['bare_per_s']:.2f} of bare MLLP, "
            f"{dec['delivered_per_s'] / dec['raw_fsync_per_s']:.2f} of raw fsync; need at 60 s period: "
            f"{PUMPS / 60:.1f} /s")
        lat = await order_latency(args.orders, _mk(work / "orders"))
        o, r = lat["ours"], lat["reference"]
        say(f"orders ({lat['orders']} reductions through the kernel and the pump's read-back; replies {lat['codes']}):")
        say(f"  accept ACK   p50 {o['accept_p50_ms']:7.2f} ms  p99 {o['accept_p99_ms']:7.2f} ms   "
            f"(reference {r['accept_p50_ms']:.2f} / {r['accept_p99_ms']:.2f} ms)")
        say(f"  RRG^O16      p50 {o['reply_p50_ms']:7.2f} ms  p99 {o['reply_p99_ms']:7.2f} ms   "
            f"(reference {r['reply_p50_ms']:.2f} / {r['reply_p99_ms']:.2f} ms)")
        say("load at end:", os.getloadavg())


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    asyncio.run(main())
