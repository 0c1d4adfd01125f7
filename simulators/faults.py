"""Wire-level fault plans shared by every protocol front-end (New Era PTY/TCP, Modbus).

A front-end computes its reply from the model as usual, then asks the plan what to do with it:
``action = plan.on_reply(reply)`` and acts on ``action.kind``:

- ``"send"``: write ``action.payload`` (the reply unchanged)
- ``"drop"``: write nothing (the host times out)
- ``"garble"``: write ``action.payload`` (the reply with one byte corrupted, same length)
- ``"delay"``: sleep ``action.delay_s`` then write ``action.payload``
- ``"disconnect"``: write nothing and close the connection (TCP) / hang up (PTY)

Faults are queued (``drop_next(2)`` affects the next two replies), sticky (``drop_all()`` drops every reply until
``clear()``; it holds no queue, so a long outage costs no memory) or scripted in a scenario file
counted in replies: ``after_requests = N`` means the first N replies go out normally and the fault starts at reply N+1.
``kind = "alarm"`` is a physical fault: it calls ``alarm_hook`` (wired by ``World`` to the pump model's
``inject_alarm``, or ``power_cycle`` for power_interrupted) right after reply N, so request N+1 already sees
it; with N = 0 it fires when the first reply is consulted.

Scenario file (TOML)::

    wire_time_per_byte_s = 0.00052   # optional; or baud = 19200 (10 bits per byte at 8N1)

    [[fault]]
    after_requests = 3
    kind = "drop"        # drop | garble | delay | disconnect | alarm
    count = 2            # optional, default 1 (not for disconnect/alarm)

    [[fault]]
    after_requests = 5
    kind = "delay"
    seconds = 2.5

    [[fault]]
    after_requests = 8
    kind = "alarm"
    alarm = "occlusion"  # an AlarmKind value

Times here are real seconds (floats are fine: they are waits, not doses).

A cut cable (``cut()`` until ``restore()`` or ``clear()``) is more than dropped replies: requests no longer reach
the pump either, so it sees no host contact (its dead-man fires) and takes no command. A front-end asks
``plan.reaches_pump()`` once per request before the pump sees it, and drops the request when it is False.

Every fault that fires (a queued or scheduled one applied to a reply, an alarm, a cut, a restore, drop-all) is
reported to ``on_event`` (a ``FaultEvent``), so a simulator can print it. Replies dropped by an ongoing cut or
drop-all are not reported one by one: their start and end are.
"""

from __future__ import annotations

import math
import threading
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from driverd.core.errors import Problem, ValidationError
from drivers.base import AlarmKind

__all__ = ["FaultAction", "FaultEvent", "FaultKind", "FaultPlan", "FaultScenarioError", "ScheduledFault", "garble"]

FaultKind = Literal["send", "drop", "garble", "delay", "disconnect"]
ScenarioKind = Literal["drop", "garble", "delay", "disconnect", "alarm"]
_SCENARIO_KINDS = ("drop", "garble", "delay", "disconnect", "alarm")
MAX_DELAY_S = 3600.0
MAX_COUNT = 1_000_000


class FaultScenarioError(ValidationError):
    """A fault scenario file that is malformed; names the field and the rule."""


@dataclass(frozen=True, slots=True)
class FaultAction:
    kind: FaultKind
    payload: bytes
    delay_s: float = 0.0


_SEND_EMPTY = FaultAction("send", b"")  # what a healthy link does with an empty reply (sim://, once per poll)


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """A fault that fired: ``kind`` is drop | garble | delay | disconnect | alarm | cut | restore | drop_all."""

    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class ScheduledFault:
    after_requests: int
    kind: ScenarioKind
    count: int = 1
    seconds: float = 0.0
    alarm: AlarmKind | None = None


def garble(reply: bytes) -> bytes:
    """Corrupt one byte (the middle one, all bits flipped): same length, never equal to the input.

    Flipping every bit turns printable ASCII into a byte >= 0x80, so text protocols see a non-ASCII byte and
    CRC-framed ones see a CRC mismatch.
    """
    if not reply:
        return b"\xff"
    i = len(reply) // 2
    return reply[:i] + bytes([reply[i] ^ 0xFF]) + reply[i + 1 :]


def _problem(path: str, rule: str, detail: str) -> FaultScenarioError:
    return FaultScenarioError([Problem(path, rule, detail)])


class FaultPlan:
    """What to do with each reply. Thread-safe (a lock), so a front-end thread and a test may share it."""

    def __init__(
        self,
        *,
        wire_time_per_byte_s: float | None = None,
        alarm_hook: Callable[[AlarmKind], None] | None = None,
        on_event: Callable[[FaultEvent], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._cut = False
        self.lost_requests = 0  # requests that never reached the pump (the cable was cut)
        self.on_event = on_event
        self._queue: deque[FaultAction] = deque()  # one entry per affected reply (payload unused)
        self._scheduled: list[ScheduledFault] = []
        self._drop_all = False
        self._replies = 0
        self.wire_time_per_byte_s = self._check_wire_time(wire_time_per_byte_s)
        self.alarm_hook = alarm_hook
        self.history: list[FaultAction] = []  # every non-"send" action taken, for tests and logs

    @staticmethod
    def _check_wire_time(value: float | None) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise _problem("wire_time_per_byte_s", "range", f"must be a number 0..1 s, got {value!r}")
        return float(value)

    # ---- queued faults -----

    @staticmethod
    def _check_n(n: int, name: str = "n") -> int:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_COUNT:
            raise _problem(name, "range", f"must be an int 1..{MAX_COUNT}, got {n!r}")
        return n

    @staticmethod
    def _check_seconds(seconds: float, name: str = "seconds") -> float:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or not 0 <= seconds <= MAX_DELAY_S
        ):
            raise _problem(name, "range", f"must be a number 0..{MAX_DELAY_S} s, got {seconds!r}")
        return float(seconds)

    def drop_next(self, n: int = 1) -> None:
        n = self._check_n(n)
        with self._lock:
            self._queue.extend(FaultAction("drop", b"") for _ in range(n))

    def garble_next(self, n: int = 1) -> None:
        n = self._check_n(n)
        with self._lock:
            self._queue.extend(FaultAction("garble", b"") for _ in range(n))

    def delay_next(self, n: int, seconds: float) -> None:
        n, s = self._check_n(n), self._check_seconds(seconds)
        with self._lock:
            self._queue.extend(FaultAction("delay", b"", s) for _ in range(n))

    def disconnect_next(self) -> None:
        with self._lock:
            self._queue.append(FaultAction("disconnect", b""))

    def drop_all(self) -> None:
        """Drop every reply from now on until `clear()` (requests still reach the pump: see `cut` for a pulled
        cable). Queued faults wait: a reply dropped this way uses none of them up."""
        with self._lock:
            started = not self._drop_all
            self._drop_all = True
        if started:
            self._emit("drop_all", "every reply dropped until restored")

    def cut(self) -> None:
        """Pull the cable: from now on no request reaches the pump and nothing is answered, until `restore()` or
        `clear()`. The pump sees no host contact, so its dead-man fires as on a real unplugged line."""
        with self._lock:
            started = not self._cut
            self._cut = True
        if started:
            self._emit("cut", "link cut: requests no longer reach the pump, nothing is answered")

    @property
    def is_cut(self) -> bool:
        with self._lock:
            return self._cut

    def reaches_pump(self) -> bool:
        """Whether a request gets through to the pump (False while cut). Call once per request."""
        with self._lock:
            if self._cut:
                self.lost_requests += 1
                return False
            return True

    def restore(self) -> None:
        """Plug the cable back in: ends `cut` and `drop_all` (queued and scheduled faults stay)."""
        with self._lock:
            was = self._cut or self._drop_all
            self._cut = self._drop_all = False
        if was:
            self._emit("restore", "link restored")

    def fire_alarm(self, kind: AlarmKind) -> None:
        """A physical fault at the pump, now (through `alarm_hook`)."""
        hook = self.alarm_hook
        if hook is None:
            raise RuntimeError(f"alarm {kind.value!r} is due but the plan has no alarm_hook")
        hook(kind)
        self._emit("alarm", f"{kind.value} at the pump")

    def _emit(self, kind: str, detail: str) -> None:
        observer = self.on_event
        if observer is not None:
            observer(FaultEvent(kind, detail))

    @property
    def dropping_all(self) -> bool:
        with self._lock:
            return self._drop_all

    def clear(self) -> None:
        """Forget queued and scheduled faults and end `drop_all` (history and the reply count stay)."""
        with self._lock:
            was = self._cut or self._drop_all
            self._queue.clear()
            self._scheduled.clear()
            self._drop_all = self._cut = False
        if was:
            self._emit("restore", "link restored")

    def schedule(self, fault: ScheduledFault) -> None:
        with self._lock:
            self._scheduled.append(fault)
            self._scheduled.sort(key=lambda f: f.after_requests)
        # Not activated here: an alarm due "after 0 requests" fires at the first reply, once a hook is wired.

    @property
    def pending(self) -> int:
        """Queued faults not yet applied (scheduled ones not yet due are not counted)."""
        with self._lock:
            return len(self._queue)

    @property
    def replies_seen(self) -> int:
        with self._lock:
            return self._replies

    # ---- the front-end's question -----

    def _activate(self) -> None:
        """Move scheduled faults that are due into the queue; fire due alarms (outside the lock)."""
        alarms: list[AlarmKind] = []
        with self._lock:
            while self._scheduled and self._scheduled[0].after_requests <= self._replies:
                f = self._scheduled.pop(0)
                if f.kind == "alarm":
                    assert f.alarm is not None
                    alarms.append(f.alarm)
                elif f.kind == "disconnect":
                    self._queue.append(FaultAction("disconnect", b""))
                else:
                    self._queue.extend(FaultAction(f.kind, b"", f.seconds) for _ in range(f.count))
        for kind in alarms:
            self.fire_alarm(kind)

    def on_reply(self, reply: bytes) -> FaultAction:
        """Decide what happens to `reply` (call once per reply, before writing it)."""
        with self._lock:
            if not (self._scheduled or self._queue or self._drop_all or self._cut):
                # Nothing planned (every poll of a healthy link): the reply goes out, only the count moves.
                self._replies += 1
                return _SEND_EMPTY if reply == b"" else FaultAction("send", reply)
        self._activate()
        sticky = False
        with self._lock:
            self._replies += 1
            n = self._replies
            if self._drop_all or self._cut:
                planned: FaultAction | None = FaultAction("drop", b"")
                sticky = True
            else:
                planned = self._queue.popleft() if self._queue else None
            if planned is None:
                action = FaultAction("send", reply)
            elif planned.kind == "garble":
                action = FaultAction("garble", garble(reply))
            elif planned.kind == "delay":
                action = FaultAction("delay", reply, planned.delay_s)
            else:
                action = FaultAction(planned.kind, b"")
            if action.kind != "send":
                self.history.append(action)
        if action.kind != "send" and not sticky:
            extra = f" by {action.delay_s:g} s" if action.kind == "delay" else ""
            self._emit(action.kind, f"reply {n}: {action.kind}{extra}")
        self._activate()  # alarms scheduled "after N requests" fire right after reply N
        return action

    def wire_delay_s(self, n_bytes: int) -> float:
        """How long `n_bytes` take on the imitated wire (0 when no baud rate is imitated)."""
        per = self.wire_time_per_byte_s
        return 0.0 if per is None else per * n_bytes

    def set_baud(self, baud: int) -> None:
        """Imitate a serial line at `baud` (8N1: 10 bits per byte)."""
        if isinstance(baud, bool) or not isinstance(baud, int) or not 50 <= baud <= 4_000_000:
            raise _problem("baud", "range", f"must be an int 50..4000000, got {baud!r}")
        self.wire_time_per_byte_s = 10 / baud

    # ---- scenarios -----

    @classmethod
    def from_scenario(
        cls, path_or_text: str | Path, *, alarm_hook: Callable[[AlarmKind], None] | None = None
    ) -> FaultPlan:
        """Build a plan from a TOML scenario (a Path, a path string, or the TOML text itself)."""
        if isinstance(path_or_text, Path) or (
            isinstance(path_or_text, str) and "\n" not in path_or_text and "=" not in path_or_text
        ):
            path = Path(path_or_text)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise _problem("scenario", "readable", f"cannot read {str(path)!r}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise _problem("scenario", "utf-8", f"{str(path)!r} is not UTF-8 text") from None
        elif isinstance(path_or_text, str):
            text = path_or_text
        else:
            raise _problem(
                "scenario", "type", f"expected a path or TOML text, got {type(path_or_text).__name__}"
            )
        plan = cls(alarm_hook=alarm_hook)
        wire, faults = parse_scenario(text)
        plan.wire_time_per_byte_s = wire
        for f in faults:
            plan.schedule(f)
        return plan


def parse_scenario(text: str) -> tuple[float | None, list[ScheduledFault]]:
    """Pure parser: TOML text -> (wire time per byte, scheduled faults). Collects every problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _problem("scenario", "toml", f"not valid TOML: {exc}") from None
    problems: list[Problem] = []
    unknown = set(doc) - {"fault", "wire_time_per_byte_s", "baud"}
    problems += [Problem(k, "known-key", f"unknown key {k!r}") for k in sorted(unknown)]
    wire: float | None = None
    if "wire_time_per_byte_s" in doc and "baud" in doc:
        problems.append(Problem("baud", "exclusive", "give either baud or wire_time_per_byte_s, not both"))
    elif "wire_time_per_byte_s" in doc:
        w = doc["wire_time_per_byte_s"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
            problems.append(Problem("wire_time_per_byte_s", "range", f"must be a number 0..1 s, got {w!r}"))
        else:
            wire = float(w)
    elif "baud" in doc:
        b = doc["baud"]
        if isinstance(b, bool) or not isinstance(b, int) or not 50 <= b <= 4_000_000:
            problems.append(Problem("baud", "range", f"must be an int 50..4000000, got {b!r}"))
        else:
            wire = 10 / b
    raw = doc.get("fault", [])
    faults: list[ScheduledFault] = []
    if not isinstance(raw, list):
        problems.append(Problem("fault", "array", "must be an array of tables: [[fault]]"))
        raw = []
    for i, entry in enumerate(raw):
        f, errs = _parse_fault(f"fault[{i}]", entry)
        problems += errs
        if f is not None:
            faults.append(f)
    if problems:
        raise FaultScenarioError(problems)
    return wire, faults


def _parse_fault(path: str, entry: Any) -> tuple[ScheduledFault | None, list[Problem]]:
    if not isinstance(entry, dict):
        return None, [Problem(path, "table", "each [[fault]] must be a table")]
    errs: list[Problem] = []
    allowed = {"after_requests", "kind", "count", "seconds", "alarm"}
    errs += [Problem(f"{path}.{k}", "known-key", f"unknown key {k!r}") for k in sorted(set(entry) - allowed)]
    after = entry.get("after_requests")
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= 10**9:
        errs.append(Problem(f"{path}.after_requests", "range", f"required int 0..1e9, got {after!r}"))
    kind = entry.get("kind")
    if kind not in _SCENARIO_KINDS:
        errs.append(
            Problem(f"{path}.kind", "enum", f"must be one of {', '.join(_SCENARIO_KINDS)}; got {kind!r}")
        )
    count = entry.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        errs.append(Problem(f"{path}.count", "range", f"must be an int 1..{MAX_COUNT}, got {count!r}"))
    elif count != 1 and kind in ("disconnect", "alarm"):
        errs.append(Problem(f"{path}.count", "not-applicable", f"count is not allowed for kind {kind!r}"))
    seconds = entry.get("seconds")
    if kind == "delay":
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or not 0 <= seconds <= MAX_DELAY_S
        ):
            errs.append(
                Problem(f"{path}.seconds", "range", f"delay needs seconds 0..{MAX_DELAY_S}, got {seconds!r}")
            )
    elif seconds is not None:
        errs.append(
            Problem(f"{path}.seconds", "not-applicable", f"seconds is only for kind 'delay', not {kind!r}")
        )
    alarm_raw = entry.get("alarm")
    alarm: AlarmKind | None = None
    if kind == "alarm":
        names = ", ".join(a.value for a in AlarmKind)
        try:
            alarm = AlarmKind(alarm_raw)
        except ValueError:
            errs.append(Problem(f"{path}.alarm", "enum", f"must be one of {names}; got {alarm_raw!r}"))
    elif alarm_raw is not None:
        errs.append(
            Problem(f"{path}.alarm", "not-applicable", f"alarm is only for kind 'alarm', not {kind!r}")
        )
    if errs:
        return None, errs
    return (
        ScheduledFault(
            after_requests=cast(int, after),
            kind=cast(ScenarioKind, kind),
            count=count,
            seconds=float(cast(float, seconds)) if kind == "delay" else 0.0,
            alarm=alarm,
        ),
        [],
    )
