"""Block wrappers (seam 3): which tokens enter a block. The dense wrapper sends every token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from condcomp import registry
from condcomp.config import ModelConfig
from condcomp.model.block import Block
from condcomp.model.rope import Positions


class FullBlock(nn.Module):
    """Every token goes through the block: ``x + block(x)``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.block = Block(cfg, layer_idx)

    def forward(self, x_BTD: torch.Tensor, positions: Positions) -> torch.Tensor:
        return x_BTD + self.block(x_BTD, positions)

    def flops_per_token(self, seq_len: int) -> float:
        return self.block.flops_per_token(seq_len)


@dataclass
class FullOptions:
    """The dense wrapper takes no options."""


def _build_full(options: FullOptions, cfg: ModelConfig, layer_idx: int | None) -> FullBlock:
    assert layer_idx is not None
    return FullBlock(cfg, layer_idx)


registry.register(registry.Family("full", "wrapper", FullOptions, _build_full,
                                  "every token enters every block"))
