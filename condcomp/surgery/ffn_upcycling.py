"""The dense FFN of a block as the FFN slot of a conditional family (``condcomp upcycle``).

A SwiGLU FFN is a sum over its hidden units: ``y = sum_h act(x . w1[:, h]) (x . w3[:, h])
w2[h]``, so cutting the units into chunks and adding the chunks' outputs gives the dense FFN
back exactly. Every mapping here is built on that:

- MoE (Komatsuzaki et al. 2022, "Sparse Upcycling"): each expert a copy of the dense FFN.
  Experts narrower than the FFN ("granular upcycling", Megatron-LM's
  ``moe_upcycling_granularity``; OLMo-core's virtual groups) hold its G chunks: expert ``e``
  holds chunk ``e mod G``, so each run of G consecutive experts holds the whole FFN once, and
  the router's rows are made equal within each run, so a token's scores pick whole runs. With
  combine weights that sum to a constant s (``normalize_topk``, or softmax over every expert),
  the chosen runs give ``s / G`` times the FFN, and ``w2`` times ``G / s`` gives it exactly.
  Shared experts take the first units (all of them, at half weight with the routed experts'
  half, when they are as wide as the FFN).
- Mixture of Tokens: the experts hold the chunks the same way; ``w2`` is scaled so that a
  group of equal tokens (uniform group weights) gets the dense output, which is exact with
  ``group_size = 1``.
- Sparse FF: its units are the dense units (``w1`` transposed to unit-major, ``w2`` as is);
  the controller is fresh, and one unit per block is kept, so the function changes.

Each mapping writes through a :class:`~condcomp.surgery.transplant.Transplant`, which records
what came from where and why the function differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from condcomp.errors import ConfigError
from condcomp.surgery.transplant import Transplant

FFNWeights = dict[str, torch.Tensor]  # "w1" [D, H], "w2" [H, D], "w3" [D, H] (SwiGLU only)


def read_dense_ffn(t: Transplant, prefix: str, names: tuple[str, ...] = ("w1", "w2", "w3")
                   ) -> FFNWeights:
    """The source's dense FFN at ``prefix`` (``layers.1.block.ffn``), the weights in ``names``
    it has."""
    return {w: t.read(f"{prefix}.{w}") for w in names if f"{prefix}.{w}" in t.source}


def hidden_units(ffn: FFNWeights, lo: int, hi: int) -> FFNWeights:
    """The FFN of hidden units ``lo..hi-1`` only: their columns of ``w1``/``w3``, rows of
    ``w2``."""
    return {w: x[lo:hi] if w == "w2" else x[:, lo:hi] for w, x in ffn.items()}


def replicated_chunks(ffn: FFNWeights, lo: int, hi: int, num_experts: int, d_expert: int,
                      key: str) -> tuple[FFNWeights, int]:
    """Units ``lo..hi-1`` cut into G chunks of ``d_expert``, stacked ``[E, ...]`` with chunk
    ``e mod G`` in expert ``e``; returns the stack and G."""
    units = hi - lo
    if units <= 0 or units % d_expert:
        raise ConfigError(f"{key}.d_expert = {d_expert}: experts of that width do not tile the "
                          f"{units} hidden units of the dense FFN they share (d_ff less the "
                          "shared experts); pick a width that divides it")
    G = units // d_expert
    if num_experts % G:
        raise ConfigError(f"{key}.num_experts = {num_experts}: the dense FFN makes {G} chunks "
                          f"of {d_expert} units, which {num_experts} experts cannot hold as "
                          f"whole copies; pick a multiple of {G}")
    chunks = [hidden_units(ffn, lo + c * d_expert, lo + (c + 1) * d_expert) for c in range(G)]
    stacked = {w: torch.stack([chunks[e % G][w] for e in range(num_experts)]) for w in ffn}
    return stacked, G


def add_noise(stacked: FFNWeights, noise: float, generator: torch.Generator) -> FFNWeights:
    """Each expert's weights plus Gaussian noise of ``noise`` times the weight's std, drawn
    apart for every expert, so that copies can drift apart (Komatsuzaki et al. 2022 try it)."""
    if noise <= 0:
        return stacked
    return {w: x + noise * x.std() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
            for w, x in stacked.items()}


def _chunk_note(prefix: str, w: str, G: int, E: int, d_expert: int) -> str:
    if G == 1:
        return f"{prefix}.{w}, copied into each of the {E} experts"
    return (f"{prefix}.{w}, cut into {G} chunks of {d_expert} units, chunk e mod {G} in "
            f"expert e")


def _write_experts(t: Transplant, prefix: str, stacked: FFNWeights, G: int, w2_scale: float,
                   d_expert: int) -> None:
    E = next(iter(stacked.values())).shape[0]
    for w, x in stacked.items():
        how = _chunk_note(prefix, w, G, E, d_expert)
        if w == "w2" and w2_scale != 1.0:
            x, how = x * w2_scale, f"{how}, times {w2_scale:g}"
        t.write(f"{prefix}.experts.{w}", x, how)


def _write_shared(t: Transplant, prefix: str, ffn: FFNWeights, width: int, w2_scale: float
                  ) -> None:
    shared = hidden_units(ffn, 0, width)
    for w, x in shared.items():
        how = f"{prefix}.{w}, units 0..{width - 1}"
        if w == "w2" and w2_scale != 1.0:
            x, how = x * w2_scale, f"{how}, times {w2_scale:g}"
        t.write(f"{prefix}.shared_experts.{w}", x, how)


def upcycle_moe(t: Transplant, prefix: str, moe: nn.Module, noise: float,
                generator: torch.Generator) -> None:
    """The dense FFN at ``prefix`` into the MoE layer ``moe`` (``condcomp.layers.MoE``)."""
    ffn = read_dense_ffn(t, prefix)
    H, E, W = ffn["w2"].shape[0], moe.num_experts, moe.experts.d_expert
    S = moe.shared_experts.d_hidden if moe.shared_experts is not None else 0
    if S > H:
        raise ConfigError(f"model.ffn: the shared experts are {S} units wide, wider than the "
                          f"dense FFN's {H}; make num_shared_experts * d_shared at most {H}")
    # Shared experts as wide as the FFN share its output with the routed ones, half each.
    routed_lo, share = (S, 1.0) if S < H else (0, 0.5)
    if S:
        gate_scale = 1.0
        if moe.shared_gate is not None:
            # Qwen2-MoE's gate sigmoid(g . x) is 1/2 for every token at g = 0.
            t.set(f"{prefix}.shared_gate.weight", torch.zeros_like(moe.shared_gate.weight),
                  "zero: sigmoid(0) = 1/2 for every token, made up for by the shared w2")
            gate_scale = 2.0
        _write_shared(t, prefix, ffn, S, share * gate_scale)
    stacked, G = replicated_chunks(ffn, routed_lo, H, E, W, "model.ffn")
    # The chosen runs of G experts give (sum of combine weights) / G times the FFN; the sum
    # is route_scale when the weights are renormalised (or softmax over every expert).
    _write_experts(t, prefix, add_noise(stacked, noise, generator), G,
                   share * G / moe.route_scale, W)
    if G > 1:
        router = moe.router.weight.detach().clone()
        runs = router[:E].view(E // G, G, -1)
        router[:E] = runs[:, :1].expand_as(runs).reshape(E, -1)
        t.set(f"{prefix}.router.weight", router,
              f"the layer's own init, the rows of each run of {G} experts (one copy of the "
              "dense FFN) made equal")
    _note_moe_routing(t, prefix, moe, G, noise)


def _note_moe_routing(t: Transplant, prefix: str, moe: nn.Module, G: int, noise: float) -> None:
    """Why the upcycled MoE at ``prefix`` does not compute the dense FFN, if it does not."""
    k, E = moe._eval_top_k(), moe.num_experts  # the k of evaluation and generation
    if moe.num_noop_experts:
        t.note(prefix, f"a slot the router sends to one of the {moe.num_noop_experts} no-op "
               "experts skips the FFN")
    elif not (moe.normalize_topk or (moe.score == "softmax" and k == E)):
        t.note(prefix, f"the combine weights of a token's top-{k} experts ({moe.score} scores, "
               "not renormalised) do not sum to a constant, so the FFN's output is scaled "
               "token by token (normalize_topk = true starts as the dense FFN)")
    if 0 < moe.groups_per_token < moe.expert_groups and (E // moe.expert_groups) % G:
        t.note(prefix, f"expert_groups = {moe.expert_groups} cuts runs of {G} experts apart, "
               "so group-limited routing can keep part of a run")
    if k % G:
        t.note(prefix, f"top_k = {k} is not a multiple of the {G} chunks each run of experts "
               "holds, so a token's experts do not add up to the dense FFN once")
    if moe.routing_mode == "expert_choice":
        t.note(prefix, "expert choice lets each expert take its top tokens of the batch, so "
               "a token may get no expert or several", training_only=True)
    elif moe.capacity_factor is not None:
        t.note(prefix, f"capacity_factor = {moe.capacity_factor:g} drops the slots over an "
               "expert's capacity", training_only=True)
    _note_noise(t, prefix, noise)


def _note_noise(t: Transplant, prefix: str, noise: float) -> None:
    if noise > 0:
        t.note(prefix, f"the experts carry noise of {noise:g} times each weight's std")


def upcycle_mot(t: Transplant, prefix: str, mot: nn.Module, noise: float,
                generator: torch.Generator) -> None:
    """The dense FFN at ``prefix`` into the Mixture of Tokens layer ``mot``."""
    ffn = read_dense_ffn(t, prefix)
    H, E, W = ffn["w2"].shape[0], mot.num_experts, mot.experts.d_expert
    S = mot.shared_experts.d_hidden if mot.shared_experts is not None else 0
    if S:
        _write_shared(t, prefix, ffn, S, 1.0)
    stacked, G = replicated_chunks(ffn, S, H, E, W, "model.ffn")
    # E / G copies of each chunk; a group of equal tokens weighs every expert's output by
    # 1 / group_size (eq. 1-3 with equal logits), so w2 times group_size / copies.
    _write_experts(t, prefix, add_noise(stacked, noise, generator), G,
                   mot.group_size / (E // G), W)
    if mot.routing == "token_choice":
        t.note(prefix, f"after the transition to sparse a token goes through one of the {E} "
               "experts, weighed by its controller probability")
    elif mot.group_size > 1:
        t.note(prefix, f"Mixture of Tokens mixes the tokens at one position of "
               f"{mot.group_size} sequences before the experts (Antoniak et al. 2023, "
               "eq. 1-3); only a group of equal tokens gets the dense output")
    _note_noise(t, prefix, noise)


def upcycle_sparse_ff(t: Transplant, prefix: str, sparse_ff: nn.Module, noise: float,
                      generator: torch.Generator) -> None:
    """The dense FFN at ``prefix`` as Sparse FF's units, with a fresh controller."""
    ffn = read_dense_ffn(t, prefix, ("w1", "w2"))
    H = ffn["w2"].shape[0]
    if sparse_ff.d_ff != H:
        raise ConfigError(f"model.ffn.d_ff = {sparse_ff.d_ff}: Sparse FF is upcycled unit for "
                          f"unit, so it must be the dense FFN's width, {H}")
    t.write(f"{prefix}.w1", ffn["w1"].t(), f"{prefix}.w1, transposed to unit-major")
    t.write(f"{prefix}.w2", ffn["w2"], f"{prefix}.w2")
    t.note(prefix, f"Sparse FF keeps one ReLU unit in each block of {sparse_ff.block_size}, "
           "chosen by a fresh controller (Jaszczur et al. 2021, sec. 3.1)")
    if f"{prefix}.w3" in t.source:
        t.note(prefix, "Sparse FF's units are ReLU(x W1): the dense SwiGLU gate (w1) becomes "
               "W1 and the up projection (w3) is left out")


FFNUpcycler = Callable[[Transplant, str, nn.Module, float, torch.Generator], None]
# By the config's model.ffn.kind; "mlp" layers are copied by name.
FFN_UPCYCLERS: dict[str, FFNUpcycler] = {
    "moe": upcycle_moe,
    "mot": upcycle_mot,
    "sparse_ff": upcycle_sparse_ff,
}
