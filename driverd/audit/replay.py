"""Replay: fold the logged core inputs through the pure core again and compare every recomputed output with
what the log says was commanded.

For each pump, records are taken in log order. Each input record (`INPUT_EVENTS`) is decoded with
`event_from_record` and folded with the machine's `step` (the daemon's own entry point: an illegal event
becomes a logged refusal); its commands, converted with `command_to_record`, must equal, in order, the output
records (`OUTPUT_EVENTS`) the log has for that pump after the input and before the pump's next input.
Any missing, extra or different output is a divergence (seq, expected, found), with one exception: outputs
missing at a crash boundary (the end of the log, or the writer's `log_reopened` after a restart). The daemon logs an
input and then its decisions as separate durable writes, so a crash can fall between them. The decisions are not
lost: the core is deterministic and recomputes them from the input, which is what replay and recovery continue
from. They provably never acted either: write-ahead means a setpoint that is not in the log was never sent. They
are reported as `interrupted` (see docs/audit.md, "Crash consistency").

The state is kept per pump across courses (as the daemon does: setpoint ids and the memory of a stopped
course carry over); the summary is reported per (pump, course). The drug library in force is the last
`library_loaded` record's `text`, parsed with the core's own `parse_protocol`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from driverd.audit.canonical import canonicalize
from driverd.audit.exposure import LedgerBuilder
from driverd.audit.reader import Line
from driverd.audit.report import Report, ReportBuilder, report_lines
from driverd.core.errors import DriverdError
from driverd.core.protocol import ProtocolSpec, parse_protocol
from driverd.core.rules import RULES_VERSION

if TYPE_CHECKING:
    from driverd.audit.snapshot import Snapshot

ENVELOPE = frozenset({"seq", "ts", "event", "pump_id", "course_id", "prev", "hash"})
#: Records the writer puts first after a restart: whatever the previous process had not logged yet, it never will.
CRASH_BOUNDARIES = frozenset({"torn_tail_truncated", "log_reopened"})
#: The writer's own records (writer.WRITER_EVENTS): they carry no course data.
WRITER_RECORDS = frozenset({"segment_start", "checkpoint", "torn_tail_truncated", "log_reopened"})


@dataclass(frozen=True, slots=True)
class Divergence:
    seq: int  # the output record that differs, or the input whose output is missing
    pump_id: str
    course_id: str | None
    kind: str  # "different" | "missing" | "unexpected" | "input" | "no_library"
    expected: dict[str, Any] | None
    found: dict[str, Any] | None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "pump_id": self.pump_id,
            "course_id": self.course_id,
            "kind": self.kind,
            "expected": self.expected,
            "found": self.found,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Interrupted:
    """Outputs the core recomputes for the last input before a crash boundary that the log does not hold."""

    input_seq: int
    pump_id: str
    course_id: str | None
    outputs: tuple[dict[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return {"input_seq": self.input_seq, "pump_id": self.pump_id, "course_id": self.course_id,
                "outputs": list(self.outputs)}


@dataclass(slots=True)
class ReplayResult:
    divergences: list[Divergence] = field(default_factory=list)
    interrupted: list[Interrupted] = field(default_factory=list)
    inputs: int = 0
    outputs_checked: int = 0
    report: Report = field(default_factory=Report)
    # The log did not start at seq 1 (the segments before were archived, or one segment was given) and its first
    # record with course data was a state snapshot: replay started from that snapshot's states (its seq).
    seeded_from: int | None = None
    # Each daemon start in the log and the decision rules it recorded (None: a release before rules were recorded),
    # in log order: a stretch decided by other rules than this replay's may diverge where the rules changed.
    rules: list[dict[str, Any]] = field(default_factory=list)

    @property
    def other_rules(self) -> list[dict[str, Any]]:
        """The daemon starts whose rules differ from this replay's (RULES_VERSION)."""
        return [r for r in self.rules if r["rules"] != RULES_VERSION]

    def rules_at(self, seq: int) -> int | None:
        """The decision rules of the daemon that wrote record `seq` (the last daemon_start at or before it; None:
        a release that did not record them). Before any daemon_start replayed (a window of the log): ours."""
        at = [r["rules"] for r in self.rules if isinstance(r["seq"], int) and r["seq"] <= seq]
        return at[-1] if at else RULES_VERSION

    def detail(self, d: Divergence) -> str:
        """A divergence's detail, with the rules that decided its stretch of the log when they are not ours."""
        rules = self.rules_at(d.seq)
        if rules == RULES_VERSION:
            return d.detail
        return (f"{d.detail + ' ' if d.detail else ''}[this stretch was decided by {_rules_name(rules)}, this replay "
                f"runs decision rules {RULES_VERSION}: where the rules changed, a divergence is not a wrong "
                "decision; replay it with the driverd release that wrote it]")

    @property
    def ok(self) -> bool:
        return not self.divergences

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "inputs": self.inputs,
            "outputs_checked": self.outputs_checked,
            "divergences": [{**d.as_dict(), "detail": self.detail(d), "rules": self.rules_at(d.seq)}
                            for d in self.divergences],
            "interrupted": [i.as_dict() for i in self.interrupted],
            **self.report.as_dict(),
            "seeded_from": self.seeded_from,
            "rules": self.rules,
            "replay_rules": RULES_VERSION,
        }

    def text_lines(self) -> list[str]:
        head = (
            f"replay {'OK' if self.ok else 'FAILED'}: {self.inputs} inputs folded, "
            f"{self.outputs_checked} logged outputs compared, {len(self.divergences)} divergence(s)"
        )
        note = "  (replay checks decisions, not integrity: `driverd audit verify` checks the chain and signatures)"
        out = [head, note]
        if self.seeded_from is not None:
            out.append(f"  started from the state snapshot at seq {self.seeded_from}: the log before it is not here "
                       "(archived: see its archive anchor); decisions from there on are checked")
        for r in self.other_rules:
            out.append(f"  the log from seq {r['seq']} was decided by {_rules_name(r['rules'])}; this replay runs "
                       f"decision rules {RULES_VERSION}: it may diverge there where the rules changed")
        for i in self.interrupted:
            names = ", ".join(str(o.get("event")) for o in i.outputs)
            out.append(f"  interrupted by a crash after input seq {i.input_seq} (pump {i.pump_id}): {names} "
                       "recomputed, never logged (so never sent)")
        for d in self.divergences:
            out.append(f"  DIVERGENCE at seq {d.seq} (pump {d.pump_id}, course {d.course_id or '-'}): {d.kind}")
            if d.detail or self.rules_at(d.seq) != RULES_VERSION:
                out.append(f"    {self.detail(d)}")
            if d.expected is not None:
                out.append(f"    expected: {d.expected}")
            if d.found is not None:
                out.append(f"    found:    {d.found}")
        return [*out, "", *report_lines(self.report)]


Reduce = Callable[[Any, Any, ProtocolSpec], tuple[Any, tuple[Any, ...]]]


class _NoReport:
    """Stands in for the ReportBuilder when replay builds no report (its report stays empty)."""

    def __init__(self) -> None:
        self.report = Report()

    def add(self, rec: dict[str, Any]) -> None:
        pass


@dataclass(slots=True)
class _Pump:
    state: Any
    expected: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # outputs still to be matched
    input_seq: int = 0
    course_id: str | None = None


class Replayer:
    """Streaming replay. The core functions are injectable so the comparison logic can be tested alone."""

    def __init__(
        self,
        *,
        initial_state: Callable[[str], Any] | None = None,
        reduce: Reduce | None = None,
        event_from_record: Callable[[dict[str, Any]], Any] | None = None,
        command_to_record: Callable[[Any], tuple[str, dict[str, Any]]] | None = None,
        input_events: frozenset[str] | None = None,
        output_events: frozenset[str] | None = None,
        report: bool = True,
    ) -> None:
        if None in (initial_state, reduce, event_from_record, command_to_record, input_events, output_events):
            from driverd.core import machine, records

            initial_state = initial_state or machine.initial_state
            # `step` is what the daemon folds with (illegal events become refusals); plain reduce otherwise.
            reduce = reduce or getattr(machine, "step", machine.reduce)
            event_from_record = event_from_record or records.event_from_record
            command_to_record = command_to_record or records.command_to_record
            input_events = input_events if input_events is not None else records.INPUT_EVENTS
            output_events = output_events if output_events is not None else records.OUTPUT_EVENTS
        assert initial_state and reduce and event_from_record and command_to_record
        assert input_events is not None and output_events is not None
        self._initial_state = initial_state
        self._reduce = reduce
        self._event_from_record = event_from_record
        self._command_to_record = command_to_record
        self._inputs = input_events
        self._outputs = output_events
        self._protocol: ProtocolSpec | None = None
        self._library_text: str | None = None
        self._versions: dict[str, int] = {}  # highest schedule version accepted, as recovery counts them
        self._ledger = LedgerBuilder()  # the exposure ledger's builder (checked against snapshots)
        self._accepted: dict[str, dict[str, Any]] = {}  # schedule digest -> its schedule_accepted record
        self._pumps: dict[str, _Pump] = {}
        self._summary = ReportBuilder()
        self.result = ReplayResult(report=self._summary.report)
        self._suffix: bool | None = None  # the first record added was not seq 1 (None: nothing added yet)
        self._course_data = False  # a record other than the writer's own has been added (or seed() was called)
        # The last snapshot or delta, for checking the next delta (audit/snapshot.py, SnapshotChain).
        # History rows are encoded once for every snapshot and delta that holds them (RowMemo).
        from driverd.audit.snapshot import RowMemo, SnapshotChain

        self._chain = SnapshotChain(RowMemo())
        self._segment = 0  # the segment being read (from its segment_start)
        self._follow = False  # the next record's prev is the line hash of the last snapshot or delta
        if not report:  # no per-course report: a parallel replay's workers (the parent builds it, replay_parallel.py)
            self._summary = _NoReport()  # type: ignore[assignment]
            self.result.report = self._summary.report

    def add(self, rec: dict[str, Any]) -> None:
        self._summary.add(rec)
        event = rec.get("event")
        if self._suffix is None:
            self._suffix = rec.get("seq") != 1
        if self._follow or event == "segment_start":
            self._see(rec)
        if event == "state_snapshot" and self._suffix and not self._course_data:
            # A log that begins after seq 1 with a state snapshot (after `audit archive`, the live log starts
            # so): replay carries on from it, as start-up does. In a whole log every snapshot is checked instead.
            self._seed_record(rec)
            return
        if event not in WRITER_RECORDS:
            self._course_data = True
        if event == "daemon_start":
            rules = rec.get("rules")
            self.result.rules.append({"seq": rec.get("seq"),
                                      "rules": rules if isinstance(rules, int) and not isinstance(rules, bool)
                                      else None})
        if event == "library_loaded":
            self._load_library(rec)
            return
        if event in CRASH_BOUNDARIES:
            self._interrupt_all()
            return
        if event == "state_snapshot":
            self._check_snapshot(rec)
            self._mark_chain(rec)
            return
        if event == "state_delta":
            self._check_delta(rec)
            return
        self._ledger.add(rec)
        if event == "schedule_accepted" and isinstance(rec.get("schedule"), dict):
            self._accepted[str(rec["schedule"].get("digest"))] = rec
            sid, ver = rec["schedule"].get("schedule_id"), rec["schedule"].get("version")
            if isinstance(sid, str) and isinstance(ver, int) and not isinstance(ver, bool):
                self._versions[sid] = max(self._versions.get(sid, 0), ver)
        pump_id = rec.get("pump_id")
        if not isinstance(pump_id, str):
            return
        if event in self._inputs:
            self._input(pump_id, rec)
        elif event in self._outputs:
            self._output(pump_id, rec)

    @property
    def library_text(self) -> str | None:
        return self._library_text

    def _seed_record(self, rec: dict[str, Any]) -> None:
        from driverd.audit.snapshot import read_snapshot

        try:
            snap = read_snapshot(rec)
        except DriverdError as exc:
            self._diverge(rec, "", None, "snapshot", None, None, f"state snapshot does not parse: {exc}")
            return
        self.seed(snap)
        self.result.seeded_from = rec.get("seq") if isinstance(rec.get("seq"), int) else None

    def seed(self, snap: Snapshot) -> None:
        """Start from a state snapshot (start-up replays only what follows it)."""
        self._course_data = True  # later snapshots are checked against it
        for pump_id, state in snap.states.items():
            self._pumps[pump_id] = _Pump(state)
        if snap.library is not None:
            self._load_library({"seq": 0, "text": snap.library})
        self._versions = dict(snap.versions)
        self._ledger = LedgerBuilder.from_fields(snap.ledger.to_fields())
        for acc in snap.schedules:
            if isinstance(acc.get("schedule"), dict):
                self._accepted[str(acc["schedule"].get("digest"))] = acc
        states, versions, ledger = dict(snap.states), dict(snap.versions), snap.ledger.to_fields()
        schedules = list(snap.schedules)
        self._chain.mark(lambda: self._chain.encode(states, versions, snap.library, ledger, schedules),
                         {"seq": snap.seq, "segment": snap.segment or self._segment,
                          "line_sha256": snap.line_sha256}, full=True)
        self._follow = snap.line_sha256 is None

    def _check_snapshot(self, rec: dict[str, Any]) -> None:
        """A snapshot must hold exactly the states replay has computed up to it, and the library in force.

        Fast path: a pump's state in the snapshot is identical to ours when its fields equal ours encoded
        (decoding is exact: decode(encode(state)) is the state itself, tests/core/test_state_records.py), and
        each history sample is encoded once for all the snapshots it appears in. Only when some state differs is
        the snapshot decoded, and judged as before (parse errors, ==, repr)."""
        from driverd.audit.snapshot import read_snapshot, schedules_in

        raw_states: dict[str, Any] = rec["states"] if isinstance(rec.get("states"), dict) else {}
        pumps = sorted(set(raw_states) | set(self._pumps)) if raw_states else []
        replayed = {q: (self._pumps[q].state if q in self._pumps else self._initial_state(q)) for q in pumps}
        identical = bool(pumps)
        for pump in pumps:  # every pump encoded (no short cut): the next snapshot reuses the rows
            encoded = self._encode_state(pump, replayed[pump])
            identical = identical and raw_states.get(pump) == encoded
        assert self._chain.row_memo is not None
        self._chain.row_memo.round()
        try:
            snap = read_snapshot(rec, decode_states=not identical)
        except DriverdError as exc:
            self._diverge(rec, "", None, "snapshot", None, None, f"state snapshot does not parse: {exc}")
            return
        if identical:
            snap.states = replayed
        if snap.library != self._library_text:
            self._diverge(rec, "", None, "snapshot", None, None, "state snapshot names another drug library")
        if snap.versions != self._versions:
            self._diverge(rec, "", None, "snapshot", None, None,
                          f"state snapshot schedule versions {snap.versions} differ from the log's {self._versions}")
        def unnumbered(xs: list[dict[str, Any]]) -> list[dict[str, Any]]:  # seq: where it was logged, for messages
            return [{k: v for k, v in x.items() if k != "seq"} for x in xs]

        if unnumbered(snap.schedules) != unnumbered(schedules_in(snap.states, self._accepted)):
            self._diverge(rec, "", None, "snapshot", None, None,
                          "state snapshot's schedules differ from the log's schedule_accepted records")
        if isinstance(rec.get("ledger"), dict) and "retired" in rec["ledger"]:
            self._ledger.prune(held(replayed))  # the daemon pruned its ledger as it wrote this snapshot
        if snap.ledger.to_fields() != self._ledger.to_fields():
            self._diverge(rec, "", None, "snapshot", None, None,
                          "state snapshot exposure ledger differs from the log's")
        if identical:
            return  # every state is identical to ours (above): nothing more to compare
        for pump_id in sorted(set(snap.states) | set(self._pumps)):
            p = self._pumps.get(pump_id)
            ours = p.state if p is not None else self._initial_state(pump_id)
            theirs = snap.states.get(pump_id, self._initial_state(pump_id))
            if theirs != ours or repr(theirs) != repr(ours):
                self._diverge(rec, pump_id, None, "snapshot", None, None,
                              f"state snapshot differs from the replayed state of pump {pump_id}")

    # ------------------------------------------------------------------------------------------ deltas

    def _see(self, rec: dict[str, Any]) -> None:
        if self._follow:
            self._follow = False
            if self._chain.parent is not None and isinstance(rec.get("prev"), str):
                self._chain.parent["line_sha256"] = rec["prev"]
        if rec.get("event") == "segment_start" and isinstance(rec.get("segment"), int):
            self._segment = rec["segment"]

    def _chain_view(self, pumps: Iterable[str]) -> Any:
        from driverd.audit.snapshot import schedules_in

        states = {q: (self._pumps[q].state if q in self._pumps else self._initial_state(q)) for q in pumps}
        if self._ledger.pruned:  # a daemon that prunes prunes at every snapshot and delta (runtime/daemon.py)
            self._ledger.prune(held(states))
        return states, dict(self._versions), self._library_text, self._ledger.to_fields(), \
            schedules_in(states, self._accepted)

    def _mark_chain(self, rec: dict[str, Any]) -> None:
        """The snapshot just checked is the parent of the next delta: replay's own view of it (the same pumps),
        encoded only if a delta comes."""
        raw = rec["states"] if isinstance(rec.get("states"), dict) else {}
        view = self._chain_view(sorted(set(raw) | set(self._pumps)))
        seq = rec["seq"] if isinstance(rec.get("seq"), int) else 0
        self._chain.mark(lambda: self._chain.encode(*view), {"seq": seq, "segment": self._segment,
                                                             "line_sha256": None}, full=True)
        self._follow = True

    def _check_delta(self, rec: dict[str, Any]) -> None:
        """A delta must be exactly the record the daemon writes from replay's states against the previous snapshot
        or delta (the same code: SnapshotChain). Judged like a snapshot (divergence kind `snapshot`)."""
        from driverd.audit.snapshot import DELTA_FORMAT, DELTA_FORMATS, apply_delta, delta_body, full_fields

        prev = self._chain.last()
        cur = self._chain.encode(*self._chain_view(sorted(set(prev.states if prev else ()) | set(self._pumps))))
        fmt = rec.get("format")  # each delta is checked in the format it was written in (older logs: format 1)
        expected = self._chain.delta_fields(cur, fmt if fmt in DELTA_FORMATS and not isinstance(fmt, bool)
                                            else DELTA_FORMAT)
        found = delta_body(rec)
        if expected is None:
            self._diverge(rec, "", None, "snapshot", None, None,
                          "state delta without a state snapshot before it (replay the log from a full snapshot)")
        elif found != expected:
            assert prev is not None
            try:
                apply_delta(full_fields(prev), rec)
            except DriverdError as exc:
                self._diverge(rec, "", None, "snapshot", None, None, f"state delta does not parse: {exc}")
            else:
                self._diverge(rec, _delta_culprit(found, expected), None, "snapshot", None, None,
                              f"state delta differs from the replayed states ({_delta_where(found, expected)})")
        seq = rec["seq"] if isinstance(rec.get("seq"), int) else 0
        self._chain.mark(cur, {"seq": seq, "segment": self._segment, "line_sha256": None}, full=False)
        self._follow = True

    def _encode_state(self, pump: str, state: Any) -> Any:
        """state_to_fields(state), with each history sample's row encoded once for all the snapshots that hold it
        (the chain's RowMemo, shared with the deltas), and the other fields taken from the
        chain (encoded there once per state object: the chain's encoding after this snapshot reuses them)."""
        assert self._chain.row_memo is not None
        return {**self._chain.fields(pump, state), "samples": self._chain.row_memo.rows(state.samples)}

    def states(self) -> dict[str, Any]:
        """Each pump's course state after everything added so far (crash recovery starts from these)."""
        return {pump_id: p.state for pump_id, p in self._pumps.items()}

    def finish(self) -> ReplayResult:
        """End of the log: it may end at a crash, so outputs still expected here are interrupted, not missing."""
        self._interrupt_all()
        return self.result

    def _interrupt_all(self) -> None:
        for pump_id, p in self._pumps.items():
            if p.expected:
                outputs = tuple({"event": name, **fields} for name, fields in p.expected)
                self.result.interrupted.append(Interrupted(p.input_seq, pump_id, p.course_id, outputs))
                p.expected = []

    # ------------------------------------------------------------------------------------------ steps

    def _load_library(self, rec: dict[str, Any]) -> None:
        text = rec.get("text")
        try:
            if not isinstance(text, str):
                raise ValueError("library_loaded has no `text`")
            self._protocol = parse_protocol(text)
            self._library_text = text
        except (DriverdError, ValueError) as exc:
            self._protocol = None
            self._library_text = None
            self._diverge(rec, "", None, "no_library", None, None, f"drug library in the log does not parse: {exc}")

    def _input(self, pump_id: str, rec: dict[str, Any]) -> None:
        p = self._pumps.get(pump_id)
        if p is None:
            p = self._pumps[pump_id] = _Pump(self._initial_state(pump_id))
        if p.expected:
            self._flush_missing(pump_id, p)
        p.input_seq = rec["seq"]
        p.course_id = rec.get("course_id")
        self.result.inputs += 1
        if self._protocol is None:
            self._diverge(rec, pump_id, p.course_id, "no_library", None, None, "input before any library_loaded")
            return
        try:
            event = self._event_from_record(rec)
            p.state, cmds = self._reduce(p.state, event, self._protocol)
        except DriverdError as exc:
            self._diverge(rec, pump_id, p.course_id, "input", None, _fields(rec), f"cannot fold this input: {exc}")
            return
        if cmds:  # most inputs (a quiet pump report) decide nothing: p.expected is already empty
            p.expected = [(name, _canon(fields)) for name, fields in map(self._command_to_record, cmds)]

    def _output(self, pump_id: str, rec: dict[str, Any]) -> None:
        p = self._pumps.get(pump_id)
        found = {"event": rec["event"], **_fields(rec)}
        self.result.outputs_checked += 1
        if p is None or not p.expected:
            why = "the core produced nothing here" if p is not None else "no input for this pump yet"
            self._diverge(rec, pump_id, rec.get("course_id"), "unexpected", None, found, why)
            return
        name, fields = p.expected.pop(0)
        expected = {"event": name, **fields}
        # Compare the fields the core defines; extra fields the runtime adds (e.g. wire details) are context.
        got = {k: found.get(k) for k in expected}
        if got != expected:
            diff = sorted(k for k in expected if expected[k] != found.get(k))
            self._diverge(rec, pump_id, p.course_id, "different", expected, found, f"differs in: {', '.join(diff)}")

    def _flush_missing(self, pump_id: str, p: _Pump) -> None:
        for name, fields in p.expected:
            self.result.divergences.append(
                Divergence(
                    p.input_seq,
                    pump_id,
                    p.course_id,
                    "missing",
                    {"event": name, **fields},
                    None,
                    f"the core produced this after input seq {p.input_seq} but the log does not have it",
                )
            )
        p.expected = []

    def _diverge(
        self,
        rec: dict[str, Any],
        pump_id: str,
        course_id: Any,
        kind: str,
        expected: dict[str, Any] | None,
        found: dict[str, Any] | None,
        detail: str,
    ) -> None:
        course = course_id if isinstance(course_id, str) else None
        self.result.divergences.append(Divergence(rec["seq"], pump_id, course, kind, expected, found, detail))


def _rules_name(rules: int | None) -> str:
    return f"decision rules {rules}" if rules is not None else "a release that did not record its decision rules"


def held(states: Mapping[str, Any]) -> list[str]:
    """The schedule ids the states hold (the courses `LedgerBuilder.prune` keeps whole)."""
    return [s.schedule.schedule_id for s in states.values() if s.schedule is not None]


def _fields(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ENVELOPE}


def _canon(fields: dict[str, Any]) -> dict[str, Any]:
    """Expected fields in their logged form (Decimal -> plain string, datetime -> RFC 3339 Z)."""
    out = canonicalize(fields, "")
    assert isinstance(out, dict)
    return out


def replay_records(records: Iterable[dict[str, Any]], replayer: Replayer | None = None) -> ReplayResult:
    r = replayer or Replayer()
    with _collector_paused():
        for rec in records:
            r.add(rec)
    return r.finish()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while replay folds (and on again after, as it was). Replay allocates
    several tracked objects per record (records, states, samples, history views) and makes no cycles (a whole
    replay of the 7-pump bench log leaves 0 objects for gc.collect()); the collector's passes over the growing
    young generations cost up to a fifth of replay's CPU (bench/README.md, section 13). Reference counting frees
    everything as before."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def replay_lines(lines: Iterable[Line], replayer: Replayer | None = None) -> ReplayResult:
    return replay_records((line.record for line in lines), replayer)


def _delta_where(found: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    pumps = found.get("pumps"), expected.get("pumps")
    if keys == ["pumps"] and all(isinstance(x, dict) for x in pumps):
        return f"pump {_delta_culprit(found, expected)}"
    return ", ".join(keys)


def _delta_culprit(found: dict[str, Any], expected: dict[str, Any]) -> str:
    a, b = found.get("pumps"), expected.get("pumps")
    if isinstance(a, dict) and isinstance(b, dict):
        for pump in sorted(set(a) | set(b)):
            if a.get(pump) != b.get(pump):
                return str(pump)
    return ""
