"""Sharded checkpoints (placeholder until the DCP format lands)."""

from __future__ import annotations

from typing import Any


def is_sharded(ckpt: Any) -> bool:
    return False


def load_sharded(ckpt, model, optimizer, ctx, run_dir=None) -> dict[str, Any]:
    raise NotImplementedError


def save_sharded(run_dir, step, model, optimizer, state, ctx, keep_last):
    raise NotImplementedError
