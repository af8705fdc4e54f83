"""A static, preallocated KV cache written at ``input_pos`` (as in gpt-fast).

Shapes are fixed for the whole generation, so a compiled decode step never recompiles. The
cache also records which slots hold a token (``filled_BL``): a block that only some tokens
enter (Mixture-of-Depths) leaves the skipped positions empty, and attention never reads them.
"""

from __future__ import annotations

import torch
from torch import nn

from condcomp.model.rope import Positions


class KVCache(nn.Module):
    def __init__(self, batch_size: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.register_buffer("k_BHLd", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v_BHLd", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("filled_BL", torch.zeros(batch_size, max_len, dtype=torch.bool,
                                                      device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k_BHLd.shape[2]

    def update(self, positions: Positions, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the new keys/values at their positions; return the whole cache and the
        attention mask ``[B, 1, T, L]`` (a slot is visible if filled and not in the future)."""
        self.write(positions, k_BHTd, v_BHTd)
        return self.k_BHLd, self.v_BHLd, self.visible(positions)

    def write(self, positions: Positions, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor) -> None:
        """Write the new keys/values at their positions and mark those slots filled (only the
        ``valid_BT`` ones, when given)."""
        pos_BT = positions.pos_BT
        if pos_BT.shape[0] == 1 and positions.valid_BT is None:
            # Every sequence writes the same positions (plain decoding): one index_copy_.
            pos_T = pos_BT[0]
            self.k_BHLd.index_copy_(2, pos_T, k_BHTd.to(self.k_BHLd.dtype))
            self.v_BHLd.index_copy_(2, pos_T, v_BHTd.to(self.v_BHLd.dtype))
            self.filled_BL.index_fill_(1, pos_T, True)
        else:
            # Per-sequence positions (a wrapper that routes tokens): advanced indexing in dims
            # 0 and 2 puts [B, T] first, so the values are [B, T, H, d].
            B, T = pos_BT.shape
            batch_BT = torch.arange(B, device=pos_BT.device).unsqueeze(1).expand(B, T)
            self.k_BHLd[batch_BT, :, pos_BT] = k_BHTd.transpose(1, 2).to(self.k_BHLd.dtype)
            self.v_BHLd[batch_BT, :, pos_BT] = v_BHTd.transpose(1, 2).to(self.v_BHLd.dtype)
            # Padding entries of a ragged selection write into the slot of a token that skipped
            # this block (never filled, so never read) and are not marked filled.
            filled = True if positions.valid_BT is None else positions.valid_BT
            self.filled_BL[batch_BT, pos_BT] = filled

    def visible(self, positions: Positions) -> torch.Tensor:
        """The attention mask ``[B, 1, T, L]`` over the cache as it is: a slot is visible if
        filled and not in the future. Reads the cache only."""
        visible_BTL = self.filled_BL.unsqueeze(1) & positions.causal_mask(self.max_len)
        if positions.valid_BT is not None:
            # A padding entry sees its own slot, so its (discarded) softmax row is never empty:
            # an all-masked row would be NaN.
            slots_L = torch.arange(self.max_len, device=positions.pos_BT.device)
            visible_BTL = visible_BTL | (slots_L == positions.pos_BT.unsqueeze(-1))
        return visible_BTL.unsqueeze(1)

    def reset(self) -> None:
        self.filled_BL.zero_()
