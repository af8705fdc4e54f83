"""How a global batch is split over data-parallel ranks.

The config's batch is global: ``train.batch_size * train.grad_accum`` sequences per optimizer
step whatever the number of processes, so the token budget and the learning-rate schedule do
not change with the world size. Each of ``world`` ranks reads its own contiguous slice of
every global batch (:meth:`condcomp.data.TrainBatches.rows`) and accumulates over as many
micro-batches as its slice needs.
"""

from __future__ import annotations

from condcomp.errors import ConfigError


def rank_batch(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int]:
    """``(micro_batch, accumulation)`` of each rank: the slice of ``S = batch_size *
    grad_accum / world`` sequences, in micro-batches of the largest divisor of ``S`` up to
    ``batch_size``. With ``grad_accum`` a multiple of the world size, a rank's micro-batches
    are the single process's, routing groups included (an MoE's capacity, expert choice)."""
    sequences = batch_size * grad_accum
    if sequences % world_size:
        raise ConfigError(f"the global batch of train.batch_size * train.grad_accum = "
                          f"{batch_size} * {grad_accum} = {sequences} sequences does not split "
                          f"over {world_size} processes; make it a multiple of {world_size}")
    per_rank = sequences // world_size
    micro = max(m for m in range(1, min(batch_size, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro
