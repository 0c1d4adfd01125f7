"""Restart from exec: a fresh `driverd run` process until systemd would see READY=1 (issue #12 item 1).

`bench/restart_history.py` times `Daemon.start` inside a warm process. A real restart also pays the interpreter, the
imports and the config load. This script starts `driverd run` as systemd would: a new process, NOTIFY_SOCKET
set to a datagram socket we listen on. It measures the wall time from spawning the process to READY=1. The
service sends READY=1 only after `Daemon.start` (recovery, every pump's channel started, the start-up snapshot
signed and synced) and the control socket are up. The child is then stopped with SIGTERM, and its CPU time
(user + system, whole life) is taken from wait4.

The logs are the copies `bench/synth_log.py --restart-at ...` kept (OUT/at-<D>d/clean, OUT/at-<D>d/crash). Each
round runs on a fresh scratch copy: sealed segments hard-linked, the open one copied. The pumps are `sim://`.
The references, in the same run:
- `python -c pass` (the interpreter alone);
- `python -c "import driverd.runtime.service"` (interpreter + imports);
- the same restart on the 5-day log.

The log must end before the wall clock (`synth_log.py --start DATE`): a daemon started behind its log's last
record raises a clock fault on every course (docs/safety.md, "Time"), which is not a plain restart.

usage: python bench/restart_exec.py OUT [--days 5 365] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, say, table
from synth_log import copy_log

from driverd import resources
from driverd.audit.segments import list_segments

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DRIVERD = str(Path(sys.executable).parent / "driverd")  # the console script systemd's ExecStart runs


def write_config(scratch: Path, key: Path, pumps: list[str]) -> Path:
    """The daemon config `synth_log.config_for` builds, as TOML (what `driverd run --config` reads)."""
    lines = [
        "[daemon]",
        f'protocol = "{resources.PROTOCOL}"',
        f'trust_dir = "{resources.DEMO_TRUST_DIR}"',
        f'audit_dir = "{scratch / "audit"}"',
        f'audit_key = "{key}"',
        f'control_socket = "{scratch / "control.sock"}"',
        'socket_mode = "0660"',
        "poll_period_s = 60.0",
        "link_timeout_s = 120.0",
        "deadman_s = 180",
        "driver_timeout_s = 1.0",
        'mode = "bench"',
        "",
    ]
    for p in pumps:
        lines += ["[[pumps]]", f'id = "{p}"', f'url = "sim://{p}"', ""]
    path = scratch / "driverd.toml"
    path.write_text("\n".join(lines))
    return path


def pumps_in(audit: Path) -> list[str]:
    """The pump ids of the log (from its first segment's records): the config must name the same pumps."""
    import json

    ids: set[str] = set()
    first = list_segments(audit)[0][1]
    with first.open("rb") as f:
        for raw in f:
            pid = json.loads(raw).get("pump_id")
            if isinstance(pid, str):
                ids.add(pid)
    return sorted(ids, key=lambda s: (len(s), s))


def last_ts(audit: Path) -> datetime:
    import json

    last_line = list_segments(audit)[-1][1].read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return datetime.fromisoformat(json.loads(last_line)["ts"].replace("Z", "+00:00"))


def startup_snapshot_at(audit: Path, after_segment: int) -> datetime:
    """The time (`ts`, the daemon's wall clock) of the start-up state snapshot: the first one in the segments the
    daemon opened. It is written at the end of `Daemon.start`, once every pump's channel exists, just before their
    tasks start: "supervising every pump". READY=1 comes after the control socket is up, by which time the
    channels have made their first polls (here: every pump found stopped, each decision logged durably)."""
    import json

    for _number, path in list_segments(audit, after_segment + 1):
        with path.open("rb") as f:
            for raw in f:
                rec = json.loads(raw)
                if rec.get("event") == "state_snapshot":
                    return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00"))
    raise SystemExit(f"{audit}: no start-up snapshot after segment {after_segment}")


def run_until_ready(argv: list[str], env: dict[str, str], notify: Path | None) -> tuple[float, float]:
    """(wall seconds from spawn to READY=1, or to exit without a notify socket; child CPU seconds, whole life)."""
    sock = None
    if notify is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify))
        sock.settimeout(0.05)
        env = {**env, "NOTIFY_SOCKET": str(notify)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if sock is not None:
            while True:
                try:
                    msg = sock.recv(4096).decode()
                except TimeoutError:
                    if proc.poll() is not None:  # died before READY=1
                        err = proc.stderr.read().decode() if proc.stderr else ""
                        raise SystemExit(f"{argv} exited {proc.returncode} before READY=1: {err[-2000:]}") from None
                    if time.perf_counter() - t0 > 300:
                        raise SystemExit(f"{argv}: no READY=1 within 300 s") from None
                    continue
                if "READY=1" in msg.split("\n"):
                    break
            wall = time.perf_counter() - t0
            proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
        if sock is None:
            wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.returncode != 0:
            raise SystemExit(f"{argv} exited {proc.returncode}: {err[-2000:]}")
        return wall, usage.ru_utime + usage.ru_stime
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if sock is not None:
            sock.close()


def restart_once(log: Path, key: Path, pumps: list[str], env: dict[str, str], driverd: str = DRIVERD,
                 ) -> tuple[float, float, float]:
    """(wall s to the start-up snapshot, wall s to READY=1, child CPU s)."""
    scratch = Path(tempfile.mkdtemp(prefix="driverd-restart-exec-"))
    try:
        copy_log(log, scratch / "audit")
        last_segment = list_segments(scratch / "audit")[-1][0]
        config = write_config(scratch, key, pumps)
        argv = [driverd, "run", "--config", str(config), "--json"]
        spawned = datetime.now(UTC)
        ready, cpu = run_until_ready(argv, env, scratch / "notify.sock")
        return (startup_snapshot_at(scratch / "audit", last_segment) - spawned).total_seconds(), ready, cpu
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="bench/synth_log.py's output directory (with at-<D>d/ copies)")
    ap.add_argument("--days", type=int, nargs="+", default=[5, 365])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", type=Path, help="an earlier checkout with its own .venv (pip install -e DIR): its "
                    "`driverd run` on the same logs, in the same rounds")
    args = ap.parse_args()
    say(machine())
    key = args.out / "keys" / "audit.key"
    logs = {f"{d} days, {kind}": args.out / f"at-{d}d" / kind for d in args.days for kind in ("clean", "crash")}
    for name, log in logs.items():
        if not log.is_dir():
            raise SystemExit(f"{log}: missing (run bench/synth_log.py with --restart-at {name.split()[0]})")
    for log in logs.values():
        last = last_ts(log)
        if last > datetime.now(UTC):
            raise SystemExit(f"{log}: its last record ({last:%Y-%m-%d %H:%M}) is after the wall clock: the daemon "
                             "would start with a clock fault on every course (generate with synth_log.py --start DATE)")
    pumps = pumps_in(next(iter(logs.values())))
    say(f"{len(pumps)} pumps; logs: " + ", ".join(f"{n}: {len(list_segments(p))} segments" for n, p in logs.items()))
    # An installed daemon runs from compiled bytecode (pip writes the .pyc files at install). This machine sets
    # PYTHONDONTWRITEBYTECODE, which would make every run compile ~100 modules from source (0.3 s): compile once
    # here, and let the children use the .pyc files.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([PYTHON, "-m", "compileall", "-q", "-j", "0", str(ROOT / "driverd"), str(ROOT / "drivers"),
                    str(ROOT / "simulators"), str(Path(PYTHON).parent.parent / "lib")], check=False,
                   stdout=subprocess.DEVNULL)
    refs = {
        "python -c pass": [PYTHON, "-c", "pass"],
        "python -c 'import driverd.runtime.service'": [PYTHON, "-c", "import driverd.runtime.service"],
    }
    walls: dict[str, list[float]] = {k: [] for k in [*refs, *logs]}
    cpus: dict[str, list[float]] = {k: [] for k in walls}
    drivers = {name: (log, DRIVERD) for name, log in logs.items()}
    if args.before is not None:
        theirs = str(args.before / ".venv" / "bin" / "driverd")
        drivers.update({f"before: {name}": (log, theirs) for name, log in logs.items()})
        walls.update({f"before: {name}": [] for name in logs})
        cpus.update({f"before: {name}": [] for name in logs})
    snaps: dict[str, list[float]] = {k: [] for k in drivers}
    for r in range(args.rounds):  # rounds interleaved: every contender sees the same minutes
        for name, argv in refs.items():
            w, c = run_until_ready(argv, env, None)
            walls[name].append(w)
            cpus[name].append(c)
        for name, (log, driverd) in drivers.items():
            at, w, c = restart_once(log, key, pumps, env, driverd)
            snaps[name].append(at)
            walls[name].append(w)
            cpus[name].append(c)
        say(f"round {r + 1}/{args.rounds} done")
    rows = [[name, f"{median(snaps[name]):.3f}" if name in snaps else "", f"{median(walls[name]):.3f}",
             f"{min(walls[name]):.3f}", f"{max(walls[name]):.3f}", f"{median(cpus[name]):.3f}"] for name in walls]
    heads = ["contender", "to the start-up snapshot (every pump supervised), median s",
             "wall to READY=1 / exit, median s", "min", "max", "child CPU (whole life), median s"]
    say(table(heads, rows))
    say(machine())


if __name__ == "__main__":
    main()
