"""CourseState <-> JSON-safe fields, exactly (issue 12, item 1: signed state snapshots). Pure.

A snapshot must give back the very state the daemon had, not merely an equal one: a Decimal's exponent shows in
later outputs (Decimal("1E+2") * Decimal("0.5") prints "50", Decimal("100") * Decimal("0.5") prints "50.0"), so
decimals are written so that they parse back with the same sign, digits and exponent: plain notation when the
exponent is <= 0 (as everywhere in the log), else scientific ("1E+2"). Fields are driven by the dataclasses'
own type hints, so a field added to CourseState is carried without touching this module (and a type this module
does not know fails loudly, in tests, not silently).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from driverd.core.errors import DriverdError, Problem, ValidationError
from driverd.core.history import History
from driverd.core.kernel import Setpoint, restore_setpoint
from driverd.core.quantities import Resolution
from driverd.core.records import exact_dec, fmt_time, schedule_from_fields, schedule_to_fields
from driverd.core.schedule import Schedule
from driverd.core.state import CourseState, Pending, Phase, Sample, SyringeChange

#: Version of the snapshot's state encoding (a reader refuses versions it does not know).
STATE_FORMAT = 1

_NESTED = (Resolution, Sample, Pending, SyringeChange, Setpoint)
_HINTS: dict[type, dict[str, Any]] = {
    cls: typing.get_type_hints(cls, localns={"Setpoint": Setpoint}) for cls in (CourseState, *_NESTED)
}


SampleRow = Callable[[Sample], list[str]]


def sample_row(sample: Sample) -> list[str]:
    """One history sample as the snapshot holds it: [at, delivered_ml, delivered_mg]."""
    return [fmt_time(sample.at), exact_dec(sample.delivered_ml), exact_dec(sample.delivered_mg)]


def state_to_fields(state: CourseState, row: SampleRow = sample_row) -> dict[str, Any]:
    """`row` encodes one history sample; a caller encoding many snapshots of the same history may pass a cached
    one (`sample_row` of an identical sample gives the identical row)."""
    out = _encode_obj(state)
    out["samples"] = [row(x) for x in state.samples]
    return out


#: CourseState's fields as state_fields encodes them, in order.
_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(CourseState) if f.name not in ("token", "samples"))


def state_fields(state: CourseState,
                 since: tuple[CourseState, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`state_to_fields(state)` less its "samples": the rest of the state, for a caller that encodes the history
    rows apart (once for many snapshots and deltas). `since`: an earlier state and its state_fields; a field of
    `state` that holds the very same object as that state's is taken from there instead of encoded again (every
    value a state holds is immutable: frozen dataclasses, tuples, Decimals, times, strings; _encode refuses any
    other type), so the result is the same."""
    if since is None:
        out = _encode_obj(state)
        del out["samples"]
        return out
    old, old_fields = since
    return {name: old_fields[name] if getattr(state, name) is getattr(old, name) else _encode(getattr(state, name))
            for name in _STATE_FIELDS}


def state_from_fields(fields: Any, path: str = "state") -> CourseState:
    """Rebuild a CourseState from `state_to_fields` output (as parsed from the log). Raises ValidationError
    naming the field and the rule."""
    out = _decode(CourseState, fields, path)
    assert isinstance(out, CourseState)
    return out


# ------------------------------------------------------------------------------------------------ encode


def _encode_obj(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Schedule):
        return schedule_to_fields(obj)
    return {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "token"}


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, History):
        # The 24-h history (up to ~1,440 samples) is most of a state: rows, not objects (see state_to_fields).
        return None
    if isinstance(value, Decimal):
        return exact_dec(value)
    if isinstance(value, datetime):
        return fmt_time(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _encode_obj(value)
    raise TypeError(f"cannot encode {type(value).__name__} in a state snapshot")


# ------------------------------------------------------------------------------------------------ decode


def _bad(path: str, rule: str, detail: str) -> ValidationError:
    return ValidationError([Problem(path, rule, detail)])


def _decode(hint: Any, raw: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if raw is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, raw, path)
    if origin is tuple:
        if not isinstance(raw, list):
            raise _bad(path, "type", f"expected a list, got {raw!r}")
        item = typing.get_args(hint)[0]
        if item is Sample:
            return tuple(_sample(v, f"{path}[{i}]") for i, v in enumerate(raw))
        return tuple(_decode(item, v, f"{path}[{i}]") for i, v in enumerate(raw))
    if hint is History:
        if not isinstance(raw, list):
            raise _bad(path, "type", f"expected a list, got {raw!r}")
        return History(_samples(raw, path))
    if hint is bool:
        if not isinstance(raw, bool):
            raise _bad(path, "type", f"expected true or false, got {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _bad(path, "type", f"expected an integer, got {raw!r}")
        return raw
    if hint is str:
        if not isinstance(raw, str):
            raise _bad(path, "type", f"expected a string, got {raw!r}")
        return raw
    if hint is Decimal:
        return _decimal(raw, path)
    if hint is datetime:
        return _time(raw, path)
    if hint is Phase:
        try:
            return Phase(raw)
        except ValueError:
            raise _bad(path, "enum", f"unknown phase {raw!r}") from None
    if hint is Schedule:
        if not isinstance(raw, dict):
            raise _bad(path, "type", "expected an object")
        try:
            return schedule_from_fields(raw)
        except (KeyError, TypeError) as exc:
            raise _bad(path, "schedule", f"malformed schedule: {exc!r}") from None
    if hint in _HINTS:
        return _decode_obj(hint, raw, path)
    raise TypeError(f"no snapshot decoding for {hint!r} at {path}")


def _decode_obj(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise _bad(path, "type", f"expected an object, got {type(raw).__name__}")
    hints = _HINTS[cls]
    names = [f.name for f in dataclasses.fields(cls) if f.name != "token"]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise _bad(f"{path}.{unknown[0]}", "unknown", "not a field of the state")
    missing = [n for n in names if n not in raw]
    if missing:
        raise _bad(f"{path}.{missing[0]}", "required", "missing")
    kwargs = {n: _decode(hints[n], raw[n], f"{path}.{n}") for n in names}
    try:
        if cls is Setpoint:
            return restore_setpoint(**kwargs)
        return cls(**kwargs)
    except (DriverdError, ValueError) as exc:
        raise _bad(path, "value", str(exc)) from None


def _samples(raw: list[Any], path: str) -> list[Sample]:
    """The history rows: a fast path for well-formed rows (most of a snapshot's bytes: start-up time), and the
    validating path, which names the field and the rule, for the first row that is not plainly well formed."""
    out: list[Sample] = []
    parse_time, dec = datetime.fromisoformat, Decimal
    for row in raw:
        if type(row) is list and len(row) == 3:
            at, ml, mg = row
            if type(at) is str and type(ml) is str and type(mg) is str:
                try:
                    t, dml, dmg = parse_time(at), dec(ml), dec(mg)
                except (ValueError, InvalidOperation):
                    pass
                else:
                    if t.tzinfo is not None and dml.is_finite() and dmg.is_finite():
                        out.append(Sample(t, dml, dmg))
                        continue
        out.append(_sample(row, f"{path}[{len(out)}]"))  # raises, naming the field and the rule
    return out


def _sample(raw: Any, path: str) -> Sample:
    if not isinstance(raw, list) or len(raw) != 3:
        raise _bad(path, "type", f"expected [at, delivered_ml, delivered_mg], got {raw!r}")
    return Sample(_time(raw[0], f"{path}.at"), _decimal(raw[1], f"{path}.delivered_ml"),
                  _decimal(raw[2], f"{path}.delivered_mg"))


def _decimal(raw: Any, path: str) -> Decimal:
    if not isinstance(raw, str):
        raise _bad(path, "type", f"expected a decimal string, got {raw!r}")
    try:
        d = Decimal(raw)
    except InvalidOperation:
        raise _bad(path, "number", f"not a decimal: {raw!r}") from None
    if not d.is_finite():
        raise _bad(path, "finite", f"not finite: {raw!r}")
    return d


def _time(raw: Any, path: str) -> datetime:
    try:
        t = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        t = None
    if t is None or t.tzinfo is None:
        raise _bad(path, "format", f"expected an RFC 3339 time with offset, got {raw!r}")
    return t
