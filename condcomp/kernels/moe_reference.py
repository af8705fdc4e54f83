"""Plain PyTorch beside :mod:`condcomp.kernels.triton_moe`: the same two steps, computed with
an explicit gather, the reference grouped GEMM and an explicit scatter, differentiated by
autograd. The tests hold the kernels to these, forward and backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from condcomp.kernels.grouped_gemm import grouped_mm_reference


def swiglu_up_reference(x_TD: torch.Tensor, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor,
                        order_N: torch.Tensor, offsets_E: torch.Tensor, k: int) -> torch.Tensor:
    """``silu(x[t] @ w1[e]) * (x[t] @ w3[e])`` for sorted row n, ``t = order_N[n] // k``; rows
    past ``offsets_E[-1]`` are zero. The gather here is the permuted copy the kernel avoids."""
    x_ND = x_TD[order_N // k]
    gate_NH = grouped_mm_reference(x_ND, w1_EDH, offsets_E)
    up_NH = grouped_mm_reference(x_ND, w3_EDH, offsets_E)
    return F.silu(gate_NH) * up_NH


def down_combine_reference(h_NH: torch.Tensor, w2_EHD: torch.Tensor, weights_TK: torch.Tensor,
                           order_N: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_j weights_TK[t, j] * (h[n] @ w2[e])`` with ``order_N[n] = t * k + j``: each
    row scaled (in fp32, as the kernel's epilogue), written to its slot of ``[T, k, D]`` in
    token order, and summed over k. Rows past ``offsets_E[-1]`` add nothing."""
    T, K = weights_TK.shape
    out_ND = grouped_mm_reference(h_NH, w2_EHD, offsets_E)
    w_N1 = weights_TK.reshape(-1)[order_N].float().unsqueeze(-1)
    y_ND = (out_ND.float() * w_N1).to(out_ND.dtype)
    y_SD = y_ND.new_zeros(T * K, y_ND.shape[-1]).index_copy(0, order_N, y_ND)
    return y_SD.view(T, K, -1).sum(dim=1)
