"""Scale: one daemon polling N simulated Modbus pumps at 1 Hz, against a bare pymodbus polling loop.

For each N (default 16 64 256 1024) and each run kind, a fresh simulator process (bench/scale_sim.py: gateways
of up to --per-gateway unit ids on loopback TCP) and a fresh worker process are started, so each worker's own
CPU time (getrusage) is its workload only. Run kinds:

- ``reference``: a bare pymodbus 3.16 async loop, one AsyncModbusTcpClient per pump, reading the same two spans
  the driver's status read asks for (discrete inputs 0..8, input registers 0..4) once a second on an absolute
  schedule, the same way a channel schedules its polls.
- ``idle``: the real Daemon (RealClock, real channels, the real audit log with fdatasync and signed checkpoints,
  audit group commit flushed every 0.2 s like the service's control loop), pumps idle (no schedule).
- ``course``: the same, after a demo schedule (driverd.runtime.demo.demo_schedule, dated so its first step is
  due) was pushed to every pump: the pumps are primed, set to the first step and infusing while measured.

Lateness = actual poll start - scheduled poll start, measured with a Channel subclass installed only in the
worker (product code unchanged); reported as a fraction of the 1 s period. CPU per pump = worker CPU seconds /
window seconds / N, in ms of CPU per pump per second. Load: the whole machine's busy CPU in the window (from
/proc/stat) and the simulator process's share, so other engineers' load shows next to the figures.

usage: python bench/scale.py [--n 16 64 256 1024] [--seconds 20] [--kinds reference idle course]
                             [--profile KIND:N] [--json OUT.json]
Experiments (not product behaviour, not in the default run): --kinds idle-spread course-spread; see
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PERIOD_S = 1.0
CONNECT_TIMEOUT_S = 30.0  # reference worker: bounded connect retries
REQUEST_TIMEOUT_S = 2.0  # reference worker: a poll that gets no reply is an error, never a hang
KINDS = ("reference", "idle", "course")
# Not product behaviour: polls spread over the period by a per-pump phase (see bench/README.md), to measure what
# that would change. Not in the default run.
EXPERIMENTS = ("idle-spread", "course-spread")

# ---------------------------------------------------------------------------------------------- measuring


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of another process, seconds (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine, all cores (Linux /proc/stat)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _self_sys_csw() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_stime, ru.ru_nvcsw + ru.ru_nivcsw


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard) if hard != resource.RLIM_INFINITY else need,
                                                    hard))


class Window:
    """CPU of this process, the simulator process and the machine over the measured window."""

    def __init__(self, sim_pid: int) -> None:
        self.sim_pid = sim_pid

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = _self_cpu_s()
        self.sys0, self.csw0 = _self_sys_csw()
        self.sim0 = _proc_cpu_s(self.sim_pid)
        self.busy0 = _machine_busy_s()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        return {
            "window_s": wall,
            "cpu_s": _self_cpu_s() - self.cpu0,
            "sys_s": _self_sys_csw()[0] - self.sys0,
            "ctx_switches": _self_sys_csw()[1] - self.csw0,
            "sim_cpu_s": _proc_cpu_s(self.sim_pid) - self.sim0,
            "machine_busy_s": _machine_busy_s() - self.busy0,
        }


def herd(phases_s: list[float], slot_s: float = 0.05) -> float:
    """Share of polls scheduled in the busiest `slot_s` of the period (1/20 = evenly spread at 50 ms)."""
    if not phases_s:
        return float("nan")
    counts: dict[int, int] = {}
    for ph in phases_s:
        k = int((ph % PERIOD_S) / slot_s)
        counts[k] = counts.get(k, 0) + 1
    return max(counts.values()) / len(phases_s)


def _summary(lateness_s: list[float], polls: int, n: int, measured: dict[str, float],
             phases_s: list[float] | None = None) -> dict[str, Any]:
    lat = sorted(lateness_s)

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / PERIOD_S if lat else float("nan")

    w = measured["window_s"]
    return {
        **measured,
        "n": n,
        "polls": polls,
        "poll_rate": polls / (n * w / PERIOD_S),  # achieved polls / scheduled polls
        "cpu_ms_per_pump_s": measured["cpu_s"] / w / n * 1e3,
        "sim_cpu_frac": measured["sim_cpu_s"] / w,
        "machine_busy_frac": measured["machine_busy_s"] / w,
        "late_p50": q(0.50),
        "late_p99": q(0.99),
        "late_max": lat[-1] / PERIOD_S if lat else float("nan"),
        "late_mean": statistics.fmean(lat) / PERIOD_S if lat else float("nan"),
        "herd_50ms": herd(phases_s or []),
    }


# ---------------------------------------------------------------------------------------------- reference


async def run_reference(urls: dict[str, str], seconds: float, warmup: float, sim_pid: int,
                        profile: Path | None) -> dict[str, Any]:
    from urllib.parse import parse_qs, urlsplit

    from pymodbus.client import AsyncModbusTcpClient

    lateness: list[float] = []
    phases: list[float] = []
    recording = False
    polls = 0
    errors = 0

    async def pump(url: str) -> None:
        nonlocal polls, errors
        u = urlsplit(url)
        unit = int(parse_qs(u.query)["unit"][0])
        client = AsyncModbusTcpClient(u.hostname or "127.0.0.1", port=u.port or 502, timeout=1.0, retries=0,
                                      reconnect_delay=0)
        loop = asyncio.get_running_loop()
        # connect() returns False when it fails; it does not raise. The worker used to ignore that and send
        # anyway: pymodbus logs "Cancel send, because not connected!" and the request waits out its timeout, so a
        # pump's polls went missing or late without a word (seen here at N=1, where the only connection races the
        # simulator's start; issue #12 saw the worker hang). So: retry within a bound, else fail loudly.
        deadline = loop.time() + CONNECT_TIMEOUT_S
        while not await client.connect():
            if loop.time() > deadline:
                client.close()
                raise RuntimeError(f"reference: cannot connect to {url} within {CONNECT_TIMEOUT_S} s")
            await asyncio.sleep(0.1)
        next_poll = loop.time()
        try:
            while True:
                started = loop.time()
                if recording:
                    lateness.append(started - next_poll)
                    phases.append(next_poll)
                    polls += 1
                try:
                    if not client.connected and not await client.connect():
                        errors += 1  # no request on a closed client (it would wait for ever): try next period
                    else:
                        # The same two requests the driver's status read makes (its contiguous spans), bounded as
                        # the channel bounds its driver calls.
                        async with asyncio.timeout(REQUEST_TIMEOUT_S):
                            bits = await client.read_discrete_inputs(0, count=9, device_id=unit)
                            regs = await client.read_input_registers(0, count=5, device_id=unit)
                        if bits.isError() or regs.isError():
                            errors += 1
                except Exception:  # count, keep polling: a bare loop, not a driver
                    errors += 1
                next_poll += PERIOD_S
                if next_poll <= loop.time():
                    next_poll = loop.time() + PERIOD_S  # as the channel does: no catch-up burst
                await asyncio.sleep(max(next_poll - loop.time(), 0.0))
        finally:
            client.close()

    tasks = [asyncio.create_task(pump(url)) for url in urls.values()]
    await asyncio.sleep(warmup + 2.0)
    for t in tasks:
        if t.done():  # a pump that never connected: say so instead of measuring fewer pumps
            t.result()
    window = Window(sim_pid)
    prof = cProfile.Profile(time.process_time) if profile else None
    window.start()
    recording = True
    if prof:
        prof.enable()
    await asyncio.sleep(seconds)
    if prof:
        prof.disable()
    recording = False
    measured = window.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out = _summary(lateness, polls, len(urls), measured, phases)
    out["errors"] = errors
    if prof and profile:
        _dump_profile(prof, profile)
    return out


# ---------------------------------------------------------------------------------------------- daemon


async def run_daemon(urls: dict[str, str], course: bool, seconds: float, warmup: float, sim_pid: int,
                     profile: Path | None, *, spread: bool = False) -> dict[str, Any]:
    import driverd.runtime.daemon as daemon_mod
    from driverd.core.state import Phase
    from driverd.runtime.channel import Channel
    from driverd.runtime.clock import RealClock
    from driverd.runtime.config import AuditSettings, DaemonConfig, PumpConfig
    from driverd.runtime.daemon import Daemon
    from driverd.runtime.demo import CONFIG_DIR, DEMO_TRUST, demo_schedule
    from driverd.signing import generate_keypair

    lateness: list[float] = []
    phases: list[float] = []
    rec = {"on": False, "polls": 0}

    class TimedChannel(Channel):
        """Records when each poll starts against when the channel scheduled it; behaviour unchanged."""

        _scheduled: datetime | None = None

        async def _wait(self, until: datetime) -> None:
            self._scheduled = until
            await super()._wait(until)

        async def poll(self) -> None:
            if rec["on"] and self._scheduled is not None:
                lateness.append((self.clock.now() - self._scheduled).total_seconds())
                phases.append(self._scheduled.timestamp())
                rec["polls"] += 1
            self._scheduled = None  # a poll from a request (resume) is not a scheduled one
            await super().poll()

    class SpreadChannel(TimedChannel):
        """EXPERIMENT (*-spread): stretch the first wait by a per-pump phase (crc32 of the id, over the period) so
        polls do not all fall due at once; run() then keeps that phase. Measuring only, not product behaviour."""

        _phased = False

        async def _wait(self, until: datetime) -> None:
            if not self._phased:
                # One period plus the phase: run()'s next deadline is then overdue, and it re-bases it to
                # now + period, so the phase persists. (In the product: start run()'s schedule at now + phase.)
                self._phased = True
                phase = PERIOD_S * (zlib.crc32(self.pump_id.encode()) % 1000) / 1000
                until += timedelta(seconds=PERIOD_S + phase)
            await super()._wait(until)

    # the bench's instrumented subclass, in this worker process only
    daemon_mod.Channel = SpreadChannel if spread else TimedChannel  # type: ignore[attr-defined]

    work = Path(tempfile.mkdtemp(prefix="driverd-scale-"))
    key_path, _ = generate_keypair(work / "keys", "audit")
    names = list(urls)
    # The shipped driverd.toml's settings (poll 1 s, link 10 s, driver timeout) and audit defaults.
    config = DaemonConfig(
        path=work / "driverd.toml", sha256="bench-scale", protocol=CONFIG_DIR / "protocols" / "ketamine-burst.toml",
        audit_dir=work / "audit", audit_key=key_path, trust_dir=DEMO_TRUST, control_socket=work / "control.sock",
        socket_mode=0o660, poll_period_s=PERIOD_S, link_timeout_s=10.0, deadman_s=30, driver_timeout_s=1.0,
        pumps=tuple(PumpConfig(n, urls[n]) for n in names), audit=AuditSettings(),
    )
    clock = RealClock()
    daemon = Daemon(config, clock)
    t_start = time.monotonic()
    await daemon.start()

    async def ticker() -> None:  # the service's control loop flushes group commit every 0.2 s
        while True:
            await asyncio.sleep(0.2)
            daemon.tick_audit()

    tick_task = asyncio.create_task(ticker())
    info: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 120
        await _until(daemon, lambda: all(ch.polls > 0 for ch in daemon.channels.values()), deadline)
        info["first_poll_all_s"] = time.monotonic() - t_start
        if course:
            t0 = time.monotonic()
            start = clock.now() - timedelta(minutes=5)  # demo_schedule puts step 1 at start + 5 min: due now
            docs = [demo_schedule(n, i + 1, start) for i, n in enumerate(names)]
            replies = await asyncio.gather(*(daemon.push_schedule(d) for d in docs))
            refused = [r for r in replies if not r.get("ok")]
            if refused:
                raise RuntimeError(f"{len(refused)} schedules refused, e.g. {json.dumps(refused[0])[:500]}")
            await _until(daemon, lambda: all(ch.state.phase is Phase.TITRATING and ch.state.verified_rate > 0
                                             for ch in daemon.channels.values()), deadline)
            info["course_start_s"] = time.monotonic() - t0
            info["phases"] = sorted({ch.state.phase.value for ch in daemon.channels.values()})
        await asyncio.sleep(warmup)
        window = Window(sim_pid)
        seq0 = daemon.audit.seq if daemon.audit else 0
        polls0 = sum(ch.polls for ch in daemon.channels.values())
        prof = cProfile.Profile(time.process_time) if profile else None
        window.start()
        rec["on"] = True
        if prof:
            prof.enable()
        await asyncio.sleep(seconds)
        if prof:
            prof.disable()
        rec["on"] = False
        measured = window.stop()
        info["audit_records_per_s"] = ((daemon.audit.seq if daemon.audit else 0) - seq0) / measured["window_s"]
        info["all_polls_per_s"] = (sum(ch.polls for ch in daemon.channels.values()) - polls0) / measured["window_s"]
        info["channels_with_errors"] = sum(1 for ch in daemon.channels.values() if ch.last_error)
        info["link_lost"] = sum(1 for ch in daemon.channels.values() if ch.link_lost)
        info["end_phases"] = sorted({ch.state.phase.value for ch in daemon.channels.values()})
        errs = [ch.last_error for ch in daemon.channels.values() if ch.last_error]
        info["error_example"] = errs[0][:200] if errs else ""
    finally:
        tick_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick_task
        await daemon.stop()
    out = _summary(lateness, rec["polls"], len(urls), measured, phases)
    out.update(info)
    if prof and profile:
        _dump_profile(prof, profile)
    return out


async def _until(daemon: Any, done: Any, deadline: float) -> None:
    """Wait (bounded) until done() holds; every course state change sets daemon.changed."""
    while not done() and time.monotonic() < deadline:
        daemon.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(daemon.changed.wait(), timeout=0.5)


# Where a function's own time goes, by the code it belongs to (first match wins).
_GROUPS = (
    ("socket send/recv syscalls", ("<method 'send' ", "<method 'recv' ")),
    ("epoll", ("<method 'poll' of 'select",)),
    ("fdatasync", ("posix.fdatasync",)),
    ("audit (driverd/audit, structlog, json, hashlib)", ("driverd/audit/", "structlog/", "json/", "hashlib",
                                                         "_hashlib", "sha256")),
    ("core (driverd/core)", ("driverd/core/",)),
    ("runtime channel (driverd/runtime)", ("driverd/runtime/", "bench/scale.py")),
    ("Modbus driver + codec (drivers/modbus)", ("drivers/modbus/", "drivers/base.py")),
    ("pymodbus", ("pymodbus/",)),
    ("asyncio", ("asyncio/", "_asyncio", "<method 'run' of '_contextvars")),
    ("decimal/datetime", ("decimal", "datetime")),
)


def profile_groups(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Own time (tottime) summed per code group; what is left over is 'other'."""
    totals: dict[str, float] = {}
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (file, _line, func), (_cc, _nc, tt, _ct, _callers) in raw.items():
        where = f"{file}:{func}" if file != "~" else func
        group = next((g for g, keys in _GROUPS if any(k in where for k in keys)), "other")
        totals[group] = totals.get(group, 0.0) + tt
    return sorted(totals.items(), key=lambda kv: -kv[1])


def _dump_profile(prof: cProfile.Profile, path: Path) -> None:
    prof.dump_stats(str(path))
    buf = io.StringIO()
    groups = profile_groups(pstats.Stats(prof))
    total = sum(t for _, t in groups)
    buf.write("own time by group:\n")
    for g, t in groups:
        buf.write(f"  {t:7.3f} s  {t / total * 100:5.1f} %  {g}\n")
    buf.write("\n")
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(40)
    st.sort_stats("cumulative").print_stats(60)
    path.with_suffix(".txt").write_text(buf.getvalue())


# ---------------------------------------------------------------------------------------------- orchestration


def _start_sim(n: int, per_gateway: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, str(HERE / "scale_sim.py"), str(n), "--per-gateway", str(per_gateway)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError("simulator process exited before listening")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def run_one(kind: str, n: int, args: argparse.Namespace, profile: Path | None = None) -> dict[str, Any]:
    sim, hello = _start_sim(n, args.per_gateway)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(hello["pumps"], f)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--urls", f.name,
               "--sim-pid", str(hello["pid"]), "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
        if profile:
            cmd += ["--profile-out", str(profile)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + args.warmup + 300)
        os.unlink(f.name)
        if done.returncode != 0:
            raise RuntimeError(f"{kind} N={n} failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
    finally:
        _stop(sim)


def _fmt_row(kind: str, r: dict[str, Any]) -> str:
    return (f"| {r['n']} | {kind} | {r['cpu_ms_per_pump_s']:.3f} | {r['late_p50'] * 100:.2f} % | "
            f"{r['late_p99'] * 100:.2f} % | {r['late_max'] * 100:.1f} % | {r['poll_rate']:.3f} | "
            f"{r['herd_50ms'] * 100:.0f} % | {r['sim_cpu_frac'] * 100:.0f} % | {r['machine_busy_frac'] * 100:.0f} % |")


def orchestrate(args: argparse.Namespace) -> None:
    results: dict[int, dict[str, dict[str, Any]]] = {}
    lines = ["| N | run | CPU ms/pump/s | p50 late | p99 late | max late | polls/scheduled | busiest 50 ms | sim CPU "
             "| machine busy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_version()}, {os.cpu_count()} cores, "
          f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    print(lines[0], flush=True)
    print(lines[1], flush=True)
    for n in args.n:
        results[n] = {}
        for kind in args.kinds:
            r = run_one(kind, n, args)
            results[n][kind] = r
            row = _fmt_row(kind, r)
            lines.append(row)
            print(row, flush=True)
        ref = results[n].get("reference")
        for kind in ("idle", "course", *EXPERIMENTS):
            if ref and kind in results[n]:
                ratio = results[n][kind]["cpu_s"] / ref["cpu_s"]
                print(f"#   N={n} {kind}/reference CPU = {ratio:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"# end {datetime.now(UTC):%H:%M} UTC, loadavg {Path('/proc/loadavg').read_text().split()[:3]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--kinds", nargs="+", choices=KINDS + EXPERIMENTS, default=list(KINDS),
                    help="runs per N; the *-spread experiments are not in the default run")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=4.0, help="after every pump polled (and courses started)")
    ap.add_argument("--per-gateway", type=int, default=128, help="unit ids per simulated gateway (TCP port)")
    ap.add_argument("--profile", metavar="KIND:N", help="one cProfiled run instead, e.g. course:1024")
    ap.add_argument("--json", help="write all results as JSON here")
    # worker mode (internal)
    ap.add_argument("--worker", choices=KINDS + EXPERIMENTS, help=argparse.SUPPRESS)
    ap.add_argument("--urls", help=argparse.SUPPRESS)
    ap.add_argument("--sim-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        urls: dict[str, str] = json.loads(Path(args.urls).read_text())
        _raise_fd_limit(2 * len(urls) + 256)
        profile = Path(args.profile_out) if args.profile_out else None
        if args.worker == "reference":
            coro = run_reference(urls, args.seconds, args.warmup, args.sim_pid, profile)
        else:
            kind = args.worker
            coro = run_daemon(urls, kind.startswith("course"), args.seconds, args.warmup, args.sim_pid, profile,
                              spread=kind.endswith("-spread"))
        print(json.dumps(asyncio.run(coro)))
        return
    if args.profile:
        kind, _, n = args.profile.partition(":")
        out = HERE / "results" / f"scale-{kind}-{n}.prof"
        out.parent.mkdir(exist_ok=True)
        r = run_one(kind, int(n), args, profile=out)
        print(json.dumps(r, indent=1))
        print(f"profile: {out} and {out.with_suffix('.txt')}")
        return
    orchestrate(args)


if __name__ == "__main__":
    main()
