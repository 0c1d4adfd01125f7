"""Signed schedules in the log: every `schedule_accepted` record must carry the signed document it came from,
that document must verify against a trust store, and the logged schedule fields must be what parsing that
document gives.

A hash chain proves only that nobody edited the log without recomputing the chain; anyone who can write the
log's files can append a well-chained record. Crash recovery adopts courses from the log, so it must adopt a
schedule only on the same evidence the daemon required at push time: a signature by a trusted key over the
schedule's content. The logged fields alone cannot be re-verified (they are normalised: times in UTC, numbers
as strings, `"stop"` as `[]`), hence the `document` field (canonical JSON of the whole pushed document).

Checked per record, in log order: the document is present and parses (strict `load_json`); its signature
verifies against the trust store; it validates against the drug library in force at that point of the log
(the last `library_loaded` before it), as at push time but without the expiry check (the record's `at` is when
the channel logged it, not when the push was checked); the logged `schedule` equals, value for value, the
schedule parsed from the document; and the record's `pump_id` is the document's. Logs written before the
document was logged fail the first check: such a log cannot prove its schedules were signed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from driverd.core.errors import AuditError, DriverdError, ValidationError
from driverd.core.protocol import ProtocolSpec, parse_protocol
from driverd.core.records import schedule_from_fields
from driverd.core.schedule import Schedule
from driverd.core.schedule_parse import load_json, parse_schedule
from driverd.signing import SignatureRejected, TrustStore


class UntrustedSchedule(AuditError):
    """A `schedule_accepted` record whose schedule is not proven signed by a trusted key."""

    def __init__(self, seq: object, pump_id: object, why: str) -> None:
        self.seq = seq
        self.why = why
        super().__init__(
            f"audit log seq {seq}: schedule_accepted for pump {pump_id!r} is not trusted: {why} "
            "(a schedule is adopted from the log only if its signed document verifies against the trust store)"
        )


class ScheduleChecker:
    """Streaming check: `add` every record in log order; it raises UntrustedSchedule at the first bad one."""

    def __init__(self, trust: TrustStore) -> None:
        self._trust = trust
        self._protocol: ProtocolSpec | None = None
        self._library_error = "no library_loaded record before it"
        self.checked = 0  # schedule_accepted records that passed

    def add(self, rec: Mapping[str, Any]) -> None:
        event = rec.get("event")
        if event == "library_loaded":
            self._load_library(rec.get("text"))
        elif event == "schedule_accepted":
            self._check(rec)
            self.checked += 1

    def _load_library(self, text: object) -> None:
        try:
            if not isinstance(text, str):
                raise ValueError("library_loaded has no `text`")
            self._protocol = parse_protocol(text)
        except (DriverdError, ValueError) as exc:
            self._protocol = None
            self._library_error = f"the drug library in force does not parse: {exc}"

    def _check(self, rec: Mapping[str, Any]) -> None:
        seq, pump_id = rec.get("seq"), rec.get("pump_id")

        def refuse(why: str) -> UntrustedSchedule:
            return UntrustedSchedule(seq, pump_id, why)

        text = rec.get("document")
        if not isinstance(text, str):
            raise refuse("it has no signed `document` (forged, or written by a driverd before documents were logged)")
        try:
            doc = load_json(text)
        except ValidationError as exc:
            raise refuse(f"its document is not valid JSON: {_problems(exc)}") from None
        if not isinstance(doc, Mapping):
            raise refuse("its document is not a JSON object")
        try:
            key_id = self._trust.verify(doc)
        except SignatureRejected as exc:
            raise refuse(f"signature check failed: {exc}") from None
        if self._protocol is None:
            raise refuse(self._library_error)
        try:
            signed = parse_schedule(doc, self._protocol, now=None)
        except ValidationError as exc:
            why = f"its document does not validate against the drug library in force: {_problems(exc)}"
            raise refuse(why) from None
        try:
            logged = schedule_from_fields(rec["schedule"])
        except (DriverdError, KeyError, TypeError, ValueError) as exc:
            raise refuse(f"its logged `schedule` fields do not parse: {exc}") from None
        differ = _differences(logged, signed)
        if differ:
            raise refuse(f"the logged schedule differs from its signed document (key {key_id}) in: {', '.join(differ)}")
        if pump_id != signed.pump_id:
            raise refuse(f"logged for pump {pump_id!r} but the signed document is for pump {signed.pump_id!r}")


def _differences(logged: Schedule, signed: Schedule) -> list[str]:
    # Value equality: Decimal("2.50") == Decimal("2.5") and equal instants in different offsets are the same
    # schedule (the canonical document writes numbers in shortest form, the push parsed the literal).
    return [f.name for f in dataclasses.fields(Schedule) if getattr(logged, f.name) != getattr(signed, f.name)]


def _problems(exc: ValidationError) -> str:
    return "; ".join(str(p) for p in exc.problems[:5])


def check_schedule_records(records: Iterable[Mapping[str, Any]], trust: TrustStore) -> int:
    """Check every `schedule_accepted` in records (log order); return how many. Raises UntrustedSchedule."""
    checker = ScheduleChecker(trust)
    for rec in records:
        checker.add(rec)
    return checker.checked


__all__ = ["ScheduleChecker", "UntrustedSchedule", "check_schedule_records"]
