"""Rotary position embeddings (Su et al. 2021, RoFormer, eq. 34).

We use the "rotate half" layout of GPT-NeoX / LLaMA (pairs are (x_i, x_{i+d/2}) rather than
adjacent channels), so that weights move to and from HF ``LlamaForCausalLM`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Positions:
    """Where each token of a forward pass sits in its sequence, with its RoPE angles.

    ``pos_BT`` is ``None`` in training (positions ``0..T-1`` for every sequence), or the
    absolute positions when decoding with a KV cache or when a wrapper (Mixture-of-Depths)
    runs a block on a subset of tokens. ``cos``/``sin`` are ``[B or 1, T, head_dim/2]``.
    ``valid_BT`` (None: all) marks padding entries of a ragged selection, which a KV cache
    must not record as filled. ``decoding`` is True when the forward reads and writes the KV
    caches (the caller gave input positions): a cache left set up never leaks into training.
    """

    pos_BT: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    valid_BT: torch.Tensor | None = None
    decoding: bool = False
    _causal: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def causal_mask(self, max_len: int) -> torch.Tensor:
        """``[B or 1, T, max_len]``: which cache slots each token may see (slot <= position).
        Computed once per forward and shared by every layer's KV cache."""
        if max_len not in self._causal:
            slots = torch.arange(max_len, device=self.cos.device)
            self._causal[max_len] = slots <= self.pos_BT.unsqueeze(-1)
        return self._causal[max_len]

    def select(self, idx_BK: torch.Tensor, valid_BK: torch.Tensor | None = None) -> Positions:
        """The positions of the tokens ``idx_BK`` (indices into T, per sequence); ``valid_BK``
        marks which of them are real (the rest pad a ragged selection)."""
        B, K = idx_BK.shape
        if self.pos_BT is None:
            pos = idx_BK  # training: a token's position is its index in the sequence
        else:
            pos = torch.gather(self.pos_BT.expand(B, -1), 1, idx_BK)
        gather_idx = idx_BK.unsqueeze(-1).expand(B, K, self.cos.shape[-1])
        cos = torch.gather(self.cos.expand(B, -1, -1), 1, gather_idx)
        sin = torch.gather(self.sin.expand(B, -1, -1), 1, gather_idx)
        return Positions(pos, cos, sin, valid_BK, self.decoding)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles_TF = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # Non-persistent: derived from the config, so never stored in checkpoints.
        self.register_buffer("cos_table", angles_TF.cos().float(), persistent=False)
        self.register_buffer("sin_table", angles_TF.sin().float(), persistent=False)

    def positions(self, seq_len: int, pos: torch.Tensor | None = None) -> Positions:
        """Angles for positions ``0..seq_len-1`` (``pos=None``), or for explicit ``pos``
        of shape ``[T]`` or ``[B, T]``."""
        if pos is None:
            return Positions(None, self.cos_table[None, :seq_len], self.sin_table[None, :seq_len])
        pos_BT = pos if pos.dim() == 2 else pos.unsqueeze(0)
        return Positions(pos_BT, self.cos_table[pos_BT], self.sin_table[pos_BT], decoding=True)


def apply_rope(x_BTHd: torch.Tensor, positions: Positions) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by the token's angle: RoFormer eq. 34."""
    x1, x2 = x_BTHd.float().chunk(2, dim=-1)
    cos = positions.cos.unsqueeze(2)  # [B, T, 1, d/2]: shared by all heads
    sin = positions.sin.unsqueeze(2)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x_BTHd)
