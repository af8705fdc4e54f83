"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258): a block only some tokens enter.

A scalar router scores each token, ``r_i = w . x_i``. In training each sequence sends its
top-k tokens by ``r`` through the block (k = ``capacity * T``, at least 1); only they are
gathered, attend among themselves (causally, by their original positions) and run the FFN,
so the compute and memory saved are real. Their output is ``x_i + r_i * f(x)_i`` (eq. 1: the
block's update is scaled by the router weight, which gives the router its gradient; the
residual is never scaled); every other token passes through unchanged.

``router_weight`` says what scales the update: ``"logit"`` is eq. 1's raw ``r_i``;
``"sigmoid"`` is ``sigmoid(r_i)``, the same monotone function of the same score (so the same
tokens are chosen, and the same ``sigmoid(r) > 0.5`` rule decodes) but bounded in (0, 1) and
0.5 at initialisation. With the raw logit a routed block starts almost switched off: a small
init gives ``|r|`` of a few thousandths, so the block's update is scaled away until the router
has grown (see docs/results.md, "Quality at fewer FLOPs per token").

Top-k over a sequence looks at future tokens, so it cannot route while decoding (sec. 3.5).
The paper's two fixes are both here (``decode_router``):

- ``"aux_loss"``: a binary cross-entropy loss on the router logits against top-k membership;
  at decode a token enters the block when ``sigmoid(r) > 0.5``.
- ``"predictor"``: a small MLP on the router's input under stop-gradient, trained by BCE on
  top-k membership (the LM loss is untouched); at decode its decision routes the token.

In eval mode (validation and generation) routing is that causal per-token decision, so the
validation loss is the one generation sees. A token that skips a routed block writes no K/V
there: the block's KV cache holds only the tokens that went through it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from condcomp import registry
from condcomp.config import ModelConfig
from condcomp.errors import ConfigError
from condcomp.model.accounting import active_param_count
from condcomp.model.block import Block
from condcomp.model.mlp import MLP
from condcomp.model.rope import Positions
from condcomp.ranges import MAX_LOSS_WEIGHT, MAX_SIZE, ranged

DECODE_ROUTERS = ("aux_loss", "predictor")
ROUTER_WEIGHTS = ("logit", "sigmoid")


class MixtureOfDepths(nn.Module):
    """Wraps a block (anything mapping ``(x[B, K, D], positions) -> update[B, K, D]``).

    Weights: ``router.weight`` ``[1, D]`` (bias-free linear) and, with the predictor,
    ``predictor.0.weight`` ``[H, D]`` / ``predictor.2.weight`` ``[1, H]``. After each forward
    ``aux_loss`` holds the routing BCE and ``stats`` the routed fraction and the predictor's
    accuracy.
    """

    # Device types on which a compiled batch-1 decode step decides on the device whether a token
    # enters the block (torch.cond skips it, or it runs and a select keeps its update): CUDA,
    # where a host sync drains the device's queue and keeps CUDA graphs from the step (the
    # ``bool(tensor)`` of a host-side ``if`` breaks the graph). Elsewhere the decision is
    # read on the host and a skipped block costs nothing, the step's graph breaking there: on
    # the CPU that decodes 1.54x faster than the dense model (docs/benchmarks.md).
    DEVICE_DECISION = ("cuda",)
    # FFN-slot layers whose forward mutates nothing, so that a device decision can skip the
    # block inside ``torch.cond``. The others (an MoE, MoT, Sparse FF) rewrite their
    # ``aux_loss`` / ``stats`` on every forward, a side effect torch.cond refuses in a branch:
    # their blocks run and are selected (:meth:`_decode_one_selected`).
    SKIPPABLE_FFNS: tuple[type[nn.Module], ...] = (MLP,)

    def decides_on_host(self, device_type: str) -> bool:
        """Whether a compiled decode step on ``device_type`` reads the decision on the host
        (:func:`condcomp.generate.compile_decode_step` then lets the graph break)."""
        return device_type not in self.DEVICE_DECISION

    def _decides_on_device(self, device_type: str) -> bool:
        """Whether this batch-1 decode step decides on the device: ``torch.compile`` traces it
        for a device of ``DEVICE_DECISION``."""
        return torch.compiler.is_compiling() and not self.decides_on_host(device_type)

    def __init__(self, block: nn.Module, d_model: int, capacity: float = 0.125,
                 decode_router: str = "aux_loss", aux_loss_coef: float = 1e-2,
                 predictor_hidden: int = 0, router_weight: str = "logit") -> None:
        super().__init__()
        check_mod_options(capacity, decode_router, aux_loss_coef, router_weight)
        self.block = block
        self.d_model, self.capacity, self.decode_router = d_model, capacity, decode_router
        self.router_weight = router_weight
        self.aux_loss_coef = aux_loss_coef
        self.router = nn.Linear(d_model, 1, bias=False)
        self.predictor = None
        if decode_router == "predictor":
            hidden = predictor_hidden or max(8, d_model // 8)
            self.predictor = nn.Sequential(nn.Linear(d_model, hidden, bias=False), nn.SiLU(),
                                           nn.Linear(hidden, 1, bias=False))
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)
        # What aux_loss points to outside training: no allocation (a fill kernel on CUDA) in
        # every routed block of every decode step.
        self.register_buffer("_no_loss", torch.zeros(()), persistent=False)
        self.stats: dict[str, torch.Tensor | float] = {}
        self.routed_BT: torch.Tensor | None = None  # the last forward's decisions (for reports)

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        if self.predictor is not None:
            nn.init.normal_(self.predictor[0].weight, std=std)
            nn.init.normal_(self.predictor[2].weight, std=std)

    # ------------------------------------------------------------------ accounting

    def tokens_in_block(self, seq_len: int) -> int:
        """k: the tokens of a sequence that enter the block in training."""
        return max(1, int(self.capacity * seq_len))

    def active_params(self) -> int:
        """Router and predictor for every token; the block's for the routed share of them."""
        own = sum(p.numel() for name, p in self.named_parameters()
                  if not name.startswith("block."))
        return own + round(self.capacity * active_param_count(self.block))

    def flops_per_token(self, seq_len: int) -> float:
        """Router (and predictor) for every token; the block for the k/T routed ones, whose
        attention spans only the k routed tokens."""
        k = self.tokens_in_block(seq_len)
        flops = 2.0 * self.d_model + (k / seq_len) * self.block.flops_per_token(k)
        if self.predictor is not None:
            flops += 2.0 * sum(p.numel() for p in self.predictor.parameters())
        return flops

    # ------------------------------------------------------------------ forward

    def forward(self, x_BTD: torch.Tensor, positions: Positions) -> torch.Tensor:
        B, T, D = x_BTD.shape
        r_BT = self.router(x_BTD).squeeze(-1).float()
        predictor_BT = (self.predictor(x_BTD.detach()).squeeze(-1).float()
                        if self.predictor is not None else None)
        if self.training:
            k = self.tokens_in_block(T)
            idx_BK = torch.topk(r_BT, k, dim=1, sorted=False).indices.sort(dim=1).values
            valid_BK = None
            chosen_BT = torch.zeros(B, T, dtype=torch.bool, device=x_BTD.device)
            chosen_BT.scatter_(1, idx_BK, True)
            self.aux_loss = self._routing_loss(r_BT, predictor_BT, chosen_BT)
            decision_BT = (predictor_BT if predictor_BT is not None else r_BT) > 0
            with torch.no_grad():
                self.stats = {"routed_fraction": chosen_BT.float().mean(),
                              "routed_over_capacity": share_over_capacity(chosen_BT,
                                                                          self.capacity),
                              "decode_over_capacity": share_over_capacity(decision_BT,
                                                                          self.capacity),
                              "predictor_accuracy": decode_agreement(decision_BT, chosen_BT),
                              "router_score_hist": score_histogram(r_BT)}
        else:
            # Causal routing: each token decides alone (sigmoid(logit) > 0.5 <=> logit > 0).
            chosen_BT = (predictor_BT if predictor_BT is not None else r_BT) > 0
            self.aux_loss = self._no_loss
            self.routed_BT = chosen_BT
            self.stats = {"routed_fraction": chosen_BT.float().mean()}
            if B * T == 1:  # batch-1 decoding (a histogram of one score would say nothing)
                return self._decode_one(x_BTD, positions, r_BT, chosen_BT)
            self.stats["router_score_hist"] = score_histogram(r_BT)
            idx_BK, valid_BK = ragged_selection(chosen_BT)
            if idx_BK.shape[1] == 0:  # no token of the batch enters the block
                return x_BTD
        x_BKD = torch.gather(x_BTD, 1, idx_BK.unsqueeze(-1).expand(-1, -1, D))
        update_BKD = self.block(x_BKD, positions.select(idx_BK, valid_BK))
        new_BKD = self._add_update(x_BKD, torch.gather(r_BT, 1, idx_BK), update_BKD)
        if valid_BK is not None:
            new_BKD = torch.where(valid_BK.unsqueeze(-1), new_BKD, x_BKD)
        return x_BTD.scatter(1, idx_BK.unsqueeze(-1).expand(-1, -1, D), new_BKD)

    def _decode_one(self, x_11D: torch.Tensor, positions: Positions, r_11: torch.Tensor,
                    chosen_11: torch.Tensor) -> torch.Tensor:
        """Batch-1 decoding of one token: the block runs on it or not at all. The same result
        as the ragged selection, without building one (a sort, a gather and a scatter per
        routed block and token). Eager, the decision is read on the host and a skipped block
        costs nothing; traced by ``torch.compile`` on a device of ``DEVICE_DECISION``,
        :meth:`_decode_one_skipping` (or :meth:`_decode_one_selected`) keeps the step one
        graph."""
        if self._decides_on_device(x_11D.device.type):
            if self._skippable_on_device():
                return self._decode_one_skipping(x_11D, positions, r_11, chosen_11)
            return self._decode_one_selected(x_11D, positions, r_11, chosen_11)
        if not bool(chosen_11):  # a host sync, as the ragged selection's count is
            return x_11D
        return self._add_update(x_11D, r_11, self.block(x_11D, positions))

    def _skippable_on_device(self) -> bool:
        """Whether :meth:`_decode_one_skipping` can decode this block: a :class:`Block` (it
        splits its cached forward at the KV-cache write) whose attention projects keys and
        values apart from queries (the dense family; Sparse QKV does not, and a
        Mixture-of-Depths block refuses it anyway) and whose FFN mutates nothing."""
        return (isinstance(self.block, Block) and self.block.attn.splits_qkv()
                and isinstance(self.block.ffn, self.SKIPPABLE_FFNS))

    def _decode_one_skipping(self, x_11D: torch.Tensor, positions: Positions,
                             r_11: torch.Tensor, chosen_11: torch.Tensor) -> torch.Tensor:
        """The same token without a host sync, the block's work skipped when it was not chosen.

        ``torch.cond`` runs one of two branches on a device-side predicate, but its branches may
        not mutate their inputs, and the block's attention writes the KV cache. So the write
        comes first, outside the branches and whatever the decision: the token's keys and
        values land in its own slot, marked filled only if the token was chosen (the padding
        entry of a one-token ragged selection, ``valid_BT = chosen``: a slot no later token
        reads otherwise). The chosen branch reads the cache as it now is for the rest of the
        block (the query projection, attention, output layer, FFN) and adds the update (eq. 1);
        the other returns the token unchanged. Eager, torch.cond runs only the branch taken;
        compiled, the step stays one graph. Inductor (torch 2.13) lowers the cond to a
        host-side ``if`` on the predicate and records CUDA graphs for the pieces between; the
        ``"cudagraphs"`` backend captures it as CUDA-graph conditional nodes
        (``torch._higher_order_ops.cudagraph_conditional_nodes``)."""
        visible_111L = self.block.write_kv(x_11D, replace(positions, valid_BT=chosen_11))

        def enter(x_11D: torch.Tensor, r_11: torch.Tensor, visible_111L: torch.Tensor
                  ) -> torch.Tensor:
            update_11D = self.block.update_from_cache(x_11D, positions, visible_111L)
            return self._add_update(x_11D, r_11, update_11D)

        def skip(x_11D: torch.Tensor, r_11: torch.Tensor, visible_111L: torch.Tensor
                 ) -> torch.Tensor:
            return x_11D.clone()  # a branch's output may not alias its input

        return torch.cond(chosen_11.reshape(()), enter, skip, (x_11D, r_11, visible_111L))

    def _decode_one_selected(self, x_11D: torch.Tensor, positions: Positions,
                             r_11: torch.Tensor, chosen_11: torch.Tensor) -> torch.Tensor:
        """The same token without a host sync: the block runs whatever the router decided and
        a select keeps its update only where the token was chosen.

        The decision masks the KV-cache write too: a token that skips the block is a padding
        entry of a one-token ragged selection (``valid_BT = chosen``), whose keys land in its
        own slot without marking it filled, so no later token reads them. Used for a block
        :meth:`_decode_one_skipping` cannot skip (its FFN keeps statistics); a host-side ``if``
        would break the graph, which keeps CUDA graphs ("reduce-overhead") from the step. At
        batch 1 the routed block's extra work is one pass over its weights, where each host
        sync drains the device's queue."""
        routed = replace(positions, valid_BT=chosen_11)
        new_11D = self._add_update(x_11D, r_11, self.block(x_11D, routed))
        return torch.where(chosen_11.unsqueeze(-1), new_11D, x_11D)

    def _add_update(self, x_BKD: torch.Tensor, r_BK: torch.Tensor,
                    update_BKD: torch.Tensor) -> torch.Tensor:
        """Eq. 1 for routed tokens: ``x + w(r) * f(x)``, where ``w`` is the router logit
        itself or its sigmoid (``router_weight``); the residual is never scaled."""
        weight_BK = torch.sigmoid(r_BK) if self.router_weight == "sigmoid" else r_BK
        return x_BKD + weight_BK.unsqueeze(-1).to(update_BKD.dtype) * update_BKD

    def _routing_loss(self, r_BT: torch.Tensor, predictor_BT: torch.Tensor | None,
                      chosen_BT: torch.Tensor) -> torch.Tensor:
        target_BT = chosen_BT.float()
        if predictor_BT is not None:
            # The predictor sees stop-gradient inputs: this loss trains it alone.
            return F.binary_cross_entropy_with_logits(predictor_BT, target_BT)
        return self.aux_loss_coef * F.binary_cross_entropy_with_logits(r_BT, target_BT)

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity}, decode_router={self.decode_router}, "
                f"router_weight={self.router_weight}")


def share_over_capacity(routed_BT: torch.Tensor, capacity: float) -> torch.Tensor:
    """The share of tokens ``routed_BT`` sends into the block, over ``capacity``: 1 when it
    spends the compute the config plans; above 1 more, below 1 less. Training's top-k sits at
    1 (below only by rounding k down); the causal decode rule is free to drift from it."""
    return routed_BT.float().mean() / capacity


def decode_agreement(decision_BT: torch.Tensor, chosen_BT: torch.Tensor) -> torch.Tensor:
    """The share of tokens on which the causal decode decision (``sigmoid(r) > 0.5``, or the
    predictor's) equals top-k membership: how closely decoding routes as training did
    (Raposo et al. 2024, sec. 3.5)."""
    return (decision_BT == chosen_BT).float().mean()


SCORE_BINS, SCORE_RANGE = 16, 4.0


def score_histogram(r_BT: torch.Tensor) -> torch.Tensor:
    """Share of router scores in 16 equal bins over [-4, 4] (outliers clamped to the ends)."""
    with torch.no_grad():
        clamped = r_BT.detach().float().clamp(-SCORE_RANGE, SCORE_RANGE)
        counts = torch.histc(clamped, bins=SCORE_BINS, min=-SCORE_RANGE, max=SCORE_RANGE)
        return counts / counts.sum().clamp_min(1.0)


def ragged_selection(chosen_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[B, K]`` of each sequence's chosen tokens in order, K the largest count in the
    batch; shorter rows are padded with tokens that were *not* chosen (so a pad never shares a
    KV-cache slot with a routed token), and ``valid_BK`` says which entries are real.
    Pads come after every real entry, so causal attention never lets a real token see one."""
    B, T = chosen_BT.shape
    arange_T = torch.arange(T, device=chosen_BT.device)
    key_BT = (~chosen_BT).long() * T + arange_T  # chosen first, each group in position order
    order_BT = torch.argsort(key_BT, dim=1)
    K = int(chosen_BT.sum(dim=1).max())  # a host sync: eval only
    idx_BK = order_BT[:, :K]
    return idx_BK, torch.gather(chosen_BT, 1, idx_BK)


def check_mod_options(capacity: float, decode_router: str, aux_loss_coef: float,
                      router_weight: str, key: str = "MixtureOfDepths") -> None:
    if not 0.0 < capacity <= 1.0:
        raise ConfigError(f"{key}.capacity = {capacity} must be in (0, 1]; the paper's best is "
                          "0.125 (12.5% of the tokens enter the block)")
    if decode_router not in DECODE_ROUTERS:
        raise ConfigError(f"{key}.decode_router = {decode_router!r} is unknown; use one of "
                          f"{DECODE_ROUTERS}")
    if aux_loss_coef < 0:
        raise ConfigError(f"{key}.aux_loss_coef = {aux_loss_coef} must not be negative")
    if router_weight not in ROUTER_WEIGHTS:
        raise ConfigError(f"{key}.router_weight = {router_weight!r} is unknown; use one of "
                          f"{ROUTER_WEIGHTS}")


@dataclass
class MoDOptions:
    """``[model.wrapper]`` keys of ``kind = "mod"`` (use ``layers = "odd"`` for the paper's
    every-other-block layout)."""

    capacity: float = ranged(0.125, gt=0.0, le=1.0)
    decode_router: str = "aux_loss"  # aux_loss | predictor
    # weight of the BCE on the router logits (aux_loss mode)
    aux_loss_coef: float = ranged(1e-2, ge=0.0, le=MAX_LOSS_WEIGHT)
    predictor_hidden: int = ranged(0, ge=0, le=MAX_SIZE)  # 0: d_model / 8
    router_weight: str = "logit"  # logit (eq. 1) | sigmoid: what scales the block's update

    def validate(self, cfg: ModelConfig) -> None:
        check_mod_options(self.capacity, self.decode_router, self.aux_loss_coef,
                          self.router_weight, "model.wrapper")


def _build(options: MoDOptions, cfg: ModelConfig, layer_idx: int | None) -> MixtureOfDepths:
    assert layer_idx is not None
    return MixtureOfDepths(Block(cfg, layer_idx), cfg.d_model, options.capacity,
                           options.decode_router, options.aux_loss_coef, options.predictor_hidden,
                           options.router_weight)


registry.register(registry.Family("mod", "wrapper", MoDOptions, _build, "mixture-of-depths"))


@torch.no_grad()
def blocks_per_token(model: nn.Module, tokens_1T: torch.Tensor) -> list[int] | None:
    """How many blocks each token of ``tokens_1T`` went through, with the causal (decode-time)
    routing; ``None`` when the model has no Mixture-of-Depths layer."""
    was_training = model.training
    model.eval()
    try:
        model(tokens_1T)
    finally:
        model.train(was_training)
    depth_T = torch.zeros(tokens_1T.shape[1], dtype=torch.long)
    routed = False
    for layer in model.layers:
        if isinstance(layer, MixtureOfDepths):
            routed = True
            depth_T += layer.routed_BT[0].cpu().long()
        else:
            depth_T += 1
    return depth_T.tolist() if routed else None
