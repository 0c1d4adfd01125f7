"""Run by test_orderlog.py in a subprocess: begin and finish orders forever, printing each once it returned
(so the parent knows what was acknowledged when it SIGKILLs this process)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from driverd.hl7.orderlog import OrderLog


def main() -> None:
    directory, run = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(run)
    log = OrderLog.open(directory, max_entries=50, compact_after=5)
    out = sys.stdout
    n = run * 1_000_000
    while True:
        unfinished = log.unfinished()
        if not unfinished or rng.random() < 0.5:
            n += 1
            log.begin(f"M{n}", "d")
            out.write(f"begin M{n}\n")
        else:
            cid = unfinished[-1].control_id
            text = f"R{cid}-{rng.randint(0, 9)}"
            log.finish(cid, [text])
            out.write(f"finish {cid} {text}\n")
        out.flush()


if __name__ == "__main__":
    main()
