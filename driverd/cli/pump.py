"""`driverd pump ...`: read-only look at any pump or simulator."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

import typer

from driverd.cli.output import emit_json, fail, usage
from driverd.cli.sim_console import library_logs_silenced
from driverd.core.errors import DriverdError
from driverd.core.quantities import fmt

app = typer.Typer(help="Talk to one pump (read-only).", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]


@app.callback()
def _group() -> None:
    """Talk to one pump (read-only)."""  # a callback keeps `probe` a subcommand even as the only one


async def _probe(url: str, timeout_s: float) -> dict[str, Any]:
    from drivers.base import DriverOptions
    from drivers.registry import open_driver

    # probe() never uses options.deadman_s: it sends queries only, so a pump's dead-man stays as it is. 0 says so
    # (a driver for a pump without a dead-man refuses to be built for a dead-man unless its URL allows it).
    report = await open_driver(url, DriverOptions(timeout_s=timeout_s, retries=1, deadman_s=0)).probe()
    ident, status = report.identity, report.status
    return {
        "ok": True,
        "url": url,
        "model": ident.model,
        "firmware": ident.firmware,
        "address": ident.address,
        "state": status.state.value,
        "rate_ml_per_h": fmt(status.rate_ml_per_h),
        "diameter_mm": None if status.diameter_mm is None else fmt(status.diameter_mm),
        "delivered_ml": fmt(status.delivered_ml),
        "alarms": sorted(a.value for a in status.alarms),
        "deadman_s": report.deadman_s,
        "acknowledged_alarms": sorted(a.value for a in report.acknowledged),
    }


@app.command()
def probe(
    url: Annotated[str, typer.Argument(help="driver URL, e.g. sim://bed-1 or newera+socket://127.0.0.1:7001")],
    timeout: Annotated[float, typer.Option("--timeout", help="reply timeout per exchange, seconds")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Identify a pump and read its status: model, firmware, state, rate, diameter, delivered volume, alarms,
    and its dead-man (safe mode / watchdog) timeout.

    Read-only: sends queries only, never sets anything, never changes the pump's dead-man. A pump that answers
    with a latched alarm (New Era: that reply acknowledges it on the pump) is reported under "acked".
    """
    if not math.isfinite(timeout) or not 0 < timeout <= 60:
        usage(f"--timeout must be > 0 and <= 60 seconds, got {timeout}")
    # Six queries, each retried once, plus resends after an alarm reply: a probe must never hang.
    bound = timeout * 20 + 5
    try:
        with library_logs_silenced():
            info = asyncio.run(asyncio.wait_for(_probe(url, timeout), bound))
    except DriverdError as exc:
        fail(f"{url}: {exc}", as_json=as_json, kind=type(exc).__name__)
    except TimeoutError:
        fail(f"{url}: no answer within {bound:g} s", as_json=as_json, kind="Timeout")
    except ImportError as exc:  # a registered driver whose module (or a dependency) is missing
        fail(f"{url}: driver unavailable: {exc}", as_json=as_json, kind="ImportError")
    except OSError as exc:
        fail(f"{url}: {exc.strerror or exc}", as_json=as_json, kind="OSError")
    if as_json:
        emit_json(info)
        return
    alarms = ", ".join(info["alarms"]) or "none"
    diameter = "unknown" if info["diameter_mm"] is None else f"{info['diameter_mm']} mm"
    deadman = f"{info['deadman_s']} s" if info["deadman_s"] else "off"
    acked = ", ".join(info["acknowledged_alarms"])
    acked = f"{acked} (the pump answered with this latched alarm; that reply acknowledged it)" if acked else "none"
    for label, value in (
        ("pump", url),
        ("model", info["model"]),
        ("firmware", info["firmware"]),
        ("state", info["state"]),
        ("rate", f"{info['rate_ml_per_h']} mL/h"),
        ("diameter", diameter),
        ("delivered", f"{info['delivered_ml']} mL"),
        ("dead-man", deadman),
        ("alarms", alarms),
        ("acked", acked),
    ):
        typer.echo(f"{label:<10}{value}")
