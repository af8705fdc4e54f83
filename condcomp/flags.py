"""Types of command-line flags: each parses its text and checks it against a range
(:mod:`condcomp.ranges`), so a bad flag stops argparse with one line naming the flag, the
value and what is allowed: ``argument --tokens: -5 must be positive``."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import get_type_hints

from condcomp.devices import device_problem
from condcomp.ranges import MAX_SEED, MIN_SEED, Range, range_of


def number(kind: type, *, gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None) -> Callable[[str], float]:
    """An ``int`` or ``float`` flag in a range: ``type=number(int, gt=0)``."""
    return _in_range(kind, Range(gt=gt, ge=ge, lt=lt, le=le))


def like(cls: type, name: str) -> Callable[[str], float]:
    """A flag for the dataclass field ``cls.name``, with the field's type and declared range,
    so that the flag and the Python API allow the same values."""
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return _in_range(get_type_hints(cls)[name], range_of(f) or Range())


def _in_range(kind: type, allowed: Range) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        problem = allowed.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # how argparse names the type
    return parse


def device(text: str) -> str:
    """A ``--device`` name: auto, cpu, cuda or cuda:N."""
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


# torch.manual_seed's range: a seed beyond it would stop generation with an overflow.
seed = number(int, ge=MIN_SEED, le=MAX_SEED)
# The benchmarks seed several generators with small offsets from theirs.
bench_seed = number(int, ge=0, le=2**63 - 1)
