"""Export records as CSV (envelope columns + the event fields as canonical JSON) or JSONL (exact lines)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any, Final, TextIO

from driverd.audit.canonical import dumps
from driverd.audit.reader import Line

FORMATS: Final = ("csv", "jsonl")
CSV_COLUMNS: Final = ("seq", "ts", "event", "pump_id", "course_id", "fields", "prev", "hash")
_ENVELOPE: Final = frozenset(CSV_COLUMNS) - {"fields"}


def csv_row(record: dict[str, Any]) -> list[str]:
    fields = {k: v for k, v in record.items() if k not in _ENVELOPE}
    row: list[str] = []
    for col in CSV_COLUMNS:
        v = dumps(fields).decode("utf-8") if col == "fields" else record.get(col)
        row.append("" if v is None else str(v))
    return row


def export(lines: Iterable[Line], fmt: str, out: TextIO) -> int:
    """Write every record to out; returns the number written. fmt must be one of FORMATS."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    n = 0
    if fmt == "jsonl":
        for line in lines:
            out.write(line.raw.decode("utf-8") + "\n")  # the exact bytes: a JSONL export still verifies
            n += 1
        return n
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for line in lines:
        writer.writerow(csv_row(line.record))
        n += 1
    return n


def export_text(lines: Iterable[Line], fmt: str) -> str:
    buf = io.StringIO()
    export(lines, fmt, buf)
    return buf.getvalue()
