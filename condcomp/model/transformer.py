"""The decoder-only language model: embedding, residual stream, blocks, norm, output head."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from condcomp import registry
from condcomp.config import ModelConfig
from condcomp.errors import ConfigError
from condcomp.kernels.linear_cross_entropy import linear_cross_entropy
from condcomp.model.accounting import active_param_count
from condcomp.model.norm import RMSNorm
from condcomp.model.rope import RotaryEmbedding

# Dense bf16 peak of the accelerators we know, in FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM; the PCIe card is 756e12 but H100 PCIe names contain "PCIe"
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
}


@dataclass
class LMOutput:
    """What the model's forward returns.

    ``loss`` is the mean next-token cross-entropy (``None`` without targets); ``logits`` are
    ``None`` when ``model.loss = "fused"`` computed that loss, which never forms them;
    ``aux_loss`` the sum of every layer's auxiliary loss; ``stats`` each layer's routing
    statistics, keyed by the module's path and the statistic's name
    (``"layers.1.block.ffn.tokens_per_expert"``, ``"layers.1.routed_fraction"``).
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    stats: dict[str, torch.Tensor | float] = field(default_factory=dict)

    @property
    def total_loss(self) -> torch.Tensor:
        assert self.loss is not None, "total_loss needs targets"
        return self.loss + self.aux_loss


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size is not set; it comes from the tokenizer, or set "
                              "model.vocab_size explicitly")
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.stream = registry.build("residual", cfg, None)
        self.layers = nn.ModuleList(registry.build("wrapper", cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Modules that report aux losses / statistics, found once rather than every forward.
        self._reporting = [(name, m) for name, m in self.named_modules()
                           if m is not self and hasattr(m, "aux_loss")]
        self.init_weights()

    # ------------------------------------------------------------------ init

    def init_weights(self) -> None:
        """GPT-2 / nanoGPT init: N(0, std) everywhere; projections that write into the residual
        stream get std / sqrt(2 * n_layers), so the stream's variance does not grow with depth.
        A family with its own scheme (Switch's smaller router init) does it in ``init_weights``.
        """
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights(std, residual_std)

    # ------------------------------------------------------------------ forward

    def forward(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> LMOutput:
        """Logits for ``tokens_BT``; with ``targets_BT`` also the loss.

        ``input_pos`` (``[T]`` or ``[B, T]``) gives absolute positions when decoding with the KV
        cache set up by :meth:`setup_cache`; training leaves it ``None`` (positions 0..T-1).
        """
        B, T = tokens_BT.shape
        positions = self.rope.positions(T, input_pos)
        state = self.stream.expand(self.tok_emb(tokens_BT), tokens_BT)
        for i, layer in enumerate(self.layers):
            state = self.stream.apply(i, state, lambda h, layer=layer: layer(h, positions))
        x_BTD = self.norm(self.stream.collapse(state))
        logits_BTV, loss = None, None
        if targets_BT is not None and self.cfg.loss == "fused":
            # The head and the loss chunk by chunk: the [B*T, V] logits are never formed.
            loss = linear_cross_entropy(x_BTD.reshape(B * T, -1), self.lm_head.weight,
                                        targets_BT.reshape(-1), ignore_index=-100)
        else:
            logits_BTV = self.lm_head(x_BTD)
            if targets_BT is not None:
                loss = F.cross_entropy(logits_BTV.float().view(B * T, -1),
                                       targets_BT.reshape(-1), ignore_index=-100)
        aux = self.tok_emb.weight.new_zeros((), dtype=torch.float32)
        stats: dict[str, torch.Tensor | float] = {}
        for name, module in self._reporting:
            aux = aux + module.aux_loss
            for key, value in getattr(module, "stats", {}).items():
                stats[f"{name}.{key}"] = value
        return LMOutput(logits_BTV, loss, aux, stats)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Let layers update state that lives outside the loss (the aux-loss-free router bias
        of an MoE). The train loop calls this after every applied update, on every rank."""
        self._sum_pending_loads_over_ranks()
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step()

    def _sum_pending_loads_over_ranks(self) -> None:
        """The aux-loss-free bias moves by the global batch's loads (DeepSeek-V3 sec. 2.1.2),
        and must move alike on every rank: one all-reduce (sum) of every MoE layer's counts,
        concatenated, per step (torchtitan's ``_update_expert_bias``). A single process, or a
        model without such counts, communicates nothing."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        loads = [m.pending_load() for m in self.modules()
                 if m is not self and hasattr(m, "pending_load")]
        loads = [load for load in loads if load is not None]
        if not loads:
            return
        flat = torch.cat([load.reshape(-1) for load in loads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for load, summed in zip(loads, flat.split([load.numel() for load in loads])):
            load.copy_(summed.view_as(load))

    # ------------------------------------------------------------------ decoding

    def setup_cache(self, batch_size: int, max_len: int | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Preallocate each attention layer's static KV cache (gpt-fast)."""
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ConfigError(f"a KV cache of {max_len} exceeds model.max_seq_len = "
                              f"{self.cfg.max_seq_len}")
        device = self.tok_emb.weight.device
        dtype = dtype or self.tok_emb.weight.dtype
        for module in self.modules():
            if hasattr(module, "setup_cache") and module is not self:
                module.setup_cache(batch_size, max_len, dtype, device)

    def clear_cache(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "clear_cache"):
                module.clear_cache()

    def cache_shape(self) -> tuple[int, int] | None:
        """(batch, length) of the KV caches set up, or None."""
        for module in self.modules():
            cache = getattr(module, "kv_cache", None)
            if cache is not None:
                return cache.k_BHLd.shape[0], cache.max_len
        return None

    def reset_cache(self) -> None:
        """Empty the caches in place (same tensors, so compiled / CUDA-graph steps stay valid)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_cache"):
                module.reset_cache()

    # ------------------------------------------------------------------ accounting

    def num_params(self, active_only: bool = False) -> int:
        """Parameters of the model (tied weights once). ``active_only`` counts what a token
        touches on average (see :func:`condcomp.model.accounting.active_param_count`)."""
        if not active_only:
            return sum(p.numel() for p in self.parameters())
        return active_param_count(self)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Analytic forward FLOPs per token at context ``seq_len``: every matmul as 2*m*n,
        attention scores over the causal context, each FFN-slot family by the work it really
        does per token. Training costs 3x this (backward = 2x forward)."""
        seq_len = seq_len or self.cfg.max_seq_len
        flops = sum(layer.flops_per_token(seq_len) for layer in self.layers)
        flops += self.stream.flops_per_token()
        flops += 2.0 * self.lm_head.weight.numel()
        return flops

    def estimate_mfu(self, tokens_per_s: float, seq_len: int, device: torch.device | str | None
                     = None, training: bool = True) -> float | None:
        """Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, app. B): achieved FLOP/s over
        the device's bf16 peak. ``None`` on a device whose peak we do not know (the CPU)."""
        peak = device_peak_flops(device or self.tok_emb.weight.device)
        if peak is None:
            return None
        flops = self.flops_per_token(seq_len) * (3 if training else 1)
        return flops * tokens_per_s / peak


def device_peak_flops(device: torch.device | str) -> float | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_BF16_FLOPS if key in name]
    if not matches:
        return None
    return PEAK_BF16_FLOPS[max(matches, key=len)]  # "H100 PCIe" before "H100"
