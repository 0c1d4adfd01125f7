"""Run by test_outbox.py in a subprocess: put, done and set_state forever, printing each one once it returned
(so the parent knows what was acknowledged when it SIGKILLs this process)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from driverd.hl7.outbox import Outbox


def main() -> None:
    directory, run = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(run)
    box = Outbox.open(directory, compact_after=5)
    out = sys.stdout
    step = 0
    while True:
        step += 1
        head = box.head()
        if head is None or rng.random() < 0.55:
            cid = f"N{box.next_number():08d}"
            box.put(cid, f"MSH|^~\\&|A|B|||20260302||ORU^R01|{cid}|P|2.6\r" + "x" * rng.randint(0, 300),
                    kind="ORU^R01", pump_id=None)
            out.write(f"put {cid}\n")
        else:
            box.done(head.control_id, "AA")
            out.write(f"done {head.control_id}\n")
        if step % 7 == 0:
            box.set_state("k", [run, step])
            out.write(f"state {run} {step}\n")
        out.flush()


if __name__ == "__main__":
    main()
