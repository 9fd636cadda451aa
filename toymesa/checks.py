"""Strict field types for the config classes, checked once from the type annotations.

`strict` decorates a (frozen) dataclass: before the class's own `__post_init__` range
checks run, every field is checked against its annotation, so a new field is checked
without new code. What each annotation accepts:

* ``bool``: True or False (a NumPy bool too); never a string or a number.
* ``int``: an integer (a NumPy integer too); never a bool, and never a float, not even
  an integer-valued one like 2.0, so no value is silently truncated.
* ``float``: a finite int or float (NumPy ones too); never a bool, a string or None.
* ``Literal[...]``: one of the choices.
* ``T | None``: None (a default that follows other fields), or what ``T`` accepts.
* ``tuple[T, ...]`` / ``tuple[T, U]``: a tuple of such items; a list is converted to a
  tuple, and its items are checked the same way.
* a class (a config group): an instance of it.

NumPy scalars are stored as the equivalent Python scalar (`np.int64(4)` -> ``4``), so equal
configs have equal reprs and hashes; Python ints in float fields stay ints (the repr, which
names a sweep cell, does not change). Unknown keyword arguments raise `UnknownFieldError`
naming the field. Every error is one line: ``Owner.field=value is invalid: what would be valid.``
The classes' own range checks (`__post_init__`) fail through `check` and `positive`, so theirs read the same.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Literal, NoReturn

import numpy as np


class UnknownFieldError(ValueError, TypeError):
    """An unknown field name: a ValueError like every config error, and a TypeError like
    any unexpected keyword argument."""


def show(value) -> str:
    """`repr(value)` on one line, shortened past 200 characters (an error names the value)."""
    text = repr(value)
    if "\n" in text:
        text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def fail(owner: str, name: str, value, valid: str, error: type[ValueError] = ValueError) -> NoReturn:
    raise error(f"{owner}.{name}={show(value)} is invalid: {valid}.")


def check(ok: bool, owner: str, name: str, value, valid: str) -> None:
    """`fail` unless `ok`: one range check of a config class's `__post_init__`."""
    if not ok:
        fail(owner, name, value, valid)


def positive(owner: str, name: str, value: int) -> None:
    check(isinstance(value, int) and value >= 1, owner, name, value, "use an integer >= 1")


def check_known(owner: str, names, kwargs: dict) -> None:
    """Raise `UnknownFieldError` for the first keyword of `kwargs` that is not in `names`."""
    for key, value in kwargs.items():
        if key not in names:
            fail(owner, key, value, f"unknown field; {owner} fields are {sorted(names)}", UnknownFieldError)


class _Bad(Exception):
    """Internal: a value does not fit an annotation; args[0] says what would."""


def kind_of(value) -> str:
    """What `value` is, for an error message: "None", "a str", "a float", ..."""
    return "None" if value is None else f"a {type(value).__name__}"


def _plural(hint) -> str:
    return {bool: "booleans", int: "integers", float: "numbers"}.get(hint) or f"{hint!r} values"


def _convert(hint, value):
    """`value` in canonical form if it fits the annotation `hint`; else raise _Bad."""
    if isinstance(value, np.generic):  # NumPy scalars behave as the Python scalar they hold
        value = value.item()
    origin = typing.get_origin(hint)
    if _optional(hint):
        if value is None:
            return None
        (inner,) = (a for a in typing.get_args(hint) if a is not type(None))
        return _convert(inner, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Bad(f"use True or False, not {kind_of(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            raise _Bad(f"use the integer {int(value)}; floats are not accepted for integer fields, not even {value!r}")
        raise _Bad(f"use an integer, not {kind_of(value)}" + ("; floats are never truncated" if isinstance(value, float) else ""))
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _Bad(f"use a number (int or float), not {kind_of(value)}")
        if isinstance(value, float) and not math.isfinite(value):  # (an int is finite; math.isfinite overflows on huge ones)
            raise _Bad("use a finite number")
        return value
    if origin is Literal:
        for choice in typing.get_args(hint):
            if isinstance(value, type(choice)) and value == choice:
                return choice
        raise _Bad(f"choose one of {typing.get_args(hint)}")
    if origin is tuple:
        args = typing.get_args(hint)
        variadic = args[-1] is Ellipsis  # tuple[T, ...]: any length
        noun = _plural(args[0]) if len(set(args) - {Ellipsis}) == 1 else f"items of types {args}"
        want = f"use a tuple of {noun}" if variadic else f"use a tuple of {len(args)} {noun}"
        if not isinstance(value, tuple | list) or (not variadic and len(value) != len(args)):
            raise _Bad(f"{want} (a list is converted)")
        out = []
        for i, (h, v) in enumerate(zip((args[0],) * len(value) if variadic else args, value, strict=True)):
            try:
                out.append(_convert(h, v))
            except _Bad as e:
                raise _Bad(f"{want}; item {i} ({show(v)}): {e.args[0]}") from None
        return tuple(out)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Bad(f"give a {hint.__name__}, not {kind_of(value)}")
    raise TypeError(f"no strict check for the annotation {hint!r}")  # a programming error: extend _convert


def _optional(hint) -> bool:
    """`T | None` (or Optional[T]) with one T."""
    args = typing.get_args(hint)
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args


def _supported(hint) -> bool:
    if _optional(hint):
        return _supported(next(a for a in typing.get_args(hint) if a is not type(None)))
    origin = typing.get_origin(hint)
    if origin is tuple:
        return all(a is Ellipsis or _supported(a) for a in typing.get_args(hint))
    return hint in (bool, int, float) or origin is Literal or (origin is None and isinstance(hint, type))


def check_fields(obj, advice: dict[str, str] | None = None) -> None:
    """Check every field of dataclass `obj` against its annotation and store its canonical
    form (see the module docstring); `advice[name]` is appended to that field's error."""
    owner = type(obj).__name__
    for name, hint in _hints(type(obj)).items():
        value = getattr(obj, name)
        try:
            new = _convert(hint, value)
        except _Bad as e:
            fail(owner, name, value, e.args[0] + (f"; {advice[name]}" if advice and name in advice else ""))
        if new is not value:
            object.__setattr__(obj, name, new)  # frozen: the canonical form replaces the given one


def unset_type(cls, name: str) -> type:
    """The type a field annotated ``T | None`` takes when it is set: ``T``."""
    hint = _hints(cls)[name]
    if not _optional(hint):
        raise TypeError(f"{cls.__name__}.{name} is not annotated T | None")
    return next(a for a in typing.get_args(hint) if a is not type(None))


@functools.cache
def _hints(cls) -> dict:
    # `from __future__ import annotations` leaves annotations as strings; resolve them once
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def strict(cls=None, *, advice: dict[str, str] | None = None):
    """Class decorator (outside `@dataclass`): unknown keyword arguments raise
    `UnknownFieldError`, and `check_fields` runs before the class's own `__post_init__`.
    Raises TypeError at import if a field's annotation has no strict check."""
    if cls is None:
        return functools.partial(strict, advice=advice)
    unsupported = {name: hint for name, hint in _hints(cls).items() if not _supported(hint)}
    if unsupported:
        raise TypeError(f"{cls.__name__}: no strict check for the annotations {unsupported}; extend toymesa.checks")
    names = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
    init, post_init = cls.__init__, getattr(cls, "__post_init__", None)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        check_known(cls.__name__, names, kwargs)
        init(self, *args, **kwargs)
        if post_init is None:  # the dataclass's __init__ calls only a __post_init__ it saw
            check_fields(self, advice)

    cls.__init__ = __init__
    if post_init is not None:

        @functools.wraps(post_init)
        def __post_init__(self):
            check_fields(self, advice)
            post_init(self)

        cls.__post_init__ = __post_init__
    return cls


def repr_when_set(*names: str):
    """A `__repr__` for a dataclass that prints the fields `names` only when they differ from
    their defaults. Reprs name sweep cells, install caches and chunk files, so a field added
    after runs were stored must not change the repr of configs that leave it unset."""

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.repr and (f.name not in names or value != f.default):
                shown.append(f"{f.name}={value!r}")
        return f"{type(self).__qualname__}({', '.join(shown)})"

    return __repr__
