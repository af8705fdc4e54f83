"""Residual streams (seam 4): the state carried between blocks.

A stream turns the token embedding (and the token ids, for a stream with an embedding of its
own) into its state (``expand``), applies each layer to it
(``apply``; AltUp runs a layer on one of K sub-blocks and predicts/corrects the others), and
turns the final state back into ``[B, T, D]`` for the output head (``collapse``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from condcomp import registry
from condcomp.config import ModelConfig


class PlainStream(nn.Module):
    """The usual width-D residual stream: the layer is applied to the state as is."""

    def expand(self, x_BTD: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        return x_BTD

    def apply(self, layer_idx: int, state: torch.Tensor,
              layer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return layer(state)

    def collapse(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def flops_per_token(self) -> float:
        return 0.0


@dataclass
class PlainOptions:
    """The plain stream takes no options."""


def _build_plain(options: PlainOptions, cfg: ModelConfig, layer_idx: int | None) -> PlainStream:
    return PlainStream()


registry.register(registry.Family("plain", "residual", PlainOptions, _build_plain,
                                  "width-D residual stream"))
