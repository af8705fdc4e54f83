"""Routing for Mixture of Experts: who goes where, with what weight, and what it costs.

Token choice (Shazeer et al. 2017; k = 1 is Switch, Fedus et al. 2021): each token picks its k
most probable experts. Expert choice (Zhou et al. 2022): each expert picks its top-C tokens.
Capacity (GShard, Lepikhin et al. 2021; Switch sec. 2.2) bounds the tokens per expert;
no-token-left-behind (Switch, app. / "No Token Left Behind") re-routes overflow to the next
choice with room. The balance losses are Switch's (eq. 4) and ST-MoE's router z-loss
(Zoph et al. 2022, eq. 5).

DeepSeek-V3 (arXiv 2412.19437, sec. 2.1.2) adds sigmoid scores (eq. 15), group-limited
routing (its "node-limited routing", sec. 2.1.2, as HF's ``DeepseekV3TopkRouter`` computes
it), and a sequence-wise balance loss (eqs. 17-20). Megatron-LM's ``probs`` drop policy keeps
each expert's most probable slots; Qiu et al. 2025 (arXiv 2501.11873) count the balance
loss's expert fractions over the global batch.

Everything here works on flattened tokens: ``T`` is the number of tokens in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TokenChoice:
    """A token-choice assignment: ``k`` slots per token.

    ``expert_ids_TK`` are distinct per token; ``weights_TK`` the combine weights (float32),
    zero where ``kept_TK`` is False (the slot was over capacity and the token skips it).
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    kept_TK: torch.Tensor


def router_probs(logits_TE: torch.Tensor) -> torch.Tensor:
    """Softmax in float32, whatever the autocast dtype: Switch's "selective precision"
    (sec. 2.4), since bf16 rounding in the exponent makes routing unstable."""
    return torch.softmax(logits_TE.float(), dim=-1)


SCORES = ("softmax", "sigmoid")


def router_scores(logits_TE: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """The router's scores in float32: softmax over the experts, or DeepSeek-V3's per-expert
    sigmoid (eq. 15: s_{i,t} = sigmoid(u_t^T e_i)), which does not make experts compete."""
    if score == "sigmoid":
        return torch.sigmoid(logits_TE.float())
    return router_probs(logits_TE)


def score_distribution(scores_TE: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """The scores as a distribution over the experts, for the balance losses and the entropy:
    softmax probabilities as they are; sigmoid scores normalised per token, DeepSeek-V3
    eq. 19 (s'_{i,t} = s_{i,t} / sum_j s_{j,t})."""
    if score == "sigmoid":
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return scores_TE


def group_limited(choice_scores_TE: torch.Tensor, num_groups: int,
                  groups_per_token: int) -> torch.Tensor:
    """DeepSeek-V3's group-limited routing, as HF's ``DeepseekV3TopkRouter``: a group's score
    is the sum of its two highest (bias-corrected) expert scores; each token keeps its
    ``groups_per_token`` best groups, and the experts of the other groups get -inf so top-k
    never picks them. The groups are contiguous runs of E / num_groups experts (in DeepSeek-V3,
    the experts of one node, which bounds the nodes a token is sent to)."""
    T, E = choice_scores_TE.shape
    per_group = E // num_groups
    group_scores_TG = choice_scores_TE.view(T, num_groups, per_group).topk(2, dim=-1).values.sum(-1)
    kept_groups_TG = group_scores_TG.topk(groups_per_token, dim=-1, sorted=False).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, kept_groups_TG, True)
    keep_TE = keep_TG.repeat_interleave(per_group, dim=1)
    return choice_scores_TE.masked_fill(~keep_TE, float("-inf"))


def token_choice(probs_TE: torch.Tensor, top_k: int, normalize_topk: bool = False,
                 selection_bias_E: torch.Tensor | None = None, num_groups: int = 1,
                 groups_per_token: int = 0) -> TokenChoice:
    """Each token's ``top_k`` highest-scoring distinct experts.

    ``selection_bias_E`` (aux-loss-free balancing, DeepSeek-V3 sec. 2.1.2, eq. 16) shifts which
    experts are *chosen* but not the combine weights, which stay the router's scores
    (renormalised over the chosen k when ``normalize_topk``, as in Mixtral and DeepSeek-V3's
    eq. 13 for sigmoid scores). With ``num_groups > 1`` and ``0 < groups_per_token <
    num_groups``, the choice is limited to each token's best groups (:func:`group_limited`).
    """
    scores_TE = probs_TE if selection_bias_E is None else probs_TE + selection_bias_E
    if num_groups > 1 and 0 < groups_per_token < num_groups:
        scores_TE = group_limited(scores_TE, num_groups, groups_per_token)
    expert_ids_TK = torch.topk(scores_TE, top_k, dim=-1, sorted=True).indices
    weights_TK = probs_TE.gather(1, expert_ids_TK)
    if normalize_topk:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    kept_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
    return TokenChoice(expert_ids_TK, weights_TK, kept_TK)


def token_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Switch eq. 3, for k slots per token: factor * tokens * k / experts (at least 1)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def count_per_expert(expert_ids_N: torch.Tensor, num_experts: int,
                     weights_N: torch.Tensor | None = None) -> torch.Tensor:
    """How many entries (or how much weight) went to each expert, ``[E]``.

    A scatter-add into a fixed-size buffer rather than ``bincount``, whose output size depends
    on the data: that keeps shapes static for ``torch.compile`` and needs no host sync.
    """
    ids_N = expert_ids_N.reshape(-1)
    if weights_N is None:
        counts = torch.zeros(num_experts, dtype=torch.long, device=ids_N.device)
        return counts.scatter_add_(0, ids_N, torch.ones_like(ids_N))
    counts = torch.zeros(num_experts, dtype=weights_N.dtype, device=ids_N.device)
    return counts.scatter_add_(0, ids_N, weights_N.reshape(-1))


def rank_within_expert(expert_ids_N: torch.Tensor, num_experts: int,
                       priority_N: torch.Tensor | None = None) -> torch.Tensor:
    """For each entry, how many earlier entries chose the same expert (0 for the first).

    A stable sort by expert keeps the original order within each expert, so the rank is the
    position in the sorted run minus the run's start. O(N log N), no [N, E] one-hot.
    With ``priority_N``, entries of higher priority come first (ties: earlier first).
    """
    if priority_N is not None:
        by_priority_N = torch.argsort(priority_N, descending=True, stable=True)
        rank_N = torch.empty_like(by_priority_N)
        rank_N[by_priority_N] = rank_within_expert(expert_ids_N[by_priority_N], num_experts)
        return rank_N
    order_N = torch.argsort(expert_ids_N, stable=True)
    counts_E = count_per_expert(expert_ids_N, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_ids_N = expert_ids_N[order_N]
    rank_sorted_N = torch.arange(expert_ids_N.numel(), device=expert_ids_N.device) - starts_E[
        sorted_ids_N]
    rank_N = torch.empty_like(rank_sorted_N)
    rank_N[order_N] = rank_sorted_N
    return rank_N


DROP_POLICIES = ("position", "probability")
CAPACITY_SCOPES = ("batch", "sequence")


def sequence_capacity(valid_T: torch.Tensor | None, num_seqs: int, seq_len: int, top_k: int,
                      num_experts: int, capacity_factor: float) -> int | torch.Tensor:
    """:func:`token_capacity` of each sequence (HF Switch routes each sequence as a group with
    its own ``expert_capacity``), counted on the sequence's real tokens: ``[S]`` with padding,
    else one number for all (no host-to-device copy)."""
    if valid_T is None:
        return token_capacity(seq_len, top_k, num_experts, capacity_factor)
    n_S = valid_T.view(num_seqs, seq_len).sum(dim=1).to(torch.float64)
    return torch.ceil(capacity_factor * n_S * top_k / num_experts).clamp_min(1).long()


def apply_capacity(choice: TokenChoice, num_experts: int, capacity: int | torch.Tensor,
                   valid_T: torch.Tensor | None = None, drop_policy: str = "position",
                   seq_len: int | None = None) -> TokenChoice:
    """Drop the slots past each expert's capacity.

    ``drop_policy = "position"`` follows GShard: every token's first choice is served before
    any second choice, and within a choice, earlier tokens first. ``"probability"`` is
    Megatron-LM's ``probs`` policy (``--moe-token-drop-policy probs``): each expert keeps its
    slots of highest combine weight, whatever their choice rank, so the least probable go
    first (ties by the GShard order). With ``seq_len``, capacity counts per sequence of
    ``seq_len`` tokens (``capacity`` one number or ``[S]``, :func:`sequence_capacity`), else
    per batch.
    Dropped slots get weight 0; a token whose every slot is dropped passes through on the
    residual. Padding tokens (``valid_T`` False) never take capacity.
    """
    T, K = choice.expert_ids_TK.shape
    ids_KT = choice.expert_ids_TK.t()
    kept_KT = choice.kept_TK.t()
    if valid_T is not None:
        kept_KT = kept_KT & valid_T.unsqueeze(0)
    # Entries not kept are sent to a virtual expert E so they take no capacity.
    ids_N = torch.where(kept_KT, ids_KT, num_experts).reshape(-1)
    priority_N = choice.weights_TK.t().reshape(-1) if drop_policy == "probability" else None
    if seq_len is None:
        rank_N = rank_within_expert(ids_N, num_experts + 1, priority_N)
        capacity_N = capacity
    else:  # one queue per (sequence, expert): expert ids offset by the sequence's index
        seq_N = (torch.arange(T, device=ids_N.device) // seq_len).repeat(K)
        num_seqs = T // seq_len
        rank_N = rank_within_expert(seq_N * (num_experts + 1) + ids_N,
                                    num_seqs * (num_experts + 1), priority_N)
        capacity_N = capacity[seq_N] if isinstance(capacity, torch.Tensor) else capacity
    kept_TK = (kept_KT.reshape(-1) & (rank_N < capacity_N)).view(K, T).t()
    return TokenChoice(choice.expert_ids_TK, choice.weights_TK * kept_TK, kept_TK)


def reroute_overflow(choice: TokenChoice, probs_TE: torch.Tensor, capacity: int,
                     valid_T: torch.Tensor | None = None) -> TokenChoice:
    """No-token-left-behind (Switch Transformer, app. "No Token Left Behind"): a slot dropped
    for lack of capacity is offered, round by round, to the token's next most probable expert
    that it has not tried and that still has room. Its weight becomes that expert's probability.
    Runs at most E - k rounds; each round serves at most one dropped slot per token.
    """
    ids_TK, weights_TK, kept_TK = (choice.expert_ids_TK.clone(), choice.weights_TK.clone(),
                                   choice.kept_TK.clone())
    T, K = ids_TK.shape
    E = probs_TE.shape[1]
    valid_T = torch.ones(T, dtype=torch.bool, device=ids_TK.device) if valid_T is None else valid_T
    tried_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, ids_TK, True)
    load_E = count_per_expert(ids_TK, E, kept_TK.long())
    for _ in range(E - K):
        dropped_TK = ~kept_TK & valid_T.unsqueeze(1)
        if not bool(dropped_TK.any()):  # host sync: no-token-left-behind is a training option
            break
        has_drop_T = dropped_TK.any(dim=1)
        slot_T = dropped_TK.float().argmax(dim=1)  # the first dropped slot of each token
        candidate_T = probs_TE.masked_fill(tried_TE, -1.0).argmax(dim=1)
        untried_T = ~tried_TE.all(dim=1)
        asking_T = has_drop_T & untried_T
        if not bool(asking_T.any()):
            break
        asked_N = torch.where(asking_T, candidate_T, E)
        rank_T = rank_within_expert(asked_N, E + 1)
        room_E = (capacity - load_E).clamp_min(0)
        granted_T = asking_T & (rank_T < room_E[candidate_T.clamp_max(E - 1)])
        rows = granted_T.nonzero(as_tuple=True)[0]
        cols = slot_T[rows]
        ids_TK[rows, cols] = candidate_T[rows]
        weights_TK[rows, cols] = probs_TE[rows, candidate_T[rows]]
        kept_TK[rows, cols] = True
        tried_TE[asking_T, candidate_T[asking_T]] = True
        load_E += count_per_expert(candidate_T[rows], E)
    return TokenChoice(ids_TK, weights_TK, kept_TK)


def expert_choice(probs_TE: torch.Tensor, capacity: int, valid_T: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert takes its ``capacity`` highest-scoring tokens of the batch (Zhou et al.
    2022, eq. 1: I = TopK(S^T, k)). Returns ``token_idx_EC`` and the gating ``weights_EC``.
    Padding tokens are never chosen."""
    scores_ET = probs_TE.t()
    if valid_T is not None:
        scores_ET = scores_ET.masked_fill(~valid_T.unsqueeze(0), -1.0)
    capacity = min(capacity, probs_TE.shape[0])
    weights_EC, token_idx_EC = torch.topk(scores_ET, capacity, dim=1)
    return token_idx_EC, weights_EC.clamp_min(0.0)


# ----------------------------------------------------------------------------- losses


def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor,
                      valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch eq. 4: E * sum_i f_i * P_i, where f_i is the fraction of routing slots that chose
    expert i (before capacity) and P_i the mean router probability of expert i. It is 1 when
    routing is uniform, whatever k is. Padding tokens do not count."""
    E = probs_TE.shape[1]
    if valid_T is not None:
        probs_TE = probs_TE[valid_T]
        expert_ids_TK = expert_ids_TK[valid_T]
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    f_E = count_per_expert(expert_ids_TK, E).to(probs_TE.dtype) / expert_ids_TK.numel()
    P_E = probs_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


BALANCE_SCOPES = ("micro_batch", "sequence", "global_batch")


def slot_counts(expert_ids_TK: torch.Tensor, num_choices: int,
                valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Routing slots per choice before capacity, real tokens only, and their total last:
    ``[E + 1]`` float32 (one tensor, so a global-batch count is one all-reduce)."""
    if valid_T is not None:
        expert_ids_TK = expert_ids_TK[valid_T]
    counts_E = count_per_expert(expert_ids_TK, num_choices).float()
    return torch.cat((counts_E, counts_E.new_tensor([expert_ids_TK.numel()])))


def balance_from_fractions(f_E: torch.Tensor, probs_TE: torch.Tensor,
                           valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch eq. 4 with given fractions ``f_E``: E * sum_i f_i * P_i, P over the real tokens
    of ``probs_TE`` (the only factor that carries a gradient)."""
    if valid_T is not None:
        probs_TE = probs_TE[valid_T]
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    return probs_TE.shape[1] * torch.sum(f_E.to(probs_TE.dtype) * probs_TE.mean(dim=0))


def sequence_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, seq_len: int,
                          valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (eqs. 17-20; also HF Switch's
    ``load_balancing_loss_func``, whose groups are the sequences): Switch's loss of each
    sequence alone, E * sum_i f_i P_i with f_i = count_i / (K * T_seq) (eq. 18 up to its
    factor E, which eq. 17's form carries here) and P_i the sequence's mean score (eq. 20),
    averaged over the sequences that have real tokens."""
    T, E = probs_TE.shape
    S, K = T // seq_len, expert_ids_TK.shape[1]
    valid_ST = (torch.ones(S, seq_len, dtype=torch.bool, device=probs_TE.device)
                if valid_T is None else valid_T.view(S, seq_len))
    real_S = valid_ST.sum(dim=1).to(probs_TE.dtype)
    ids_SN = (expert_ids_TK.view(S, seq_len * K)
              + E * torch.arange(S, device=probs_TE.device).unsqueeze(1))
    weights_SN = valid_ST.repeat_interleave(K, dim=1).to(probs_TE.dtype)
    counts_SE = count_per_expert(ids_SN, S * E, weights_SN).view(S, E)
    f_SE = counts_SE / (K * real_S).clamp_min(1).unsqueeze(1)
    P_SE = (probs_TE.view(S, seq_len, E) * valid_ST.unsqueeze(-1)).sum(1) / real_S.clamp_min(
        1).unsqueeze(1)
    loss_S = E * (f_SE * P_SE).sum(dim=1)
    has_real_S = real_S > 0
    return (loss_S * has_real_S).sum() / has_real_S.sum().clamp_min(1)


def router_z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE eq. 5: mean over tokens of logsumexp(logits)^2, which keeps router logits small
    (large logits make the float32 softmax's rounding errors matter)."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1)
    if valid_T is not None:
        z_T = z_T[valid_T]
    return (z_T ** 2).mean() if z_T.numel() else z_T.new_zeros(())


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the routing distribution, in nats (log E when uniform); 0 for no
    tokens (an all-padding batch), not the NaN of an empty mean."""
    entropy_T = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(dim=-1)
    return entropy_T.mean() if entropy_T.numel() else entropy_T.new_zeros(())


# ----------------------------------------------------------------------------- health


def max_load_violation(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing", arXiv 2408.15664,
    eq. 4): ``max_i load_i / mean load - 1``. 0 when every expert has the same load, E - 1
    when one expert takes every slot; 0 for no slot at all rather than the NaN of 0 / 0."""
    load_E = load_E.float()
    mean = load_E.mean()
    return torch.where(mean > 0, load_E.max() / mean.clamp_min(1e-20) - 1.0, 0.0)


POSITION_BUCKETS = 4  # quarters of the sequence


def share_by_position(hits_T: torch.Tensor, slots_T: torch.Tensor, seq_len: int,
                      buckets: int = POSITION_BUCKETS) -> torch.Tensor:
    """``[buckets]``: of the slots of the tokens in each equal stretch of the sequence
    (quarters by default; token ``t`` of a sequence falls in ``t * buckets // seq_len``), the
    share that ``hits_T`` counts (e.g. the slots capacity dropped). Tokens are flattened
    sequences of ``seq_len``; a stretch without slots shows 0. Capacity counted per sequence
    serves each sequence's earlier tokens first (GShard's order), so its overflow shows as a
    share that grows toward the last stretch."""
    position_T = torch.arange(hits_T.numel(), device=hits_T.device) % seq_len
    bucket_T = position_T * buckets // seq_len
    hits_B = torch.zeros(buckets, device=hits_T.device).scatter_add_(0, bucket_T, hits_T.float())
    slots_B = torch.zeros(buckets, device=hits_T.device).scatter_add_(0, bucket_T,
                                                                      slots_T.float())
    return hits_B / slots_B.clamp_min(1.0)
