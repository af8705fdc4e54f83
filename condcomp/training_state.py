"""What a continuing run reads from a checkpoint, in either format, on any layout.

Two steps, because the weights must be in place before the model is sharded over ranks or its
matrix weights are copied into fp32 master weights, while the optimizer state can only be
loaded into the optimizer built after both:

1. :func:`load_weights`: the whole weights into the plain model (skipped where step 2 loads
   them: a sharded checkpoint into a ``torchrun`` job reads each rank's shards only);
2. :func:`load_training_state`: the optimizer state into the optimizer, and the loop's
   counters and schedule; the RNG states where the layout that wrote them is this one.

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
from condcomp.distributed.checkpoint import load_sharded
from condcomp.distributed.context import DistContext
from condcomp.master_weights import MasterWeights
from condcomp.runs import load_weights as load_any_weights


def load_weights(ckpt: ckpt_lib.Checkpoint, model: nn.Module, ctx: DistContext,
                 run_dir: Path | None = None, map_location: str | torch.device = "cpu"
                 ) -> dict[str, Any] | None:
    """Step 1: the weights of ``ckpt`` into the plain (unsharded) ``model``; the training
    state it holds, or None where step 2 does both."""
    if ctx.distributed and ckpt_lib.is_sharded(ckpt):
        return None
    return load_any_weights(ckpt, model, run_dir, map_location=map_location)


def load_training_state(ckpt: ckpt_lib.Checkpoint, model: nn.Module,
                        optimizer: torch.optim.Optimizer, masters: MasterWeights | None,
                        step1_state: dict[str, Any] | None, ctx: DistContext, run_dir: Path
                        ) -> dict[str, Any]:
    """Step 2: the optimizer state of ``ckpt`` into ``optimizer``, and the rest of its
    training state. ``rng_restored`` says whether this process's RNG states were restored;
    where not (another world size), the caller keeps the per-rank seeding it started with."""
    if ckpt_lib.is_sharded(ckpt):
        if masters is None:
            return load_sharded(ckpt, model, optimizer, ctx, run_dir)
        # The optimizer holds fp32 masters in place of the bf16 weights: they take the
        # checkpoint's weights and optimizer state, then the model takes them.
        with masters.full_precision():
            state = load_sharded(ckpt, model, optimizer, ctx, run_dir,
                                 optimizer_params=masters.optimizer_params())
        masters.copy_to_model()
        return state
    assert step1_state is not None
    state = dict(step1_state)
    # The RNG states of one process: the caller restores them in one process; they belong to
    # no rank of a job.
    state["rng_restored"] = False
    if not ctx.distributed:
        optimizer.load_state_dict(state["optimizer"])
        return state
    _load_full_optimizer_state(model, optimizer, state["optimizer"])
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
