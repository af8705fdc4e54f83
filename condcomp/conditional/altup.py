"""AltUp: Alternating Updates of a wider residual stream (Baykal et al., NeurIPS 2023).

The residual stream holds K blocks of width d (``[B, T, K, D]``); every layer keeps width d and
computes on one of them. At layer l (Baykal et al., Alg. 1):

- predict: ``x_hat_i = sum_j p_ij x_j`` (K x K learned scalars, identity at init);
- compute: ``x_tilde = Layer(x_hat_j*)`` with ``j* = l mod K`` (``selection = "alternating"``)
  or ``j* = 0`` (``"same"``);
- correct: ``x_i <- x_hat_i + g_i (x_tilde - x_hat_j*)`` (K learned scalars, 1 at init).

With K = 1 and these initial coefficients it is exactly the plain model. Embedding: plain AltUp
widens the embedding table to K*d (the model's table is block 0, ``extra_embedding`` holds
blocks 1..K-1); Recycled-AltUp (``recycled = true``) copies the d-wide embedding into every
block, adding no parameters. Output: the K blocks are averaged into one d-wide vector for the
final norm and the output head (our choice: with identity coefficients the blocks move
together, so the mean starts as the plain model's stream and no output parameters are added).

``coefficients = "dynamic"`` is the token-dependent variant used in Gemma 3n: a small router on
the active block gives each token its own ``p`` and ``g`` as the static ones plus a learned
delta (zero at init), clipped to ``[-clip, clip]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from condcomp import registry
from condcomp.config import ModelConfig
from condcomp.errors import ConfigError
from condcomp.ranges import ranged

SELECTIONS = ("alternating", "same")
COEFFICIENTS = ("static", "dynamic")


class AltUp(nn.Module):
    """The AltUp residual stream for ``n_layers`` layers of width ``d_model``.

    Weights: ``predict`` ``[L, K, K]``, ``correct`` ``[L, K]``; plain AltUp adds
    ``extra_embedding`` ``[V, (K - 1) * D]``; dynamic coefficients add ``router_weight``
    ``[L, K * K + K, D]``.
    """

    def __init__(self, d_model: int, n_layers: int, k: int = 2, vocab_size: int = 0,
                 recycled: bool = False, selection: str = "alternating",
                 coefficients: str = "static", clip: float = 10.0) -> None:
        super().__init__()
        check_altup(k, selection, coefficients, clip)
        if not recycled and k > 1 and vocab_size <= 0:
            raise ConfigError("plain AltUp widens the embedding: give vocab_size (or use "
                              "recycled = true)")
        self.d_model, self.n_layers, self.k = d_model, n_layers, k
        self.recycled, self.selection, self.coefficients, self.clip = (
            recycled, selection, coefficients, clip)
        self.predict = nn.Parameter(torch.eye(k).repeat(n_layers, 1, 1))
        self.correct = nn.Parameter(torch.ones(n_layers, k))
        self.extra_embedding = (nn.Parameter(torch.empty(vocab_size, (k - 1) * d_model))
                                if not recycled and k > 1 else None)
        self.router_weight = (nn.Parameter(torch.zeros(n_layers, k * k + k, d_model))
                              if coefficients == "dynamic" else None)
        # Coefficients initialised to the identity must not decay toward zero.
        for p in (self.predict, self.correct, self.router_weight):
            if p is not None:
                p.no_weight_decay = True
        self.init_weights(0.02, 0.02)

    def init_weights(self, std: float, residual_std: float) -> None:
        with torch.no_grad():
            self.predict.copy_(torch.eye(self.k).repeat(self.n_layers, 1, 1))
            self.correct.fill_(1.0)
        if self.extra_embedding is not None:
            nn.init.normal_(self.extra_embedding, std=std)
        if self.router_weight is not None:
            nn.init.zeros_(self.router_weight)  # the dynamic variant starts as the static one

    def active_block(self, layer_idx: int) -> int:
        return layer_idx % self.k if self.selection == "alternating" else 0

    # ------------------------------------------------------------------ the stream protocol

    def expand(self, x_BTD: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        """``[B, T, K, D]``: the embedding in block 0 and, for the others, the widened table's
        columns (plain) or copies (recycled)."""
        if self.k == 1:
            return x_BTD.unsqueeze(2)
        if self.extra_embedding is None:
            return x_BTD.unsqueeze(2).expand(-1, -1, self.k, -1).contiguous()
        extra = self.extra_embedding[tokens_BT].view(*tokens_BT.shape, self.k - 1, self.d_model)
        return torch.cat((x_BTD.unsqueeze(2), extra.to(x_BTD.dtype)), dim=2)

    def apply(self, layer_idx: int, state_BTKD: torch.Tensor,
              layer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        j = self.active_block(layer_idx)
        p_KK, g_K = self.predict[layer_idx], self.correct[layer_idx]
        if self.router_weight is None:
            # Predict as K scalar-times-block terms rather than an einsum: K is 2 or 4, and an
            # einsum becomes a batched matmul over B*T tiny [K, K] x [K, D] products with
            # layout copies around it, which torch.compile cannot fuse with the correction.
            # As plain broadcasts, predict, slice and correct fuse into one memory pass.
            p_KK = p_KK.to(state_BTKD.dtype)
            x_hat = p_KK[:, 0].view(1, 1, self.k, 1) * state_BTKD[:, :, :1]
            for i in range(1, self.k):
                x_hat = x_hat + p_KK[:, i].view(1, 1, self.k, 1) * state_BTKD[:, :, i:i + 1]
            x_tilde = layer(x_hat[:, :, j])
            g = g_K.to(state_BTKD.dtype).view(1, 1, self.k, 1)
        else:
            # Gemma 3n's token-dependent coefficients: static + a delta read off the active
            # block, clipped.
            delta = state_BTKD[:, :, j] @ self.router_weight[layer_idx].t().to(state_BTKD.dtype)
            p = (p_KK.to(delta.dtype) + delta[..., :self.k * self.k].unflatten(-1, (self.k,
                                                                                   self.k)))
            p = p.clamp(-self.clip, self.clip)
            x_hat = torch.einsum("btij,btjd->btid", p, state_BTKD)
            x_tilde = layer(x_hat[:, :, j])
            g = (g_K.to(delta.dtype) + delta[..., self.k * self.k:]).clamp(-self.clip, self.clip)
            g = g.unsqueeze(-1)
        return x_hat + g * (x_tilde - x_hat[:, :, j]).unsqueeze(2)

    def collapse(self, state_BTKD: torch.Tensor) -> torch.Tensor:
        return state_BTKD.mean(dim=2)

    def flops_per_token(self) -> float:
        """Predict (K*K*D multiply-adds) and correct (K*D) per layer, plus the router."""
        per_layer = 2.0 * self.k * self.k * self.d_model + 3.0 * self.k * self.d_model
        if self.router_weight is not None:
            per_layer += 2.0 * (self.k * self.k + self.k) * self.d_model
        return self.n_layers * per_layer


def check_altup(k: int, selection: str, coefficients: str, clip: float,
                key: str = "AltUp") -> None:
    if k < 1:
        raise ConfigError(f"{key}.k = {k} must be at least 1")
    if selection not in SELECTIONS:
        raise ConfigError(f"{key}.selection = {selection!r} is unknown; use one of {SELECTIONS}")
    if coefficients not in COEFFICIENTS:
        raise ConfigError(f"{key}.coefficients = {coefficients!r} is unknown; use one of "
                          f"{COEFFICIENTS}")
    if clip <= 0:
        raise ConfigError(f"{key}.clip = {clip} must be positive")


@dataclass
class AltUpOptions:
    """``[model.residual]`` keys of ``kind = "altup"``."""

    # The stream is k * d_model wide; the paper's k is 2 to 4.
    k: int = ranged(2, ge=1, le=64)
    recycled: bool = False  # Recycled-AltUp: no widened embedding
    selection: str = "alternating"  # alternating | same
    coefficients: str = "static"  # static | dynamic (Gemma 3n)
    # Dynamic coefficients are clipped to [-clip, clip]; from 1e6 on nothing is clipped, and
    # far beyond it the bound overflows float32.
    clip: float = ranged(10.0, gt=0.0, le=1e6)

    def validate(self, cfg: ModelConfig) -> None:
        check_altup(self.k, self.selection, self.coefficients, self.clip, "model.residual")


def _build(options: AltUpOptions, cfg: ModelConfig, layer_idx: int | None) -> AltUp:
    return AltUp(cfg.d_model, cfg.n_layers, options.k, cfg.vocab_size, options.recycled,
                 options.selection, options.coefficients, options.clip)


registry.register(registry.Family("altup", "residual", AltUpOptions, _build,
                                  "alternating updates (K-wide residual stream)"))
