"""The state-delta encoding as it was before it became incremental (driverd/audit/snapshot.py at d780b49, verbatim
but for the names): every delta re-encodes every pump's whole state and copies its history. The oracle that
tests/audit/test_incremental_snapshot.py holds the incremental SnapshotChain to, in delta format 1 (the format it
wrote; format 2 is held to format 1 there by what applying each gives)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from driverd.core.state import CourseState
from driverd.core.state_records import STATE_FORMAT, sample_row, state_to_fields


@dataclass
class OracleEncoded:
    states: dict[str, dict[str, Any]]  # pump -> state fields without "samples"
    samples: dict[str, list[Any]]  # pump -> the history samples (the states' own objects)
    versions: dict[str, int]
    library: str | None
    ledger: dict[str, Any]
    schedules: list[Any]


def _no_row(_sample: Any) -> list[str]:
    return []


def oracle_full_fields(enc: OracleEncoded) -> dict[str, Any]:
    return {"format": STATE_FORMAT,
            "states": {p: {**f, "samples": [sample_row(x) for x in enc.samples[p]]} for p, f in enc.states.items()},
            "versions": enc.versions, "library": enc.library, "ledger": enc.ledger, "schedules": enc.schedules}


class OracleChain:
    def __init__(self) -> None:
        self._last: OracleEncoded | None = None
        self.parent: dict[str, Any] | None = None

    def encode(self, states: Mapping[str, CourseState], versions: Mapping[str, int], library: str | None,
               ledger: dict[str, Any], schedules: list[Any]) -> OracleEncoded:
        enc = OracleEncoded({}, {}, dict(sorted(versions.items())), library, ledger, schedules)
        for pump, state in sorted(states.items()):
            fields = state_to_fields(state, _no_row)
            del fields["samples"]
            enc.states[pump] = fields
            enc.samples[pump] = list(state.samples)
        return enc

    def mark(self, last: OracleEncoded, parent: dict[str, Any]) -> None:
        self._last, self.parent = last, parent

    def delta_fields(self, cur: OracleEncoded) -> dict[str, Any] | None:
        prev = self._last
        if prev is None or self.parent is None or self.parent.get("line_sha256") is None:
            return None
        pumps: dict[str, Any] = {}
        for pump, fields in cur.states.items():
            old = prev.states.get(pump)
            if old is None:
                pumps[pump] = {"state": {**fields, "samples": [sample_row(x) for x in cur.samples[pump]]}}
                continue
            patch: dict[str, Any] = {"fields": {k: v for k, v in fields.items() if old.get(k) != v}}
            history = _history_patch(prev.samples[pump], cur.samples[pump])
            if patch["fields"] or history != {"drop": 0, "add": []}:
                pumps[pump] = {**patch, **history}
        out: dict[str, Any] = {"format": 1, "parent": dict(self.parent), "pumps": pumps,
                               "gone": sorted(set(prev.states) - set(cur.states)), "versions": cur.versions}
        if cur.library != prev.library:
            out["library"] = cur.library
        if cur.ledger != prev.ledger:
            out["ledger"] = cur.ledger
        if cur.schedules != prev.schedules:
            out["schedules"] = cur.schedules
        return out


def _history_patch(old: list[Any], new: list[Any]) -> dict[str, Any]:
    if not new:
        return {"drop": len(old), "add": []}
    k = bisect_left([x.at for x in old], new[0].at)  # times strictly increase: the only possible overlap
    kept = len(old) - k
    if kept <= len(new) and all(a is b or sample_row(a) == sample_row(b) for a, b in zip(old[k:], new, strict=False)):
        return {"drop": k, "add": [sample_row(x) for x in new[kept:]]}
    return {"samples": [sample_row(x) for x in new]}
