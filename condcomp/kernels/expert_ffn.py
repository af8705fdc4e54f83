"""A token-choice MoE's SwiGLU experts from the tokens, without a permuted copy: which
implementation runs them, and which one the MoE layer uses.

:func:`swiglu_experts` computes ``y[t] = sum_j weights_TK[t, j] * ffn_e(x[t])`` (``e`` the
expert of slot ``t * k + j``) as the gather-on-load Triton kernels
(:mod:`condcomp.kernels.triton_moe`) or their plain PyTorch reference
(:mod:`condcomp.kernels.moe_reference`): ``impl = "auto"`` takes the kernels for CUDA tensors
when Triton is installed and the reference otherwise; ``"triton"`` and ``"reference"`` force
one (``"triton"`` on CPU tensors runs in Triton's interpreter, ``TRITON_INTERPRET=1``).

The MoE layer keeps its grouped-GEMM path (``torch._grouped_mm`` on CUDA) unless its
``expert_kernel`` (``[model.ffn] expert_kernel``) selects one of these: the kernels are held to
the reference by the tests but not yet timed against ``torch._grouped_mm`` on a GPU
(``condcomp bench moe --expert-kernel triton`` does that).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from condcomp.errors import CondcompError, ConfigError
from condcomp.kernels.moe_reference import down_combine_reference, swiglu_up_reference


@functools.cache
def _triton_moe() -> ModuleType | None:
    """The kernels' module, imported on first use: Triton is optional (the dev extra installs
    it, CUDA wheels of torch too), and importing it costs every condcomp command a third of a
    second at start-up on a CPU (docs/benchmarks.md, "Importing HF models")."""
    try:
        from condcomp.kernels import triton_moe
    except ImportError:
        return None
    return triton_moe


IMPLS = ("auto", "triton", "reference")
# What the MoE layer runs its token-choice experts with: "grouped_mm" is its own path.
EXPERT_KERNELS = ("grouped_mm", *IMPLS)



def check_expert_kernel(kernel: str, key: str, *, gated: bool, dropout: float,
                        routing_mode: str = "token_choice") -> None:
    """One ConfigError where ``kernel`` cannot run a layer's experts: the kernels compute
    token-choice SwiGLU experts without expert dropout."""
    if kernel not in EXPERT_KERNELS:
        raise ConfigError(f"{key} = {kernel!r} is unknown; choose one of "
                          f"{', '.join(EXPERT_KERNELS)}")
    if kernel == "grouped_mm":
        return
    if not gated or dropout > 0 or routing_mode != "token_choice":
        raise ConfigError(f"{key} = {kernel!r} runs token-choice SwiGLU experts without expert "
                          "dropout; this layer has "
                          + ", ".join(part for part, bad in (
                              ("another activation", not gated),
                              ("expert_dropout > 0", dropout > 0),
                              (f"routing = {routing_mode!r}", routing_mode != "token_choice"))
                              if bad)
                          + "; keep expert_kernel = 'grouped_mm'")


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for ``impl`` on ``x``'s device; a clear error where the
    kernels cannot run."""
    if impl not in IMPLS:
        raise ConfigError(f"impl {impl!r}: choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if x.is_cuda and _triton_moe() is not None else "reference"
    if impl == "triton":
        triton_moe = _triton_moe()
        if triton_moe is None:
            raise CondcompError("the Triton expert kernels need Triton: pip install triton "
                                "(or condcomp's dev extra)")
        if not x.is_cuda and not triton_moe.triton.knobs.runtime.interpret:
            raise CondcompError("the Triton expert kernels run on CUDA tensors, or on CPU "
                                "tensors in Triton's interpreter: set TRITON_INTERPRET=1")
    return impl


@functools.cache
def _outside_compiled_graphs():
    """:func:`_triton_experts` outside any compiled graph (dynamo would have to trace the
    launches and the cached wrapping), made on first use: ``torch.compiler.disable`` imports
    the compiler stack, 0.75 s that every condcomp command would otherwise pay at start-up."""
    return torch.compiler.disable(_triton_experts)


def _triton_experts(x_TD, w1_EDH, w2_EHD, w3_EDH, order_N, offsets_E, weights_TK, k):
    triton_moe = _triton_moe()
    h_NH = triton_moe.swiglu_up(x_TD, w1_EDH, w3_EDH, order_N, offsets_E, k)
    return triton_moe.down_combine(h_NH, w2_EHD, weights_TK, order_N, offsets_E)


def swiglu_experts(x_TD: torch.Tensor, w1_EDH: torch.Tensor, w2_EHD: torch.Tensor,
                   w3_EDH: torch.Tensor, order_N: torch.Tensor, offsets_E: torch.Tensor,
                   weights_TK: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``[T, D]`` in ``x_TD``'s dtype: each token's ``k`` SwiGLU experts, weighted and summed.

    ``order_N`` sorts the slots ``t * k + j`` by expert (a permutation of ``T * k``);
    ``offsets_E`` are the cumulative ends of each expert's run of sorted rows, and rows past
    the last end (slots capacity dropped) add nothing. The weights (``[E, D, H]``, ``[E, H, D]``)
    are cast to ``x_TD``'s dtype, as the grouped-GEMM path does under autocast."""
    k = weights_TK.shape[1]
    w1_EDH, w2_EHD, w3_EDH = (w.to(x_TD.dtype) for w in (w1_EDH, w2_EHD, w3_EDH))
    if resolve_impl(impl, x_TD) == "triton":
        return _outside_compiled_graphs()(x_TD, w1_EDH, w2_EHD, w3_EDH, order_N, offsets_E,
                                          weights_TK, k)
    h_NH = swiglu_up_reference(x_TD, w1_EDH, w3_EDH, order_N, offsets_E, k)
    return down_combine_reference(h_NH, w2_EHD, weights_TK, order_N, offsets_E)
