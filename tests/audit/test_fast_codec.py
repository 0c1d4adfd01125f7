"""Proof that the fast verify path gives the reference's answers.

1. msgspec (the C JSON codec behind `loads_line`'s fast path) encodes every value a record can hold to exactly the
   canonical bytes (`_reference_dumps`: json.dumps, sorted keys, no spaces, UTF-8): any unicode (escapes, control
   characters, U+2028, astral planes), keys sorting around each other, nested objects and lists, integers of any
   size and sign (beyond 64 bits too), decimals as strings. And it decodes those bytes back to the same values,
   type for type. So a line the fast path accepts is `_reference_dumps` of what it returns, which the standard
   library parses to the same record: the fast path accepts nothing the reference refuses.
2. On arbitrary and mutated lines, the fast path either agrees with the reference or steps aside (None).
3. `line_content_hash` (the content hash cut out of the line, no second encoding) == `record_hash`.
4. `verify_log` (fast per-line checks, chunks, worker processes) gives the same report as the one-pass verify it
   replaced (tests/audit/verify_oracle.py) on intact logs and on every damaged log tried, whatever the chunk size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driverd.audit import canonical, verify
from driverd.audit.canonical import (
    _FAST_CODEC,
    _reference_dumps,
    canonicalize,
    dumps,
    hash_cut_from_line,
    line_content_hash,
    loads_line,
    loads_line_fast,
    record_hash,
    sha256_hex,
)
from driverd.audit.verify import verify_log

from . import verify_oracle
from .conftest import write_generic_log

# The codec proofs need msgspec (a declared dependency); verify_log's equivalence with the one pass holds either way.
needs_msgspec = pytest.mark.skipif(_FAST_CODEC is None, reason="msgspec (a dependency) is not installed")

# Every Unicode scalar value (no lone surrogates: they are not UTF-8, and the writer refuses them).
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
TRICKY = st.sampled_from(['"', "\\", "/", "\n", "\r", "\t", "\b", "\f", "\x00", "\x1f", "\x7f", "\x80", "\u2028",
                          "\u2029", "\ufeff", "\uffff", "\U0001f600", "\U0010ffff", "é", "e\u0301", "\\u00e9"])
STRINGS = TEXT | st.lists(TRICKY | TEXT, max_size=5).map("".join)
KEYS = STRINGS | st.sampled_from(["hash", "has", "hasg", "hashh", "Hash", "prev", "seq", "ts", "", "\U0001f600",
                                  "\uffff", "\ue000"])
INTS = (st.integers() | st.integers(-(2**64) - 2, 2**64 + 2) | st.sampled_from([2**63 - 1, 2**63, -(2**63),
        -(2**63) - 1, 2**64 - 1, 2**64, -(2**64), 10**300, -(10**300)]))
DECIMALS = st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: format(d, "f"))  # as the writer logs them
SCALARS = st.none() | st.booleans() | INTS | STRINGS | DECIMALS
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
                      max_leaves=20)
RECORDS = st.dictionaries(KEYS, VALUES, max_size=8)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (1 == True and {"a": 1} == {"a": True} in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def reference_loads(line: bytes) -> dict[str, Any]:
    obj = canonical._parse(line)
    if _reference_dumps(obj) != line:
        raise ValueError("line is not in canonical form")
    return obj


# ---------------------------------------------------------------------------------------------- 1. the codec


@needs_msgspec
@given(RECORDS)
def test_fast_encoder_gives_the_canonical_bytes(record: dict[str, Any]) -> None:
    assert _FAST_CODEC is not None
    decode, encode = _FAST_CODEC
    want = _reference_dumps(record)
    assert encode(record) == want
    assert same(decode(want), json.loads(want))
    assert same(decode(want), record)


@needs_msgspec
@given(RECORDS)
def test_canonical_lines_take_the_fast_path_and_give_the_reference_record(record: dict[str, Any]) -> None:
    line = _reference_dumps(record)
    fast = loads_line_fast(line)
    assert fast is not None  # every canonical line is accepted without the reference
    assert same(fast, reference_loads(line))
    assert same(loads_line(line), record)


@needs_msgspec
@pytest.mark.parametrize("n", [2**64 - 1, 2**64, 2**64 + 1, -(2**63) - 1, -(2**64), 3**200, -(7**300), 10**4299])
def test_integers_beyond_64_bits(n: int) -> None:
    line = _reference_dumps({"n": n})
    assert same(loads_line_fast(line), {"n": n})
    assert same(loads_line(line), reference_loads(line))


MUTATIONS = st.sampled_from([b" ", b".", b"0", b"e", b"E", b"-", b"+", b",", b":", b'"', b"\\", b"u", b"d8", b"00",
                             b"\xff", b"\xc3", b"\x00", b"\n", b"{", b"}", b"[", b"]", b"1.0", b"NaN", b"\\ud800",
                             b"\\ud83d\\ude00", b"\\u00e9", b"\\/", b"true", b"null", b"9" * 25])


@needs_msgspec
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(RECORDS, st.lists(st.tuples(st.floats(0, 1), st.integers(0, 3), MUTATIONS), min_size=1, max_size=3))
def test_damaged_lines_never_accepted_by_the_fast_path_alone(
    record: dict[str, Any], edits: list[tuple[float, int, bytes]]
) -> None:
    line = _reference_dumps(record)
    for where, cut, insert in edits:
        i = int(where * len(line))
        line = line[:i] + insert + line[i + cut :]
    fast = loads_line_fast(line)
    try:
        ref = reference_loads(line)
    except (ValueError, RecursionError):
        assert fast is None  # the reference refuses it: so does the fast path (loads_line then raises)
        with pytest.raises(ValueError):
            loads_line(line)
        return
    if fast is not None:
        assert same(fast, ref)
    assert same(loads_line(line), ref)


@needs_msgspec
@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"a":1.5}', "float literal"),
        (b'{"a":1e5}', "float literal"),
        (b'{"a":-0}', "not in canonical form"),
        (b'{"a":"\\ud800"}', "surrogates not allowed"),  # msgspec refuses the lone surrogate; the reference words it
        (b'{"a":"\\ud83d\\ude00"}', "not in canonical form"),  # an escaped pair: valid JSON, not canonical
        (b'{"a":"\\u00e9"}', "not in canonical form"),
        (b'{"a":1,"a":1}', "not in canonical form"),
        (b'{"a":1}\n', "not in canonical form"),
        (b'{"a":' + b"9" * 4301 + b"}", "Exceeds the limit"),  # Python's int-string limit, both paths
        (b"[1]", "not a JSON object"),
        (b'{"a":"\xff"}', "utf-8"),
    ],
)
def test_where_msgspec_differs_the_reference_decides(line: bytes, message: str) -> None:
    assert loads_line_fast(line) is None
    with pytest.raises(ValueError, match=message):
        loads_line(line)


def test_without_msgspec_the_reference_path_gives_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [_reference_dumps({"b": [1, None, True], "a": "ü\u2028\U0001f600", "n": 2**70})]
    want = [loads_line(x) for x in lines]
    monkeypatch.setattr(canonical, "_FAST_CODEC", None)
    assert loads_line_fast(lines[0]) is None
    assert all(same(loads_line(x), w) for x, w in zip(lines, want, strict=True))


@needs_msgspec
def test_writer_values_round_trip() -> None:
    rec = canonicalize({"rate_ml_per_h": Decimal("2.083"), "delivered_ml": Decimal("-0.0000"), "big": 10**30,
                        "note": "naïve → \"q\" \\ \t", "alarms": [], "nested": {"z": None, "a": [Decimal("1E+2")]}})
    assert isinstance(rec, dict)
    line = dumps(rec)
    assert same(loads_line_fast(line), rec)


# ------------------------------------------------------------------------------------- 3. the content hash


HASH_RECORDS = st.dictionaries(KEYS, VALUES, max_size=6)


@given(HASH_RECORDS, st.sampled_from(["top", "nested-same", "nested-other", "only", "quoted-key"]))
def test_line_content_hash_is_record_hash(record: dict[str, Any], shape: str) -> None:
    record.pop("hash", None)
    if shape == "only":
        record = {}
    digest = record_hash(record)
    if shape == "nested-same":  # the same member inside: ambiguous, so the record is encoded again
        record["a"] = {"hash": digest}
        digest = record_hash(record)
        record["a"] = {"hash": digest}
    elif shape == "nested-other":
        record["has"] = [{"hash": "0" * 64}]
        digest = record_hash(record)
    elif shape == "quoted-key":  # written "a\"hash":"...": the member's bytes, inside a key
        record['a"hash'] = "0" * 64
        digest = record_hash(record)
    record["hash"] = digest
    line = _reference_dumps(record)
    assert line_content_hash(line, record) == record_hash(record)
    if shape != "nested-same":
        assert line_content_hash(line, record) == digest


def test_line_content_hash_with_a_bad_hash_field_falls_back() -> None:
    for value in ["0" * 63, "A" * 64, "0" * 64 + "\n", "é" * 64, '"' * 64, 5, None]:
        rec = {"a": 1, "hash": value}
        line = _reference_dumps(rec)
        assert line_content_hash(line, rec) == record_hash(rec)
        if isinstance(value, str):  # what verify's inline path compares: never equal to a malformed hash
            assert hash_cut_from_line(line, value) != value


# ---------------------------------------------------------------------------- 4. verify_log vs the one pass


def _same_report(path: Path, **kw: Any) -> verify.VerifyReport:
    want = verify_oracle.verify_log(path, **kw).as_dict()
    for chunk in (None, 1, 200, 1500):
        got = verify_log(path, chunk_bytes=chunk, **kw).as_dict()
        assert got == want, (chunk, got["failure"], want["failure"])
    return verify_log(path, **kw)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fastverify")
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    return {
        "signed": write_generic_log(base / "signed", key, n=40),
        "unsigned": write_generic_log(base / "unsigned", None, n=25),
    }


def test_intact_logs_same_report(logs: dict[str, Path]) -> None:
    for path in logs.values():
        assert _same_report(path).ok
        for seg in sorted(path.glob("audit-*.jsonl")):
            _same_report(seg)
        _same_report(path, require_sealed=True)


def test_golden_log_same_report() -> None:
    _same_report(Path(__file__).parent / "data" / "golden-log")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_logs_same_first_failure(logs: dict[str, Path], tmp_path: Path, data: st.DataObject) -> None:
    src = logs[data.draw(st.sampled_from(sorted(logs)))]
    work = Path(tempfile.mkdtemp(dir=tmp_path)) / "log"
    shutil.copytree(src, work)
    segs = sorted(work.glob("audit-*.jsonl"))
    seg = data.draw(st.sampled_from(segs))
    body = seg.read_bytes()
    kind = data.draw(st.sampled_from(["byte", "delete-line", "swap-lines", "truncate", "rehash", "empty", "dup"]))
    lines = body.split(b"\n")[:-1]
    if kind == "byte" and body:
        i = data.draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([data.draw(st.integers(0, 255))]) + body[i + 1 :]
    elif kind == "delete-line":
        i = data.draw(st.integers(0, len(lines) - 1))
        body = b"".join(x + b"\n" for x in lines[:i] + lines[i + 1 :])
    elif kind == "swap-lines" and len(lines) > 1:
        i = data.draw(st.integers(0, len(lines) - 2))
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        body = b"".join(x + b"\n" for x in lines)
    elif kind == "truncate":
        body = body[: data.draw(st.integers(0, len(body)))]
    elif kind == "rehash":  # an edited record with its own hash recomputed: only the chain can tell
        i = data.draw(st.integers(0, len(lines) - 1))
        rec = loads_line(lines[i])
        rec["edited"] = True
        rec.pop("hash")
        rec["hash"] = record_hash(rec)
        lines[i] = dumps(rec)
        body = b"".join(x + b"\n" for x in lines)
    elif kind == "empty":
        body = b""
    elif kind == "dup":
        i = data.draw(st.integers(0, len(lines) - 1))
        body = b"".join(x + b"\n" for x in [*lines[: i + 1], lines[i], *lines[i + 1 :]])
    seg.write_bytes(body)
    target = data.draw(st.sampled_from([work, seg]))
    _same_report(target, require_sealed=data.draw(st.booleans()))


def test_parallel_workers_same_report(logs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real worker processes (the size threshold lowered so a small log is split and farmed out)."""
    monkeypatch.setattr(verify, "PARALLEL_MIN_BYTES", 0)
    path = logs["signed"]
    want = verify_oracle.verify_log(path).as_dict()
    assert verify_log(path, workers=2, chunk_bytes=300).as_dict() == want
    work = tmp_path / "bad"
    shutil.copytree(path, work)
    seg = sorted(work.glob("audit-*.jsonl"))[1]
    data = seg.read_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    seg.write_bytes(data[:cut] + data[cut:].replace(b'"i":', b'"i" :', 1))
    want = verify_oracle.verify_log(work).as_dict()
    got = verify_log(work, workers=2, chunk_bytes=300).as_dict()
    assert got == want and got["failure"] is not None
    assert "canonical" in got["failure"]["reason"]


def test_chain_is_checked_across_chunk_boundaries(logs: dict[str, Path], tmp_path: Path) -> None:
    """A line moved within a segment keeps every line intact on its own: only the cross-chunk link catches it."""
    work = tmp_path / "moved"
    shutil.copytree(logs["signed"], work)
    seg = sorted(work.glob("audit-*.jsonl"))[0]
    lines = seg.read_bytes().split(b"\n")[:-1]
    lines.append(lines.pop(3))
    seg.write_bytes(b"".join(x + b"\n" for x in lines))
    for chunk in (1, 200, None):
        report = verify_log(work, chunk_bytes=chunk)
        assert not report.ok and report.failure is not None
        assert report.failure.line == 4 and "seq" in report.failure.reason


def test_sha256_of_line_is_the_chain_hash(logs: dict[str, Path]) -> None:
    seg = sorted(logs["signed"].glob("audit-*.jsonl"))[0]
    a, b = seg.read_bytes().split(b"\n")[:2]
    assert loads_line(b)["prev"] == sha256_hex(a)


@pytest.mark.parametrize("limit", [150, 300, 420, 10_000])
@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_line_limit_and_read_blocks_same_report(
    logs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, block: int
) -> None:
    """The line-length limit (lowered so real records cross it) and the block reads give the one pass's answer,
    torn and over-long last lines included."""
    from driverd.audit import reader

    for module in (reader, verify, verify_oracle):
        monkeypatch.setattr(module, "MAX_LINE_BYTES", limit)
    monkeypatch.setattr(verify, "READ_BLOCK", block)
    work = tmp_path / "log"
    shutil.copytree(logs["signed"], work)
    _same_report(work)
    last = sorted(work.glob("audit-*.jsonl"))[-1]
    data = last.read_bytes()
    for tail in (b"x" * (limit - 1), b"x" * limit, b"x" * (limit + 1), b"x" * (limit + 1) + b"\n"):
        last.write_bytes(data + tail)
        _same_report(work)


def test_parallel_workers_spawned_when_the_caller_has_threads(
    logs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With another thread alive (a progress bar, a daemon) workers are spawned, not forked: same report."""
    import threading

    monkeypatch.setattr(verify, "PARALLEL_MIN_BYTES", 0)
    started: list[str] = []
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        import multiprocessing

        get_context = multiprocessing.get_context

        def spy(method: str | None = None) -> Any:
            started.append(str(method))
            return get_context(method)

        monkeypatch.setattr(multiprocessing, "get_context", spy)
        got = verify_log(logs["signed"], workers=2, chunk_bytes=500).as_dict()
    finally:
        stop.set()
        other.join()
    assert started == ["spawn"]
    assert got == verify_oracle.verify_log(logs["signed"]).as_dict()
