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

``coefficients = "dynamic"`` is condcomp's own token-dependent variant (not Gemma 3n's): a
linear map of the raw active block adds a per-token delta (zero at init) to the learned static
``p`` and ``g``, and the sums are clipped to ``[-clip, clip]``.

``coefficients = "gemma3n"`` computes what Gemma 3n's ``Gemma3nTextAltUp`` computes
(:mod:`condcomp.conditional.altup_gemma3n`): a fixed identity / one static part plus ``tanh`` of
a router on the RMS-normalised active block (scaled by 1/D), the correction's coefficients read
off the layer's output, the coefficient weights clipped to ``[-clip, clip]`` in training only,
and Gemma 3n's stream ends: ``altup_projections`` of the embedding into blocks 1..K-1 (at the
embedding's magnitude) and ``altup_unembed_projections`` back before the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from condcomp import registry
from condcomp.conditional import altup_gemma3n as g3n
from condcomp.config import ModelConfig
from condcomp.errors import ConfigError
from condcomp.ranges import ranged

SELECTIONS = ("alternating", "same")
COEFFICIENTS = ("static", "dynamic", "gemma3n")


class AltUp(nn.Module):
    """The AltUp residual stream for ``n_layers`` layers of width ``d_model``.

    Weights: ``predict`` ``[L, K, K]``, ``correct`` ``[L, K]``; plain AltUp adds
    ``extra_embedding`` ``[V, (K - 1) * D]``; dynamic coefficients add ``router_weight``
    ``[L, K * K + K, D]``. Gemma 3n's coefficients replace all of these with
    ``prediction_coefs`` ``[L, K*K, K]``, ``correction_coefs`` ``[L, K, K]``,
    ``modality_router`` ``[L, K, D]``, ``router_norm`` ``[L, D]``, ``altup_projections`` and
    ``altup_unembed_projections`` ``[K - 1, D, D]`` (``nn.Linear`` layout, [out, in]) and the
    buffer ``correct_output_scale`` ``[L, D]``.
    """

    def __init__(self, d_model: int, n_layers: int, k: int = 2, vocab_size: int = 0,
                 recycled: bool = False, selection: str = "alternating",
                 coefficients: str = "static", clip: float = 10.0, eps: float = 1e-6) -> None:
        super().__init__()
        check_altup(k, selection, coefficients, clip, recycled=recycled)
        gemma3n = coefficients == "gemma3n"
        if not recycled and not gemma3n and k > 1 and vocab_size <= 0:
            raise ConfigError("plain AltUp widens the embedding: give vocab_size (or use "
                              "recycled = true)")
        self.d_model, self.n_layers, self.k = d_model, n_layers, k
        self.recycled, self.selection, self.coefficients, self.clip = (
            recycled, selection, coefficients, clip)
        self.eps = eps
        self.predict = self.correct = self.extra_embedding = self.router_weight = None
        if gemma3n:
            self._gemma3n_weights(d_model, n_layers, k)
        else:
            self.predict = nn.Parameter(torch.eye(k).repeat(n_layers, 1, 1))
            self.correct = nn.Parameter(torch.ones(n_layers, k))
            if not recycled and k > 1:
                self.extra_embedding = nn.Parameter(torch.empty(vocab_size, (k - 1) * d_model))
            if coefficients == "dynamic":
                self.router_weight = nn.Parameter(torch.zeros(n_layers, k * k + k, d_model))
        # Coefficients initialised to the identity must not decay toward zero.
        for p in (self.predict, self.correct, self.router_weight):
            if p is not None:
                p.no_weight_decay = True
        self.init_weights(0.02, 0.02)

    def _gemma3n_weights(self, d_model: int, n_layers: int, k: int) -> None:
        """Gemma3nTextAltUp's weights, one slice per layer, and Gemma3nTextModel's
        projections. The static part (identity predict, correct by 1) is fixed, so weight
        decay on these pulls toward it, as for any matrix."""
        self.prediction_coefs = nn.Parameter(torch.empty(n_layers, k * k, k))
        self.correction_coefs = nn.Parameter(torch.empty(n_layers, k, k))
        self.modality_router = nn.Parameter(torch.empty(n_layers, k, d_model))
        self.router_norm = nn.Parameter(torch.ones(n_layers, d_model))
        self.router_norm.no_weight_decay = True  # a norm's gains, stacked into a matrix
        self.altup_projections = nn.Parameter(torch.empty(k - 1, d_model, d_model))
        self.altup_unembed_projections = nn.Parameter(torch.empty(k - 1, d_model, d_model))
        # Gemma 3n's decoder layer multiplies the corrected active block by this scale and
        # feeds it to its per-layer inputs, a path condcomp's stream does not have: a buffer,
        # saved so that Gemma 3n's values travel, and read only by scale_corrected_output.
        self.register_buffer("correct_output_scale", torch.zeros(n_layers, d_model))

    def init_weights(self, std: float, residual_std: float) -> None:
        if self.coefficients == "gemma3n":
            self._init_gemma3n(std)
            return
        with torch.no_grad():
            self.predict.copy_(torch.eye(self.k).repeat(self.n_layers, 1, 1))
            self.correct.fill_(1.0)
        if self.extra_embedding is not None:
            nn.init.normal_(self.extra_embedding, std=std)
        if self.router_weight is not None:
            nn.init.zeros_(self.router_weight)  # the dynamic variant starts as the static one

    def _init_gemma3n(self, std: float) -> None:
        """As HF initialises Gemma 3n: linear weights N(0, std), the norm's gain 1, the
        output scale 0."""
        for p in (self.prediction_coefs, self.correction_coefs, self.modality_router,
                  self.altup_projections, self.altup_unembed_projections):
            nn.init.normal_(p, std=std)
        nn.init.ones_(self.router_norm)
        nn.init.zeros_(self.correct_output_scale)

    def active_block(self, layer_idx: int) -> int:
        return layer_idx % self.k if self.selection == "alternating" else 0

    # ------------------------------------------------------------------ the stream protocol

    def expand(self, x_BTD: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
        """``[B, T, K, D]``: the embedding in block 0 and, for the others, the widened table's
        columns (plain), copies (recycled) or Gemma 3n's projections."""
        if self.coefficients == "gemma3n":
            return g3n.expand(x_BTD, self.altup_projections)
        if self.k == 1:
            return x_BTD.unsqueeze(2)
        if self.extra_embedding is None:
            return x_BTD.unsqueeze(2).expand(-1, -1, self.k, -1).contiguous()
        extra = self.extra_embedding[tokens_BT].view(*tokens_BT.shape, self.k - 1, self.d_model)
        return torch.cat((x_BTD.unsqueeze(2), extra.to(x_BTD.dtype)), dim=2)

    def apply(self, layer_idx: int, state_BTKD: torch.Tensor,
              layer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        j = self.active_block(layer_idx)
        if self.coefficients == "gemma3n":
            x_hat_BTKD = self.gemma3n_predict(layer_idx, state_BTKD)
            return self.gemma3n_correct(layer_idx, x_hat_BTKD, layer(x_hat_BTKD[:, :, j]))
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
            # condcomp's token-dependent coefficients: static + a linear delta read off the
            # raw active block, the sums clipped.
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
        if self.coefficients == "gemma3n":
            return g3n.collapse(state_BTKD, self.altup_unembed_projections)
        return state_BTKD.mean(dim=2)

    # ------------------------------------------------------------------ Gemma 3n's steps

    def gemma3n_predict(self, layer_idx: int, state_BTKD: torch.Tensor) -> torch.Tensor:
        """``Gemma3nTextAltUp.predict`` of layer ``layer_idx`` (active block as selected)."""
        if self.training:
            # As Gemma 3n: the stored weights themselves are clipped, outside autograd
            # (``.data``), before this layer's use; each layer's slice is read once a forward.
            self.prediction_coefs.data[layer_idx].clamp_(-self.clip, self.clip)
        return g3n.predict(state_BTKD, self.active_block(layer_idx),
                           self.prediction_coefs[layer_idx], self.router_norm[layer_idx],
                           self.modality_router[layer_idx], self.eps)

    def gemma3n_correct(self, layer_idx: int, x_hat_BTKD: torch.Tensor,
                        x_tilde_BTD: torch.Tensor) -> torch.Tensor:
        """``Gemma3nTextAltUp.correct``: the correction weights are clipped in the graph (no
        gradient outside ``[-clip, clip]``) and in training only, as Gemma 3n's."""
        coefs_KK = self.correction_coefs[layer_idx]
        if self.training:
            coefs_KK = coefs_KK.clamp(-self.clip, self.clip)
        return g3n.correct(x_hat_BTKD, x_tilde_BTD, self.active_block(layer_idx), coefs_KK,
                           self.router_norm[layer_idx], self.modality_router[layer_idx],
                           self.eps)

    def scale_corrected_output(self, layer_idx: int, x_BTD: torch.Tensor) -> torch.Tensor:
        """``Gemma3nTextAltUp.scale_corrected_output``; condcomp's stream does not call it."""
        scale_D = self.correct_output_scale[layer_idx]
        return (x_BTD.type_as(scale_D) * scale_D).type_as(x_BTD)

    def flops_per_token(self) -> float:
        """Predict (K*K*D multiply-adds) and correct (K*D) per layer, plus the router; Gemma 3n
        adds a router per step and its D x D projections at both ends."""
        k, d = self.k, self.d_model
        per_layer = 2.0 * k * k * d + 3.0 * k * d
        if self.router_weight is not None:
            per_layer += 2.0 * (k * k + k) * d
        if self.coefficients == "gemma3n":
            per_layer += 2 * (2.0 * k * d + 4.0 * d) + 2.0 * k * k * k + 2.0 * k * k
            return self.n_layers * per_layer + 2 * (k - 1) * 2.0 * d * d
        return self.n_layers * per_layer


def check_altup(k: int, selection: str, coefficients: str, clip: float,
                key: str = "AltUp", recycled: bool = False) -> None:
    if k < 1:
        raise ConfigError(f"{key}.k = {k} must be at least 1")
    if selection not in SELECTIONS:
        raise ConfigError(f"{key}.selection = {selection!r} is unknown; use one of {SELECTIONS}")
    if coefficients not in COEFFICIENTS:
        raise ConfigError(f"{key}.coefficients = {coefficients!r} is unknown; use one of "
                          f"{COEFFICIENTS}")
    if clip <= 0:
        raise ConfigError(f"{key}.clip = {clip} must be positive")
    if coefficients == "gemma3n" and recycled:
        raise ConfigError(f"{key}.recycled = true does not go with coefficients = 'gemma3n': "
                          "Gemma 3n fills blocks 1..K-1 with its own projections of the "
                          "embedding; drop recycled")


@dataclass
class AltUpOptions:
    """``[model.residual]`` keys of ``kind = "altup"``."""

    # The stream is k * d_model wide; the paper's k is 2 to 4.
    k: int = ranged(2, ge=1, le=64)
    recycled: bool = False  # Recycled-AltUp: no widened embedding
    selection: str = "alternating"  # alternating | same
    # static | dynamic (condcomp's per-token delta) | gemma3n (Gemma3nTextAltUp's router,
    # and its embedding / unembedding projections)
    coefficients: str = "static"
    # Dynamic coefficients are clipped to [-clip, clip], gemma3n's coefficient weights in
    # training (Gemma 3n's altup_coef_clip, 120 there); from 1e6 on nothing is clipped, and
    # far beyond it the bound overflows float32.
    clip: float = ranged(10.0, gt=0.0, le=1e6)

    def validate(self, cfg: ModelConfig) -> None:
        check_altup(self.k, self.selection, self.coefficients, self.clip, "model.residual",
                    self.recycled)


def _build(options: AltUpOptions, cfg: ModelConfig, layer_idx: int | None) -> AltUp:
    return AltUp(cfg.d_model, cfg.n_layers, options.k, cfg.vocab_size, options.recycled,
                 options.selection, options.coefficients, options.clip, cfg.norm_eps)


registry.register(registry.Family("altup", "residual", AltUpOptions, _build,
                                  "alternating updates (K-wide residual stream)"))
