"""Dataclasses from TOML tables, with one clear error for every wrong key or value.

The run config (:mod:`condcomp.config`), every family's options (:mod:`condcomp.registry`)
and the comparison suites (:mod:`condcomp.compare`) are built here, so all read TOML the same
way. Every key is checked for its type (no boolean or string where a number belongs, a table
only where a table belongs, each element of a list), then by :func:`check_fields` for
finiteness and its declared range (:mod:`condcomp.ranges`). The module knows no condcomp
dataclass: one that reads its table its own way (a seam's table mixes fixed keys with the
family's options) says so with a ``from_table(raw, key)`` classmethod.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from condcomp.errors import ConfigError
from condcomp.ranges import Range, range_of


def build(cls: type, raw: Any, prefix: str) -> Any:
    """``cls`` from the table ``raw``; ``prefix`` is the table's dotted key, for messages."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a table, got {_show(raw)}")
    from_table = getattr(cls, "from_table", None)
    if from_table is not None:
        return from_table(raw, prefix)
    hints = _hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        # A class may say where such keys belong (a ClassVar, not a key).
        hint = getattr(cls, "UNKNOWN_KEY_HINT", "")
        raise ConfigError(
            f"unknown key {join(prefix, unknown[0])}; valid keys in [{prefix or 'top level'}]: "
            f"{sorted(known)}" + (f"; {hint}" if hint else "")
        )
    obj = cls(**{name: coerce(hints[name], value, join(prefix, name))
                 for name, value in raw.items()})
    check_fields(obj, prefix)
    return obj


def check_fields(obj: Any, prefix: str) -> None:
    """Check every field of the dataclass ``obj``: its type, that a float is finite, and the
    range the field declares. Configs built in Python, not from TOML, pass through here too
    (their ``validate`` calls it)."""
    hints = _hints(type(obj))
    for f in fields(obj):
        key = join(prefix, f.name)
        value = coerce(hints[f.name], getattr(obj, f.name), key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            (range_of(f) or Range()).check(value, key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)  # resolving string annotations is the slow part of a load


def coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` as the type ``tp``, or a :class:`ConfigError` naming ``key``, the value and
    what is allowed. TOML's integers stand for floats, and whole floats (``5e6``) for
    integers; nothing else is converted."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        # An instance is built already, and checked by its own validate.
        return value if isinstance(value, tp) else build(tp, value, key)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, value, key)
    if isinstance(value, bool) and tp is not bool:
        raise _wrong_type(tp, value, key)
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise _wrong_type(tp, value, key)
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise _wrong_type(tp, value, key)
        return value
    if tp is float:
        if not isinstance(value, (int, float)):
            raise _wrong_type(tp, value, key)
        try:
            return float(value)
        except OverflowError:  # an integer beyond every float: the range check says so
            return math.inf if value > 0 else -math.inf
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise _wrong_type(tp, value, key)
        (item_tp,) = get_args(tp) or (Any,)
        return [coerce(item_tp, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _wrong_type(tp, value, key)
        return value
    return value  # a type this module does not know (a plugin's): the family's validate checks


def _coerce_union(tp: Any, value: Any, key: str) -> Any:
    members = get_args(tp)
    if value is None:  # JSON's null (a run's config.json); TOML has none
        if type(None) in members:
            return None
        raise _wrong_type(tp, value, key)
    for member in members:
        if member is type(None):
            continue
        try:
            return coerce(member, value, key)
        except ConfigError:
            # A value of the member's kind that is still wrong (an element of a list, a key
            # of a table) has the more precise message.
            if _kind_matches(member, value):
                raise
    raise _wrong_type(tp, value, key)


def _kind_matches(tp: Any, value: Any) -> bool:
    """Whether ``value`` is the container ``tp`` is (a list for ``list[int]``, a table for a
    dataclass)."""
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    origin = get_origin(tp) or tp
    return origin in (list, dict) and isinstance(value, origin)


def _wrong_type(tp: Any, value: Any, key: str) -> ConfigError:
    return ConfigError(f"{key} must be {_describe_type(tp)}, got {_show(value)}")


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)  # true, as in TOML


def _describe_type(tp: Any) -> str:
    """``tp`` in words, for messages: "a number", "a string or a list of integers"..."""
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe_type(m) for m in get_args(tp) if m is not type(None))
    if get_origin(tp) is list or tp is list:
        args = get_args(tp)
        return f"a list of {_plural(args[0])}" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    return "a table"


def _plural(tp: Any) -> str:
    if dataclasses.is_dataclass(tp) or tp is dict or get_origin(tp) is dict:
        return "tables"
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(
        tp, "values")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
