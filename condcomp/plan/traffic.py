"""What a step moves and computes: the MoE all-to-all under expert parallelism, and FLOPs.

All-to-all, as torchtitan's expert parallelism exchanges tokens: per MoE layer and
micro-batch each rank sends its routed slots
(``tokens * k`` rows of d_model values in the compute dtype) to the ranks holding their
experts, and receives the outputs back; the backward sends the gradients of both the same
way. Four exchanges of that size, of which the share (ep - 1) / ep leaves the rank when routing
is balanced. The exchange of the per-expert counts (ep * E / ep integers) is left out. All
slots are counted, so a capacity-limited layer that drops slots before sending them moves a
little less.
"""

from __future__ import annotations

from dataclasses import dataclass

from condcomp.conditional.moe import MoE
from condcomp.model import TransformerLM

EXCHANGES = 4  # dispatch and combine, forward and backward
TRAINING_FLOPS = 3  # forward + a backward of twice the forward


@dataclass(frozen=True)
class AllToAll:
    """Bytes one rank sends per step, over all its micro-batches."""

    ep: int
    world_size: int
    moe_layers: int
    per_layer: int  # the largest MoE layer's
    per_step: int  # all MoE layers

    @property
    def leaving_share(self) -> float:
        return (self.ep - 1) / self.ep

    @property
    def leaving_per_layer(self) -> int:
        return round(self.per_layer * self.leaving_share)

    @property
    def leaving_per_step(self) -> int:
        return round(self.per_step * self.leaving_share)

    @property
    def world_leaving_per_step(self) -> int:
        """Bytes that cross between ranks in one step, all ranks together."""
        return self.leaving_per_step * self.world_size

    def as_dict(self) -> dict[str, float]:
        return {"ep": self.ep, "moe_layers": self.moe_layers,
                "per_layer_bytes": self.per_layer, "per_step_bytes": self.per_step,
                "leaving_share": self.leaving_share,
                "leaving_per_layer_bytes": self.leaving_per_layer,
                "leaving_per_step_bytes": self.leaving_per_step,
                "world_leaving_per_step_bytes": self.world_leaving_per_step}


def all_to_all(model: TransformerLM, ep: int, world_size: int, tokens_per_micro_batch: int,
               accum: int, compute_bytes: int) -> AllToAll:
    """The all-to-all of every MoE layer; none when ``ep = 1`` (the tokens stay home)."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    sent = [0 if ep == 1 else _layer_bytes(m, tokens_per_micro_batch, compute_bytes) * accum
            for m in layers]
    return AllToAll(ep, world_size, len(layers), max(sent, default=0), sum(sent))


def _layer_bytes(moe: MoE, tokens: int, compute_bytes: int) -> int:
    """One rank's bytes per micro-batch through one MoE layer's four exchanges."""
    if moe.routing_mode == "expert_choice":
        slots = moe.num_experts * min(tokens, max(1, int(moe.capacity_factor * tokens
                                                         / moe.num_experts)))
    else:
        slots = tokens * moe.top_k
    return EXCHANGES * slots * moe.d_model * compute_bytes


@dataclass(frozen=True)
class Flops:
    """Training FLOPs: 3 x the forward's (``model.flops_per_token``) x the tokens."""

    forward_per_token: float
    per_step: float  # all ranks
    per_rank: float

    def as_dict(self) -> dict[str, float]:
        return {"forward_per_token": self.forward_per_token, "per_step": self.per_step,
                "per_rank": self.per_rank}


def training_flops(model: TransformerLM, seq_len: int, tokens_per_step: int,
                   world_size: int) -> Flops:
    forward = model.flops_per_token(seq_len)
    per_step = TRAINING_FLOPS * forward * tokens_per_step
    return Flops(forward, per_step, per_step / world_size)
