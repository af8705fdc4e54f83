"""Triton kernels for a token-choice MoE's experts that never copy the permuted activations.

The grouped-GEMM path (:mod:`condcomp.kernels.permute`, :mod:`condcomp.kernels.grouped_gemm`)
writes each token's activation k times in expert order, reads that copy into the GEMM, and
reads and writes the same volume again on the way back. Following ScatterMoE (Tan et al.
2024, "Scattered Mixture-of-Experts Implementation", sec. 3), the kernels here index rows as
they load and store them instead:

- :class:`SwigluUp`: row ``n`` of the sorted order reads token ``order_N[n] // k``'s activation
  from ``x_TD`` (gather on load) and computes ``silu(x @ w1[e]) * (x @ w3[e])`` in the
  epilogue (fused SwiGLU). It stores the two pre-activations beside the product, for the
  backward: recomputing them would cost a second pass of the two GEMMs.
- :class:`DownCombine`: ``h @ w2[e]`` scaled by the slot's routing weight, stored at the slot's
  own row of a ``[T, k, D]`` buffer in token order (scatter on store); a sum over ``k`` gives
  the layer's output. Each slot is written by exactly one program, so there are no atomics and
  the result does not depend on the schedule: the same bits on every run, which an
  atomic-add combine does not give.

The backward passes are the same kernels with other operands: the gradient of the output is
gathered on load in the sorted order (``grad_TD[tokens_N[n]]``), the weights read transposed
through their strides, and the routing weights' gradient ``<grad_y[t], out[n]>`` equals
``<grad_y[t] @ w2[e]^T, h[n]>``, a row reduction in the epilogue of the product that computes
``grad_h`` anyway (per column tile, summed after).

Rows ``n >= offsets_E[-1]`` (slots capacity dropped, sorted last) belong to no expert: their
programs multiply nothing and store zeros, so no output needs a zero fill first
(:class:`BlockSchedule`).

``triton.jit`` reads ``TRITON_INTERPRET`` when it wraps a function, so the kernels are wrapped
on first use, once for each value of the flag (:func:`_kernels`): a test that sets the flag
runs them on CPU tensors in Triton's interpreter, and later callers get compiled kernels.
``triton.language``'s own jit functions (``tl.zeros``, ``tl.sum``, ``tl.sigmoid``, ...) were
wrapped when Triton was imported, which may be before the flag was set, and the interpreter
cannot call compiled ones: the kernels use only builtins (``tl.full``, ``tl.exp``, and
``tl.reduce`` with Triton's own sum combiner, which the interpreter runs as a numpy sum).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Tile sizes: one program computes a BLOCK_M x BLOCK_N tile of the output, BLOCK_K at a time.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
SWIGLU_GRAD_BLOCK = 1024  # elements per program of the elementwise SwiGLU backward


def _rows_gemm(a_ptr, a_rows_ptr, b_ptr, a2_ptr, b2_ptr, scale_ptr, c_ptr, c_rows_ptr,
               c2_ptr, c3_ptr, r_ptr, dot_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
               K, N, M, stride_am, stride_ak, stride_be, stride_bk, stride_bn,
               stride_cm, stride_cn, stride_rm, stride_rn,
               GATHER_A: tl.constexpr, DUAL: tl.constexpr, SWIGLU: tl.constexpr,
               SCALE: tl.constexpr, SCATTER_C: tl.constexpr, ROW_DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               FP32_DOT: tl.constexpr):
    """One tile of ``c[rows] = scale[rows] * (a[rows] @ b[e] (+ a2[rows] @ b2[e]))``, the rows
    those of the program's block (:class:`BlockSchedule`), ``e`` their expert.

    ``GATHER_A``: row m reads ``a[a_rows[m]]``; ``SCATTER_C``: it is stored at
    ``c[c_rows[m]]``; ``ROW_DOT``: before scaling, ``sum_cols(acc * r[rows])`` goes to
    ``dot[pid_n, rows]`` (one partial per column tile, summed by the caller). ``DUAL`` adds
    ``a2 @ b2`` (``a2`` in ``a``'s layout, ``b2`` in ``b``'s). ``SWIGLU`` instead keeps
    ``up = a @ b2`` apart and stores ``c = gate = a @ b``, ``c2 = up`` and
    ``c3 = silu(gate) * up`` (Shazeer 2020, eq. 6), ``c2`` and ``c3`` in ``c``'s layout."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    start = tl.load(block_start_ptr + pid_m)
    end = tl.load(block_end_ptr + pid_m)
    if start < end:
        e = tl.load(block_expert_ptr + pid_m)
        k_end = tl.where(e >= 0, K, 0)  # rows of no expert: nothing to multiply, zeros stored
        e = e.to(tl.int64)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a_rows = (tl.load(a_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64) if GATHER_A
                  else rows.to(tl.int64))
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a_offs = a_rows[:, None] * stride_am + ks[None, :] * stride_ak
            a_mask = row_ok[:, None] & k_ok[None, :]
            b_offs = e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
            b_mask = k_ok[:, None] & col_ok[None, :]
            a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
            b = tl.load(b_ptr + b_offs, mask=b_mask, other=0.0)
            if DUAL or SWIGLU:
                b2 = tl.load(b2_ptr + b_offs, mask=b_mask, other=0.0)
            if DUAL:
                a2 = tl.load(a2_ptr + a_offs, mask=a_mask, other=0.0)
            else:
                a2 = a
            if FP32_DOT:
                a, b, a2 = a.to(tl.float32), b.to(tl.float32), a2.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision="ieee")
                if DUAL:
                    acc = tl.dot(a2, b2.to(tl.float32), acc, input_precision="ieee")
                if SWIGLU:
                    acc_up = tl.dot(a, b2.to(tl.float32), acc_up, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
                if DUAL:
                    acc = tl.dot(a2, b2, acc)
                if SWIGLU:
                    acc_up = tl.dot(a, b2, acc_up)
        mask = row_ok[:, None] & col_ok[None, :]
        if ROW_DOT:
            r = tl.load(r_ptr + rows[:, None].to(tl.int64) * stride_rm + cols[None, :] * stride_rn,
                        mask=mask, other=0.0)
            row_dot = tl.reduce(acc * r.to(tl.float32), 1, tl.standard._sum_combine)
            tl.store(dot_ptr + pid_n * M + rows, row_dot, mask=row_ok)
        if SCALE:
            acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
        c_rows = (tl.load(c_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64) if SCATTER_C
                  else rows.to(tl.int64))
        c_offs = c_rows[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)
        if SWIGLU:
            h = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up
            tl.store(c2_ptr + c_offs, acc_up.to(c2_ptr.dtype.element_ty), mask=mask)
            tl.store(c3_ptr + c_offs, h.to(c3_ptr.dtype.element_ty), mask=mask)


def _expert_weight_grad(a_ptr, a_rows_ptr, g_ptr, g_rows_ptr, scale_ptr, out_ptr,
                        starts_ptr, ends_ptr, K, N,
                        stride_am, stride_ak, stride_gm, stride_gn,
                        stride_oe, stride_ok, stride_on,
                        GATHER_A: tl.constexpr, GATHER_G: tl.constexpr, SCALE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FP32_DOT: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``out[e] = a[rows of e]^T @ (scale * g)[rows of e]``,
    the rows of a and g gathered by index (``GATHER_A``, ``GATHER_G``) as they load; the
    expert's rows are the reduction, BLOCK_K at a time. An empty expert's tile is zeros."""
    e = tl.program_id(0)
    pid = tl.program_id(1)
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    ks_out = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns_out = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, n_ok = ks_out < K, ns_out < N
    start = tl.load(starts_ptr + e)
    end = tl.load(ends_ptr + e)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < end
        a_rows = (tl.load(a_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64) if GATHER_A
                  else rows.to(tl.int64))
        g_rows = (tl.load(g_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64) if GATHER_G
                  else rows.to(tl.int64))
        a_T = tl.load(a_ptr + a_rows[None, :] * stride_am + ks_out[:, None] * stride_ak,
                      mask=row_ok[None, :] & k_ok[:, None], other=0.0)
        g = tl.load(g_ptr + g_rows[:, None] * stride_gm + ns_out[None, :] * stride_gn,
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
            g = (g.to(tl.float32) * scale[:, None]).to(a_T.dtype)
        if FP32_DOT:
            acc = tl.dot(a_T.to(tl.float32), g.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a_T, g, acc)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + ks_out[:, None] * stride_ok
             + ns_out[None, :] * stride_on,
             acc, mask=k_ok[:, None] & n_ok[None, :])


def _swiglu_grad(gate_ptr, up_ptr, grad_h_ptr, grad_gate_ptr, grad_up_ptr, numel,
                 BLOCK: tl.constexpr):
    """The SwiGLU product's backward on one block of elements, in fp32: from ``h = silu(g) u``,
    ``dg = dh u s (1 + g (1 - s))`` and ``du = dh g s`` with ``s = sigmoid(g)``. One pass over
    the saved pre-activations, where eager PyTorch takes one per operation."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dh = tl.load(grad_h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(grad_gate_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(
        grad_gate_ptr.dtype.element_ty), mask=ok)
    tl.store(grad_up_ptr + offs, (dh * g * s).to(grad_up_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _kernels(interpret: bool) -> tuple:
    """The kernels wrapped by ``triton.jit`` while ``TRITON_INTERPRET`` is ``interpret`` (the
    argument keys the cache; ``triton.jit`` reads the flag itself)."""
    return tuple(triton.jit(fn) for fn in (_rows_gemm, _expert_weight_grad, _swiglu_grad))


def kernels() -> tuple:
    """``(rows_gemm, expert_weight_grad, swiglu_grad)`` for the interpreter flag now set."""
    return _kernels(bool(triton.knobs.runtime.interpret))


class BlockSchedule:
    """Which rows each program of a row-tiled grouped GEMM computes, built on the device
    without a host sync. Expert e takes ``ceil(count_e / BLOCK_M)`` blocks, and the rows past
    the last expert (slots capacity dropped) take blocks of a group ``-1``, whose programs
    store zeros: every output row is written, so the outputs need no zero fill. The grid has
    the static upper bound ``ceil(rows / BLOCK_M) + E + 1`` programs; a program past the last
    block gets an empty row range (``start == end``) and returns at once. Empty experts take
    no blocks.

    Also keeps each expert's ``starts_E``/``ends_E`` rows for the weight-gradient kernel."""

    def __init__(self, offsets_E: torch.Tensor, rows: int) -> None:
        E = offsets_E.shape[0]
        ends_G = torch.cat([offsets_E.to(torch.int64), offsets_E.new_full((1,), rows)])
        starts_G = torch.cat([ends_G.new_zeros(1), ends_G[:-1]])
        blocks_G = (ends_G - starts_G + BLOCK_M - 1) // BLOCK_M
        block_ends_G = torch.cumsum(blocks_G, 0)
        self.programs = triton.cdiv(rows, BLOCK_M) + E + 1
        block_B = torch.arange(self.programs, device=offsets_E.device)
        group_B = torch.searchsorted(block_ends_G, block_B, right=True)
        used_B = group_B <= E
        g_B = group_B.clamp(max=E)
        start_B = starts_G[g_B] + (block_B - (block_ends_G - blocks_G)[g_B]) * BLOCK_M
        self.expert_B = torch.where(g_B < E, g_B, -1).to(torch.int32)
        self.start_B = torch.where(used_B, start_B, 0).to(torch.int32)
        self.end_B = torch.where(used_B, ends_G[g_B], 0).to(torch.int32)
        self.starts_E, self.ends_E = starts_G[:E].to(torch.int32), ends_G[:E].to(torch.int32)


def _fp32_dot(t: torch.Tensor) -> bool:
    """Multiply the tiles in fp32: fp32 operands get fp32 products (as the reference's matmul
    does), not TF32's 10-bit mantissa; and in the interpreter every dtype does, since Triton
    3.9's interpreter multiplies bf16 tiles as their raw 16-bit patterns (it stores bf16 as
    uint16). bf16 values are exact in fp32, and the products accumulate in fp32 either way."""
    return t.dtype == torch.float32 or bool(triton.knobs.runtime.interpret)


def rows_gemm(a: torch.Tensor, b_EKN: torch.Tensor, sched: BlockSchedule, out: torch.Tensor,
              a_rows: torch.Tensor | None = None, out_rows: torch.Tensor | None = None,
              scale_M: torch.Tensor | None = None,
              dual: tuple[torch.Tensor, torch.Tensor] | None = None,
              swiglu: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              row_dot_with: torch.Tensor | None = None) -> torch.Tensor | None:
    """Launch :func:`_rows_gemm` over the rows of ``sched`` into ``out`` (``dual``:
    ``(a2, b2)``; ``swiglu``: ``(b2, up_out, h_out)``); returns the per-row dot products with
    ``row_dot_with`` when asked (fp32, ``[M]``), else None."""
    rows_gemm_kernel, _, _ = kernels()
    K, N = b_EKN.shape[1], b_EKN.shape[2]
    M = row_dot_with.shape[0] if row_dot_with is not None else 0
    tiles_n = triton.cdiv(N, BLOCK_N)
    dots = torch.empty(tiles_n, M, device=a.device, dtype=torch.float32) if M else None
    a2, b2 = dual if dual is not None else (a, b_EKN)
    c2, c3 = out, out
    if swiglu is not None:
        b2, c2, c3 = swiglu
    r = _or(row_dot_with, out)
    no_rows = sched.start_B  # a placeholder for the index arguments a mode does not read
    rows_gemm_kernel[(sched.programs, tiles_n)](
        a, _or(a_rows, no_rows), b_EKN, a2, b2, _or(scale_M, out), out, _or(out_rows, no_rows),
        c2, c3, r, _or(dots, out), sched.expert_B, sched.start_B, sched.end_B, K, N, M,
        a.stride(0), a.stride(1), *b_EKN.stride(), out.stride(0), out.stride(1),
        r.stride(0), r.stride(1),
        GATHER_A=a_rows is not None, DUAL=dual is not None, SWIGLU=swiglu is not None,
        SCALE=scale_M is not None, SCATTER_C=out_rows is not None, ROW_DOT=bool(M),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, FP32_DOT=_fp32_dot(a))
    return dots.sum(0) if dots is not None else None


def _or(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """``t``, or where a mode leaves it unread, a tensor to pass in its place."""
    return t if t is not None else placeholder


def expert_weight_grad(a: torch.Tensor, g: torch.Tensor, sched: BlockSchedule,
                       a_rows: torch.Tensor | None = None, g_rows: torch.Tensor | None = None,
                       scale_M: torch.Tensor | None = None) -> torch.Tensor:
    """``[E, K, N]`` fp32: for each expert, its rows of ``a`` (``[*, K]``) transposed times its
    rows of ``g`` (``[*, N]``, scaled by ``scale_M``)."""
    _, weight_grad_kernel, _ = kernels()
    E, K, N = sched.ends_E.shape[0], a.shape[1], g.shape[1]
    out = torch.empty(E, K, N, device=a.device, dtype=torch.float32)
    grid = (E, triton.cdiv(K, BLOCK_M) * triton.cdiv(N, BLOCK_N))
    weight_grad_kernel[grid](
        a, _or(a_rows, sched.starts_E), g, _or(g_rows, sched.starts_E),
        _or(scale_M, out), out, sched.starts_E, sched.ends_E, K, N,
        a.stride(0), a.stride(1), g.stride(0), g.stride(1), *out.stride(),
        GATHER_A=a_rows is not None, GATHER_G=g_rows is not None, SCALE=scale_M is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, FP32_DOT=_fp32_dot(a))
    return out


def _transposed(w_EKN: torch.Tensor) -> torch.Tensor:
    """``w[e]^T`` for every expert as a view: the kernels read it through its strides."""
    return w_EKN.transpose(1, 2)


class SwigluUp(torch.autograd.Function):
    """``h_NH[n] = silu(x_TD[t] @ w1[e]) * (x_TD[t] @ w3[e])`` for the rows ``n`` of expert
    ``e`` (``offsets_E``: cumulative ends), ``t = order_N[n] // k`` the row's token; rows past
    the last end are zero. ``x_TD``, ``w1``, ``w3`` share one dtype; products accumulate in
    fp32."""

    @staticmethod
    def forward(ctx, x_TD, w1_EDH, w3_EDH, order_N, offsets_E, k: int):
        x_TD, w1_EDH, w3_EDH = x_TD.contiguous(), w1_EDH.contiguous(), w3_EDH.contiguous()
        tokens_N = order_N // k
        N, H = tokens_N.shape[0], w1_EDH.shape[-1]
        gate_NH, up_NH, h_NH = (x_TD.new_empty(N, H) for _ in range(3))
        rows_gemm(x_TD, w1_EDH, BlockSchedule(offsets_E, N), gate_NH, a_rows=tokens_N,
                  swiglu=(w3_EDH, up_NH, h_NH))
        ctx.save_for_backward(x_TD, w1_EDH, w3_EDH, order_N, offsets_E, gate_NH, up_NH)
        ctx.k = k
        return h_NH

    @staticmethod
    def backward(ctx, grad_h_NH):
        x_TD, w1_EDH, w3_EDH, order_N, offsets_E, gate_NH, up_NH = ctx.saved_tensors
        tokens_N = order_N // ctx.k
        sched = BlockSchedule(offsets_E, tokens_N.shape[0])
        grad_gate_NH, grad_up_NH = torch.empty_like(gate_NH), torch.empty_like(up_NH)
        _, _, swiglu_grad_kernel = kernels()
        swiglu_grad_kernel[(triton.cdiv(gate_NH.numel(), SWIGLU_GRAD_BLOCK),)](
            gate_NH, up_NH, grad_h_NH.contiguous(), grad_gate_NH, grad_up_NH, gate_NH.numel(),
            BLOCK=SWIGLU_GRAD_BLOCK)
        grad_x_TD = grad_w1 = grad_w3 = None
        if ctx.needs_input_grad[0]:
            # Row n's gradient is stored at its slot order_N[n] of a [T, k, D] buffer, which a
            # sum over k turns into the token's: each slot written once, no atomics.
            T, D = x_TD.shape
            grad_x_SD = x_TD.new_empty(T * ctx.k, D)
            rows_gemm(grad_gate_NH, _transposed(w1_EDH), sched, grad_x_SD, out_rows=order_N,
                      dual=(grad_up_NH, _transposed(w3_EDH)))
            grad_x_TD = grad_x_SD.view(T, ctx.k, D).sum(dim=1)
        if ctx.needs_input_grad[1]:
            grad_w1 = expert_weight_grad(x_TD, grad_gate_NH, sched, a_rows=tokens_N)
            grad_w1 = grad_w1.to(w1_EDH.dtype)
        if ctx.needs_input_grad[2]:
            grad_w3 = expert_weight_grad(x_TD, grad_up_NH, sched, a_rows=tokens_N)
            grad_w3 = grad_w3.to(w3_EDH.dtype)
        return grad_x_TD, grad_w1, grad_w3, None, None, None


class DownCombine(torch.autograd.Function):
    """``y_TD[t] = sum_j weights_TK[t, j] * (h_NH[n] @ w2[e])``, ``n`` the sorted row of slot
    ``t * k + j`` (``order_N[n] = t * k + j``) and ``e`` its expert; slots whose rows lie past
    ``offsets_E[-1]`` add nothing. ``h_NH`` and ``w2`` share one dtype, the output's."""

    @staticmethod
    def forward(ctx, h_NH, w2_EHD, weights_TK, order_N, offsets_E):
        h_NH, w2_EHD = h_NH.contiguous(), w2_EHD.contiguous()
        T, K = weights_TK.shape
        D = w2_EHD.shape[-1]
        sched = BlockSchedule(offsets_E, order_N.shape[0])
        w_N = weights_TK.reshape(-1).float()[order_N]
        y_SD = h_NH.new_empty(T * K, D)
        rows_gemm(h_NH, w2_EHD, sched, y_SD, out_rows=order_N, scale_M=w_N)
        ctx.save_for_backward(h_NH, w2_EHD, weights_TK, order_N, offsets_E)
        return y_SD.view(T, K, D).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_TD):
        h_NH, w2_EHD, weights_TK, order_N, offsets_E = ctx.saved_tensors
        T, K = weights_TK.shape
        grad_TD = grad_TD.to(h_NH.dtype).contiguous()
        sched = BlockSchedule(offsets_E, order_N.shape[0])
        tokens_N = order_N // K
        w_N = weights_TK.reshape(-1).float()[order_N]
        # grad_h[n] = w_n grad_y[t] @ w2[e]^T, grad_y gathered on load; its row dot with h[n]
        # before the scale is <grad_y[t], h[n] @ w2[e]>, the routing weight's gradient.
        grad_h_NH = torch.empty_like(h_NH)
        dot_N = rows_gemm(grad_TD, _transposed(w2_EHD), sched, grad_h_NH, a_rows=tokens_N,
                          scale_M=w_N, row_dot_with=h_NH)
        grad_w2 = grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_w2 = expert_weight_grad(h_NH, grad_TD, sched, g_rows=tokens_N, scale_M=w_N)
            grad_w2 = grad_w2.to(w2_EHD.dtype)
        if ctx.needs_input_grad[2]:
            grad_S = torch.empty_like(dot_N)
            grad_S[order_N] = dot_N  # order_N is a permutation: each slot written once
            grad_weights = grad_S.view(T, K).to(weights_TK.dtype)
        return grad_h_NH, grad_w2, grad_weights, None, None


def swiglu_up(x_TD: torch.Tensor, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor,
              order_N: torch.Tensor, offsets_E: torch.Tensor, k: int) -> torch.Tensor:
    """The kernels' fused gather + up projections + SwiGLU (:class:`SwigluUp`)."""
    return SwigluUp.apply(x_TD, w1_EDH, w3_EDH, order_N, offsets_E, k)


def down_combine(h_NH: torch.Tensor, w2_EHD: torch.Tensor, weights_TK: torch.Tensor,
                 order_N: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """The kernels' down projection + weighted combine (:class:`DownCombine`)."""
    return DownCombine.apply(h_NH, w2_EHD, weights_TK, order_N, offsets_E)
