"""The dense FFN slot: ``MLP`` with the weight layout of the public layer contract.

Weights (docs/design.md, "The layer contract"): ``w1`` ``[D, H]``, ``w2`` ``[H, D]`` and, for
gated activations, ``w3`` ``[D, H]``; ``w1`` is the gate and ``w3`` the up projection:
``y = (act(x @ w1) * (x @ w3)) @ w2`` (SwiGLU, Shazeer 2020), or ``y = act(x @ w1) @ w2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from condcomp import registry
from condcomp.config import ACTIVATIONS, ModelConfig
from condcomp.errors import ConfigError
from condcomp.ranges import MAX_SIZE, ranged

_ACT = {"relu": F.relu, "gelu": F.gelu, "swiglu": F.silu}


class MLP(nn.Module):
    """Dense feed-forward layer ``x[B, T, D] -> y[B, T, D]``.

    After each forward ``aux_loss`` is a zero scalar and ``stats`` is empty: the FFN-slot
    contract shared with the conditional families.
    """

    MATRIX_WEIGHTS = ("w1", "w2", "w3")  # bf16-storable (condcomp.master_weights)

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"MLP activation {activation!r} is unknown; use one of {ACTIVATIONS}")
        self.d_model, self.d_hidden, self.activation = d_model, d_hidden, activation
        self.gated = activation == "swiglu"
        self.w1 = nn.Parameter(torch.empty(d_model, d_hidden))
        self.w2 = nn.Parameter(torch.empty(d_hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(d_model, d_hidden)) if self.gated else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # on the hidden units
        # A buffer, so the zero follows the module to its device (no aux loss for dense).
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)
        self.stats: dict[str, torch.Tensor | float] = {}
        self.init_weights(0.02, 0.02)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h = _ACT[self.activation](x_BTD @ self.w1)
        if self.w3 is not None:
            h = h * (x_BTD @ self.w3)
        if self.dropout is not None:
            h = self.dropout(h)
        return h @ self.w2

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        if self.w3 is not None:
            nn.init.normal_(self.w3, std=std)
        # The output projection writes into the residual stream: GPT-2's 1/sqrt(2L) scaling.
        nn.init.normal_(self.w2, std=residual_std)

    def flops_per_token(self) -> float:
        n_in = 2 if self.gated else 1
        return 2.0 * self.d_model * self.d_hidden * (n_in + 1)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation}"


@dataclass
class MLPOptions:
    """The dense FFN takes its width and activation from ``model.d_ff`` / ``model.activation``."""

    d_ff: int = ranged(0, ge=0, le=MAX_SIZE)  # 0: model.d_ff


def _build(options: MLPOptions, cfg: ModelConfig, layer_idx: int | None) -> MLP:
    # model.dropout applies to the block's residual updates (Block), not again inside the MLP.
    return MLP(cfg.d_model, options.d_ff or cfg.ffn_hidden, cfg.activation)


registry.register(registry.Family("mlp", "ffn", MLPOptions, _build, "dense MLP"))
