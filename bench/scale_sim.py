"""Simulator process for bench/scale.py: N simulated Modbus pumps behind TCP gateways on 127.0.0.1.

Runs in its own process so the daemon's CPU can be measured apart from the simulators'. Each gateway is one
``serve_modbus`` server (one TCP port, ephemeral) answering up to ``--per-gateway`` unit ids, like a ward Modbus
gateway; every master still opens its own connection per pump (the driver's layout: one client per URL).

Prints one JSON line on stdout -- {"pid": ..., "pumps": {name: url}} -- once every gateway listens, then serves
until SIGTERM/SIGINT or until stdin closes (the parent died).

usage: python bench/scale_sim.py N [--per-gateway 128]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from decimal import Decimal

from driverd.runtime.demo import SYRINGE
from drivers.modbus.regmap import load_map
from simulators.clock import SystemClock
from simulators.modbus import SIM_FIRMWARE, SIM_MODEL, serve_modbus
from simulators.world import World

MAX_UNITS = 247  # Modbus unit ids 1..247


def pump_name(i: int) -> str:
    return f"bed-{i + 1:04d}"


async def serve(n: int, per_gateway: int) -> None:
    world = World(SystemClock())
    regmap = load_map()
    for i in range(n):
        # The demo's syringe (30 mL, 21.59 mm, 22 mL fill): a pushed demo schedule primes and runs on it.
        world.pump(pump_name(i), model=SIM_MODEL, firmware=SIM_FIRMWARE,
                   diameter_mm=Decimal(SYRINGE["inner_diameter_mm"]), fill_volume_ml=Decimal(SYRINGE["fill_volume_ml"]),
                   rate_resolution=regmap.rate_resolution())
    urls: dict[str, str] = {}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # stdin EOF = the parent is gone: do not linger as an orphan holding ports.
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 4096) else None)
    async with contextlib.AsyncExitStack() as stack:
        for first in range(0, n, per_gateway):
            names = [pump_name(i) for i in range(first, min(n, first + per_gateway))]
            units = {u + 1: name for u, name in enumerate(names)}
            ep = await stack.enter_async_context(serve_modbus(world, units, tcp_port=0, regmap=regmap))
            urls.update({name: ep.url(u) for u, name in units.items()})
        print(json.dumps({"pid": os.getpid(), "pumps": urls}), flush=True)
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int)
    ap.add_argument("--per-gateway", type=int, default=128)
    args = ap.parse_args()
    if not 1 <= args.per_gateway <= MAX_UNITS:
        ap.error(f"--per-gateway must be 1..{MAX_UNITS}")
    if args.n < 1:
        ap.error("n must be >= 1")
    asyncio.run(serve(args.n, args.per_gateway))


if __name__ == "__main__":
    main()
