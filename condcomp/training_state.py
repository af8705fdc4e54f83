"""What a continuing run reads from a checkpoint, in either format, on any layout.

Two steps, because the weights must be in place before the model is sharded over ranks or its
matrix weights are copied into fp32 master weights, while the optimizer state can only be
loaded into the optimizer built after both:

1. :func:`load_weights`: the whole weights into the plain model;
2. :func:`load_training_state`: the optimizer state into the optimizer, and the loop's
   counters, schedule and RNG states.

A single-file checkpoint (a single-process run) and a sharded one (a ``torchrun`` job,
:mod:`condcomp.distributed.checkpoint`) both load into one process or into any number of
ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from condcomp import checkpoint as ckpt_lib
from condcomp.distributed.checkpoint import is_sharded, load_sharded
from condcomp.distributed.context import SINGLE, DistContext


def load_weights(ckpt: ckpt_lib.Checkpoint, model: nn.Module, run_dir: Path | None = None,
                 map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The weights of ``ckpt`` into the plain (unsharded) ``model``; the training state of a
    single-file checkpoint, which holds it beside the weights (None for a sharded one)."""
    if is_sharded(ckpt):
        load_sharded(ckpt, model, None, SINGLE, run_dir)
        return None
    return ckpt_lib.load_checkpoint(ckpt, model, run_dir, map_location=map_location)


def load_training_state(ckpt: ckpt_lib.Checkpoint, model: nn.Module,
                        optimizer: torch.optim.Optimizer, single_file_state: dict[str, Any] | None,
                        ctx: DistContext, run_dir: Path) -> dict[str, Any]:
    """The optimizer state of ``ckpt`` into ``optimizer``, and the rest of its training state.
    ``rng_cpu`` is None where the checkpoint holds no RNG state for this rank (another world
    size): the caller keeps the per-rank seeding it started with."""
    if is_sharded(ckpt):
        return load_sharded(ckpt, model, optimizer, ctx, run_dir)
    assert single_file_state is not None
    state = dict(single_file_state)
    if not ctx.distributed:
        optimizer.load_state_dict(state["optimizer"])
        return state
    _load_full_optimizer_state(model, optimizer, state["optimizer"])
    # One process's RNG stream belongs to no rank of a job.
    state["rng_cpu"] = state["rng_cuda"] = None
    return state


def _load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                               saved: dict[str, Any]) -> None:
    """A single process's optimizer state (whole tensors keyed by position) into a sharded
    optimizer: keyed by parameter name, then scattered by torch's state-dict API."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = {id(p): name for name, p in model.named_parameters()}
    flat = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {flat[int(i)]: value for i, value in saved["state"].items()},
               "param_groups": [{**group, "params": [flat[int(i)] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))
