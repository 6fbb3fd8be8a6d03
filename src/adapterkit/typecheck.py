"""Check a dataclass's field values against its own type annotations.

Configs come from users and from JSON files (``-o layers=all``, ``"num_labels": "2"``), so a
value of the wrong type must be refused where the config is made, with the field's name and the
expected type, instead of failing later with a ``TypeError`` deep inside the model. The checker
understands what the configs use: ``int``, ``float`` (an ``int`` is accepted), ``bool``, ``str``,
``None``, unions (``X | Y``, ``Optional``), ``tuple[X, ...]``, ``list[X]``, ``dict[K, V]``,
``Literal`` and ``Any``. ``bool`` is not accepted where a number is expected.
"""

from __future__ import annotations

import dataclasses
import types
import functools
import typing
from typing import Any

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and (not args or all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this checker does not know: accept


def describe(hint: Any) -> str:
    """A reader's name for a type hint: ``a list of integers or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (tuple, list):
        inner = args[0] if args else Any
        return f"a list of {describe(inner).replace('an integer', 'integers').replace('a string', 'strings')}"
    if origin is dict:
        return "an object"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a dataclass, resolved once per class (it evaluates every
    annotation string: milliseconds, paid by each config built, one per adapter and site)."""
    return typing.get_type_hints(cls)


def check_field_types(obj: Any) -> None:
    """Raise ``TypeError`` naming the first field of dataclass ``obj`` whose value has the wrong type."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints.get(f.name, Any)
        value = getattr(obj, f.name)
        if not _matches(value, hint):
            raise TypeError(f"{f.name}={value!r} should be {describe(hint)}")


__all__ = ["check_field_types", "describe"]
