"""The experts of an MoE layer: E feed-forward networks with stacked weights.

Layout (docs/design.md, the layer contract): ``w1`` ``[E, D, H]`` (the gate for SwiGLU),
``w2`` ``[E, H, D]``, and for gated activations ``w3`` ``[E, D, H]`` (the up projection):
``y_e = (act(x @ w1[e]) * (x @ w3[e])) @ w2[e]``.

Three ways to run them, one per shape of work:

- :meth:`GroupedExperts.forward_sorted`: tokens sorted by expert, one grouped GEMM per
  projection (token choice in training and prefill);
- :meth:`GroupedExperts.forward_gathered`: each routed slot reads its expert's weights
  directly (decode: a few tokens, so reading k experts' weights beats sorting): on the CPU as
  ``embedding_bag`` sums over the expert's rows, on CUDA as a gathered copy and a batched
  product;
- :meth:`GroupedExperts.forward_batched`: every expert has the same number of tokens
  ``[E, C, D]`` (expert choice), a plain batched matmul.

Under expert parallelism (:func:`condcomp.distributed.expert_parallel.shard_experts`) the
weights are DTensors sharded on the expert dimension and ``ep_group`` is set: the sorted and
batched paths send the rows to the ranks that hold their experts and compute there on the
local shard; the gathered path, which needs every expert locally, is not used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.distributed.expert_parallel import forward_batched_ep, forward_sorted_ep
from condcomp.kernels.expert_ffn import check_expert_kernel, swiglu_experts
from condcomp.kernels.grouped_gemm import grouped_mm
from condcomp.kernels.permute import combine_rows, dispatch_rows

_ACT = {"relu": F.relu, "gelu": F.gelu, "swiglu": F.silu}


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype for ``x``'s device, or None outside autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class GroupedExperts(nn.Module):
    MATRIX_WEIGHTS = ("w1", "w2", "w3")  # bf16-storable (condcomp.master_weights)
    # The entry points the MoE layer calls instead of forward() (for FSDP's hooks).
    FSDP_FORWARD_METHODS = ("forward_dispatched", "forward_batched")

    def __init__(self, num_experts: int, d_model: int, d_expert: int,
                 activation: str = "swiglu", dropout: float = 0.0,
                 kernel: str = "grouped_mm") -> None:
        super().__init__()
        check_expert_kernel(kernel, "expert_kernel", gated=activation == "swiglu",
                            dropout=dropout)
        # What forward_dispatched runs the experts with (condcomp.kernels.expert_ffn).
        self.kernel = kernel
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation = activation
        self.gated = activation == "swiglu"
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_expert)) if self.gated else None
        # Switch (sec. 3.3) uses a higher dropout inside the experts than elsewhere.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # The expert-parallel process group, set by shard_experts; None: every expert is here.
        self.ep_group = None
        self.init_weights(0.02, 0.02)

    def init_weights(self, std: float, residual_std: float) -> None:
        # Each expert is initialised as the dense MLP would be, so an MoE starts where dense does.
        nn.init.normal_(self.w1, std=std)
        if self.w3 is not None:
            nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=residual_std)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``w1, w2, w3`` of the experts this rank computes: all of them, or under expert
        parallelism the local shard (``L = E / ep`` experts). Plain tensors, as torchtitan's
        ``GroupedExperts`` does with ``to_local()``: the exchanged rows have data-dependent
        shapes, which DTensor does not express."""
        if self.ep_group is None:
            return self.w1, self.w2, self.w3
        w3 = None if self.w3 is None else self.w3.to_local()
        return self.w1.to_local(), self.w2.to_local(), w3

    def _hidden(self, gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
        h = _ACT[self.activation](gate)
        if up is not None:
            h = h * up
        return self.dropout(h) if self.dropout is not None else h

    def forward_sorted(self, x_MD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Rows of ``x_MD`` grouped by expert (``offsets_E``: cumulative ends, the last one
        ``M``: every row belongs to an expert), through the experts this rank holds."""
        w1, w2, w3 = self.local_weights()
        if w3 is not None:
            # Gate and up projections as one grouped GEMM over [w1 | w3]: x is read once and
            # the GEMM is twice as wide (narrow fine-grained experts use the tensor cores
            # poorly). The weights stay separate parameters: their layout is the contract.
            # Under autocast they are cast before the concatenation, which then moves half
            # the bytes.
            dtype = _compute_dtype(x_MD) or w1.dtype
            w13 = torch.cat([w1.to(dtype), w3.to(dtype)], dim=-1)
            gate, up = grouped_mm(x_MD, w13, offsets_E, all_rows=True).chunk(2, dim=-1)
        else:
            gate, up = grouped_mm(x_MD, w1, offsets_E, all_rows=True), None
        return grouped_mm(self._hidden(gate, up), w2, offsets_E, all_rows=True)

    def forward_dispatched(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                           weights_TK: torch.Tensor, kept_TK: torch.Tensor | None = None
                           ) -> torch.Tensor:
        """Token choice through the grouped GEMMs: permute the (token, slot) pairs so each
        expert's rows are contiguous, run :meth:`forward_sorted`, and un-permute each token's
        ``k`` outputs into ``sum_j weights_TK[t, j] * out[t, j]``, ``[T, D]``. ``kept_TK``
        (None: every slot is kept) marks the slots that capacity, padding or a no-op expert
        left out; they add nothing. Under expert parallelism they also stay on this rank.
        With ``kernel`` other than ``"grouped_mm"`` the experts run through
        :func:`~condcomp.kernels.expert_ffn.swiglu_experts` instead (no permuted copy); under
        expert parallelism the rows travel to their experts' ranks, on the grouped-GEMM path."""
        from condcomp.conditional.routing import count_per_expert

        T, K = expert_ids_TK.shape
        E = self.num_experts
        # Permute in the compute dtype: the permuted copy is k times the activations.
        x_TD = x_TD.to(_compute_dtype(x_TD) or x_TD.dtype)
        ids_N = expert_ids_TK.reshape(-1)
        if kept_TK is not None:
            ids_N = torch.where(kept_TK.reshape(-1), ids_N, E)  # a virtual expert E, sorted last
        order_N = torch.argsort(ids_N, stable=True)
        counts_E = count_per_expert(ids_N, E + 1)[:E]
        if self.kernel != "grouped_mm" and self.ep_group is None:
            # Rows gathered by index as the kernels load them: no permuted copy of x. Slots
            # not kept sort past the last offset and add nothing.
            return swiglu_experts(x_TD, self.w1, self.w2, self.w3, order_N,
                                  torch.cumsum(counts_E, 0), weights_TK, impl=self.kernel)
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
        x_ND = dispatch_rows(x_TD, order_N, inverse_N, K)
        if self.ep_group is not None:
            out_ND = forward_sorted_ep(self, x_ND, counts_E)
            return combine_rows(out_ND, weights_TK, order_N, inverse_N)
        offsets_E = torch.cumsum(counts_E, 0)
        if kept_TK is not None:
            # Slots not kept sort to the end. The last expert's group takes them in, fed zero
            # rows, so that every row belongs to a group (the grouped kernel leaves rows outside
            # every group unwritten): a zero row comes out exactly zero (no biases, act(0) = 0)
            # and adds nothing to that expert's weight gradient.
            x_ND = torch.where((ids_N[order_N] < E).unsqueeze(1), x_ND, x_ND.new_zeros(()))
            offsets_E = torch.cat([offsets_E[:-1], offsets_E.new_full((1,), ids_N.numel())])
        out_ND = self.forward_sorted(x_ND, offsets_E)
        # Un-permute by a gather with the inverse permutation: deterministic (no atomics),
        # unlike index_add, and so is the backward (condcomp.kernels.permute).
        return combine_rows(out_ND, weights_TK, order_N, inverse_N)

    def forward_gathered(self, x_ND: torch.Tensor, expert_ids_N: torch.Tensor) -> torch.Tensor:
        """Row n through expert ``expert_ids_N[n]`` (decode: a few rows, no gradient needed
        beyond what autograd gives the ops below)."""
        if self.ep_group is not None:
            raise RuntimeError("the gathered path needs every expert on this rank; under "
                               "expert parallelism use forward_dispatched")
        if x_ND.device.type == "cpu":
            return self._forward_bags(x_ND, expert_ids_N)
        x_N1D = x_ND.unsqueeze(1)
        gate = torch.bmm(x_N1D, self.w1[expert_ids_N].to(x_ND.dtype))
        up = torch.bmm(x_N1D, self.w3[expert_ids_N].to(x_ND.dtype)) if self.w3 is not None else None
        return torch.bmm(self._hidden(gate, up), self.w2[expert_ids_N].to(x_ND.dtype)).squeeze(1)

    def _forward_bags(self, x_ND: torch.Tensor, expert_ids_N: torch.Tensor) -> torch.Tensor:
        """Each product as an ``embedding_bag`` over the expert's rows of the stacked weight:
        ``x @ w1[e] = sum_d x[d] * w1[e, d, :]``, the D rows of ``w1.view(E * D, H)`` from
        ``e * D`` weighted by ``x``. The weights are read once, in place; gathering
        ``w1[ids]`` first copies the k experts' matrices (read, written, read again), which at
        batch-1 decode is most of a step's memory traffic on a CPU. Computed in the weights'
        dtype (``embedding_bag`` weights and table share one)."""
        w1, w2, w3 = self.w1, self.w2, self.w3
        E, D, H = w1.shape
        xw_ND = x_ND.to(w1.dtype)
        rows_ND = expert_ids_N.unsqueeze(1) * D + torch.arange(D, device=x_ND.device)
        gate = F.embedding_bag(rows_ND, w1.view(E * D, H), per_sample_weights=xw_ND, mode="sum")
        up = (F.embedding_bag(rows_ND, w3.view(E * D, H), per_sample_weights=xw_ND, mode="sum")
              if w3 is not None else None)
        h_NH = self._hidden(gate, up)
        rows_NH = expert_ids_N.unsqueeze(1) * H + torch.arange(H, device=x_ND.device)
        y_ND = F.embedding_bag(rows_NH, w2.view(E * H, D), per_sample_weights=h_NH, mode="sum")
        return y_ND.to(x_ND.dtype)

    def forward_batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Expert e on its own ``C`` tokens, ``x_ECD[e]`` (E: every expert, wherever it is)."""
        if self.ep_group is not None:
            return forward_batched_ep(self, x_ECD)
        return self.forward_batched_local(x_ECD)

    def forward_batched_local(self, x_LCD: torch.Tensor) -> torch.Tensor:
        """Local expert l on its own ``C`` tokens, ``x_LCD[l]``."""
        w1, w2, w3 = self.local_weights()
        gate = torch.bmm(x_LCD, w1.to(x_LCD.dtype))
        up = torch.bmm(x_LCD, w3.to(x_LCD.dtype)) if w3 is not None else None
        return torch.bmm(self._hidden(gate, up), w2.to(x_LCD.dtype))

    def flops_per_expert_token(self) -> float:
        """Forward FLOPs for one token through one expert."""
        return 2.0 * self.d_model * self.d_expert * (3 if self.gated else 2)

    def params_per_expert(self) -> int:
        return self.d_model * self.d_expert * (3 if self.gated else 2)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, "
                f"d_expert={self.d_expert}, activation={self.activation}")


@contextlib.contextmanager
def expert_kernel(module: nn.Module, kernel: str) -> Iterator[None]:
    """Every :class:`GroupedExperts` in ``module`` runs its experts with ``kernel`` inside the
    block (a benchmark's or a test's comparison of the paths)."""
    experts = [m for m in module.modules() if isinstance(m, GroupedExperts)]
    saved = [m.kernel for m in experts]
    for m in experts:
        check_expert_kernel(kernel, "expert_kernel", gated=m.gated,
                            dropout=m.dropout.p if m.dropout is not None else 0.0)
        m.kernel = kernel
    try:
        yield
    finally:
        for m, old in zip(experts, saved):
            m.kernel = old
