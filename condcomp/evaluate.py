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

from condcomp.data import eval_batches
from condcomp.model import TransformerLM
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
def evaluate(model: TransformerLM, tokens: np.ndarray, *, batch_size: int, seq_len: int,
             max_tokens: int, bytes_per_token: float, device: torch.device,
             dtype: torch.dtype | None = None) -> EvalResult:
    """Mean loss over the first ``max_tokens`` predicted tokens of ``tokens`` (contiguous,
    non-overlapping windows, so every run is scored on the same text)."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    try:
        for x, y in eval_batches(tokens, batch_size, seq_len, max_tokens):
            with autocast(device, dtype):
                out = model(x.to(device), y.to(device))
            n = y.numel()
            total_nats += float(out.loss) * n
            total_tokens += n
    finally:
        model.train(was_training)
    loss = total_nats / max(total_tokens, 1)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)),
                      bits_per_byte=loss / math.log(2) / bytes_per_token, tokens=total_tokens)
