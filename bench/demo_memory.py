"""Peak memory (max RSS) of `driverd demo --pumps N [--faults]` vs the interpreter with the CLI imported.

Goal (issue #12, item 5): `driverd demo --pumps 32` peaks under 150 MB. Each run is a fresh process; its own peak
RSS comes from os.wait4 (ru_maxrss of that child only). The reference, measured in the same run, is a process that
imports the CLI and exits: the floor any command pays.

usage: python bench/demo_memory.py [--pumps 32] [--faults] [--src DIR]   (--src: another checkout, e.g. "before")
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, say, table

RUN_CLI = "import sys; from driverd.cli.main import main; sys.argv = ['driverd', *sys.argv[1:]]; main()"


def peak(args: list[str], src: Path) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, last stdout line) of `python -c RUN_CLI args` run from src."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, *args], cwd=src, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    last = out.decode(errors="replace").strip().splitlines()[-1] if out.strip() else ""
    return usage.ru_maxrss / 1024, wall, last  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pumps", type=int, default=32)
    ap.add_argument("--faults", action="store_true")
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    say("machine:", machine(Path(tempfile.gettempdir())))
    say(f"source: {args.src}")
    ref_mb, ref_s, _ = peak(["--help"], args.src)
    rows = [["`driverd --help` (reference: interpreter + CLI imports)", f"{ref_mb:.0f}", f"{ref_s:.1f}", "1", "—"]]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["demo", "--pumps", str(args.pumps), "--json", "--audit", str(Path(tmp) / "log")]
        if args.faults:
            cmd.append("--faults")
        mb, s, last = peak(cmd, args.src)
        size = sum(p.stat().st_size for p in (Path(tmp) / "log").glob("audit-*.jsonl"))
    try:
        ok = json.loads(last).get("ok")
    except ValueError:
        ok = None
    label = f"`driverd demo --pumps {args.pumps}{' --faults' if args.faults else ''}` (log {size / 1e6:.0f} MB)"
    rows.append([label, f"{mb:.0f}", f"{s:.1f}", f"{mb / ref_mb:.2f}", str(ok)])
    say(table(["process", "peak RSS MB", "wall s", "× reference", "demo ok"], rows))
    say("load at end:", machine())


if __name__ == "__main__":
    main()
