"""Edited copies of a real log, for replay tests: records replaced, removed or added, pumps renamed, the log cut
short. The copies are canonical lines (replay reads them) but their chain is not redone: replay does not check it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from driverd.audit.canonical import dumps, loads_line
from driverd.audit.segments import list_segments

Edit = Callable[[dict[str, Any]], "dict[str, Any] | list[dict[str, Any]] | None"]


def copy_log(src: Path, dest: Path, edit: Edit | None = None, *, until: int | None = None,
             rename: dict[str, str] | None = None) -> Path:
    """A copy of the log in src, each record through `edit` (None: removed; a list: those records instead),
    the records after seq `until` left out, and every string `a` of `rename` written `b` (pump ids)."""
    dest.mkdir(parents=True, exist_ok=True)
    for _, seg in list_segments(src):
        out = []
        for line in seg.read_bytes().splitlines():
            if rename:
                text = line.decode()
                for a, b in rename.items():
                    text = text.replace(a, b)
                rec = json.loads(text)
            else:
                rec = loads_line(line)
            if until is not None and rec["seq"] > until:
                break
            got = edit(rec) if edit is not None else rec
            for r in [] if got is None else got if isinstance(got, list) else [got]:
                out.append(dumps(r) + b"\n")
        if out:
            (dest / seg.name).write_bytes(b"".join(out))
        if until is not None and out and loads_line(out[-1][:-1])["seq"] >= until:
            break
    return dest
