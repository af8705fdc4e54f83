"""Grouped GEMM: one matrix product per expert over a token buffer sorted by expert.

``x_MK`` holds the rows of every expert back to back; ``offsets_E[e]`` is the end row of expert
``e`` (a cumulative sum of the per-expert counts, as ``torch._grouped_mm`` takes it); rows past
``offsets_E[-1]`` belong to no expert (dropped tokens) and come out as zeros.

:func:`grouped_mm` is the one place the MoE layer calls. On CUDA with bf16-friendly shapes it
runs ``torch._grouped_mm`` (one kernel for all experts, no host sync); elsewhere it runs
:func:`grouped_mm_reference`, a plain loop over experts. A faster kernel drops in here, and the
tests hold every path to the reference, forward and backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Row strides of the operands must be 16-byte aligned for the CUTLASS grouped kernels.
_ALIGN_ELEMS = 8


def grouped_mm_reference(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor
                         ) -> torch.Tensor:
    """Plain PyTorch: ``out[rows of e] = x[rows of e] @ w[e]`` for each expert, in a loop.

    ``split``/``unbind``/``cat`` rather than slicing and slice writes: their backward joins
    the gradient pieces once, where per-expert slices would each materialise a full-size
    zero gradient (O(E) full copies of the activations and of the expert weights).
    """
    ends = offsets_E.tolist()  # a host sync: the reference path is for the CPU and for tests
    counts = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    x_pieces = x_MK.split([*counts, x_MK.shape[0] - ends[-1]])
    w_pieces = w_EKN.to(x_MK.dtype).unbind(0)
    out = [x_pieces[e] @ w_pieces[e] for e in range(len(counts))]
    # Rows past the last offset (dropped tokens) come out as zeros.
    out.append(x_pieces[-1].new_zeros(x_pieces[-1].shape[0], w_EKN.shape[-1]))
    return torch.cat(out)


_fast_path_on_cpu = False


@contextmanager
def fast_path_on_cpu() -> Iterator[None]:
    """Inside the block, the CPU runs the fast path too (``torch._grouped_mm`` has a CPU kernel
    in recent torch), so that a compiled CPU graph holds the kernels CUDA runs: what
    ``condcomp bench moe --count-bytes`` counts. Training on the CPU keeps the reference."""
    global _fast_path_on_cpu
    saved, _fast_path_on_cpu = _fast_path_on_cpu, True
    try:
        yield
    finally:
        _fast_path_on_cpu = saved


def _fast_path_supported(x_MK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    grouped = getattr(torch, "_grouped_mm", None)
    device_ok = ((x_MK.is_cuda and torch.cuda.get_device_capability(x_MK.device)[0] >= 9)
                 or (_fast_path_on_cpu and x_MK.device.type == "cpu"))
    return (grouped is not None and device_ok
            and x_MK.shape[1] % _ALIGN_ELEMS == 0 and w_EKN.shape[-1] % _ALIGN_ELEMS == 0)


def grouped_mm_fast(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor,
                    all_rows: bool = False) -> torch.Tensor:
    """``torch._grouped_mm`` in bf16 (Hopper and newer): all experts in one kernel."""
    x_MK, w_EKN = x_MK.to(torch.bfloat16), w_EKN.to(torch.bfloat16)
    offs = offsets_E.to(torch.int32)
    if all_rows:
        return torch._grouped_mm(x_MK, w_EKN, offs=offs)
    # Rows past the last offset (dropped tokens) are left unwritten by the kernel, forward and
    # backward: zero them with a select, not a multiply, since unwritten memory may hold NaNs.
    # The select on the input is there for the backward: the kernel's gradient for those rows
    # is unwritten too, and the select's backward replaces it with zeros.
    valid_M1 = (torch.arange(x_MK.shape[0], device=x_MK.device) < offsets_E[-1]).unsqueeze(1)
    x_MK = torch.where(valid_M1, x_MK, x_MK.new_zeros(()))
    out = torch._grouped_mm(x_MK, w_EKN, offs=offs)
    return torch.where(valid_M1, out, out.new_zeros(()))


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor,
               all_rows: bool = False) -> torch.Tensor:
    """The grouped product, by the fastest path available for these tensors.

    ``all_rows=True`` is the caller's promise that ``offsets_E[-1]`` is the number of rows
    (every row belongs to an expert), which spares the fast path two masking passes."""
    if _fast_path_supported(x_MK, w_EKN):
        return grouped_mm_fast(x_MK, w_EKN, offsets_E, all_rows)
    return grouped_mm_reference(x_MK, w_EKN, offsets_E)
