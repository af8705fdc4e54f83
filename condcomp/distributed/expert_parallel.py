"""Expert parallelism: each MoE layer's experts split over the ranks of an ``ep`` group, and
tokens sent to the rank that holds their expert by all-to-all (GShard, Lepikhin et al. 2021,
sec. 3.2; Switch, Fedus et al. 2021, sec. 2.2 and fig. 9).

:func:`shard_experts` turns the stacked expert weights of every ``MoE`` layer (``experts.w1``
``[E, D, H]``, ``w2`` ``[E, H, D]``, ``w3``) into DTensors sharded on dim 0 (``Shard(0)``)
over ``ctx.ep_mesh``: the rank of ``ep`` coordinate ``r`` holds experts ``r * E / ep`` to
``(r + 1) * E / ep - 1``. Names and global shapes do not change, so a sharded checkpoint
(``torch.distributed.checkpoint``) reshards to any ``ep`` degree, a single process included.
The experts then know their process group (``GroupedExperts.ep_group``) and run the two
functions below instead of computing every expert locally.

Token choice (:func:`forward_sorted_ep`), per MoE layer and in this order, as torchtitan's
``ExpertParallel`` / ``AllToAllTokenDispatcher`` and megablocks' ``parallel_forward_once``:

1. route locally: the router, top-k and the capacity all see only this rank's tokens;
2. sort the kept slots by global expert id (dropped, no-op and padding slots are left out
   of the exchange and come back as zero rows);
3. all-to-all of the per-expert counts ``[E]`` (equal splits, no gradient), then one host
   sync to turn counts into split sizes;
4. all-to-all of the rows (uneven splits, zero allowed), through the autograd-aware
   ``all_to_all_single_autograd``, whose backward is the same exchange with the splits
   swapped (megablocks' ``AllToAllOp``);
5. permute from rank-major (what arrives: rank 0's rows of each local expert, then rank 1's)
   to expert-major, run the local experts' grouped GEMM on ``w.to_local()``, un-permute;
6. all-to-all back (splits swapped); the caller combines with the routing weights.

Expert choice (:func:`forward_batched_ep`): the routing groups are per rank. Each expert picks
its top ``C = capacity_factor * T / E`` of the rank's own ``T`` tokens, so every rank sends
``C`` rows to every expert: one equal-split all-to-all there, a batched matmul per local
expert over the ``ep * C`` rows it got, one equal-split all-to-all back, then the caller's
``index_add``. Every rank of the group must route the same number of tokens (the train loop's
micro-batches have one shape).

Where capacity applies: per rank, before the dispatch (the routing group is the rank's
micro-batch), not on the expert's rank after arrival as in megablocks. A run on N ranks is
therefore the single-process run whose routing groups are the per-rank micro-batches: the same
slots are dropped in the same order (GShard's priority), whatever the ep degree. Dropless
routing does not depend on the grouping at all.

Every rank takes part in every layer's collectives, with zero rows to send or receive if so:
the evaluation path goes through the dispatch too (the gathered decode path needs every
expert's weights locally), and the backward's exchanges mirror the forward's.

Gradients: an expert's weight gradient on its rank sums the contributions of the tokens of
every rank of the ``ep`` group (they come back through the all-to-all's backward); the
router's and the shared experts' gradients hold only this rank's tokens. The caller averages
over the ``W`` data-parallel ranks: a dense weight's gradient is summed over all ``W`` ranks
and divided by ``W``; an expert shard's is summed over the ``W / ep`` ranks of its ``efsdp``
column and divided by ``W`` too, not ``W / ep``, since the ``ep`` ranks' tokens are already in
it (torchtitan sets the experts' FSDP gradient divide factor to the full data-parallel size).

The MoE layer reaches its experts through ``forward_dispatched`` and ``forward_batched``, not
``forward``: a wrapper that acts in forward hooks (FSDP2's ``fully_shard``) must register those
methods (``torch.distributed.fsdp.register_fsdp_forward_method``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from condcomp.errors import ConfigError
from condcomp.kernels.permute import dispatch_rows

if TYPE_CHECKING:
    from condcomp.conditional.experts import GroupedExperts
    from condcomp.distributed.context import DistContext

_EXPERT_WEIGHTS = ("w1", "w2", "w3")
# The profiler range around the exchange of per-expert counts (:func:`exchange_counts`).
EXCHANGE_COUNTS_RANGE = "condcomp::ep_exchange_counts"


# ----------------------------------------------------------------------------- sharding


def shard_experts(model: nn.Module, ctx: DistContext) -> int:
    """Shard the experts of every MoE layer of ``model`` over ``ctx.ep_mesh``; returns the
    number of layers sharded (0, and nothing changed, when ``ctx.ep == 1``).

    Every rank must have built ``model`` with the same seed. ``distribute_tensor`` scatters
    the weights of the group's first rank where torch can (``src_data_rank``), else each rank
    keeps its slice of its own copy: with one seed, the same global tensor either way.
    """
    if ctx.ep <= 1:
        return 0
    layers = expert_parallel_layers(model)
    if not layers:
        raise ConfigError(f"dist.ep = {ctx.ep} needs MoE layers to split, and this model has "
                          "none; set [model.ffn] kind = \"moe\" or dist.ep = 1")
    for layer in layers:
        if layer.experts.num_experts % ctx.ep:
            raise ConfigError(f"model.ffn.num_experts = {layer.experts.num_experts} is not a "
                              f"multiple of dist.ep = {ctx.ep}; every rank of an "
                              "expert-parallel group holds the same number of experts")
    return shard_experts_over(model, ctx.ep_mesh)


def expert_parallel_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE layers of ``model`` (``model`` itself if it is one)."""
    return [m for m in model.modules() if getattr(m, "supports_expert_parallel", False)]


def shard_experts_over(model: nn.Module, mesh) -> int:
    """Shard the experts of every MoE layer of ``model`` over the one-dimensional ``mesh``,
    whatever its size; returns the number of layers sharded. :func:`shard_experts` checks the
    layout first and leaves ``ep = 1`` on the plain path; a mesh of one rank instead runs the
    expert-parallel path, exchanging every row with itself, which is how ``condcomp bench moe
    --ep-path`` measures what that path costs over the plain one."""
    layers = expert_parallel_layers(model)
    group = mesh.get_group()
    for layer in layers:
        _shard(layer.experts, mesh, group)
    return len(layers)


def _shard(experts: GroupedExperts, mesh, group) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    for name in _EXPERT_WEIGHTS:
        weight = getattr(experts, name)
        if weight is None:  # w3 of a non-gated activation
            continue
        # torchtitan's ExpertParallel._partition_fn: a Parameter around a Shard(0) DTensor keeps
        # the FQN and the global [E, ...] shape, which is what DCP reshards by.
        sharded = distribute_tensor(weight.detach(), mesh, [Shard(0)])
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=weight.requires_grad))
    experts.ep_group = group


# ----------------------------------------------------------------------------- split math


def split_sizes(counts_E: torch.Tensor, counts_RL: torch.Tensor) -> tuple[list[int], list[int]]:
    """The row exchange's split sizes, ``(input_splits, output_splits)``, ``ep`` each.

    ``counts_E``: this rank's rows per global expert; rank r holds the r-th block of
    ``L = E / ep`` experts, so ``input_splits[r]`` sums that block. ``counts_RL``: what every
    rank sends to this rank's experts (:func:`exchange_counts`), so ``output_splits[r]`` sums
    row r. One host sync for both: all-to-all takes its splits as Python ints.
    """
    ep = counts_RL.shape[0]
    both = torch.cat([counts_E.view(ep, -1).sum(dim=1), counts_RL.sum(dim=1)]).tolist()
    return both[:ep], both[ep:]


def expert_major_order(counts_RL: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The permutation from rank-major rows to expert-major rows.

    ``counts_RL[r, l]``: rows that rank r sent for local expert l. They arrive rank-major
    (rank 0's rows of experts 0, 1, ..., then rank 1's); the grouped GEMM needs each expert's
    rows contiguous. Returns ``order_M`` (expert-major row i is arrived row ``order_M[i]``),
    its inverse ``inverse_M``, and ``offsets_L``, the cumulative ends of the local experts'
    groups. Within an expert, rows keep their arrival order (a stable sort), as torchtitan's
    ``_permute`` does with ``repeat_interleave`` and ``cumsum``.
    """
    R, L = counts_RL.shape
    local_ids_RL = torch.arange(L, device=counts_RL.device).repeat(R)
    expert_M = torch.repeat_interleave(local_ids_RL, counts_RL.reshape(-1))
    order_M = torch.argsort(expert_M, stable=True)
    inverse_M = torch.empty_like(order_M)
    inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
    offsets_L = torch.cumsum(counts_RL.sum(dim=0), 0)
    return order_M, inverse_M, offsets_L


# ----------------------------------------------------------------------------- collectives


def exchange_counts(counts_E: torch.Tensor, group) -> torch.Tensor:
    """Every rank's counts for this rank's experts, ``[ep, E / ep]``: row r is what rank r
    will send. An equal-split all-to-all of ``[E]`` (torchtitan's first ``all_to_all_single``
    of ``num_tokens_per_expert``); no gradient."""
    ep = dist.get_world_size(group)
    received_E = torch.empty_like(counts_E)
    # Named for torch.profiler (condcomp bench dist): the wait inside a synchronous
    # all_to_all_single is not an operator, so without the range it would show as no one's.
    with torch.profiler.record_function(EXCHANGE_COUNTS_RANGE):
        dist.all_to_all_single(received_E, counts_E.contiguous(), group=group)
    return received_E.view(ep, -1)


def all_to_all_rows(x_MD: torch.Tensor, output_splits: list[int], input_splits: list[int],
                    group) -> torch.Tensor:
    """Send ``input_splits[r]`` consecutive rows of ``x_MD`` to rank r; receive
    ``output_splits[r]`` from rank r, in rank order. Differentiable: the backward sends the
    gradients back along the same routes (the splits swapped; megablocks' ``AllToAllOp``).

    ``all_to_all_single_autograd``, not ``all_to_all_single``: the latter has no autograd
    kernel before torch 2.11 and silently leaves the input's gradient None (checked on gloo,
    torch 2.6 to 2.10). ``dist.all_to_all`` with lists of tensors is unsupported on gloo.
    """
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    # The result may be an AsyncCollectiveTensor: its first use waits for the exchange.
    return all_to_all_single_autograd(x_MD.contiguous(), output_splits, input_splits, group)


# ----------------------------------------------------------------------------- forward paths


def forward_sorted_ep(experts: GroupedExperts, x_ND: torch.Tensor, counts_E: torch.Tensor
                      ) -> torch.Tensor:
    """Token choice under expert parallelism: ``x_ND`` holds this rank's slots sorted by
    global expert id, ``counts_E[e]`` rows for expert e first, then rows that go to no
    expert (dropped, no-op, padding). Returns each row's expert output in the same order,
    ``[N, D]``, zero for the rows past ``counts_E.sum()``: they never leave the rank."""
    group = experts.ep_group
    counts_RL = exchange_counts(counts_E, group)
    # The host sync of torchtitan's dispatcher ("this would incur a device-to-host sync") and
    # megablocks' .cpu().tolist(): the collectives need the splits on the host.
    input_splits, output_splits = split_sizes(counts_E, counts_RL)
    n_sent = sum(input_splits)
    x_recv_MD = all_to_all_rows(x_ND[:n_sent], output_splits, input_splits, group)
    order_M, inverse_M, offsets_L = expert_major_order(counts_RL)
    # Gathers with gather backward passes (condcomp.kernels.permute): each is the other's
    # inverse, so neither backward needs an index_put.
    x_sorted_MD = dispatch_rows(x_recv_MD, order_M, inverse_M, 1)
    out_sorted_MD = experts.forward_sorted(x_sorted_MD, offsets_L)
    out_recv_MD = dispatch_rows(out_sorted_MD, inverse_M, order_M, 1)
    out_sent_MD = all_to_all_rows(out_recv_MD, input_splits, output_splits, group)
    n_left = x_ND.shape[0] - n_sent
    if n_left == 0:
        return out_sent_MD
    return torch.cat([out_sent_MD, out_sent_MD.new_zeros(n_left, out_sent_MD.shape[1])])


def forward_batched_ep(experts: GroupedExperts, x_ECD: torch.Tensor) -> torch.Tensor:
    """Expert choice under expert parallelism: ``x_ECD[e]`` are the ``C`` tokens of this rank
    that expert e chose; returns expert e's outputs for them, ``[E, C, D]``.

    The ``[E, C, D]`` buffer is rank-major already (experts of rank 0 first), so one
    equal-split exchange delivers ``[ep, L, C, D]`` to each rank (L = E / ep local experts);
    each local expert then runs once over the ``ep * C`` rows of all ranks.
    """
    group = experts.ep_group
    ep = dist.get_world_size(group)
    E, C, D = x_ECD.shape
    L = E // ep
    splits = [L * C] * ep
    x_recv_RLCD = all_to_all_rows(x_ECD.reshape(E * C, D), splits, splits, group).view(
        ep, L, C, D)
    x_LMD = x_recv_RLCD.transpose(0, 1).reshape(L, ep * C, D)
    out_LMD = experts.forward_batched_local(x_LMD)
    out_RLCD = out_LMD.view(L, ep, C, -1).transpose(0, 1)
    out_back = all_to_all_rows(out_RLCD.reshape(ep * L * C, -1), splits, splits, group)
    return out_back.view(E, C, -1)
