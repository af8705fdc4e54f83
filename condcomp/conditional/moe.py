"""Mixture of Experts in the FFN slot: ``condcomp.layers.MoE``.

The FFN becomes E experts and a router that sends each token to some of them:

- ``routing = "token_choice"``: each token picks its ``top_k`` most probable experts
  (Shazeer et al. 2017; top-1 is Switch, Fedus et al. 2021; top-2 is GShard / Mixtral);
- ``routing = "expert_choice"``: each expert picks its top ``capacity_factor * T / E`` tokens
  of the batch (Zhou et al. 2022). That looks at the whole batch, future tokens included, so
  it cannot run while decoding: in eval mode (validation and generation) the layer routes by
  token choice with the same router and ``k = round(capacity_factor)``, the number of experts
  a token gets on average in training. Validation loss of expert-choice models is therefore
  measured on the path that generation uses.
- fine-grained experts (Krajewski, Jaszczur et al. 2024, "Scaling Laws for Fine-Grained MoE"):
  ``granularity = G`` and ``expansion = X`` mean X*G experts of width d_ff / G with
  top_k * G active, so the active FLOPs equal the dense FFN's;
- shared experts (DeepSeekMoE, Dai et al. 2024): ``num_shared_experts`` always-on experts, one
  dense ``MLP`` in ``shared_experts``; with ``shared_gate = "sigmoid"``, Qwen2-MoE's gate
  ``sigmoid(shared_gate(x)) * shared_experts(x)``.

Router (DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2): ``score = "sigmoid"`` scores each expert
on its own (eq. 15), ``route_scale`` multiplies the combine weights (HF's
``routed_scaling_factor``), and ``expert_groups``/``groups_per_token`` limit each token to its
best groups of experts (``n_group``/``topk_group``).

Capacity (``capacity_factor``, training only): each expert takes at most
``factor * T * k / E`` slots, T the micro-batch's tokens or (``capacity_scope = "sequence"``,
HF Switch) each sequence's; the rest skip the layer (their residual passes through), or, with
``no_token_left_behind``, try their next choices. Which slots go first: GShard's position
order, or (``drop_policy = "probability"``, Megatron-LM) the least probable. Evaluation and
decoding are dropless, so a token's output never depends on the other tokens in the batch.

Balance: Switch's load-balancing loss, per micro-batch, per sequence (DeepSeek-V3's
sequence-wise loss) or with the expert fractions of the global batch (Qiu et al. 2025; see
:meth:`MoE._global_balance`); ST-MoE's router z-loss; and the aux-loss-free router bias of
DeepSeek-V3 (updated after each optimizer step from the loads, outside the loss).

Expert parallelism (``condcomp.distributed.expert_parallel``) splits the experts over ranks;
routing, capacity, the losses and the statistics stay per rank, on the rank's own tokens (but
for the global-batch balance loss's expert counts, summed over every rank by design).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from condcomp import registry
from condcomp.conditional import routing
from condcomp.conditional.experts import GroupedExperts
from condcomp.config import ModelConfig
from condcomp.errors import ConfigError
from condcomp.kernels.expert_ffn import check_expert_kernel
from condcomp.kernels.permute import weighted_sum
from condcomp.model.mlp import MLP
from condcomp.ranges import MAX_LOSS_WEIGHT, MAX_SIZE, ranged

ROUTINGS = ("token_choice", "expert_choice")
SHARED_GATES = ("none", "sigmoid")
# Up to this many routed slots in eval mode, gather the chosen experts' weights (gpt-fast)
# instead of sorting tokens: decoding moves k experts' weights, not a permutation.
GATHER_MAX_SLOTS = 16


@dataclass
class _Dispatched:
    """What one routing scheme hands back to :meth:`MoE.forward`."""

    y_TD: torch.Tensor  # the experts' combined output
    load_E: torch.Tensor  # slots each real expert processed
    choice_load: torch.Tensor  # slots each choice (expert or no-op) was picked for
    dropped: torch.Tensor  # share of slots lost to capacity
    balance: torch.Tensor  # Switch load-balancing loss (unweighted)
    noop_fraction: torch.Tensor  # share of slots sent to no-op experts
    # training: slots of real tokens each real expert was chosen for, before capacity
    routed_E: torch.Tensor | None = None
    # training with capacity: the share of slots dropped in each quarter of the sequence
    dropped_by_position: torch.Tensor | None = None


class MoE(nn.Module):
    """Mixture-of-Experts FFN: ``x[B, T, D] -> y[B, T, D]``.

    Weights (public contract): ``router.weight`` ``[E, D]`` (bias-free linear), ``experts.w1``
    ``[E, D, H]``, ``experts.w2`` ``[E, H, D]``, ``experts.w3`` ``[E, D, H]`` for SwiGLU, and
    ``shared_experts`` (a dense :class:`MLP`) when asked for, gated by ``shared_gate.weight``
    ``[1, D]`` (bias-free linear) with ``shared_gate = "sigmoid"``. After each forward,
    ``aux_loss`` holds the weighted balance losses and ``stats`` the routing statistics.
    """

    # condcomp.distributed.expert_parallel.shard_experts may split this layer's experts over
    # ranks: its forward sends tokens through GroupedExperts' sorted and batched paths only.
    supports_expert_parallel = True

    def __init__(self, d_model: int, d_expert: int, num_experts: int, top_k: int = 1, *,
                 routing_mode: str = "token_choice", normalize_topk: bool = False,
                 capacity_factor: float | None = None, no_token_left_behind: bool = False,
                 num_shared_experts: int = 0, d_shared: int | None = None,
                 activation: str = "swiglu", load_balance_coef: float = 1e-2,
                 z_loss_coef: float = 1e-3, bias_update_rate: float = 0.0,
                 router_init_scale: float = 0.1, expert_dropout: float = 0.0,
                 router_jitter: float = 0.0, num_noop_experts: int = 0,
                 score: str = "softmax", route_scale: float = 1.0, expert_groups: int = 1,
                 groups_per_token: int = 0, shared_gate: str = "none",
                 capacity_scope: str = "batch", drop_policy: str = "position",
                 balance_scope: str = "micro_batch", expert_kernel: str = "grouped_mm") -> None:
        super().__init__()
        check_moe_shape(num_experts, top_k, routing_mode, capacity_factor)
        if num_noop_experts and (routing_mode != "token_choice" or no_token_left_behind):
            raise ConfigError("no-op experts (integrated MoDE) need token-choice routing "
                              "without no_token_left_behind")
        check_router_options(
            "MoE", num_experts=num_experts, top_k=top_k, routing_mode=routing_mode,
            capacity_factor=capacity_factor, no_token_left_behind=no_token_left_behind,
            num_noop_experts=num_noop_experts, num_shared_experts=num_shared_experts,
            score=score, expert_groups=expert_groups, groups_per_token=groups_per_token,
            shared_gate=shared_gate, capacity_scope=capacity_scope, drop_policy=drop_policy,
            balance_scope=balance_scope)
        self.score, self.route_scale = score, route_scale
        self.expert_groups, self.groups_per_token = expert_groups, groups_per_token
        self.capacity_scope, self.drop_policy = capacity_scope, drop_policy
        self.balance_scope = balance_scope
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.routing_mode, self.normalize_topk = routing_mode, normalize_topk
        self.capacity_factor, self.no_token_left_behind = capacity_factor, no_token_left_behind
        self.load_balance_coef, self.z_loss_coef = load_balance_coef, z_loss_coef
        self.bias_update_rate = bias_update_rate
        self.router_init_scale, self.router_jitter = router_init_scale, router_jitter
        # Integrated MoDE (Raposo et al. 2024, sec. 3.6): no-op experts the router may pick;
        # a slot routed to one skips the layer on the residual. Router rows E.. are theirs.
        self.num_noop_experts = num_noop_experts
        self.router = nn.Linear(d_model, num_experts + num_noop_experts, bias=False)
        check_expert_kernel(expert_kernel, "expert_kernel", gated=activation == "swiglu",
                            dropout=expert_dropout, routing_mode=routing_mode)
        self.experts = GroupedExperts(num_experts, d_model, d_expert, activation, expert_dropout,
                                      expert_kernel)
        self.shared_experts = (MLP(d_model, (d_shared or d_expert) * num_shared_experts, activation)
                               if num_shared_experts > 0 else None)
        # Qwen2-MoE's shared_expert_gate: how much of the shared experts each token takes.
        self.shared_gate = (nn.Linear(d_model, 1, bias=False) if shared_gate == "sigmoid"
                            else None)
        # Aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2): a bias used only to choose experts,
        # nudged after each optimizer step toward under-loaded experts. Saved with the model.
        n_choices = num_experts + num_noop_experts
        self.register_buffer("selection_bias", torch.zeros(n_choices))
        self.register_buffer("_load_since_update", torch.zeros(n_choices), persistent=False)
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)
        # Global-batch balance (Qiu et al. 2025): slots per choice and their total, summed over
        # the micro-batches (and ranks) of the step so far; reset after each optimizer step.
        self.register_buffer("_balance_counts", torch.zeros(n_choices + 1), persistent=False)
        # Router health (condcomp.router_health): the slots each expert processed in this
        # optimizer step, and the steps since each last got one. Kept on the device, so
        # counting dead experts over every step costs no host sync; read at logged steps.
        self.register_buffer("_step_load", torch.zeros(num_experts), persistent=False)
        self.register_buffer("_idle_steps", torch.zeros(num_experts), persistent=False)
        self.stats: dict[str, torch.Tensor | float] = {}
        self.init_weights(0.02, 0.02)

    # ------------------------------------------------------------------ init and accounting

    def init_weights(self, std: float, residual_std: float) -> None:
        # Switch (sec. 2.4): a 10x smaller init for the router, truncated normal with
        # std = sqrt(scale / fan_in), keeps early routing close to uniform and stable.
        router_std = (self.router_init_scale / self.d_model) ** 0.5
        nn.init.trunc_normal_(self.router.weight, std=router_std, a=-2 * router_std,
                              b=2 * router_std)
        self.experts.init_weights(std, residual_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, residual_std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=std)  # Qwen2-MoE: initializer_range

    @property
    def experts_per_token(self) -> float:
        """Routed experts a token goes through on average: k, or the expert-choice factor."""
        if self.routing_mode == "expert_choice" and self.training:
            return float(self.capacity_factor)
        return float(self._eval_top_k()) * self._real_expert_share()

    def _real_expert_share(self) -> float:
        """The share of routed slots that reach a real expert under balanced routing."""
        return self.num_experts / (self.num_experts + self.num_noop_experts)

    def _eval_top_k(self) -> int:
        if self.routing_mode == "expert_choice":
            return min(self.num_experts, max(1, round(self.capacity_factor)))
        return self.top_k

    def flops_per_token(self) -> float:
        """Router, the experts a token really goes through, and the shared experts."""
        flops = 2.0 * self.d_model * (self.num_experts + self.num_noop_experts)
        flops += self.experts_per_token * self.experts.flops_per_expert_token()
        if self.shared_experts is not None:
            flops += self.shared_experts.flops_per_token()
        if self.shared_gate is not None:
            flops += 2.0 * self.d_model
        return flops

    def active_params(self) -> int:
        active = self.router.weight.numel()
        active += round(self.experts_per_token * self.experts.params_per_expert())
        if self.shared_experts is not None:
            active += sum(p.numel() for p in self.shared_experts.parameters())
        if self.shared_gate is not None:
            active += self.shared_gate.weight.numel()
        return active

    # ------------------------------------------------------------------ forward

    def forward(self, x_BTD: torch.Tensor, padding_mask_BT: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``padding_mask_BT`` (True = real token), when given, keeps padding out of the
        capacity, the balance losses and the statistics."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        valid_T = None if padding_mask_BT is None else padding_mask_BT.reshape(B * T).bool()
        router_in = x_TD
        if self.training and self.router_jitter > 0:
            # Switch (sec. 2.4): multiplicative jitter on the router input, U(1-eps, 1+eps).
            noise = torch.empty_like(x_TD).uniform_(1 - self.router_jitter, 1 + self.router_jitter)
            router_in = x_TD * noise
        logits_TE = self.router(router_in)
        probs_TE = routing.router_scores(logits_TE, self.score)

        if self.routing_mode == "expert_choice" and self.training:
            out = self._expert_choice(x_TD, probs_TE, valid_T, T)
        else:
            out = self._token_choice(x_TD, probs_TE, valid_T, T)
        y_TD = out.y_TD
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * ...
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        z_loss = routing.router_z_loss(logits_TE, valid_T)
        self.aux_loss = self.load_balance_coef * out.balance + self.z_loss_coef * z_loss
        with torch.no_grad():
            if self.training:
                self._step_load += out.load_E
            if self.training and self.bias_update_rate > 0:
                self._load_since_update += out.choice_load
            dist_TE = routing.score_distribution(probs_TE, self.score)
            real_probs = dist_TE if valid_T is None else dist_TE[valid_T]
            self.stats = {
                "tokens_per_expert": out.load_E / out.load_E.sum().clamp_min(1.0),
                "dropped_fraction": out.dropped,
                "router_entropy": routing.router_entropy(real_probs),
                "load_balance_loss": out.balance.detach(),
                "z_loss": z_loss.detach(),
            }
            if self.training:  # nothing reads them in evaluation: no kernels while decoding
                self.stats.update(self._health_stats(
                    out, B * T if valid_T is None else valid_T.sum().clamp_min(1)))
            if self.num_noop_experts:
                self.stats["noop_fraction"] = out.noop_fraction
        # The compute dtype, as the dense MLP this layer replaces returns: an fp32 copy would
        # cost the layer a write and its backward a read of twice the bytes, for no precision
        # (bf16 values upcast exactly; docs/benchmarks.md, "Memory traffic, counted").
        return y_TD.view(B, T, D)

    def _health_stats(self, out: _Dispatched, num_tokens: int | torch.Tensor
                      ) -> dict[str, torch.Tensor]:
        """What condcomp.router_health reads: MaxVio and the busiest expert's share of the
        tokens, both from the router's choices before capacity (capacity caps the processed
        load, and would hide a collapse), and under capacity the dropped share by position."""
        assert out.routed_E is not None
        stats = {"max_load_violation": routing.max_load_violation(out.routed_E),
                 # Each token picks distinct experts, so an expert's slots are its tokens.
                 "top_expert_share": out.routed_E.max() / num_tokens}
        if out.dropped_by_position is not None:
            stats["dropped_by_position"] = out.dropped_by_position
        return stats

    def _token_choice(self, x_TD: torch.Tensor, probs_TE: torch.Tensor,
                      valid_T: torch.Tensor | None, seq_len: int) -> _Dispatched:
        E = self.num_experts
        k = self.top_k if self.training else self._eval_top_k()
        # DeepSeek-V3 (eq. 16): the bias is added to whichever scores route, sigmoid or softmax;
        # it picks the experts, the unbiased scores weigh them. Always added, so a bias loaded
        # from a checkpoint (DeepSeek-V3's e_score_correction_bias) routes in a run that does
        # not update it; a zero bias chooses exactly what no bias chooses.
        bias = self.selection_bias
        choice = routing.token_choice(probs_TE, k, self.normalize_topk, bias,
                                      self.expert_groups, self.groups_per_token)
        balance = self._balance_loss(probs_TE, choice.expert_ids_TK, valid_T, seq_len)
        choice_load = routing.count_per_expert(choice.expert_ids_TK, probs_TE.shape[1]).float()
        noop_TK = choice.expert_ids_TK >= E
        # Whether any slot can be left out (padding, a no-op expert, capacity): if none can,
        # the dispatch skips its masking passes.
        may_drop = (valid_T is not None or self.num_noop_experts > 0
                    or (self.training and self.capacity_factor is not None))
        if valid_T is not None or self.num_noop_experts:
            if valid_T is not None:
                choice.kept_TK &= valid_T.unsqueeze(1)
            choice.kept_TK &= ~noop_TK
            choice.weights_TK = choice.weights_TK * choice.kept_TK
            # No-op slots skip the experts; clamp their ids so every index stays in range.
            choice.expert_ids_TK = torch.where(noop_TK, E - 1, choice.expert_ids_TK)
        # Real slots to real experts, before capacity (router health, training only).
        routed_E = (routing.count_per_expert(choice.expert_ids_TK, E, choice.kept_TK.float())
                    if self.training else None)
        offered_TK = None
        if self.training and self.capacity_factor is not None:
            offered_TK = choice.kept_TK
            choice = self._apply_capacity(choice, probs_TE, k, valid_T, seq_len)
        if self.route_scale != 1.0:  # DeepSeek-V3's routed_scaling_factor, after the top-k norm
            choice.weights_TK = choice.weights_TK * self.route_scale

        T = x_TD.shape[0]
        # Under expert parallelism, the dispatch path even for a few tokens: gathering needs
        # every expert's weights here, and every rank must join the layer's exchanges.
        gather = (not self.training and T * k <= GATHER_MAX_SLOTS
                  and self.experts.ep_group is None)
        if gather:
            out_NK = self.experts.forward_gathered(
                x_TD.repeat_interleave(k, dim=0), choice.expert_ids_TK.reshape(-1))
            y_TD = weighted_sum(out_NK.view(T, k, -1), choice.weights_TK)
        else:
            y_TD = self.experts.forward_dispatched(x_TD, choice.expert_ids_TK, choice.weights_TK,
                                                   choice.kept_TK if may_drop else None)

        with torch.no_grad():
            kept_N = choice.kept_TK.reshape(-1).float()
            load_E = routing.count_per_expert(choice.expert_ids_TK, E, kept_N)
            if valid_T is None:
                n_slots = choice.kept_TK.numel()
                noop = noop_TK.float().sum()
            else:  # real tokens only; an all-padding batch has none, and shares of 0
                n_slots = (valid_T.sum() * k).clamp_min(1)
                noop = (noop_TK & valid_T.unsqueeze(1)).float().sum()
            # Dropped: slots lost to capacity (a slot sent to a no-op expert is not dropped).
            dropped = 1.0 - (kept_N.sum() + noop) / n_slots
            if valid_T is not None:
                dropped = torch.where(valid_T.any(), dropped, 0.0)
            by_position = None
            if offered_TK is not None:  # over the real slots, as dropped_fraction is
                dropped_T = (offered_TK & ~choice.kept_TK).sum(dim=1)
                slots_T = torch.full_like(dropped_T, k) if valid_T is None else valid_T * k
                by_position = routing.share_by_position(dropped_T, slots_T, seq_len)
        return _Dispatched(y_TD, load_E, choice_load, dropped, balance, noop / n_slots,
                           routed_E, by_position)

    def _apply_capacity(self, choice: routing.TokenChoice, probs_TE: torch.Tensor, k: int,
                        valid_T: torch.Tensor | None, seq_len: int) -> routing.TokenChoice:
        E, T = self.num_experts, probs_TE.shape[0]
        if self.capacity_scope == "sequence":  # HF Switch: each sequence is a routing group
            capacity = routing.sequence_capacity(valid_T, T // seq_len, seq_len, k, E,
                                                 self.capacity_factor)
            return routing.apply_capacity(choice, E, capacity, valid_T, self.drop_policy,
                                          seq_len)
        n_real = T if valid_T is None else int(valid_T.sum())
        capacity = routing.token_capacity(n_real, k, E, self.capacity_factor)
        choice = routing.apply_capacity(choice, E, capacity, valid_T, self.drop_policy)
        if self.no_token_left_behind:
            choice = routing.reroute_overflow(choice, probs_TE, capacity, valid_T)
        return choice

    def _balance_loss(self, probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor,
                      valid_T: torch.Tensor | None, seq_len: int) -> torch.Tensor:
        """Switch's balance loss over the micro-batch, per sequence, or with global-batch
        fractions; on sigmoid scores normalised per token (DeepSeek-V3 eq. 19)."""
        dist_TE = routing.score_distribution(probs_TE, self.score)
        if self.balance_scope == "sequence":
            return routing.sequence_balance_loss(dist_TE, expert_ids_TK, seq_len, valid_T)
        if self.balance_scope == "global_batch":
            return self._global_balance(dist_TE, expert_ids_TK, valid_T)
        return routing.load_balance_loss(dist_TE, expert_ids_TK, valid_T)

    def _global_balance(self, probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor,
                        valid_T: torch.Tensor | None) -> torch.Tensor:
        """Global-batch balance (Qiu et al. 2025, arXiv 2501.11873, sec. 3; Megatron-LM's
        ``global_aux_loss``): E * sum_i f_i P_i with P_i this micro-batch's mean score and f_i
        the share of slots that chose expert i counted over the step so far: this
        micro-batch and the earlier ones since the last optimizer step, summed over every rank
        of the default process group (one all-reduce of ``[E + 1]`` counts per layer and
        forward, when ``torch.distributed`` is initialized with more than one rank).

        The exact global-batch loss would need the counts of micro-batches not yet run; this
        running count (Megatron's) equals it on the step's last micro-batch, and so on every
        micro-batch when each rank runs one per step: then the summed gradient over the ranks
        is the single process's gradient of the loss on the concatenated batch. Earlier
        micro-batches of a step weigh P by the fractions seen so far. In eval mode f is the
        micro-batch's own (no exchange, nothing counted). A skipped step (non-finite loss)
        does not reset the count, which then runs over two steps."""
        counts = routing.slot_counts(expert_ids_TK, probs_TE.shape[1], valid_T)
        if self.training:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(counts)
            self._balance_counts += counts
            counts = self._balance_counts.clone()
        f_E = counts[:-1] / counts[-1].clamp_min(1.0)
        return routing.balance_from_fractions(f_E, probs_TE, valid_T)

    def _expert_choice(self, x_TD: torch.Tensor, probs_TE: torch.Tensor,
                       valid_T: torch.Tensor | None, seq_len: int) -> _Dispatched:
        T, D = x_TD.shape
        capacity = max(1, int(self.capacity_factor * T / self.num_experts))
        token_idx_EC, weights_EC = routing.expert_choice(probs_TE, capacity, valid_T)
        if self.route_scale != 1.0:
            weights_EC = weights_EC * self.route_scale
        out_ECD = self.experts.forward_batched(x_TD[token_idx_EC])
        weighted = (out_ECD * weights_EC.unsqueeze(-1).to(out_ECD.dtype)).reshape(-1, D)
        y_TD = torch.zeros(T, D, dtype=weighted.dtype, device=x_TD.device)
        y_TD = y_TD.index_add(0, token_idx_EC.reshape(-1), weighted)
        load_E = torch.full((self.num_experts,), float(token_idx_EC.shape[1]),
                            device=x_TD.device)
        # Tokens no expert chose skip the layer: the "dropped" fraction of expert choice.
        chosen_T = torch.zeros(T, dtype=torch.bool, device=x_TD.device)
        chosen_T[token_idx_EC.reshape(-1)] = True
        real_T = chosen_T if valid_T is None else chosen_T[valid_T]
        dropped = (1.0 - real_T.float().mean() if real_T.numel()  # no real token: none dropped
                   else y_TD.new_zeros((), dtype=torch.float32))
        zero = y_TD.new_zeros((), dtype=torch.float32)
        is_real_T = torch.ones_like(chosen_T) if valid_T is None else valid_T
        by_position = routing.share_by_position(is_real_T & ~chosen_T, is_real_T, seq_len)
        # Balanced by construction: no balance loss, and no bias to nudge.
        return _Dispatched(y_TD, load_E, load_E, dropped, zero, zero, load_E, by_position)

    # ------------------------------------------------------------------ outside the loss

    def idle_steps(self) -> torch.Tensor:
        """``[E]``: the optimizer steps since each expert last processed a slot (0: in the last
        step), counted over every micro-batch of every step; a device tensor that
        condcomp.router_health reads at logged steps only."""
        return self._idle_steps

    def pending_load(self) -> torch.Tensor | None:
        """The slots per choice counted since the last bias update, ``[E + N]``, which a
        data-parallel run sums over ranks in place before :meth:`after_optimizer_step` so that
        every rank moves its bias alike (``TransformerLM.after_optimizer_step``); None when the
        layer keeps no such count."""
        return self._load_since_update if self.bias_update_rate > 0 else None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Aux-loss-free balancing: b_i += rate * sign(mean load - load_i) (DeepSeek-V3); the
        global-batch balance count starts over for the next step; and each expert's count of
        steps without a slot moves on (a skipped step's load runs on into the next)."""
        self._balance_counts.zero_()
        self._idle_steps.copy_(torch.where(self._step_load > 0, 0.0, self._idle_steps + 1))
        self._step_load.zero_()
        if self.bias_update_rate <= 0:
            return
        load_E = self._load_since_update
        if load_E.sum() > 0:
            self.selection_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()

    def extra_repr(self) -> str:
        return (f"routing={self.routing_mode}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, capacity_factor={self.capacity_factor}")


def check_moe_shape(num_experts: int, top_k: int, routing_mode: str,
                    capacity_factor: float | None, key: str = "MoE") -> None:
    if num_experts < 1:
        raise ConfigError(f"{key}.num_experts = {num_experts} must be at least 1")
    if routing_mode not in ROUTINGS:
        raise ConfigError(f"{key}.routing = {routing_mode!r} is unknown; use one of {ROUTINGS}")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"{key}.top_k = {top_k} must be between 1 and num_experts = "
                          f"{num_experts}; a token picks k distinct experts")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ConfigError(f"{key}.capacity_factor = {capacity_factor} must be positive (omit it "
                          "for dropless routing)")
    if routing_mode == "expert_choice" and capacity_factor is None:
        raise ConfigError(f"{key}: expert choice needs capacity_factor (Zhou et al. use 2.0): "
                          "each expert takes capacity_factor * tokens / num_experts tokens")


def _one_of(key: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}.{name} = {value!r} is unknown; use one of {allowed}")


def check_router_options(key: str, *, num_experts: int, top_k: int, routing_mode: str,
                         capacity_factor: float | None, no_token_left_behind: bool,
                         num_noop_experts: int, num_shared_experts: int, score: str,
                         expert_groups: int, groups_per_token: int, shared_gate: str,
                         capacity_scope: str, drop_policy: str, balance_scope: str) -> None:
    """The router options that only make sense together; one ConfigError naming the keys."""
    _one_of(key, "score", score, routing.SCORES)
    _one_of(key, "shared_gate", shared_gate, SHARED_GATES)
    _one_of(key, "capacity_scope", capacity_scope, routing.CAPACITY_SCOPES)
    _one_of(key, "drop_policy", drop_policy, routing.DROP_POLICIES)
    _one_of(key, "balance_scope", balance_scope, routing.BALANCE_SCOPES)
    expert_choice = routing_mode == "expert_choice"
    if expert_choice and score != "softmax":
        raise ConfigError(f"{key}.score = {score!r} needs {key}.routing = \"token_choice\": "
                          "expert choice ranks tokens by Zhou et al.'s softmax gate")
    if expert_choice and balance_scope != "micro_batch":
        raise ConfigError(f"{key}.balance_scope = {balance_scope!r} needs {key}.routing = "
                          "\"token_choice\": expert choice is balanced by construction and has "
                          "no balance loss")
    if shared_gate != "none" and num_shared_experts < 1:
        raise ConfigError(f"{key}.shared_gate = {shared_gate!r} gates the shared experts; set "
                          f"{key}.num_shared_experts >= 1 or shared_gate = \"none\"")
    _check_capacity_options(key, routing_mode, capacity_factor, no_token_left_behind,
                            capacity_scope, drop_policy)
    _check_groups(key, num_experts, top_k, routing_mode, no_token_left_behind,
                  num_noop_experts, expert_groups, groups_per_token)


def _check_capacity_options(key: str, routing_mode: str, capacity_factor: float | None,
                            no_token_left_behind: bool, capacity_scope: str,
                            drop_policy: str) -> None:
    for name, value, default in (("capacity_scope", capacity_scope, "batch"),
                                 ("drop_policy", drop_policy, "position")):
        if value == default:
            continue
        if routing_mode != "token_choice" or capacity_factor is None:
            raise ConfigError(f"{key}.{name} = {value!r} shapes token-choice capacity: it needs "
                              f"{key}.routing = \"token_choice\" and a {key}.capacity_factor")
    if capacity_scope == "sequence" and no_token_left_behind:
        raise ConfigError(f"{key}.no_token_left_behind re-routes against the batch's capacity; "
                          f"it cannot run with {key}.capacity_scope = \"sequence\"")


def _check_groups(key: str, num_experts: int, top_k: int, routing_mode: str,
                  no_token_left_behind: bool, num_noop_experts: int, expert_groups: int,
                  groups_per_token: int) -> None:
    """DeepSeek-V3's group-limited routing (n_group, topk_group)."""
    if expert_groups < 1 or groups_per_token < 0:
        raise ConfigError(f"{key}.expert_groups = {expert_groups} must be at least 1 and "
                          f"{key}.groups_per_token = {groups_per_token} at least 0 (0: all)")
    if groups_per_token > expert_groups:
        raise ConfigError(f"{key}.groups_per_token = {groups_per_token} is more than "
                          f"{key}.expert_groups = {expert_groups}")
    if expert_groups == 1:
        return
    if num_experts % expert_groups:
        raise ConfigError(f"{key}.expert_groups = {expert_groups} does not divide "
                          f"{key}.num_experts = {num_experts}")
    if num_experts // expert_groups < 2:
        raise ConfigError(f"{key}.expert_groups = {expert_groups} leaves fewer than 2 experts "
                          f"per group of {key}.num_experts = {num_experts}; a group's score is "
                          "the sum of its top 2 (DeepSeek-V3)")
    kept = (groups_per_token or expert_groups) * (num_experts // expert_groups)
    if top_k > kept:
        raise ConfigError(f"{key}.top_k = {top_k} is more than the {kept} experts of the "
                          f"{key}.groups_per_token kept groups")
    others = [name for name, on in (("routing = \"expert_choice\"", routing_mode != "token_choice"),
                                    ("no_token_left_behind", no_token_left_behind),
                                    ("num_noop_experts", num_noop_experts > 0)) if on]
    if others:
        raise ConfigError(f"{key}.expert_groups > 1 limits each token's choice of experts; it "
                          f"cannot run with {key}." + f", {key}.".join(others))


# ----------------------------------------------------------------------------- config


@dataclass
class MoEOptions:
    """``[model.ffn]`` keys of ``kind = "moe"``."""

    num_experts: int = ranged(8, gt=0, le=MAX_SIZE)
    top_k: int = ranged(1, gt=0, le=MAX_SIZE)
    # 0: model.d_ff (each expert as wide as the dense FFN, as in Switch)
    d_expert: int = ranged(0, ge=0, le=MAX_SIZE)
    routing: str = "token_choice"  # token_choice | expert_choice
    normalize_topk: bool = False
    # None (or 0, for TOML and --set): dropless. From num_experts on, no token is dropped.
    capacity_factor: float | None = ranged(None, ge=0.0, le=MAX_SIZE)
    no_token_left_behind: bool = False
    granularity: int = ranged(0, ge=0, le=MAX_SIZE)  # >0: fine-grained sugar (see below)
    # with granularity: num_experts = expansion * granularity
    expansion: int = ranged(0, ge=0, le=MAX_SIZE)
    num_shared_experts: int = ranged(0, ge=0, le=MAX_SIZE)
    d_shared: int = ranged(0, ge=0, le=MAX_SIZE)  # width of each shared expert; 0: d_expert
    load_balance_coef: float = ranged(1e-2, ge=0.0, le=MAX_LOSS_WEIGHT)
    z_loss_coef: float = ranged(1e-3, ge=0.0, le=MAX_LOSS_WEIGHT)
    # >0: aux-loss-free balancing (DeepSeek-V3 uses 1e-3). The bias moves the router's
    # probabilities, in [0, 1]: a larger step only flips the choice back and forth.
    bias_update_rate: float = ranged(0.0, ge=0.0, le=1.0)
    # The router's init std is sqrt(scale / d_model); the switch preset uses 10. Below 1e-30
    # the std underflows to zero, which a truncated normal cannot take.
    router_init_scale: float = ranged(0.1, ge=1e-30, le=1e3)
    expert_dropout: float = ranged(0.0, ge=0.0, lt=1.0)
    # Router-input noise U(1 - eps, 1 + eps); beyond 1 it would flip the input's sign.
    router_jitter: float = ranged(0.0, ge=0.0, le=1.0)
    # integrated MoDE: experts that do nothing (skip the layer)
    num_noop_experts: int = ranged(0, ge=0, le=MAX_SIZE)
    # Router (DeepSeek-V3 sec. 2.1.2): "softmax" | "sigmoid" scores (eq. 15; normalize_topk
    # then renormalises the chosen scores, eq. 13)
    score: str = "softmax"
    # multiplies the combine weights (DeepSeek-V3's routed_scaling_factor, 2.5 in V3)
    route_scale: float = ranged(1.0, gt=0.0, le=1e3)
    # group-limited routing (DeepSeek-V3 n_group / topk_group): E / expert_groups experts per
    # group; each token keeps its groups_per_token best groups (0: all of them)
    expert_groups: int = ranged(1, gt=0, le=MAX_SIZE)
    groups_per_token: int = ranged(0, ge=0, le=MAX_SIZE)
    # "none" | "sigmoid": Qwen2-MoE's gate sigmoid(shared_gate(x)) on the shared experts
    shared_gate: str = "none"
    # capacity counted per "batch" (the micro-batch) | "sequence" (HF Switch)
    capacity_scope: str = "batch"
    # overflow dropped by "position" (GShard) | "probability" (Megatron-LM's probs policy)
    drop_policy: str = "position"
    # the balance loss over the "micro_batch" | "sequence" (DeepSeek-V3) | "global_batch"
    # (Qiu et al. 2025: expert fractions over the step's micro-batches and data ranks)
    balance_scope: str = "micro_batch"
    # token-choice SwiGLU experts through "grouped_mm" (torch._grouped_mm on CUDA) | the
    # gather-on-load kernels: "auto" (Triton on CUDA, else their reference) | "triton" |
    # "reference" (condcomp.kernels.expert_ffn)
    expert_kernel: str = "grouped_mm"

    def resolved(self, cfg: ModelConfig) -> MoEOptions:
        """Apply the fine-grained sugar (Krajewski et al. 2024): G-times narrower experts,
        G-times more of them, G-times more chosen, so active FLOPs match the dense FFN.
        TOML has no null, so a capacity factor of 0 also means dropless."""
        import dataclasses

        opts = self
        if opts.capacity_factor == 0:
            opts = dataclasses.replace(opts, capacity_factor=None)
        if opts.granularity <= 0:
            return opts
        G = opts.granularity
        return dataclasses.replace(
            opts, num_experts=opts.expansion * G, d_expert=cfg.ffn_hidden // G,
            top_k=opts.top_k * G, granularity=0, expansion=0)

    def validate(self, cfg: ModelConfig) -> None:
        if self.granularity > 0:
            if self.expansion < 1:
                raise ConfigError("model.ffn.granularity needs model.ffn.expansion (total experts "
                                  "= expansion * granularity), e.g. expansion = 8")
            if cfg.ffn_hidden % self.granularity:
                raise ConfigError(f"model.ffn.granularity = {self.granularity} does not divide "
                                  f"model.d_ff = {cfg.ffn_hidden}")
            if self.expansion * self.granularity > MAX_SIZE:
                raise ConfigError(f"model.ffn.expansion * model.ffn.granularity = "
                                  f"{self.expansion * self.granularity} experts is more than "
                                  f"{MAX_SIZE}; lower one of them")
        opts = self.resolved(cfg)
        check_moe_shape(opts.num_experts, opts.top_k, opts.routing, opts.capacity_factor,
                        "model.ffn")
        shared = opts.num_shared_experts * (opts.d_shared or opts.d_expert or cfg.ffn_hidden)
        if shared > MAX_SIZE:
            raise ConfigError(f"model.ffn.num_shared_experts * width = {shared} makes a shared "
                              f"MLP wider than {MAX_SIZE}; lower num_shared_experts or d_shared")
        if opts.num_noop_experts and (opts.routing != "token_choice" or opts.no_token_left_behind):
            raise ConfigError("model.ffn.num_noop_experts (integrated MoDE) needs token-choice "
                              "routing without no_token_left_behind")
        check_router_options(
            "model.ffn", num_experts=opts.num_experts, top_k=opts.top_k,
            routing_mode=opts.routing, capacity_factor=opts.capacity_factor,
            no_token_left_behind=opts.no_token_left_behind,
            num_noop_experts=opts.num_noop_experts, num_shared_experts=opts.num_shared_experts,
            score=opts.score, expert_groups=opts.expert_groups,
            groups_per_token=opts.groups_per_token, shared_gate=opts.shared_gate,
            capacity_scope=opts.capacity_scope, drop_policy=opts.drop_policy,
            balance_scope=opts.balance_scope)
        check_expert_kernel(opts.expert_kernel, "model.ffn.expert_kernel",
                            gated=cfg.activation == "swiglu", dropout=opts.expert_dropout,
                            routing_mode=opts.routing)


def _build(options: MoEOptions, cfg: ModelConfig, layer_idx: int | None) -> MoE:
    o = options.resolved(cfg)
    d_expert = o.d_expert or cfg.ffn_hidden
    return MoE(cfg.d_model, d_expert, o.num_experts, o.top_k, routing_mode=o.routing,
               normalize_topk=o.normalize_topk, capacity_factor=o.capacity_factor,
               no_token_left_behind=o.no_token_left_behind,
               num_shared_experts=o.num_shared_experts, d_shared=o.d_shared or None,
               activation=cfg.activation, load_balance_coef=o.load_balance_coef,
               z_loss_coef=o.z_loss_coef, bias_update_rate=o.bias_update_rate,
               router_init_scale=o.router_init_scale, expert_dropout=o.expert_dropout,
               router_jitter=o.router_jitter, num_noop_experts=o.num_noop_experts,
               score=o.score, route_scale=o.route_scale, expert_groups=o.expert_groups,
               groups_per_token=o.groups_per_token, shared_gate=o.shared_gate,
               capacity_scope=o.capacity_scope, drop_policy=o.drop_policy,
               balance_scope=o.balance_scope, expert_kernel=o.expert_kernel)


registry.register(registry.Family("moe", "ffn", MoEOptions, _build, "mixture of experts"))
