"""The incremental state encoding (issue 12, item 3: replay speed) gives exactly the records of the full encoding.

SnapshotChain encodes a pump's fields only for the fields whose value is not the very object it encoded last time,
compares histories by shared slots (History.same_run, count_before) and, with a RowMemo (replay's), encodes every
history row once for all the snapshots and deltas that hold it. On generated chains of real course states
(several pumps; courses that slide their 24-h window, branch, restart, come and go; histories rebuilt from equal
but distinct samples) every full encoding and every delta equals what the encoding before it did
(tests/audit/snapshot_oracle.py: every state and history encoded afresh), the daemon's chain (no RowMemo) and
replay's give the same records, and applying each delta to its parent gives the full encoding."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.audit.snapshot import RowMemo, SnapshotChain, apply_delta, full_fields
from driverd.core.history import History
from driverd.core.state import CourseState, Sample, evolve
from driverd.core.state_records import sample_row, state_fields, state_to_fields
from tests.audit.snapshot_oracle import OracleChain, oracle_full_fields
from tests.core.test_state_records import ACTIONS, course_states

Z = Decimal("0.0000")  # x + Z == x, with more digits
STEPS = st.lists(st.tuples(st.sampled_from([61, 61, 900, 3600, 6 * 3600]), ACTIONS), max_size=60)


def _rebuilt(state: CourseState, how: int) -> CourseState:
    """The state with its history rebuilt from distinct samples (no slot shared with any other): equal ones
    (how 1), or (how 2) every third one and the Decimal fields of the state written with one more digit: equal
    by ==, a different state by its exponents (so a different encoding)."""
    if how == 1:
        return evolve(state, samples=History([Sample(s.at, s.delivered_ml, s.delivered_mg) for s in state.samples]))
    samples = [Sample(s.at, s.delivered_ml + Z if i % 3 == 1 else s.delivered_ml, s.delivered_mg)
               for i, s in enumerate(state.samples)]
    return evolve(state, samples=History(samples), commanded_rate=state.commanded_rate + Z,
                  level_mg_per_24h=state.level_mg_per_24h + Z)


def _run(courses: dict[str, list[CourseState]], walk: list[tuple[str, dict[str, int], int]]) -> int:
    """Mark each point of `walk` (kind, pump -> index into its course, rebuild) on replay's chain, the daemon's
    chain and the oracle, checking that all three give the same fields; returns how many deltas were compared."""
    replay, daemon, oracle = SnapshotChain(RowMemo()), SnapshotChain(), OracleChain()
    assert replay.row_memo is not None
    versions, library, schedules = {"s": 1}, "library", []
    ledger: dict[str, Any] = {"patients": {}, "started": {}, "ended": {}, "last_at": {}}
    last_full: dict[str, Any] | None = None
    deltas = 0
    for seq, (kind, picks, rebuild) in enumerate(walk, start=1):
        states = {p: courses[p][i] for p, i in sorted(picks.items())}
        if rebuild:
            states = {p: _rebuilt(s, rebuild) for p, s in states.items()}
        if kind == "snapshot-check":  # replay checks a snapshot: every history through the row memo
            for p, s in states.items():
                assert replay.row_memo.rows(s.samples) == [sample_row(x) for x in s.samples]
                assert {**replay.fields(p, s), "samples": replay.row_memo.rows(s.samples)} == state_to_fields(s)
            replay.row_memo.round()
        encs = [c.encode(states, versions, library, ledger, schedules) for c in (replay, daemon)]
        ref = oracle.encode(states, versions, library, ledger, schedules)
        want = oracle_full_fields(ref)
        assert want["states"] == {p: state_to_fields(s) for p, s in states.items()}
        assert all(full_fields(e) == want for e in encs)
        found = [c.delta_fields(e, 1) for c, e in zip((replay, daemon), encs, strict=True)]
        expected = oracle.delta_fields(ref)
        assert found == [expected, expected]
        now = [c.delta_fields(e) for c, e in zip((replay, daemon), encs, strict=True)]  # format 2
        assert now[0] == now[1]
        if expected is not None:
            deltas += 1
            assert last_full is not None and now[0] is not None
            rebuilt = apply_delta(last_full, {"event": "state_delta", **expected})
            assert {"format": want["format"], **rebuilt} == want
            assert {"format": want["format"], **apply_delta(last_full, {"event": "state_delta", **now[0]})} == want
            # Format 2 differs from format 1 only in how it says the versions and the ledger.
            same = {k: v for k, v in expected.items() if k not in ("format", "versions", "ledger")}
            assert {k: v for k, v in now[0].items() if k not in ("format", "versions_patch", "ledger_patch")} == same
            assert ("versions_patch" in now[0]) == (last_full["versions"] != want["versions"])
        parent = {"seq": seq, "segment": 1, "line_sha256": f"{seq:064x}"}
        full = kind != "delta"
        for c, e in zip((replay, daemon), encs, strict=True):
            c.mark(e, dict(parent), full=full)
        oracle.mark(ref, dict(parent))
        last_full = want
    return deltas


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_incremental_encoding_equals_the_full_encoding(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 3), label="pumps")
    courses = {f"bed-{k}": course_states(data.draw(STEPS, label=f"steps {k}")) for k in range(n)}
    walk: list[tuple[str, dict[str, int], int]] = []
    at = dict.fromkeys(courses, 0)
    for _ in range(data.draw(st.integers(1, 12), label="marks")):
        for p, states in courses.items():
            # Mostly forward (the window slides and grows), sometimes the same state, or back (a branch).
            at[p] = data.draw(st.sampled_from([min(at[p] + d, len(states) - 1) for d in (0, 1, 3, 17, 60)]
                                              + [data.draw(st.integers(0, len(states) - 1))]))
        present = [p for p in courses if data.draw(st.integers(0, 5)) > 0]  # a pump comes and goes
        kind = data.draw(st.sampled_from(["delta", "delta", "delta", "snapshot", "snapshot-check"]))
        walk.append((kind, {p: at[p] for p in present}, data.draw(st.sampled_from([0] * 8 + [1, 2]))))
    _run(courses, walk)


def test_a_long_course_whose_window_slides_and_is_copied() -> None:
    """62 h of 15-min polls: the 24-h window drops samples on every delta and its buffer is copied (a trim that
    outgrew the live part), so the row memo carries rows over to the copy."""
    course = course_states([(900, "poll")] * 250)
    assert len(course[-1].samples) > 64
    assert len({id(s.samples._buf) for s in course}) > 2  # the buffer was copied (History.since)
    walk = [("snapshot-check" if i % 7 == 0 else "delta", {"bed-1": min(i * 5, len(course) - 1)}, 0)
            for i in range(110)]
    assert _run({"bed-1": course}, walk) >= 90


def test_state_fields_since_an_earlier_state_equals_the_fields_of_the_state() -> None:
    course = course_states([(61, "poll"), (3600, "escalate"), (61, "lost"), (61, "clear"), (900, "stop"),
                            (61, "poll")])
    for i, old in enumerate(course):
        for new in course[i:i + 5]:
            assert state_fields(new, (old, state_fields(old))) == state_fields(new)
            assert state_fields(new) == {k: v for k, v in state_to_fields(new).items() if k != "samples"}


def test_equal_values_written_differently_are_told_apart() -> None:
    """A state equal by == to the last one encoded but not the same object (a Decimal with more digits, a history
    of equal samples written differently) is encoded afresh, field by field and row by row."""
    course = course_states([(61, "poll")] * 30)
    walk = [("snapshot-check" if i == 0 else "delta", {"bed-1": 10 + i // 2}, (0, 2, 1, 0, 2, 2, 1)[i % 7])
            for i in range(30)]
    assert _run({"bed-1": course}, walk) == 29


def test_a_pump_silent_for_a_day_drops_its_whole_window() -> None:
    course = course_states([(61, "poll")] * 3 + [(25 * 3600, "poll")] + [(61, "poll")] * 3)
    walk = [("snapshot", {"bed-1": 3}, 0), *(("delta", {"bed-1": i}, 0) for i in range(4, len(course)))]
    assert _run({"bed-1": course}, walk) >= 3




KEYS = st.sampled_from(["a", "b", "c", "sched-1", "bed-1", ""])
LEDGERS = st.dictionaries(st.sampled_from(["patients", "started", "ended", "last_at", "retired"]),
                          st.dictionaries(KEYS, st.one_of(st.text(max_size=3), st.lists(st.text(max_size=2),
                                                                                         max_size=2))),
                          min_size=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.dictionaries(KEYS, st.integers(1, 3)), LEDGERS), min_size=2, max_size=6))
def test_versions_and_ledger_patches_give_what_format_1_gives(marks: list[tuple[dict[str, int], dict[str, Any]]]) \
        -> None:
    """Format 2 says the versions and the ledger as patches: applied to the parent they give exactly the versions
    and ledger format 1 holds whole (keys set, changed, deleted; a ledger object that appears, such as `retired`;
    a ledger object that disappears, which a patch cannot say: then the ledger is written whole). Unchanged
    versions and ledger are not written at all."""
    chain = SnapshotChain()
    last: dict[str, Any] | None = None
    for seq, (versions, ledger) in enumerate(marks, start=1):
        enc = chain.encode({}, versions, None, ledger, [])
        new, old = chain.delta_fields(enc), chain.delta_fields(enc, 1)
        if last is not None:
            assert new is not None and old is not None
            assert apply_delta(last, {"event": "state_delta", **new}) == apply_delta(last, {"event": "state_delta",
                                                                                           **old})
            assert ("versions_patch" in new) == (versions != last["versions"])
            assert ("ledger_patch" in new or "ledger" in new) == (ledger != last["ledger"])
            assert ("ledger" in new) == (ledger != last["ledger"] and not set(last["ledger"]) <= set(ledger))
        last = full_fields(enc)
        chain.mark(enc, {"seq": seq, "segment": 1, "line_sha256": f"{seq:064x}"}, full=seq == 1)
