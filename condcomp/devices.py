"""The device names a user may give, in ``train.device`` or ``--device``.

Kept apart from :mod:`condcomp.runtime` (which resolves a name to a ``torch.device``) so that
configs are checked without importing torch.
"""

from __future__ import annotations

import re

from condcomp.errors import ConfigError

DEVICE_NAMES = "'auto', 'cpu', 'cuda' or 'cuda:N' (N: a GPU index)"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_problem(name: str) -> str | None:
    """``None`` for a device name condcomp runs on; else what is wrong with it."""
    if _DEVICE.fullmatch(name):
        return None
    return f"{name!r} is not a device condcomp runs on; use {DEVICE_NAMES}"


def check_device_name(name: str, key: str) -> None:
    problem = device_problem(name)
    if problem is not None:
        raise ConfigError(f"{key} = {problem}")
