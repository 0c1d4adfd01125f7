"""Run-time fault control for a standalone simulator: a small unix-socket server on the simulator
(`driverd sim newera|modbus --control PATH`) and the words a bench operator types (`driverd sim fault --control
PATH [--unit N] WORDS...`).

Fault words (parsed by `parse_fault`, a pure function; every problem names the field and the rule):

    cut                      pull the cable: nothing reaches the pump, nothing is answered (its dead-man fires)
    restore                  plug it back in (ends cut and drop-all; queued faults stay)
    drop-all                 drop every reply until restore (requests still reach the pump)
    clear                    forget queued and scheduled faults, end cut and drop-all
    drop [N]                 drop the next N replies (default 1)
    garble [N]               corrupt the next N replies
    delay SECONDS [N]        delay the next N replies by SECONDS (0..3600)
    disconnect               close the connection (TCP) / hang up the line (PTY) at the next reply
    alarm KIND | KIND        a physical alarm at the pump now: occlusion, end_of_syringe, power_interrupted, ...

Wire protocol: one JSON line each way. Request ``{"fault": [words...], "unit": N or null}``; reply
``{"ok": true, "applied": [{"unit": N, "fault": "..."}]}`` or ``{"ok": false, "error": "..."}``. A null unit
applies the fault to every pump the simulator serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import stat
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from driverd.core.errors import Problem, ValidationError
from drivers.base import AlarmKind
from simulators.faults import MAX_COUNT, MAX_DELAY_S, FaultPlan

__all__ = ["FaultCommand", "FaultControlError", "apply_fault", "parse_fault", "send_fault", "serve_control"]

SIMPLE: Final = ("cut", "restore", "drop-all", "clear", "disconnect")
COUNTED: Final = ("drop", "garble")
MAX_REQUEST: Final = 4096  # bytes of one control request line


class FaultControlError(ValidationError):
    """Malformed fault words or control request; names the field and the rule."""


@dataclass(frozen=True, slots=True)
class FaultCommand:
    kind: str  # cut | restore | drop-all | clear | disconnect | drop | garble | delay | alarm
    count: int = 1
    seconds: float = 0.0
    alarm: AlarmKind | None = None

    def describe(self) -> str:
        if self.kind == "alarm":
            assert self.alarm is not None
            return f"alarm {self.alarm.value}"
        if self.kind in COUNTED:
            return f"{self.kind} {self.count}"
        if self.kind == "delay":
            return f"delay {self.seconds:g} s x {self.count}"
        return self.kind


def _err(field: str, rule: str, detail: str) -> FaultControlError:
    return FaultControlError([Problem(field, rule, detail)])


def _count(text: str, field: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_COUNT:
        raise _err(field, "range", f"must be a whole number 1..{MAX_COUNT}, got {text!r}")
    return int(text)


def parse_fault(words: Sequence[str]) -> FaultCommand:
    """The operator's words -> one fault command (FaultControlError if malformed)."""
    if isinstance(words, str) or not all(isinstance(w, str) for w in words):
        raise _err("fault", "type", "expected a list of words")
    if not words:
        raise _err("fault", "required", "name a fault: " + ", ".join((*SIMPLE, *COUNTED, "delay", "alarm KIND")))
    head, args = words[0].lower(), list(words[1:])
    alarms = {a.value: a for a in AlarmKind}
    if head in SIMPLE:
        if args:
            raise _err("fault", "arity", f"{head} takes no arguments, got {' '.join(args)!r}")
        return FaultCommand(head)
    if head in COUNTED:
        if len(args) > 1:
            raise _err("fault", "arity", f"{head} takes at most a count, got {' '.join(args)!r}")
        return FaultCommand(head, count=_count(args[0], "fault.count") if args else 1)
    if head == "delay":
        if not 1 <= len(args) <= 2:
            raise _err("fault", "arity", "delay takes SECONDS and an optional count")
        try:
            seconds = float(args[0])
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DELAY_S:
            raise _err("fault.seconds", "range", f"must be a number 0..{MAX_DELAY_S:g}, got {args[0]!r}")
        return FaultCommand("delay", count=_count(args[1], "fault.count") if len(args) > 1 else 1, seconds=seconds)
    if head == "alarm":
        if len(args) != 1:
            raise _err("fault", "arity", "alarm takes one KIND")
        head, args = args[0].lower(), []
    if head in alarms:
        if args:
            raise _err("fault", "arity", f"{head} takes no arguments")
        return FaultCommand("alarm", alarm=alarms[head])
    known = ", ".join((*SIMPLE, *COUNTED, "delay", "alarm", *alarms))
    raise _err("fault", "enum", f"unknown fault {words[0]!r}; one of {known}")


def apply_fault(cmd: FaultCommand, plan: FaultPlan) -> None:
    """Act on one pump's plan (its on_event hook reports what fired)."""
    if cmd.kind == "cut":
        plan.cut()
    elif cmd.kind == "restore":
        plan.restore()
    elif cmd.kind == "drop-all":
        plan.drop_all()
    elif cmd.kind == "clear":
        plan.clear()
    elif cmd.kind == "disconnect":
        plan.disconnect_next()
    elif cmd.kind == "drop":
        plan.drop_next(cmd.count)
    elif cmd.kind == "garble":
        plan.garble_next(cmd.count)
    elif cmd.kind == "delay":
        plan.delay_next(cmd.count, cmd.seconds)
    elif cmd.kind == "alarm":
        assert cmd.alarm is not None
        plan.fire_alarm(cmd.alarm)
    else:  # parse_fault never builds another kind
        raise _err("fault", "enum", f"unknown fault kind {cmd.kind!r}")


def parse_request(raw: bytes, units: Sequence[int]) -> tuple[FaultCommand, list[int]]:
    """One request line -> the command and the units it goes to (FaultControlError if malformed)."""
    try:
        req = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _err("request", "json", "one JSON object per line") from None
    if not isinstance(req, dict):
        raise _err("request", "object", "one JSON object per line")
    unknown = sorted(set(req) - {"fault", "unit"})
    if unknown:
        raise _err(f"request.{unknown[0]}", "known-key", f"unknown key {unknown[0]!r}")
    words = req.get("fault")
    if not isinstance(words, list):
        raise _err("request.fault", "type", "a list of words")
    cmd = parse_fault(words)
    unit = req.get("unit")
    if unit is None:
        return cmd, list(units)
    if isinstance(unit, bool) or not isinstance(unit, int) or unit not in units:
        raise _err("request.unit", "served", f"unit {unit!r} is not served here (served: "
                   f"{', '.join(map(str, units))})")
    return cmd, [unit]


@contextlib.asynccontextmanager
async def serve_control(path: Path, plans: Mapping[int, FaultPlan]) -> AsyncIterator[Path]:
    """Listen on unix socket `path` (mode 0600) for fault requests to `plans` (unit -> plan) until the block ends.

    An existing socket that nobody answers on (a simulator that died) is replaced; anything else at `path` is an
    OSError naming it."""
    _take_path(path)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await reader.readline()
            if len(raw) > MAX_REQUEST:
                reply: dict[str, Any] = {"ok": False, "error": f"request: longer than {MAX_REQUEST} bytes"}
            else:
                try:
                    cmd, units = parse_request(raw, sorted(plans))
                    for unit in units:
                        apply_fault(cmd, plans[unit])
                    reply = {"ok": True, "applied": [{"unit": u, "fault": cmd.describe()} for u in units]}
                except ValidationError as exc:
                    reply = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError, ValueError):
            pass  # the client went away: nothing to answer
        finally:
            writer.close()

    server = await asyncio.start_unix_server(client, path=str(path), limit=MAX_REQUEST + 2)
    try:
        os.chmod(path, 0o600)  # only this user may inject faults
        yield path
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _take_path(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError("exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # a stale socket: its simulator is gone
            return
    raise OSError("another simulator is listening there")


def send_fault(path: Path, words: Sequence[str], unit: int | None, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Client side: send one request, return the simulator's reply (OSError if it cannot be reached)."""
    request = json.dumps({"fault": list(words), "unit": unit}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(request)
        data = b""
        while not data.endswith(b"\n") and len(data) <= MAX_REQUEST * 4:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        raise OSError(f"{path}: not a simulator's answer: {data[:200]!r}") from None
    if not isinstance(reply, dict):
        raise OSError(f"{path}: not a simulator's answer: {data[:200]!r}")
    return reply
