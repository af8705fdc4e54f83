"""Dataclasses from TOML tables, with one clear error for every wrong key or value.

The run config (:mod:`condcomp.config`) and every family's options (:mod:`condcomp.registry`)
are built here, so both read TOML the same way and neither needs the other to do it. The
module knows no condcomp dataclass: one that reads its table its own way (a seam's table
mixes fixed keys with the family's options) says so with a ``from_table(raw, key)``
classmethod.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import fields
from typing import Any, Union, get_origin, get_type_hints

from condcomp.errors import ConfigError


def build(cls: type, raw: Any, prefix: str) -> Any:
    """``cls`` from the table ``raw``; ``prefix`` is the table's dotted key, for messages."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a table, got {raw!r}")
    from_table = getattr(cls, "from_table", None)
    if from_table is not None:
        return from_table(raw, prefix)
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {join(prefix, unknown[0])}; valid keys in [{prefix or 'top level'}]: "
            f"{sorted(known)}"
        )
    return cls(**{name: _coerce(hints[name], value, join(prefix, name))
                  for name, value in raw.items()})


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin in (dict, list, tuple) or tp in (dict, list):
        expected = origin or tp
        if not isinstance(value, expected if expected is not tuple else (list, tuple)):
            raise ConfigError(f"{key} must be a {expected.__name__}, got {value!r}")
        return value
    return value


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
