"""Mixture of Tokens (Antoniak, Jaszczur et al. 2023): continuous MoE by cross-example mixing.

Tokens are grouped *across examples*: the tokens at the same position in ``group_size``
different sequences form a group, so no token ever mixes with its own sequence's future. For
each expert e (eq. 1-3 of the paper):

- group weights ``w_ie = softmax_i(x_i . c_e / temperature)`` over the group's tokens;
- one merged token per expert and group, ``m_e = sum_i w_ie x_i``, through the expert's MLP;
- each token receives ``y_i = sum_e w_ie o_e``.

Every step is a batched einsum over (groups, experts): no loop, no routing discreteness, hence
no load-balancing loss and no dropped tokens.

A batch that is not a multiple of ``group_size`` is padded with masked sequences (they take
no weight). With fewer sequences than the group size (batch-1 decoding) the groups degenerate,
so inference uses the *transition to sparse* (sec. 4 of the paper): ``routing =
"token_choice"`` sends each token to its top expert by the same controller,
``p = softmax_e(x . c_e / temperature)``, with weight p. A MoT checkpoint is fine-tuned into
it with ``condcomp train --set model.ffn.routing=token_choice --set train.init_from=RUN``.

``temperature`` can be annealed to ``temperature_final`` over ``anneal_steps`` optimizer
steps (the step count lives in the layer and is saved with it).

``d_shared > 0`` adds a shared expert: a dense MLP of that width that every token goes
through on its own, beside the mixture (as DeepSeekMoE's shared experts beside routed ones;
not in the MoT paper). The mixture hands each token of a group the same few expert outputs,
told apart only by the token's group weights; the shared expert gives each token a
transformation of its own. With FLOP-matched experts the shared expert's width comes out of
the FFN budget (``expert width = (d_ff - d_shared) * G / E``), so the layer's FLOPs stay the
dense FFN's.

Weights: ``controller`` ``[D, E]``; experts stacked as the MoE's (``experts.w1`` ``[E, D, H]``,
``experts.w2`` ``[E, H, D]``, ``experts.w3`` for SwiGLU); with ``d_shared``, a dense MLP in
``shared_experts`` (named as the MoE's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from condcomp import registry
from condcomp.conditional.experts import GroupedExperts
from condcomp.conditional.moe import GATHER_MAX_SLOTS
from condcomp.config import ModelConfig
from condcomp.errors import ConfigError
from condcomp.kernels.permute import weighted_sum
from condcomp.model.mlp import MLP
from condcomp.ranges import MAX_COUNT, MAX_SIZE, ranged

ROUTINGS = ("continuous", "token_choice")
EXPERT_SIZES = ("split", "flop_matched")


class MixtureOfTokens(nn.Module):
    """Mixture of Tokens FFN: ``x[B, T, D] -> y[B, T, D]``."""

    MATRIX_WEIGHTS = ("controller",)  # bf16-storable (condcomp.master_weights)

    def __init__(self, d_model: int, d_expert: int, num_experts: int, group_size: int, *,
                 routing: str = "continuous", temperature: float = 1.0,
                 temperature_final: float | None = None, anneal_steps: int = 0,
                 activation: str = "swiglu", d_shared: int = 0) -> None:
        super().__init__()
        check_mot(num_experts, group_size, routing, temperature)
        self.d_model, self.num_experts, self.group_size = d_model, num_experts, group_size
        self.routing = routing
        self.temperature_start = temperature
        self.temperature_final = temperature if temperature_final is None else temperature_final
        self.anneal_steps = anneal_steps
        self.controller = nn.Parameter(torch.empty(d_model, num_experts))
        self.experts = GroupedExperts(num_experts, d_model, d_expert, activation)
        self.shared_experts = MLP(d_model, d_shared, activation) if d_shared > 0 else None
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)
        self.stats: dict[str, torch.Tensor | float] = {}
        self.init_weights(0.02, 0.02)

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.controller, std=std)
        self.experts.init_weights(std, residual_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, residual_std)

    def temperature(self) -> torch.Tensor:
        """The current temperature, a tensor (no host sync), annealed linearly with steps."""
        frac = (self.steps_done.float() / self.anneal_steps).clamp(max=1.0) \
            if self.anneal_steps > 0 else self.steps_done.new_zeros((), dtype=torch.float32)
        return self.temperature_start + frac * (self.temperature_final - self.temperature_start)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.steps_done += 1

    # ------------------------------------------------------------------ accounting

    def flops_per_token(self) -> float:
        """Controller and shared expert; in continuous mode the merge and the combine (2 E D
        each per token) and the E experts' work on one merged token per group, shared by the
        group's tokens."""
        every_token = 2.0 * self.d_model * self.num_experts  # the controller
        if self.shared_experts is not None:
            every_token += self.shared_experts.flops_per_token()
        expert = self.experts.flops_per_expert_token()
        if self.routing == "token_choice":
            return every_token + expert
        mix = 2 * 2.0 * self.num_experts * self.d_model
        return every_token + mix + self.num_experts * expert / self.group_size

    def active_params(self) -> int:
        """Continuous: every expert works on every group, so all of them; after the transition
        to sparse, the controller, one expert and the shared expert."""
        total = sum(p.numel() for p in self.parameters())
        if self.routing == "continuous":
            return total
        shared = (0 if self.shared_experts is None
                  else sum(p.numel() for p in self.shared_experts.parameters()))
        return self.controller.numel() + self.experts.params_per_expert() + shared

    # ------------------------------------------------------------------ forward

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        y_BTD = self._mix(x_BTD) if self.routing == "continuous" else self._token_choice(x_BTD)
        return y_BTD if self.shared_experts is None else y_BTD + self.shared_experts(x_BTD)

    def _mix(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The continuous mixture (eq. 1-3)."""
        B, T, D = x_BTD.shape
        G = self.group_size
        pad = (-B) % G
        if pad:  # masked sequences complete the last group and take no weight
            x_BTD = torch.cat((x_BTD, x_BTD.new_zeros(pad, T, D)))
        n = (B + pad) // G
        # Groups: the same position in G sequences. [n, G, T, D] -> [n, T, G, D].
        x_nTGD = x_BTD.view(n, G, T, D).transpose(1, 2)
        logits = (x_nTGD @ self.controller.to(x_BTD.dtype)).float() / self.temperature()
        if pad:
            real_G = torch.arange(n * G, device=x_BTD.device).view(n, 1, G, 1) < B
            logits = logits.masked_fill(~real_G, float("-inf"))
        w_nTGE = torch.softmax(logits, dim=2)  # over the group's tokens, per expert
        merged_nTED = torch.einsum("ntge,ntgd->nted", w_nTGE.to(x_BTD.dtype), x_nTGD)
        out_EMD = self.experts.forward_batched(
            merged_nTED.reshape(n * T, self.num_experts, D).transpose(0, 1))
        out_nTED = out_EMD.transpose(0, 1).reshape(n, T, self.num_experts, D)
        y_nTGD = torch.einsum("ntge,nted->ntgd", w_nTGE.to(out_nTED.dtype), out_nTED)
        with torch.no_grad():
            entropy = -(w_nTGE * torch.log(w_nTGE.clamp_min(1e-20))).sum(2).mean()
            self.stats = {"group_weight_entropy": entropy, "temperature": self.temperature()}
        return y_nTGD.transpose(1, 2).reshape(n * G, T, D)[:B]

    def _token_choice(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The transition to sparse: each token through its top expert, weighted by the
        controller's softmax over experts."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        probs_NE = torch.softmax((x_ND @ self.controller.to(x_ND.dtype)).float()
                                 / self.temperature(), dim=-1)
        weight_N, expert_N = probs_NE.max(dim=-1)
        if x_ND.shape[0] <= GATHER_MAX_SLOTS:  # decoding: move one expert's weights
            out_ND = self.experts.forward_gathered(x_ND, expert_N)
            y_ND = weighted_sum(out_ND.unsqueeze(1), weight_N.unsqueeze(1))
        else:
            y_ND = self.experts.forward_dispatched(x_ND, expert_N.unsqueeze(1),
                                                   weight_N.unsqueeze(1))
        with torch.no_grad():
            load = F.one_hot(expert_N, self.num_experts).float().mean(0)
            self.stats = {"tokens_per_expert": load, "temperature": self.temperature()}
        return y_ND.view(B, T, D)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, group_size={self.group_size}, "
                f"routing={self.routing}")


def check_mot(num_experts: int, group_size: int, routing: str, temperature: float,
              key: str = "MixtureOfTokens") -> None:
    if num_experts < 1 or group_size < 1:
        raise ConfigError(f"{key}: num_experts and group_size must be at least 1")
    if routing not in ROUTINGS:
        raise ConfigError(f"{key}.routing = {routing!r} is unknown; use one of {ROUTINGS}")
    if temperature <= 0:
        raise ConfigError(f"{key}.temperature = {temperature} must be positive")


@dataclass
class MoTOptions:
    """``[model.ffn]`` keys of ``kind = "mot"``."""

    num_experts: int = ranged(8, gt=0, le=MAX_SIZE)
    # sequences mixed per group (train.batch_size should be a multiple)
    group_size: int = ranged(8, gt=0, le=MAX_SIZE)
    expert_size: str = "split"  # split: d_ff / E;  flop_matched: d_ff * group_size / E
    d_expert: int = ranged(0, ge=0, le=MAX_SIZE)  # > 0 overrides expert_size
    routing: str = "continuous"  # continuous | token_choice (the transition to sparse)
    # > 0: a dense shared expert of this width beside the mixture
    d_shared: int = ranged(0, ge=0, le=MAX_SIZE)
    # At 1e-6 the group weights are one-hot already, and at 1e6 uniform; far beyond either,
    # logits / temperature or the annealed temperature overflow float32.
    temperature: float = ranged(1.0, ge=1e-6, le=1e6)
    # anneal to this over anneal_steps
    temperature_final: float | None = ranged(None, ge=1e-6, le=1e6)
    anneal_steps: int = ranged(0, ge=0, le=MAX_COUNT)

    def expert_width(self, cfg: ModelConfig) -> int:
        if self.d_expert:
            return self.d_expert
        budget = cfg.ffn_hidden - self.d_shared  # the shared expert's width comes out of it
        if self.expert_size == "flop_matched":
            # Each expert sees one merged token per group of G: G-times wider experts spend the
            # dense FFN's FLOPs per token (the paper's compute-matched setting).
            return max(1, budget * self.group_size // self.num_experts)
        return max(1, budget // self.num_experts)

    def validate(self, cfg: ModelConfig) -> None:
        check_mot(self.num_experts, self.group_size, self.routing, self.temperature,
                  "model.ffn")
        if self.expert_size not in EXPERT_SIZES:
            raise ConfigError(f"model.ffn.expert_size = {self.expert_size!r} is unknown; use "
                              f"one of {EXPERT_SIZES}")
        if not self.d_expert and self.d_shared >= cfg.ffn_hidden:
            raise ConfigError(f"model.ffn.d_shared = {self.d_shared} leaves no FFN width for "
                              f"the experts (the FFN is {cfg.ffn_hidden} wide); make it "
                              "smaller, or give model.ffn.d_expert")


def _build(options: MoTOptions, cfg: ModelConfig, layer_idx: int | None) -> MixtureOfTokens:
    return MixtureOfTokens(cfg.d_model, options.expert_width(cfg), options.num_experts,
                           options.group_size, routing=options.routing,
                           temperature=options.temperature,
                           temperature_final=options.temperature_final,
                           anneal_steps=options.anneal_steps, activation=cfg.activation,
                           d_shared=options.d_shared)


registry.register(registry.Family("mot", "ffn", MoTOptions, _build, "mixture of tokens"))
