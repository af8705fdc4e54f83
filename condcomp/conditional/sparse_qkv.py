"""Sparse QKV (Jaszczur et al. 2021, "Sparse is Enough in Scaling Transformers", sec. 3.2).

The attention projections become a *multiplicative dense layer* shared by Q, K and V:
with the output split into S modules of ``d_module = d_out / S`` units,
``y[s, m] = sum_i x_i * D[s, i] * E[i, m]`` (``D`` ``[S, d_in]``, ``E`` ``[d_in, d_module]``),
which can still represent any permutation but holds ``S * d_in + d_in * d_out / S`` weights
instead of ``d_in * d_out``. Q and K then each pass through a small convolution over
(sequence, modules): causal with kernel 3 over the length, kernel 3 over the modules, the
``d_module`` units as channels (Trax's ``LocallyConvDense``); V is the multiplicative output.

The FLOPs barely change; the weights read per decoded token drop by an order of magnitude,
which is what batch-1 decoding is bound by.

The paper makes the attention's *output* layer sparse too ("sparse mechanisms for the query,
key, value and output layers", sec. 1); Trax's ``MultiplicativeConvCausalAttention`` offers no
output layer at all (its default) or a multiplicative one. ``output`` chooses: ``"dense"``
keeps the usual ``wo`` (the layer's default, so existing checkpoints load),
``"multiplicative"`` uses a second multiplicative layer (:class:`MultiplicativeDense`), and
``"none"`` hands the merged heads straight to the residual stream. At d_model 1024 the dense
``wo`` is 1.05M of the 1.67M weights a Sparse FF + QKV block reads per token.

The length convolution needs the two previous tokens' multiplicative outputs: with a KV cache
set up, they are kept in a per-position history beside it, so cached decoding computes exactly
what the full forward does.

Weights: ``gate`` ``[S, D]`` (the D above), ``proj`` ``[D, d_module]`` (E), ``bias``
``[d_out]``; ``conv_q.weight`` / ``conv_k.weight`` ``[3, 3, d_module, d_module]`` (length
tap, module tap, in, out) and their ``bias`` ``[d_module]``. The modules are the heads. With
``output = "multiplicative"`` the attention's ``wo`` holds ``gate`` ``[S, d_in]``, ``proj``
``[d_in, D / S]`` and ``bias`` ``[D]``.
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
from condcomp.model.rope import Positions
from condcomp.ranges import MAX_SIZE, ranged

OUTPUTS = ("dense", "multiplicative", "none")


def multiplicative(x_BTD: torch.Tensor, gate_SD: torch.Tensor, proj_DM: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    """The multiplicative dense layer, ``y[s, m] = sum_i x_i D[s, i] E[i, m] + b[s, m]``
    (Jaszczur et al. 2021, sec. 3.2), as ``[B, T, S, M]``."""
    S, M = gate_SD.shape[0], proj_DM.shape[1]
    # (x * D[s]) for every module, then one product with E over all (token, module) rows. The
    # same contraction as einsum("btd,sd,dm->btsm"), which took twice as long per decode step.
    gated_BTSD = x_BTD.unsqueeze(-2) * gate_SD.to(x_BTD.dtype)
    y = gated_BTSD @ proj_DM.to(x_BTD.dtype)
    return y + bias.to(y.dtype).view(S, M)


class MultiplicativeDense(nn.Module):
    """A multiplicative layer as a drop-in linear map ``x[B, T, d_in] -> y[B, T, d_out]``
    (``d_out`` split into ``S`` modules): the sparse output layer of Sparse QKV attention."""

    def __init__(self, d_in: int, d_out: int, n_modules: int) -> None:
        super().__init__()
        if d_out % n_modules:
            raise ConfigError(f"multiplicative layer: {n_modules} modules must divide its "
                              f"output width {d_out}")
        self.gate = nn.Parameter(torch.empty(n_modules, d_in))
        self.proj = nn.Parameter(torch.empty(d_in, d_out // n_modules))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.init_weights(0.02, 0.02)

    def init_weights(self, std: float, residual_std: float) -> None:
        # It writes into the residual stream: the effective weight D[s, i] * E[i, m] gets
        # std 0.5 * 2 * residual_std = residual_std, like the dense output projection's.
        nn.init.normal_(self.gate, std=0.5)
        nn.init.normal_(self.proj, std=2.0 * residual_std)
        nn.init.zeros_(self.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        y = multiplicative(x_BTD, self.gate, self.proj, self.bias)
        return y.flatten(-2)

    def flops_per_token(self) -> float:
        return 2.0 * self.proj.numel() * self.gate.shape[0] + self.gate.numel()


class CausalModuleConv(nn.Module):
    """A 2-D convolution over (length, modules) of ``[B, T, S, d_module]``, causal in length
    (tap j reads the token j positions back) and centred over modules (zero padding)."""

    def __init__(self, d_module: int, length_kernel: int = 3, module_kernel: int = 3) -> None:
        super().__init__()
        if module_kernel % 2 != 1:
            raise ConfigError(f"module kernel {module_kernel} must be odd (centred over modules)")
        self.length_kernel, self.module_kernel = length_kernel, module_kernel
        self.weight = nn.Parameter(torch.empty(length_kernel, module_kernel, d_module, d_module))
        self.bias = nn.Parameter(torch.zeros(d_module))
        self.init_weights(0.02, 0.02)

    def init_weights(self, std: float, residual_std: float) -> None:
        fan_in = self.length_kernel * self.module_kernel * self.weight.shape[2]
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(fan_in))
        nn.init.zeros_(self.bias)

    def flat_weight(self) -> torch.Tensor:
        """``[length_kernel * module_kernel * d_in, d_out]``, rows in (tap, module offset,
        channel) order: the layout of :func:`im2col`'s columns."""
        return self.weight.reshape(-1, self.weight.shape[-1])

    def flops_per_token(self, n_modules: int) -> float:
        return 2.0 * self.weight.numel() * n_modules


def im2col(taps_BTJSM: torch.Tensor, module_kernel: int) -> torch.Tensor:
    """The convolution's inputs for every (token, module) as one row, so the whole convolution
    is one matmul: ``[B, T, S, J * module_kernel * d_module]`` from the length taps
    ``[B, T, J, S, d_module]`` (module neighbours outside the layer are zeros)."""
    half = module_kernel // 2
    padded = nn.functional.pad(taps_BTJSM, (0, 0, half, half))  # along the modules
    windows = padded.unfold(3, module_kernel, 1)  # [B, T, J, S, M, module_kernel]
    B, T, J, S, M, K = windows.shape
    return windows.permute(0, 1, 3, 2, 5, 4).reshape(B, T, S, J * K * M)


class SparseQKV(nn.Module):
    """Multiplicative Q/K/V projections: ``x[B, T, D] -> q, k, v`` each ``[B, T, H, d]``."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, length_kernel: int = 3,
                 module_kernel: int = 3, output: str = "dense") -> None:
        super().__init__()
        check_output(output, d_model, n_heads * head_dim, n_heads)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.length_kernel, self.output = length_kernel, output
        self.gate = nn.Parameter(torch.empty(n_heads, d_model))
        self.proj = nn.Parameter(torch.empty(d_model, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads * head_dim))
        self.conv_q = CausalModuleConv(head_dim, length_kernel, module_kernel)
        self.conv_k = CausalModuleConv(head_dim, length_kernel, module_kernel)
        self.history: torch.Tensor | None = None  # [B, L, S, d_module] when decoding
        self.init_weights(0.02, 0.02)

    def init_weights(self, std: float, residual_std: float) -> None:
        # Trax: gates N(0, 0.5); the shared projection like a dense layer of the same fan-in.
        nn.init.normal_(self.gate, std=0.5)
        nn.init.normal_(self.proj, std=1.0 / math.sqrt(self.d_model))
        nn.init.zeros_(self.bias)

    def output_layer(self, d_in: int, d_model: int) -> nn.Module:
        """The attention's output layer ``wo`` (the seam's second half), per ``output``."""
        if self.output == "multiplicative":
            return MultiplicativeDense(d_in, d_model, self.n_heads)
        if self.output == "none":
            return nn.Identity()
        return nn.Linear(d_in, d_model, bias=False)

    def multiplicative(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """``y[s, m] = sum_i x_i D[s, i] E[i, m] + b``, as ``[B, T, S, d_module]``."""
        return multiplicative(x_BTD, self.gate, self.proj, self.bias)

    def _taps(self, m_BTSM: torch.Tensor, positions: Positions) -> torch.Tensor:
        """``[B, T, J, S, d_module]``: the multiplicative output 0, 1, ..., J-1 tokens back
        (zeros before the sequence starts)."""
        J, T = self.length_kernel, m_BTSM.shape[1]
        if self.history is None or not positions.decoding:
            padded = nn.functional.pad(m_BTSM, (0, 0, 0, 0, J - 1, 0))
            return torch.stack([padded[:, J - 1 - j:J - 1 - j + T] for j in range(J)], dim=2)
        # The history keeps J - 1 zero slots before position 0, so no tap needs a mask; every
        # sequence decodes the same positions (this layer refuses token-routing wrappers).
        pos_T = positions.pos_BT[0] + (J - 1)
        self.history.index_copy_(1, pos_T, m_BTSM.to(self.history.dtype))
        back_TJ = pos_T.unsqueeze(1) - torch.arange(J, device=pos_T.device)
        taps = self.history.index_select(1, back_TJ.reshape(-1))
        return taps.view(m_BTSM.shape[0], T, J, *m_BTSM.shape[2:]).to(m_BTSM.dtype)

    def forward(self, x_BTD: torch.Tensor, positions: Positions
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m_BTSM = self.multiplicative(x_BTD)
        cols = im2col(self._taps(m_BTSM, positions), self.conv_q.module_kernel)
        # Q's and K's convolutions read the same columns. Two products rather than one over
        # concatenated weights: the concatenation would copy both kernels on every decode step.
        q, k = (F.linear(cols, conv.flat_weight().t().to(cols.dtype), conv.bias.to(cols.dtype))
                for conv in (self.conv_q, self.conv_k))
        return q, k, m_BTSM

    def flops_per_token(self) -> float:
        mult = 2.0 * self.d_model * self.n_heads * self.head_dim + self.gate.numel()
        return mult + 2 * self.conv_q.flops_per_token(self.n_heads)

    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype,
                    device: torch.device) -> None:
        self.history = torch.zeros(batch_size, max_len + self.length_kernel - 1, self.n_heads,
                                   self.head_dim, dtype=dtype, device=device)

    def clear_cache(self) -> None:
        self.history = None

    def reset_cache(self) -> None:
        if self.history is not None:
            self.history.zero_()


def check_output(output: str, d_model: int, d_heads: int, n_heads: int,
                 key: str = "SparseQKV") -> None:
    if output not in OUTPUTS:
        raise ConfigError(f"{key}.output = {output!r} is unknown; use one of {OUTPUTS}")
    if output == "multiplicative" and d_model % n_heads:
        raise ConfigError(f"{key}.output = 'multiplicative' splits d_model = {d_model} into "
                          f"n_heads = {n_heads} modules, which must divide it")
    if output == "none" and d_heads != d_model:
        raise ConfigError(f"{key}.output = 'none' adds the merged heads (n_heads * head_dim = "
                          f"{d_heads}) to the residual stream, so they must be d_model = "
                          f"{d_model} wide; use output = 'multiplicative' or 'dense'")


@dataclass
class SparseQKVOptions:
    """``[model.attention]`` keys of ``kind = "sparse_qkv"``."""

    length_kernel: int = ranged(3, gt=0, le=MAX_SIZE)  # causal taps over the sequence (Q and K)
    module_kernel: int = ranged(3, gt=0, le=MAX_SIZE)  # taps over neighbouring modules (heads)
    output: str = "dense"  # the output layer: dense | multiplicative | none

    def validate(self, cfg: ModelConfig) -> None:
        check_output(self.output, cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_heads,
                     "model.attention")
        if cfg.kv_heads != cfg.n_heads:
            raise ConfigError("model.attention.kind = 'sparse_qkv' shares one multiplicative "
                              "layer by Q, K and V, so it needs n_kv_heads = n_heads (no GQA)")
        if cfg.wrapper.kind != "full":
            raise ConfigError("model.attention.kind = 'sparse_qkv' convolves over consecutive "
                              f"tokens, which a '{cfg.wrapper.kind}' wrapper does not keep")
        if self.module_kernel % 2 != 1:
            raise ConfigError(f"model.attention.module_kernel = {self.module_kernel} must be odd: "
                              "the window is centred on each module (head)")
        # Wider windows reach only padding, and the convolution's weights and inputs grow
        # with the window.
        if self.module_kernel > 2 * cfg.n_heads + 1:
            raise ConfigError(f"model.attention.module_kernel = {self.module_kernel} is wider "
                              f"than 2 * n_heads + 1 = {2 * cfg.n_heads + 1}, which already "
                              "reaches every head from every head; lower it")
        if self.length_kernel > cfg.max_seq_len:
            raise ConfigError(f"model.attention.length_kernel = {self.length_kernel} is longer "
                              f"than model.max_seq_len = {cfg.max_seq_len}, the longest "
                              "context it can look back over; lower it")


def _build(options: SparseQKVOptions, cfg: ModelConfig, layer_idx: int | None) -> SparseQKV:
    return SparseQKV(cfg.d_model, cfg.n_heads, cfg.head_dim, options.length_kernel,
                     options.module_kernel, options.output)


registry.register(registry.Family("sparse_qkv", "attention", SparseQKVOptions, _build,
                                  "sparse QKV (multiplicative + conv)"))
