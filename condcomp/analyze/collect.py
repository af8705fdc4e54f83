"""Recording a model's routing decisions on a text, through forward hooks.

The layers are not changed: hooks read what each conditional layer computes in eval mode (the
routing validation and generation use), and are removed afterwards.

- MoE: a hook on ``router`` keeps its logits; the chosen experts are the layer's own choice,
  recomputed from them by :func:`condcomp.conditional.routing.token_choice` with the layer's
  score, selection bias, expert groups and eval-mode k.
- Mixture-of-Depths: the wrapper leaves its last decisions in ``routed_BT``.
- Sparse FF: a pre-hook keeps the layer's input; eval mode chooses the controller's argmax
  in each block.
- AltUp: hooks keep the embedding and every layer's output, from which
  :mod:`.altup_replay` rebuilds the stream and its coefficients.

A layer inside a Mixture-of-Depths block sees only the tokens that entered it, gathered by
:func:`condcomp.conditional.mod.ragged_selection`; its rows are mapped back to their tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from condcomp.analyze.altup_replay import CoefficientSums
from condcomp.conditional import routing
from condcomp.conditional.altup import AltUp
from condcomp.conditional.mod import MixtureOfDepths, ragged_selection
from condcomp.conditional.moe import MoE
from condcomp.conditional.sparse_ff import SparseFF
from condcomp.runtime import autocast


def eval_top_k(layer: MoE) -> int:
    """The experts a token gets from ``layer`` in eval mode: ``top_k``, or, for expert choice,
    ``round(capacity_factor)`` by token choice (the MoE's eval routing, Zhou et al. 2022 cannot
    route causally)."""
    if layer.routing_mode == "expert_choice":
        return min(layer.num_experts, max(1, round(layer.capacity_factor)))
    return layer.top_k


def choose_experts(layer: MoE, logits_NE: torch.Tensor) -> torch.Tensor:
    """``[N, k]``: the experts ``layer`` routes each row of its router logits to in eval mode
    (ids from ``num_experts`` on are no-op experts)."""
    probs_NE = routing.router_scores(logits_NE, layer.score)
    choice = routing.token_choice(probs_NE, eval_top_k(layer), layer.normalize_topk,
                                  layer.selection_bias, layer.expert_groups,
                                  layer.groups_per_token)
    return choice.expert_ids_TK


@dataclass
class ExpertChoices:
    """One MoE layer's choices: row n is token ``token_idx_N[n]``'s k experts."""

    num_experts: int  # real experts; ids from here on are no-op experts
    num_choices: int
    token_idx_N: torch.Tensor
    expert_ids_NK: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.expert_ids_NK.shape[1]


@dataclass
class UnitChoices:
    """One Sparse FF layer's choices: row n is token ``token_idx_N[n]``'s unit in each block."""

    block_size: int
    token_idx_N: torch.Tensor
    choice_NK: torch.Tensor  # K: the layer's blocks


@dataclass
class Recorded:
    """Every routing decision a model made on the analysed tokens (``T``: all windows'
    positions, flattened window by window)."""

    tokens_T: torch.Tensor
    positions_T: torch.Tensor  # the position of each token in its window
    window: int  # tokens per window
    experts: dict[str, ExpertChoices] = field(default_factory=dict)  # by module path
    depths: dict[str, torch.Tensor] = field(default_factory=dict)  # routed_T of each MoD layer
    units: dict[str, UnitChoices] = field(default_factory=dict)
    altup: CoefficientSums | None = None


def routed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose routing this package analyses, by module path."""
    kinds = (MoE, MixtureOfDepths, SparseFF, AltUp)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


class _Recorder:
    """Hooks on one model and the decisions they have seen, batch by batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = routed_modules(model)
        self.pending: dict[str, torch.Tensor] = {}  # rows of this batch, by module path
        self.outputs: list[torch.Tensor] = []  # AltUp: each layer's output, this batch
        self.emb_BTD: torch.Tensor | None = None
        self.rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.routed: dict[str, list[torch.Tensor]] = {}
        # The Mixture-of-Depths wrapper a module sits in, if any: its rows are routed tokens.
        self.wrapper_of = {name: self.modules[prefix] for name in self.modules
                           for prefix in self.modules
                           if isinstance(self.modules[prefix], MixtureOfDepths)
                           and name.startswith(prefix + ".")}
        stream = getattr(model, "stream", None)
        self.stream = stream if isinstance(stream, AltUp) else None
        self.altup = (CoefficientSums.zeros(len(model.layers), self.stream.k)
                      if self.stream is not None else None)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _Recorder:
        for name, module in self.modules.items():
            if isinstance(module, MoE):
                self.handles.append(module.router.register_forward_hook(
                    lambda _m, _args, logits, name=name: self._keep(name, logits)))
            elif isinstance(module, SparseFF):
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, args, name=name: self._keep_units(name, m, args[0])))
        if self.stream is not None:
            self.handles.append(self.model.tok_emb.register_forward_hook(
                lambda _m, _args, emb: setattr(self, "emb_BTD", emb)))
            for layer in self.model.layers:
                self.handles.append(layer.register_forward_hook(
                    lambda _m, _args, out: self.outputs.append(out)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _keep(self, name: str, logits: torch.Tensor) -> None:
        layer = self.modules[name]
        self.pending[name] = choose_experts(layer, logits.reshape(-1, logits.shape[-1]))

    def _keep_units(self, name: str, layer: SparseFF, x_BTD: torch.Tensor) -> None:
        logits_NKS = layer.controller_logits(x_BTD.reshape(-1, x_BTD.shape[-1]))
        self.pending[name] = logits_NKS.float().argmax(dim=-1)

    def finish_batch(self, tokens_BT: torch.Tensor, offset: int) -> None:
        """File the batch's decisions under the analysed tokens ``offset ..``."""
        B, T = tokens_BT.shape
        for name, module in self.modules.items():
            if isinstance(module, MixtureOfDepths):
                self.routed.setdefault(name, []).append(module.routed_BT.reshape(-1).cpu())
        for name, rows in self.pending.items():
            token_idx = torch.arange(B * T) + offset
            wrapper = self.wrapper_of.get(name)
            if wrapper is not None:  # rows are the tokens that entered the block, padded
                idx_BK, valid_BK = ragged_selection(wrapper.routed_BT.cpu())
                token_idx = (torch.arange(B).unsqueeze(1) * T + idx_BK).reshape(-1) + offset
                keep = valid_BK.reshape(-1)
                token_idx, rows = token_idx[keep], rows[keep.to(rows.device)]
            self.rows.setdefault(name, []).append((token_idx, rows.cpu()))
        if self.altup is not None:
            self.altup.add(self.stream, self.emb_BTD, tokens_BT.to(self.emb_BTD.device),
                           self.outputs)
        self.pending, self.outputs = {}, []

    def recorded(self, tokens_T: torch.Tensor, positions_T: torch.Tensor,
                 window: int) -> Recorded:
        out = Recorded(tokens_T, positions_T, window, altup=self.altup)
        for name, module in self.modules.items():
            parts = self.rows.get(name, [])
            token_idx_N = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0).long()
            if isinstance(module, MoE):
                ids_NK = (torch.cat([p[1] for p in parts]) if parts
                          else torch.zeros(0, eval_top_k(module)).long())
                out.experts[name] = ExpertChoices(module.num_experts,
                                                  module.router.out_features, token_idx_N, ids_NK)
            elif isinstance(module, SparseFF):
                choice_NK = (torch.cat([p[1] for p in parts]) if parts
                             else torch.zeros(0, module.n_blocks).long())
                out.units[name] = UnitChoices(module.block_size, token_idx_N, choice_NK)
            elif isinstance(module, MixtureOfDepths):
                out.depths[name] = torch.cat(self.routed[name])
        return out


@torch.no_grad()
def record_routing(model: nn.Module, windows: Iterable[torch.Tensor], device: torch.device,
                   dtype: torch.dtype | None = None) -> Recorded:
    """Run ``model`` in eval mode over ``windows`` (batches ``[B, L]`` of token ids) and return
    every routing decision it made."""
    was_training = model.training
    model.eval()
    tokens, offset, window = [], 0, 0
    try:
        with _Recorder(model) as recorder:
            for tokens_BL in windows:
                with autocast(device, dtype):
                    model(tokens_BL.to(device))
                recorder.finish_batch(tokens_BL, offset)
                tokens.append(tokens_BL.reshape(-1))
                offset += tokens_BL.numel()
                window = tokens_BL.shape[1]
    finally:
        model.train(was_training)
    tokens_T = torch.cat(tokens).long()
    positions_T = torch.arange(tokens_T.numel()) % max(window, 1)
    return recorder.recorded(tokens_T, positions_T, window)
