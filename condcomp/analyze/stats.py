"""The statistics of ``condcomp analyze``: pure functions of recorded routing decisions.

Letters: N the tokens a layer saw (rows of its decisions), K the choices per token (an MoE's
chosen experts; a Sparse FF layer's blocks), E a router's choices (its experts, then its
no-op experts), S the units of a Sparse FF block, L the positions of a window, U the distinct
token ids seen. Counts are float64, so shares of a few thousand tokens are exact enough to
compare with a hand count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def choice_load(expert_ids_NK: torch.Tensor, num_choices: int) -> torch.Tensor:
    """``[E]``: the share of the routed slots that went to each choice (sums to 1)."""
    counts_E = torch.bincount(expert_ids_NK.reshape(-1), minlength=num_choices).double()
    return counts_E / counts_E.sum().clamp_min(1.0)


def chosen_mask(expert_ids_NK: torch.Tensor, num_choices: int) -> torch.Tensor:
    """``[N, E]`` float64: 1 where the token chose the expert (a token's k experts are
    distinct, so each row holds k ones)."""
    mask_NE = torch.zeros(expert_ids_NK.shape[0], num_choices, dtype=torch.float64)
    return mask_NE.scatter_(1, expert_ids_NK.long(), 1.0)


def coactivation(expert_ids_NK: torch.Tensor, num_choices: int) -> torch.Tensor:
    """``[E, E]``: entry (i, j) is the share of the tokens routed to expert i that were also
    routed to expert j (OLMoE, Muennighoff et al. 2024, sec. 5, "co-activation"). The
    diagonal is 1 for every expert that got a token, so such a row sums to k; the row of an
    expert no token chose is 0."""
    mask_NE = chosen_mask(expert_ids_NK, num_choices)
    both_EE = mask_NE.t() @ mask_NE  # both_EE[i, j]: tokens that chose i and j
    return both_EE / both_EE.diagonal().clamp_min(1.0).unsqueeze(1)


@dataclass(frozen=True)
class TokenShare:
    """One token id's share of its occurrences that went somewhere (an expert, a block)."""

    token: int
    share: float  # hits / count
    hits: int  # occurrences that went there
    count: int  # occurrences among the analysed tokens


def hits_by_token(tokens_N: torch.Tensor, hits_NC: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens_U, counts_U, hits_UC)``: each distinct token id, how often it occurs, and how
    many of its occurrences hit each of the C columns of ``hits_NC`` (0/1 per row)."""
    tokens_U, inverse_N, counts_U = torch.unique(tokens_N, return_inverse=True,
                                                 return_counts=True)
    hits_UC = torch.zeros(tokens_U.shape[0], hits_NC.shape[1], dtype=torch.float64)
    hits_UC.index_add_(0, inverse_N, hits_NC.double())
    return tokens_U, counts_U, hits_UC


def ranked_by_share(tokens_U: torch.Tensor, counts_U: torch.Tensor, hits_U: torch.Tensor,
                    min_count: int, top: int, most: bool = True) -> list[TokenShare]:
    """The ``top`` token ids of largest (``most``) or smallest share ``hits / count`` among
    those seen at least ``min_count`` times; ties go to the more frequent token. With
    ``most``, a token with no hit is never listed (a share of 0 prefers nothing)."""
    shares = []
    for token, count, hits in zip(tokens_U.tolist(), counts_U.tolist(), hits_U.tolist()):
        if count >= min_count and (hits > 0 or not most):
            shares.append(TokenShare(int(token), hits / count, round(hits), int(count)))
    sign = -1.0 if most else 1.0
    shares.sort(key=lambda s: (sign * s.share, -s.count, s.token))
    return shares[:top]


def token_preferences(tokens_N: torch.Tensor, expert_ids_NK: torch.Tensor, num_choices: int,
                      min_count: int, top: int) -> list[list[TokenShare]]:
    """Per expert, the token ids it takes the largest share of: the share of the token's
    occurrences routed to that expert among its k choices (OLMoE, Muennighoff et al. 2024,
    sec. 5, "token specialization"), for tokens seen at least ``min_count`` times."""
    tokens_U, counts_U, hits_UE = hits_by_token(tokens_N, chosen_mask(expert_ids_NK,
                                                                      num_choices))
    return [ranked_by_share(tokens_U, counts_U, hits_UE[:, e], min_count, top)
            for e in range(num_choices)]


@dataclass(frozen=True)
class Agreement:
    """How well the top-1 choice at one layer predicts the top-1 choice at a later one."""

    tokens: int  # tokens seen by both layers
    # Share of tokens whose later choice is the most common successor of their earlier one:
    # sum_a max_b n(a, b) / n.
    successor_share: float
    # The same share if the layers chose independently of each other: the most common later
    # choice's share, max_b n(b) / n.
    independent_share: float
    mutual_information_bits: float  # I(A; B) of the joint counts n(a, b) / n
    # I(A; B) / min(H(A), H(B)): 0 independent, 1 one choice determines the other; 0 when
    # either layer always makes the same choice.
    normalised_mutual_information: float


def agreement(first_N: torch.Tensor, second_N: torch.Tensor, first_choices: int,
              second_choices: int) -> Agreement:
    """:class:`Agreement` of two layers' top-1 choices of the same N tokens."""
    n = first_N.shape[0]
    joint_AB = torch.zeros(first_choices, second_choices, dtype=torch.float64)
    joint_AB.index_put_((first_N.long(), second_N.long()),
                        torch.ones(n, dtype=torch.float64), accumulate=True)
    total = max(n, 1)
    p_AB = joint_AB / total
    p_A, p_B = p_AB.sum(1), p_AB.sum(0)
    independent_AB = p_A.unsqueeze(1) * p_B.unsqueeze(0)
    nonzero = p_AB > 0
    mi = float((p_AB[nonzero] * torch.log2(p_AB[nonzero] / independent_AB[nonzero])).sum())
    floor = min(_entropy_bits(p_A), _entropy_bits(p_B))
    return Agreement(
        tokens=n, successor_share=float(joint_AB.max(dim=1).values.sum()) / total,
        independent_share=float(p_B.max()) if n else 0.0,
        mutual_information_bits=max(mi, 0.0),
        normalised_mutual_information=min(max(mi, 0.0) / floor, 1.0) if floor > 1e-12 else 0.0)


def _entropy_bits(p: torch.Tensor) -> float:
    nonzero = p[p > 0]
    return float(-(nonzero * torch.log2(nonzero)).sum())


def share_by_position(hits_N: torch.Tensor, positions_N: torch.Tensor,
                      length: int) -> torch.Tensor:
    """``[L]``: at each position of a window, the share of its tokens that hit (0 where the
    layer saw no token at that position)."""
    seen_L = torch.bincount(positions_N, minlength=length).double()
    hit_L = torch.bincount(positions_N, weights=hits_N.double(), minlength=length)
    return hit_L / seen_L.clamp_min(1.0)


def unit_usage(choice_NK: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[K, S]``: for each block of a Sparse FF layer, the share of the tokens that chose each
    of its units (each row sums to 1)."""
    n, blocks = choice_NK.shape
    counts_KS = torch.zeros(blocks, block_size, dtype=torch.float64)
    block_idx_NK = torch.arange(blocks).expand(n, blocks)
    counts_KS.index_put_((block_idx_NK.reshape(-1), choice_NK.reshape(-1).long()),
                         torch.ones(n * blocks, dtype=torch.float64), accumulate=True)
    return counts_KS / counts_KS.sum(dim=1, keepdim=True).clamp_min(1.0)


def evenness(usage_KS: torch.Tensor) -> torch.Tensor:
    """``[K]``: the normalised entropy ``H(usage) / ln S`` of each row, 1 where every unit is
    chosen equally often and 0 where one unit is always chosen (0 for a block of one unit)."""
    size = usage_KS.shape[1]
    if size < 2:
        return torch.zeros(usage_KS.shape[0], dtype=torch.float64)
    logs_KS = torch.where(usage_KS > 0, usage_KS.log(), torch.zeros_like(usage_KS))
    return -(usage_KS * logs_KS).sum(dim=1) / math.log(size)
