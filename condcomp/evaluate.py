"""Validation loss, perplexity and bits per byte.

Bits per byte (Gao et al. 2020, The Pile, sec. 5) divides the total cross-entropy, in bits, by
the number of UTF-8 bytes the tokens stand for. Unlike loss per token it does not depend on
the tokenizer, so byte-level and BPE runs compare on one scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from condcomp.data import eval_batches
from condcomp.distributed.context import SINGLE, DistContext
from condcomp.runtime import autocast


@dataclass
class EvalResult:
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"val_loss": self.loss, "val_ppl": self.perplexity, "val_bpb": self.bits_per_byte,
                "val_tokens": self.tokens}


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, *, batch_size: int, seq_len: int,
             max_tokens: int, bytes_per_token: float, device: torch.device,
             dtype: torch.dtype | None = None, ctx: DistContext = SINGLE) -> EvalResult:
    """Mean loss over the first ``max_tokens`` predicted tokens of ``tokens`` (contiguous,
    non-overlapping windows, so every run is scored on the same text).

    On several ranks (``ctx``) rank ``r`` scores batches ``r, r + world, ...`` and the sums
    are added up: the same windows, the same figure. Every rank runs as many forwards as the
    busiest one (an extra one discarded where it has no batch left), because a sharded
    layer's forward is a collective that all ranks must enter."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    n_batches, spare = 0, None
    try:
        for index, (x, y) in enumerate(eval_batches(tokens, batch_size, seq_len, max_tokens)):
            n_batches = index + 1
            if index % ctx.world_size != ctx.rank:
                continue
            spare = spare or (x, y)
            with autocast(device, dtype):
                out = model(x.to(device), y.to(device))
            n = y.numel()
            total_nats += float(out.loss) * n
            total_tokens += n
        # Ranks with fewer batches than the busiest one run discarded forwards.
        mine = len(range(ctx.rank, n_batches, ctx.world_size))
        for _ in range(-(-n_batches // ctx.world_size) - mine):
            x, y = spare or next(eval_batches(tokens, batch_size, seq_len, max_tokens))
            with autocast(device, dtype):
                model(x.to(device), y.to(device))
    finally:
        model.train(was_training)
    if ctx.distributed:
        sums = ctx.all_reduce(torch.tensor([total_nats, total_tokens], dtype=torch.float64))
        total_nats, total_tokens = sums[0].item(), int(sums[1].item())
    loss = total_nats / max(total_tokens, 1)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)),
                      bits_per_byte=loss / math.log(2) / bytes_per_token, tokens=total_tokens)
