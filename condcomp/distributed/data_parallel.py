"""Data parallelism around the model: FSDP2 or DDP, and the gradients they leave behind.

``dist.data_parallel = "fsdp"``: FSDP2's ``fully_shard`` on every layer and then on the
model (the torchtitan recipe): parameters, gradients and AdamW state are sharded over the
data-parallel ranks, each layer's weights are gathered just before it runs and freed after.
With ``train.param_dtype = "bfloat16"`` FSDP's mixed-precision policy gathers bf16 weights and
reduces gradients in fp32 while the sharded parameters the optimizer updates stay fp32: what
:mod:`condcomp.master_weights` does by hand in one process (Micikevicius et al. 2018).

``dist.data_parallel = "ddp"``: ``DistributedDataParallel``, every rank a whole copy.

Expert-parallel weights (DTensors over the ``ep`` mesh dimension, :mod:`.expert_parallel`)
need one correction either way. A rank's expert gradient already sums the contributions of
every token sent to it, from all the ranks of its ``ep`` group; the data-parallel reduction
then runs over the ``efsdp`` ranks that hold the same experts, not over all ranks. The
gradient of the global mean loss is the sum over every rank's contribution divided by the
world size, so :func:`finish_gradients` rescales (FSDP averaged over world / ep ranks: divide
by ep more) or reduces them itself (DDP leaves them alone: all-reduce over ``efsdp``, divide
by the world size). torchtitan#1551 fixes the same factor with a divide factor, which gloo
cannot run (PREMUL_SUM).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from condcomp.distributed.context import DistContext
from condcomp.errors import ConfigError
from condcomp.master_weights import matrix_weights


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_expert_parallel(p: torch.Tensor) -> bool:
    """A parameter sharded over the expert-parallel mesh dimension."""
    mesh = getattr(p, "device_mesh", None)
    return mesh is not None and "ep" in (mesh.mesh_dim_names or ())


def check_precision(ctx: DistContext, param_dtype: str) -> None:
    if ctx.distributed and ctx.options.data_parallel == "ddp" and param_dtype != "float32":
        raise ConfigError(f"train.param_dtype = {param_dtype!r} with dist.data_parallel = 'ddp' "
                          "is not supported (DDP reduces the bf16 gradients the master weights "
                          "take over); use dist.data_parallel = 'fsdp', whose mixed-precision "
                          "policy keeps fp32 weights for the optimizer")


def wrap_model(model: nn.Module, ctx: DistContext, param_dtype: torch.dtype) -> nn.Module:
    """``model`` ready for data-parallel training on ``ctx``'s ranks. FSDP changes ``model``
    in place and returns it; DDP returns a wrapper whose ``.module`` is ``model``."""
    if not ctx.distributed:
        return model
    if ctx.options.data_parallel == "fsdp":
        return _fully_shard(model, ctx, param_dtype)
    return _ddp(model, ctx)


def _fully_shard(model: nn.Module, ctx: DistContext, param_dtype: torch.dtype) -> nn.Module:
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )
    from torch.distributed.tensor import Shard

    # Attributes layers set on their parameters (no_weight_decay): fully_shard replaces each
    # parameter with a sharded one, which must carry them on.
    marks = {name: {k: v for k, v in p.__dict__.items() if not k.startswith("_")}
             for name, p in model.named_parameters()}
    low = param_dtype if param_dtype != torch.float32 else None
    # cast_forward_inputs=False: the residual stream and the RoPE tables stay fp32 between
    # blocks, as autocast keeps them in one process; only the weights are gathered in bf16.
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None,
                              cast_forward_inputs=False)
    full = MixedPrecisionPolicy(cast_forward_inputs=False)
    if ctx.ep > 1:
        # Experts first, over the ranks that hold the same experts (torchtitan's apply_fsdp);
        # a layer's experts then stay out of its block's group. Fewer local experts than
        # efsdp ranks would leave ranks empty on dim 0: shard the hidden dimension instead.
        efsdp = ctx.world_size // ctx.ep
        for module in model.modules():
            if any(is_expert_parallel(p) for p in module.parameters(recurse=False)):
                local = next(p for p in module.parameters(recurse=False)).to_local().shape[0]
                fully_shard(module, mesh=ctx.efsdp_mesh, mp_policy=mp,
                            shard_placement_fn=None if local >= efsdp
                            else (lambda p: Shard(1)))
                # The MoE layer calls its experts through these, not forward(): FSDP must
                # gather their weights around them as it does around a forward.
                for method in getattr(module, "FSDP_FORWARD_METHODS", ()):
                    register_fsdp_forward_method(module, method)
    if low is not None:
        # The policy casts every weight of a unit. What one process keeps fp32 under master
        # weights (norm gains, elementwise coefficients: condcomp.master_weights) gets units
        # of its own that stay fp32, children before parents.
        matrices = {id(p) for p in matrix_weights(model)}
        for layer in model.layers:
            for module in reversed(list(layer.modules())):
                own = list(module.parameters(recurse=False))
                if module is not layer and any(id(p) not in matrices for p in own):
                    fully_shard(module, mesh=ctx.dp_mesh, mp_policy=full)
    for layer in model.layers:
        fully_shard(layer, mesh=ctx.dp_mesh, mp_policy=mp)
    # The embedding table (tied to the output head) stays fp32, as in one process.
    fully_shard(model, mesh=ctx.dp_mesh, mp_policy=full)
    for name, p in model.named_parameters():
        p.__dict__.update(marks.get(name, {}))
    return model


def reshard(model: nn.Module) -> None:
    """Free the gathered weights FSDP keeps after a forward without backward (evaluation: the
    root stays gathered), so that the parameters the optimizer and the checkpoint see are the
    sharded ones again."""
    for module in model.modules():
        if hasattr(module, "reshard") and hasattr(module, "unshard"):  # an FSDPModule
            module.reshard()


def _ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    experts = [name for name, p in model.named_parameters() if is_expert_parallel(p)]
    if experts:
        # Expert weights differ from rank to rank: DDP must neither broadcast nor average them
        # (finish_gradients reduces them over the ranks that hold the same experts).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
    device_ids = [ctx.local_rank] if torch.cuda.is_available() and next(
        model.parameters()).is_cuda else None
    # broadcast_buffers=False: layers keep rank-local buffers (the loads an MoE layer counts
    # between optimizer steps) that a broadcast from rank 0 would overwrite; the buffers that
    # must agree (the router bias) are updated from all-reduced values on every rank.
    with warnings.catch_warnings():
        # torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers, which
        # still syncs buffers at construction; its own warning says to keep this for now.
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


@torch.no_grad()
def finish_gradients(params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    """Bring expert-parallel gradients to the scale of the global mean loss (module doc)."""
    if not ctx.distributed or ctx.ep == 1:
        return
    experts = [p for p in params if p.grad is not None and is_expert_parallel(p)]
    if not experts:
        return
    if ctx.options.data_parallel == "fsdp":
        for p in experts:
            p.grad.div_(ctx.ep)
        return
    group = ctx.efsdp_mesh.get_group()
    for p in experts:
        local = p.grad.to_local()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(local, group=group)
        local.div_(ctx.world_size)


def _replicas(grad: torch.Tensor, ctx: DistContext) -> int:
    """How many ranks hold each element of ``grad``: its norm is summed over all ranks, so a
    replicated element must count once."""
    if not isinstance(grad, _dtensor_type()):
        return ctx.world_size  # a plain tensor: every rank holds it whole (DDP)
    mesh = grad.device_mesh
    replicated = math.prod(mesh.size(dim) for dim, placement in enumerate(grad.placements)
                           if placement.is_replicate())
    # A mesh smaller than the world (the ep dimension alone) repeats once per other coordinate.
    return replicated * (ctx.world_size // mesh.size())


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float, ctx: DistContext
                   ) -> torch.Tensor:
    """The global gradient norm over every rank's shards, and the gradients clipped to
    ``max_norm`` (``inf``: measured only). One all-reduce. In one process, torch's own
    ``clip_grad_norm_``, whose rounding the single-process figures were made with."""
    if not ctx.distributed:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    dtensor = _dtensor_type()
    for grad in grads:
        local = grad.to_local() if isinstance(grad, dtensor) else grad
        total_sq += local.float().pow(2).sum() / _replicas(grad, ctx)
    dist.all_reduce(total_sq)
    norm = total_sq.sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            (grad.to_local() if isinstance(grad, dtensor) else grad).mul_(coef)
    return norm
