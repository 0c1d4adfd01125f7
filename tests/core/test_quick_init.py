"""`quick_init`'s `__init__` against the one `dataclass` generated (driverd.core.quick_init.GENERATED): the same
slots hold the same objects, the same defaults, the same errors for wrong calls, and the class stays frozen."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driverd.core.events import PumpReport, Tick
from driverd.core.quick_init import GENERATED, quick_init
from driverd.core.state import Sample
from drivers.base import PumpStatus

QUICK = [Tick, PumpReport, Sample, PumpStatus]

# Any objects will do: neither init checks types. Distinct objects, so a field set from the wrong argument shows.
values = st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none(), st.builds(object)), min_size=6,
                  max_size=6)


def _slots(obj: object) -> list[tuple[str, object]]:
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]  # type: ignore[arg-type]


def _by_generated(cls: type, *args: Any, **kwargs: Any) -> object:
    obj = object.__new__(cls)
    GENERATED[cls](obj, *args, **kwargs)
    return obj


def test_the_hot_classes_are_quick() -> None:
    assert set(QUICK) <= set(GENERATED)
    for cls in QUICK:
        assert cls.__init__ is not GENERATED[cls]


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__name__)
@given(vals=values, n=st.integers(0, 6), keywords=st.integers(0, 6))
def test_same_slots_as_the_generated_init(cls: type, vals: list[object], n: int, keywords: int) -> None:
    fields = dataclasses.fields(cls)
    required = sum(f.default is dataclasses.MISSING for f in fields)
    n = min(max(n, required), len(fields))  # every required field, some of the defaulted ones
    keywords = min(keywords, n)
    args = vals[:n - keywords]
    kwargs = {f.name: v for f, v in zip(fields[n - keywords:n], vals[n - keywords:n], strict=True)}
    quick, ref = cls(*args, **kwargs), _by_generated(cls, *args, **kwargs)
    for (name, a), (_, b) in zip(_slots(quick), _slots(ref), strict=True):
        assert a is b, name  # the very object, defaults included
    assert repr(quick) == repr(ref)
    assert quick == ref


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__name__)
def test_wrong_calls_fail_alike(cls: type) -> None:
    n = len(dataclasses.fields(cls))
    for args, kwargs in [((), {}), ((0,) * (n + 1), {}), ((0,) * n, {"nope": 1}),
                         ((0,) * n, {dataclasses.fields(cls)[0].name: 1})]:
        errors = []
        for make in (cls, lambda *a, **k: _by_generated(cls, *a, **k)):
            try:
                make(*args, **kwargs)
                errors.append(None)
            except TypeError as exc:
                errors.append(type(exc))
        assert errors[0] is errors[1] is TypeError or errors[0] == errors[1], (args, kwargs, errors)


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__name__)
def test_still_frozen(cls: type) -> None:
    obj = cls(*[0] * len(dataclasses.fields(cls)))
    for f in dataclasses.fields(cls):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, f.name, 1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(obj, f.name)
        assert getattr(obj, f.name) == 0


def test_refuses_what_it_cannot_reproduce() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Factory:
        a: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True, slots=True)
    class KwOnly:
        a: int = dataclasses.field(kw_only=True)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Hidden:
        a: int = dataclasses.field(init=False, default=0)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Clash:
        _set0: int

    for cls in (NoSlots, NotFrozen, Factory, PostInit, KwOnly, Hidden, Clash):
        with pytest.raises(TypeError):
            quick_init(cls)


def test_a_class_without_fields() -> None:
    @quick_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class Empty:
        pass

    assert Empty() == Empty()
    with pytest.raises(TypeError):
        Empty(1)  # type: ignore[call-arg]
