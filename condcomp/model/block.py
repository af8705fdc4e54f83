"""The transformer block, assembled from its seams.

``Block`` is pre-norm (Xiong et al. 2020): attention and the FFN slot each read a normalised
copy of the residual stream. Its forward returns the block's *update* to the stream, not the
new stream, so the block wrapper (seam 3) decides how the update is applied: added for every
token, or for a routed subset and scaled by the router (Mixture-of-Depths, Raposo et al. 2024).
"""

from __future__ import annotations

import torch
from torch import nn

from condcomp import registry
from condcomp.config import ModelConfig
from condcomp.model.attention import Attention
from condcomp.model.norm import RMSNorm
from condcomp.model.rope import Positions


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = registry.build("ffn", cfg, layer_idx)
        # No module at p = 0: a no-op call per sublayer is measurable when decoding one token.
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(self, x_BTD: torch.Tensor, positions: Positions) -> torch.Tensor:
        """The residual update of this block: ``a + f`` where ``a = attn(norm(x))`` and
        ``f = ffn(norm(x + a))``, so that ``x + update`` is the usual pre-norm block."""
        return self._add_ffn(x_BTD, self.attn(self.attn_norm(x_BTD), positions))

    def write_kv(self, x_BTD: torch.Tensor, positions: Positions) -> torch.Tensor:
        """Only the KV-cache write of a cached :meth:`forward` (see
        :meth:`Attention.write_kv`); returns the attention mask for :meth:`update_from_cache`."""
        return self.attn.write_kv(self.attn_norm(x_BTD), positions)

    def update_from_cache(self, x_BTD: torch.Tensor, positions: Positions,
                          mask_B1TL: torch.Tensor) -> torch.Tensor:
        """The rest of that :meth:`forward`, which mutates nothing: attention over the KV cache
        as it is, the output layer and the FFN; the same update as :meth:`forward`."""
        return self._add_ffn(x_BTD, self.attn.attend_cache(self.attn_norm(x_BTD), positions,
                                                           mask_B1TL))

    def _add_ffn(self, x_BTD: torch.Tensor, a_BTD: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            a_BTD = self.dropout(a_BTD)
        f = self.ffn(self.ffn_norm(x_BTD + a_BTD))
        if self.dropout is not None:
            f = self.dropout(f)
        return a_BTD + f

    def flops_per_token(self, seq_len: int) -> float:
        return self.attn.flops_per_token(seq_len) + self.ffn.flops_per_token()
