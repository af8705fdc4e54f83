"""Sparse FF (Jaszczur et al. 2021, "Sparse is Enough in Scaling Transformers", sec. 3.1).

The FFN's ``d_ff`` units are split into ``d_ff / N`` blocks of ``N``; for each token exactly
one unit per block is active. A cheap low-rank controller picks it:
``logits = x . D1 . D2 + b`` (``d_model -> d_lowrank -> d_ff``), reshaped to ``[d_ff / N, N]``;
the output is ``(ReLU(x W1 + b1) * mask) W2 + b2``.

Training uses Gumbel-softmax with straight-through gradients (the forward sees the one-hot
sample, the backward the softmax's gradient); in a configurable share of training batches the
soft mask (the softmax itself) replaces the quantised one, which keeps training stable
(Trax's ``SparseFF``: 30% quantised, the rest soft). Following that implementation, the
temperature scales the Gumbel noise added to the log-softmax: ``argmax(log p + T * g)``.

Inference takes the argmax per block and, for a few tokens (decoding), gathers only the chosen
rows of ``W1`` and ``W2``: a decode step costs ``O(d_model * d_ff / N)``, not a masked dense
product. In training and for long prefills it runs the dense product with the one-hot mask,
which is the same function.

Weights (unit-major, so a unit's weights are one contiguous row): ``w1`` ``[d_ff, D]``,
``b1`` ``[d_ff]``, ``w2`` ``[d_ff, D]``, ``b2`` ``[D]``; controller ``controller_down``
``[D, d_lowrank]``, ``controller_up`` ``[d_lowrank, d_ff]``, ``controller_bias`` ``[d_ff]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from condcomp import registry
from condcomp.config import ModelConfig
from condcomp.errors import ConfigError
from condcomp.ranges import MAX_SIZE, ranged

# Up to this many tokens in eval mode, gather the chosen rows instead of the dense product.
GATHER_MAX_TOKENS = 16


class _StraightThrough(torch.autograd.Function):
    """Straight-through estimator (Bengio et al. 2013): the forward is the exact one-hot
    sample, the backward passes the gradient to the softmax it was drawn from.
    (``hard + soft - soft.detach()`` would leave rounding residue in the "one-hot" values.)"""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


class SparseFF(nn.Module):
    """Sparse feed-forward layer ``x[B, T, D] -> y[B, T, D]`` with one active unit per block."""

    def __init__(self, d_model: int, d_ff: int, block_size: int = 32, d_lowrank: int = 64,
                 temperature: float = 0.1, quantized_share: float = 0.3) -> None:
        super().__init__()
        check_sparse_ff(d_ff, block_size, d_lowrank, temperature, quantized_share)
        self.d_model, self.d_ff, self.block_size = d_model, d_ff, block_size
        self.n_blocks = d_ff // block_size
        self.d_lowrank, self.temperature, self.quantized_share = d_lowrank, temperature, \
            quantized_share
        self.w1 = nn.Parameter(torch.empty(d_ff, d_model))
        self.b1 = nn.Parameter(torch.zeros(d_ff))
        self.w2 = nn.Parameter(torch.empty(d_ff, d_model))
        self.b2 = nn.Parameter(torch.zeros(d_model))
        self.controller_down = nn.Parameter(torch.empty(d_model, d_lowrank))
        self.controller_up = nn.Parameter(torch.empty(d_lowrank, d_ff))
        self.controller_bias = nn.Parameter(torch.zeros(d_ff))
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)
        # The first unit of each block: chosen unit = offset + choice within the block.
        self.register_buffer("block_offsets", torch.arange(self.n_blocks) * block_size,
                             persistent=False)
        self.stats: dict[str, torch.Tensor | float] = {}
        self.init_weights(0.02, 0.02)

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        # One unit in N is active, so the output sums d_ff / N terms, not d_ff: scale W2 up by
        # sqrt(N) to start with the variance of a dense FFN (Trax's kernel_scaling).
        nn.init.normal_(self.w2, std=residual_std * math.sqrt(self.block_size))
        nn.init.normal_(self.controller_down, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.controller_up, std=1.0 / math.sqrt(self.d_lowrank))
        for bias in (self.b1, self.b2, self.controller_bias):
            nn.init.zeros_(bias)

    # ------------------------------------------------------------------ accounting

    def flops_per_token(self) -> float:
        """Controller, then one unit per block through W1 and W2 (the decode path's work)."""
        controller = 2.0 * self.d_lowrank * (self.d_model + self.d_ff)
        return controller + 2.0 * 2 * self.n_blocks * self.d_model

    def active_params(self) -> int:
        controller = self.d_lowrank * (self.d_model + self.d_ff) + self.d_ff
        return controller + 2 * self.n_blocks * self.d_model + self.n_blocks + self.d_model

    # ------------------------------------------------------------------ forward

    def controller_logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        """``[N_tokens, n_blocks, block_size]`` logits of the low-rank controller."""
        logits = torch.addmm(self.controller_bias, x_ND @ self.controller_down,
                             self.controller_up)
        return logits.view(-1, self.n_blocks, self.block_size)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NKS = self.controller_logits(x_ND).float()
        if not self.training:
            choice_NK = logits_NKS.argmax(dim=-1)
            if x_ND.shape[0] <= GATHER_MAX_TOKENS:
                y_ND = self.forward_gathered(x_ND, choice_NK)
            else:
                mask = F.one_hot(choice_NK, self.block_size).to(x_ND.dtype)
                y_ND = self.forward_masked(x_ND, mask)
            self.stats = {}
            return y_ND.view(B, T, D)
        log_p = torch.log_softmax(logits_NKS, dim=-1)
        soft_NKS = log_p.exp()
        gumbel = -torch.log(-torch.log(torch.rand_like(log_p).clamp(1e-6, 1 - 1e-6)))
        choice_NK = (log_p + self.temperature * gumbel).argmax(dim=-1)
        hard = F.one_hot(choice_NK, self.block_size).to(soft_NKS.dtype)
        straight_through = _StraightThrough.apply(hard, soft_NKS)
        # One draw per batch decides quantised or soft; a select keeps it one compiled graph.
        quantized = torch.rand((), device=x_ND.device) < self.quantized_share
        mask = torch.where(quantized, straight_through, soft_NKS)
        with torch.no_grad():
            entropy = -(soft_NKS * log_p).sum(-1).mean()
            self.stats = {"controller_entropy": entropy}
        return self.forward_masked(x_ND, mask.to(x_ND.dtype)).view(B, T, D)

    def forward_masked(self, x_ND: torch.Tensor, mask_NKS: torch.Tensor) -> torch.Tensor:
        """The dense product with a mask over the units: ``(ReLU(x W1 + b1) * m) W2 + b2``."""
        h = F.relu(x_ND @ self.w1.t() + self.b1)
        h = h * mask_NKS.reshape(h.shape)
        return h @ self.w2 + self.b2

    def forward_gathered(self, x_ND: torch.Tensor, choice_NK: torch.Tensor) -> torch.Tensor:
        """Only the chosen unit of each block: gather its row of W1 and of W2.

        ``index_select`` on the unit-major weights copies whole contiguous rows; advanced
        indexing (``w1[units]``) goes through the general index kernel, which at d_model 4096
        made the two gathers cost more than the rest of the FFN (2.3 vs 0.9 ms, 2-core CPU).
        The second product is an ``embedding_bag``: the sum of the chosen rows of W2 weighted
        by the hidden units, read once, without a gathered copy."""
        N, K = choice_NK.shape
        units_NK = choice_NK + self.block_offsets
        units = units_NK.reshape(-1)
        w1_NKD = self.w1.index_select(0, units).view(N, K, self.d_model)
        b1_NK1 = self.b1.index_select(0, units).view(N, K, 1)
        h_NK = F.relu(torch.baddbmm(b1_NK1, w1_NKD, x_ND.unsqueeze(2)).squeeze(2))
        y_ND = F.embedding_bag(units_NK, self.w2, per_sample_weights=h_NK.to(self.w2.dtype),
                               mode="sum")
        return y_ND.to(x_ND.dtype) + self.b2

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, block_size={self.block_size}, "
                f"d_lowrank={self.d_lowrank}")


def check_sparse_ff(d_ff: int, block_size: int, d_lowrank: int, temperature: float,
                    quantized_share: float, key: str = "SparseFF") -> None:
    if block_size < 2 or d_ff % block_size:
        raise ConfigError(f"{key}.block_size = {block_size} must be at least 2 and divide "
                          f"d_ff = {d_ff}")
    if d_lowrank < 1:
        raise ConfigError(f"{key}.d_lowrank = {d_lowrank} must be positive")
    if temperature < 0:
        raise ConfigError(f"{key}.temperature = {temperature} must not be negative")
    if not 0.0 <= quantized_share <= 1.0:
        raise ConfigError(f"{key}.quantized_share = {quantized_share} must be in [0, 1]")


@dataclass
class SparseFFOptions:
    """``[model.ffn]`` keys of ``kind = "sparse_ff"`` (defaults: the paper's / Trax's)."""

    d_ff: int = ranged(0, ge=0, le=MAX_SIZE)  # 0: model.d_ff
    block_size: int = ranged(32, ge=2, le=MAX_SIZE)  # N: units per block, one of them active
    d_lowrank: int = ranged(64, gt=0, le=MAX_SIZE)
    temperature: float = ranged(0.1, ge=0.0)  # scale of the Gumbel noise in training
    # share of training batches with the one-hot mask
    quantized_share: float = ranged(0.3, ge=0.0, le=1.0)

    def validate(self, cfg: ModelConfig) -> None:
        check_sparse_ff(self.d_ff or cfg.ffn_hidden, self.block_size, self.d_lowrank,
                        self.temperature, self.quantized_share, "model.ffn")


def _build(options: SparseFFOptions, cfg: ModelConfig, layer_idx: int | None) -> SparseFF:
    return SparseFF(cfg.d_model, options.d_ff or cfg.ffn_hidden, options.block_size,
                    options.d_lowrank, options.temperature, options.quantized_share)


registry.register(registry.Family("sparse_ff", "ffn", SparseFFOptions, _build,
                                  "sparse FF (one unit per block)"))
