"""Bench helper (issue #12, bounded snapshots): start today's daemon once on a copy of a log written before
pruning, and stop it cleanly (its start-up and stop snapshots are pruned), as an upgrade does. 8 model pumps
(bed-1..bed-8), 300-s poll, as `synth_log.py --pumps 8 --poll 300` wrote them.

usage: python bench/upgrade_once.py SRC_OUT LABEL DEST_OUT   (SRC_OUT/at-LABEL/clean -> DEST_OUT/at-LABEL/clean)
"""
import asyncio
import dataclasses
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_log import StepClock, config_for, copy_log, model_pumps

from driverd.runtime import daemon as daemon_module
from driverd.runtime.daemon import Daemon

src, label, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
(dest / f"at-{label}").mkdir(parents=True, exist_ok=True)
shutil.copytree(src / "keys", dest / "keys", dirs_exist_ok=True)
clean = dest / f"at-{label}" / "clean"
shutil.rmtree(clean, ignore_errors=True)
copy_log(src / f"at-{label}" / "clean", clean)
pumps = [f"bed-{i}" for i in range(1, 9)]

async def main() -> None:
    clock = StepClock(daemon_module._last_logged_ts(clean))
    config = dataclasses.replace(config_for(dest, pumps, 300.0, src / "keys" / "audit.key"), audit_dir=clean)
    with model_pumps(clock, {}):
        d = Daemon(config, clock)
        await d.start()
        await d.stop()
asyncio.run(main())
print("upgraded", clean)
