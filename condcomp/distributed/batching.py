"""How the global batch of a step splits over the data-parallel ranks.

A config's ``train.batch_size * train.grad_accum`` sequences are the GLOBAL batch of one
optimizer step, whatever the number of processes, so a run keeps its tokens per step (and its
learning-rate schedule) when it moves to more or fewer ranks. Each of ``world_size`` ranks
reads ``batch_size * grad_accum / world_size`` of those sequences, in micro-batches no larger
than ``train.batch_size`` (the size the config was tuned to fit in memory).
"""

from __future__ import annotations

from condcomp.errors import ConfigError


def rank_batch(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int]:
    """``(micro_batch, accum)`` for one rank: its ``S = batch_size * grad_accum / world_size``
    sequences per step as ``accum`` micro-batches of ``micro_batch`` sequences, the largest
    divisor of ``S`` that is at most ``batch_size`` (fewest micro-batches, none larger than the
    config's). ``S`` must be a whole number: every rank reads the same number of sequences, so
    that averaging the ranks' gradients weighs every sequence alike."""
    if world_size < 1:
        raise ConfigError(f"the world size must be at least 1 process, got {world_size}")
    sequences = batch_size * grad_accum
    if sequences % world_size:
        raise ConfigError(
            f"train.batch_size * train.grad_accum = {batch_size} * {grad_accum} = {sequences} "
            f"sequences per step do not split evenly over {world_size} ranks; make it a "
            f"multiple of {world_size} (the batch is global: each rank reads its share)")
    per_rank = sequences // world_size
    micro_batch = _largest_divisor_at_most(per_rank, batch_size)
    return micro_batch, per_rank // micro_batch


def _largest_divisor_at_most(n: int, bound: int) -> int:
    """The largest divisor of ``n`` that is ``<= bound``, by the divisor pairs up to sqrt(n)."""
    if n <= bound:
        return n
    best = 1
    i = 1
    while i * i <= n:
        if n % i == 0:
            for d in (i, n // i):
                if best < d <= bound:
                    best = d
        i += 1
    return best
