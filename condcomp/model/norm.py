"""RMSNorm (Zhang & Sennrich 2019): x / rms(x) * g, without mean-centring or bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: under bf16 autocast the mean of squares loses precision.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.ones_(self.weight)
