"""Typed options: turn a user's dict into a frozen dataclass, or raise one `OptionError` that says what is allowed.

Used for the backend's `options=` (`config.CompileConfig`), every pass's `Options` and recipe files, so that all
three report mistakes the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from llmcompress.errors import OptionError, did_you_mean


def describe(tp: Any) -> str:
    """A short human name for a type annotation (`int`, `'a' | 'b'`, `list[str]`)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(describe(a) for a in typing.get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def check_type(value: Any, tp: Any) -> bool:
    """Whether `value` matches the annotation `tp` (the subset of typing that options use)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(check_type(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(check_type(v, item) for v in value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(check_type(v, args[0]) for v in value)
        return len(args) == len(value) and all(check_type(v, a) for v, a in zip(value, args))
    if origin is dict:
        key, val = typing.get_args(tp) or (Any, Any)
        return isinstance(value, Mapping) and all(check_type(k, key) and check_type(v, val) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def build(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Instantiate the dataclass `cls` from `values`, checking keys and types.

    `where` names the thing being configured in error messages, e.g. ``options`` or ``pass 'canonicalize'``.
    The dataclass's own `__post_init__` may raise `OptionError` for value checks beyond types.
    """
    if values is not None and not isinstance(values, Mapping):
        raise OptionError(f"{where}: expected a dict of options, got {type(values).__name__}")
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    hints = typing.get_type_hints(cls)
    unknown = sorted(k for k in values if k not in fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "(none)"
        raise OptionError(f"{where}: unknown key {unknown[0]!r} (value {values[unknown[0]]!r})"
                          f"{did_you_mean(unknown[0], fields)}; allowed keys: {allowed}")
    for name, value in values.items():
        tp = hints[name]
        if not check_type(value, tp):
            raise OptionError(f"{where}: key {name!r} got {value!r} ({type(value).__name__}){_suggest(value, tp)}; "
                              f"expected {describe(tp)}")
        if isinstance(value, list) and _wants_tuple(tp):
            values[name] = tuple(value)
    try:
        return cls(**values)
    except OptionError:
        raise
    except (TypeError, ValueError) as e:
        raise OptionError(f"{where}: {e}") from e


def _suggest(value: Any, tp: Any) -> str:
    """A did-you-mean for a misspelled string among the strings a `Literal` annotation allows (lowering, mode)."""
    if not isinstance(value, str):
        return ""
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    allowed = [a for t in args if typing.get_origin(t) is Literal for a in typing.get_args(t) if isinstance(a, str)]
    return did_you_mean(value, allowed)


def _wants_tuple(tp: Any) -> bool:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_wants_tuple(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) is tuple


def as_dict(obj: Any) -> dict[str, Any]:
    """JSON-friendly dict of an options dataclass (for reports and cache keys)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
