"""Causal self-attention, with the attention-projection seam and an optional KV cache.

The Q/K/V projections are the seam (docs/design.md, "The four seams"): a registered family maps
``(x[B, T, D], positions)`` to ``q[B, T, H, d]``, ``k[B, T, H_kv, d]``, ``v[B, T, H_kv, d]``,
and builds the output layer ``wo`` (``output_layer(H * d, D)``). The dense family is three
linear layers (bias-free unless ``qkv_bias``) and a bias-free linear ``wo``. Grouped-query attention (Ainslie et al.
2023) shares each K/V head among ``H / H_kv`` query heads.

Two options of the dense family exist so that the pretrained MoE models of HF transformers
load unchanged (condcomp.hf):

- ``qk_norm``: an RMSNorm on queries and keys before RoPE, ``"head"`` over each head's ``d``
  channels (Qwen3-MoE; weights ``q_norm.weight [d]``, ``k_norm.weight [d]``) or
  ``"projection"`` over the whole projection (OLMoE; ``q_norm.weight [H*d]``,
  ``k_norm.weight [H_kv*d]``); ``"none"`` (default) has neither;
- ``clip_qkv``: clamp q, k and v to ``[-c, c]`` after the projections and norms (OLMoE's
  ``clip_qkv``, against loss spikes); 0 (default): no clamp;
- ``qkv_bias``: ``true`` gives the q, k and v projections biases (Qwen2-MoE's ``qkv_bias``;
  weights ``wq.bias [H*d]``, ``wk.bias`` / ``wv.bias [H_kv*d]``, initialised to zero);
  ``wo`` stays bias-free. ``false`` (default): no biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from condcomp import registry
from condcomp.config import ModelConfig
from condcomp.errors import ConfigError
from condcomp.model.kv_cache import KVCache
from condcomp.model.norm import RMSNorm
from condcomp.model.rope import Positions, apply_rope
from condcomp.ranges import ranged

QK_NORMS = ("none", "head", "projection")


class DenseQKV(nn.Module):
    """Dense attention projections: ``wq [H*d, D]``, ``wk``/``wv [H_kv*d, D]`` (nn.Linear,
    with biases when ``qkv_bias``), with the optional ``q_norm``/``k_norm`` (RMSNorm) and
    clamp of the module docstring."""

    def __init__(self, d_model: int, n_heads: int, kv_heads: int, head_dim: int,
                 qk_norm: str = "none", clip_qkv: float = 0.0, norm_eps: float = 1e-5,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = n_heads, kv_heads, head_dim
        self.qk_norm, self.clip_qkv, self.qkv_bias = qk_norm, clip_qkv, qkv_bias
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(d_model, kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_model, kv_heads * head_dim, bias=qkv_bias)
        if qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim, norm_eps)
        elif qk_norm == "projection":
            self.q_norm = RMSNorm(n_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(kv_heads * head_dim, norm_eps)

    def forward(self, x_BTD: torch.Tensor, positions: Positions
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.queries(x_BTD), *self.keys_values(x_BTD))

    def queries(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """q ``[B, T, H, d]`` alone: a Mixture-of-Depths decode step writes a token's keys and
        values whatever its decision, and projects its queries only if it enters the block."""
        return self._heads(self.wq(x_BTD), self.n_heads, "q_norm")

    def keys_values(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v ``[B, T, H_kv, d]`` alone (see :meth:`queries`)."""
        return (self._heads(self.wk(x_BTD), self.kv_heads, "k_norm"),
                self._heads(self.wv(x_BTD), self.kv_heads, None))

    def _heads(self, y_BTF: torch.Tensor, n_heads: int, norm: str | None) -> torch.Tensor:
        """A projection split into heads, with its norm (``q_norm`` / ``k_norm``) and clamp."""
        B, T, _ = y_BTF.shape
        norm_layer = getattr(self, norm) if norm is not None and self.qk_norm != "none" else None
        if norm_layer is not None and self.qk_norm == "projection":
            y_BTF = norm_layer(y_BTF)
        y_BTHd = y_BTF.view(B, T, n_heads, self.head_dim)
        if norm_layer is not None and self.qk_norm == "head":
            y_BTHd = norm_layer(y_BTHd)
        if self.clip_qkv > 0:
            y_BTHd = y_BTHd.clamp(-self.clip_qkv, self.clip_qkv)
        return y_BTHd

    def output_layer(self, d_in: int, d_model: int) -> nn.Module:
        return nn.Linear(d_in, d_model, bias=False)

    def init_weights(self, std: float, residual_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.qk_norm != "none":
            self.q_norm.init_weights(std, residual_std)
            self.k_norm.init_weights(std, residual_std)

    def flops_per_token(self) -> float:
        """Multiply-adds of the projections (a bias adds one FLOP per output, not counted,
        as the norms' FLOPs are not)."""
        return 2.0 * sum(lin.weight.numel() for lin in (self.wq, self.wk, self.wv))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = registry.build("attention", cfg, layer_idx)
        self.wo = self.qkv.output_layer(cfg.n_heads * cfg.head_dim, cfg.d_model)
        self.dropout_p = cfg.dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x_BTD: torch.Tensor, positions: Positions) -> torch.Tensor:
        q, k, v = self._rotated_qkv(x_BTD, positions)
        if self.kv_cache is not None and positions.decoding:
            k_all, v_all, mask = self.kv_cache.update(positions, k, v)
            return self._attend(q, k_all, v_all, mask)
        # The tokens are in causal order (a wrapper that selects tokens keeps their order), so
        # the causal mask on the local index is the causal mask on positions.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.n_heads,
            dropout_p=self.dropout_p if self.training else 0.0)
        return self._merge_heads(y)

    def splits_qkv(self) -> bool:
        """Whether :meth:`write_kv` and :meth:`attend_cache` can split a cached forward: the
        projection family computes queries apart from keys and values (``queries`` and
        ``keys_values``, as the dense family does)."""
        return hasattr(self.qkv, "queries") and hasattr(self.qkv, "keys_values")

    def write_kv(self, x_BTD: torch.Tensor, positions: Positions) -> torch.Tensor:
        """The first half of a cached :meth:`forward`: the tokens' keys and values (projected,
        normed, rotated) written into the KV cache, filled where ``positions.valid_BT`` says;
        returns the mask ``[B, 1, T, L]`` over the cache after the write."""
        k, v = self.qkv.keys_values(x_BTD)
        self.kv_cache.write(positions, apply_rope(k, positions).transpose(1, 2),
                            v.transpose(1, 2))
        return self.kv_cache.visible(positions)

    def attend_cache(self, x_BTD: torch.Tensor, positions: Positions, mask_B1TL: torch.Tensor
                     ) -> torch.Tensor:
        """The second half, which mutates nothing: the tokens' queries attend over the KV cache
        as it is, and the output layer maps the heads back to ``[B, T, D]``. Rotating q alone
        gives the same floats as the joint rotation of :meth:`forward` (RoPE is elementwise)."""
        q = apply_rope(self.qkv.queries(x_BTD), positions).transpose(1, 2)
        return self._attend(q, self.kv_cache.k_BHLd, self.kv_cache.v_BHLd, mask_B1TL)

    def _rotated_qkv(self, x_BTD: torch.Tensor, positions: Positions
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, H, T, d]``, k and v ``[B, H_kv, T, d]``: the projections, RoPE on q and k."""
        q, k, v = self.qkv(x_BTD, positions)
        # One rotation for queries and keys together: half the small ops of a decode step.
        qk = apply_rope(torch.cat((q, k), dim=2), positions).transpose(1, 2)  # [B, H+Hkv, T, d]
        q, k = qk.split((self.n_heads, self.kv_heads), dim=1)
        return q, k, v.transpose(1, 2)

    def _attend(self, q_BHTd: torch.Tensor, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor,
                mask_B1TL: torch.Tensor) -> torch.Tensor:
        y = F.scaled_dot_product_attention(q_BHTd, k_BHLd.to(q_BHTd.dtype),
                                           v_BHLd.to(q_BHTd.dtype), attn_mask=mask_B1TL,
                                           enable_gqa=self.kv_heads != self.n_heads)
        return self._merge_heads(y)

    def _merge_heads(self, y_BHTd: torch.Tensor) -> torch.Tensor:
        B, H, T, d = y_BHTd.shape
        return self.wo(y_BHTd.transpose(1, 2).reshape(B, T, H * d))

    def init_weights(self, std: float, residual_std: float) -> None:
        if isinstance(self.wo, nn.Linear):  # other output layers initialise themselves
            nn.init.normal_(self.wo.weight, std=residual_std)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: projections, plus QK^T and AV over the causal context.

        Under a causal mask a token at position t attends to t+1 keys, (T+1)/2 on average;
        flash attention skips the masked half, so that is the work really done.
        """
        context = (seq_len + 1) / 2
        scores = 2 * 2 * self.n_heads * self.head_dim * context  # QK^T and AV
        return self.qkv.flops_per_token() + self._output_flops() + scores

    def _output_flops(self) -> float:
        if isinstance(self.wo, nn.Linear):
            return 2.0 * self.wo.weight.numel()
        if isinstance(self.wo, nn.Identity):  # Sparse QKV with output = "none"
            return 0.0
        return self.wo.flops_per_token()  # any other output layer reports its own

    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype,
                    device: torch.device) -> None:
        self.kv_cache = KVCache(batch_size, self.kv_heads, max_len, self.head_dim, dtype, device)

    def clear_cache(self) -> None:
        self.kv_cache = None

    def reset_cache(self) -> None:
        if self.kv_cache is not None:
            self.kv_cache.reset()


@dataclass
class DenseQKVOptions:
    """``[model.attention]`` keys of ``kind = "dense"`` (see the module docstring)."""

    qk_norm: str = "none"  # none | head (Qwen3-MoE) | projection (OLMoE)
    # 0: no clamp (OLMoE uses 8). At most 1e30: a bound must be a float32 number.
    clip_qkv: float = ranged(0.0, ge=0.0, le=1e30)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2-MoE)

    def validate(self, cfg: ModelConfig) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"model.attention.qk_norm = {self.qk_norm!r} is unknown; use one "
                              f"of {list(QK_NORMS)}")


def _build_dense(options: DenseQKVOptions, cfg: ModelConfig, layer_idx: int | None) -> DenseQKV:
    return DenseQKV(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, options.qk_norm,
                    options.clip_qkv, cfg.norm_eps, options.qkv_bias)


registry.register(registry.Family("dense", "attention", DenseQKVOptions, _build_dense,
                                  "dense Q/K/V projections"))
