"""The values a numeric config key or command-line flag may take, declared beside the key.

A dataclass field states its range in its metadata, ``d_model: int = ranged(256, gt=0,
le=MAX_SIZE)``, and :func:`condcomp.tables.check_fields` checks every field of a config
section or a family's options against it, so no ``validate`` method repeats a bound. Every
float must also be finite: no key means anything by NaN or infinity. Checks that involve
several keys (``top_k <= num_experts``) stay in the ``validate`` methods.

The upper bounds catch values that can only be typos or that overflow, far above anything
trained in practice; the memory of a machine is reached long before them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from condcomp.errors import ConfigError

# A model's widths, lengths and counts (d_model, d_ff, experts, layers, context): one
# 2**20-wide square matrix is 4 TiB of float32 weights.
MAX_SIZE = 2**20
# Steps and token counts: int64, as torch, numpy and TensorBoard store them.
MAX_COUNT = 2**63 - 1
# The weight of an auxiliary loss: 1e-3..1e-2 in practice; beyond this it drowns the
# language-model loss, and far beyond it overflows.
MAX_LOSS_WEIGHT = 1e3
# torch.manual_seed's range (a negative seed wraps around, as the data loader's does).
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class Range:
    """An interval: ``gt``/``ge`` below, ``lt``/``le`` above (each optional)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def allows(self, value: float) -> bool:
        # Written so that NaN fails every comparison.
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def describe(self, integer: bool = False) -> str:
        """What the range allows, after "must": ``be positive``, ``be in (0, 1]``..."""
        low, high = self._low(), self._high()
        if low is None and high is None:
            return "be a finite number"
        if high is None:
            return low
        if low is None:
            return high
        if integer:  # a count: "be positive and at most 2**20"
            low = low if self.gt is not None or self.ge != 0 else "be at least 0"
            return f"{low} and {high.removeprefix('be ')}"
        lo, hi = _number(self._low_bound()), _number(self._high_bound())
        return f"be in {'(' if self.gt is not None else '['}{lo}, {hi}" \
               f"{')' if self.lt is not None else ']'}"

    def check(self, value: Any, key: str) -> None:
        """Raise :class:`ConfigError` naming ``key``, ``value`` and the range when ``value``
        (an int or a float) is outside it, or not finite."""
        problem = self.problem(value)
        if problem is not None:
            raise ConfigError(f"{key} = {problem}")

    def problem(self, value: float) -> str | None:
        """``None`` when the range holds ``value``; else what is wrong with it, starting with
        the value: ``-5 must be positive``."""
        integer = isinstance(value, int)
        if not integer and not math.isfinite(value):
            bounded = self._low() is not None or self._high() is not None
            return f"{value} is not a finite number" + (
                f"; it must {self.describe()}" if bounded else "")
        if not self.allows(value):
            shown = _number(value) if integer else repr(value)  # the value as the user gave it
            return f"{shown} must {self.describe(integer)}"
        return None

    def _low(self) -> str | None:
        if self.gt is not None:
            return "be positive" if self.gt == 0 else f"be greater than {_number(self.gt)}"
        if self.ge is not None:
            return "not be negative" if self.ge == 0 else f"be at least {_number(self.ge)}"
        return None

    def _high(self) -> str | None:
        if self.lt is not None:
            return f"be less than {_number(self.lt)}"
        if self.le is not None:
            return f"be at most {_number(self.le)}"
        return None

    def _low_bound(self) -> float:
        return self.gt if self.gt is not None else self.ge  # type: ignore[return-value]

    def _high_bound(self) -> float:
        return self.lt if self.lt is not None else self.le  # type: ignore[return-value]


def ranged(default: Any, *, gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with a default and a range: ``lr: float = ranged(3e-3, gt=0)``."""
    return field(default=default, metadata={"range": Range(gt=gt, ge=ge, lt=lt, le=le)})


def range_of(f: Any) -> Range | None:
    """The range a dataclass field declares, if any."""
    return f.metadata.get("range")


def _number(value: float) -> str:
    """A number as a reader takes it in: ``2**20``, ``2**64 - 1`` and ``1e+30``, not thirty
    digits; ``1`` for a bound of ``1.0``."""
    if isinstance(value, int) and abs(value) > 2**16:
        for offset, suffix in ((0, ""), (1, " - 1")):
            power = (abs(value) + offset).bit_length() - 1
            if abs(value) + offset == 2**power:
                return f"{'-' if value < 0 else ''}2**{power}{suffix}"
        if (abs(value) >= 10**16 and value.bit_length() < 1024
                and int(float(value)) == value):  # from a float such as 1e30
            return f"{float(value):g}"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)
