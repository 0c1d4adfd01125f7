"""A faster `__init__` for the frozen, slotted dataclasses made once per poll (issue 12 item 4: a 1-s poll in
virtual time).

The `__init__` that `dataclass(frozen=True)` generates sets each field through `object.__setattr__(self, name,
value)`, which looks the name up on the class every time to find the slot's descriptor. `quick_init` replaces it
with one that calls each slot descriptor's own `__set__`, found once: the same slots set to the same objects, with
the same signature and the very same default objects, and the class stays frozen (assignment still raises). Only
for what it can reproduce exactly: no `__post_init__`, no `default_factory`, no `init=False` or keyword-only field.
Proved against the generated `__init__` it replaces (kept in `GENERATED`) in tests/core/test_quick_init.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

_C = TypeVar("_C", bound=type)

#: class -> the `__init__` that `dataclass` generated for it (the reference the tests compare with).
GENERATED: dict[type, Callable[..., None]] = {}


def quick_init(cls: _C) -> _C:
    """Give a frozen, slotted dataclass an `__init__` that sets its slots through their descriptors."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: quick_init is for frozen dataclasses with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: quick_init does not run __post_init__")
    fields = dataclasses.fields(cls)
    names: dict[str, Any] = {}
    args: list[str] = []
    body: list[str] = []
    for i, f in enumerate(fields):
        if f.name == "self" or f.name.startswith(("_set", "_default", "_make")):
            raise TypeError(f"{cls.__name__}.{f.name}: a name quick_init's generated code uses")
        if not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: quick_init needs a plain init field")
        slot: Any = cls.__dict__.get(f.name)
        if type(slot).__name__ != "member_descriptor":
            raise TypeError(f"{cls.__name__}.{f.name}: not a slot")
        names[f"_set{i}"] = slot.__set__
        if f.default is dataclasses.MISSING:
            args.append(f.name)
        else:
            names[f"_default{i}"] = f.default
            args.append(f"{f.name}=_default{i}")
        body.append(f"        _set{i}(self, {f.name})")
    # The same way `dataclasses` builds its `__init__`: source with the descriptors and defaults as closure cells.
    source = (f"def _make({', '.join(names)}):\n"
              f"    def __init__(self, {', '.join(args)}):\n"
              + ("\n".join(body) or "        pass") + "\n"
              "    return __init__\n")
    scope: dict[str, Any] = {}
    exec(source, {}, scope)  # generated from the field names only, as dataclasses does
    init = scope["_make"](**names)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    generated: Callable[..., None] = cls.__dict__["__init__"]
    init.__doc__ = generated.__doc__
    GENERATED[cls] = generated
    setattr(cls, "__init__", init)  # noqa: B010 - mypy refuses a direct assignment to a class's __init__
    return cls
