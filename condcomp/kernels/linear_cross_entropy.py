"""The output projection and the cross-entropy in one pass over row chunks, never forming the
``[N, V]`` logits (the fused linear + cross-entropy of Liger-Kernel, Hsu et al. 2024,
arXiv 2410.10989).

At a 50k vocabulary the logits of a 16k-token batch are 3.3 GB in fp32, and the plain path keeps
them (and their log-softmax) for the backward. Here each chunk of rows computes its logits
``h_c @ W^T`` (accumulated in fp32, as the plain path's GEMM does), its loss
``logsumexp(z) - z[target]``, and at once its gradient: ``dL/dz = (softmax(z) - onehot) / n``
(n the rows not ignored, the mean ``F.cross_entropy`` takes), so ``dL/dh_c = dL/dz @ W`` and
``dL/dW += dL/dz^T @ h_c``. Only those two gradients, the size of ``h`` and ``W``, outlive the
forward; the backward scales them by the incoming gradient.

Gradients in the forward, not recomputed in the backward: recomputing the chunk's logits costs
one more ``N x D x V`` GEMM (a third more work for the head) to save memory the size of ``h``
and ``W``, which the model holds anyway. The price is that the forward does the backward's two
GEMMs, so it runs them only when a gradient is wanted (not in evaluation).

:func:`linear_cross_entropy` is what the model calls (``model.loss = "fused"``);
:func:`linear_cross_entropy_reference` is the plain PyTorch it is held equal to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# What one chunk's fp32 logits may take. The softmax overwrites them in place and the gradient
# in the compute dtype takes at most as much again, so a chunk holds at most twice this. At
# V = 50k it is ~1300 rows a chunk: GEMMs large enough to run at full speed.
CHUNK_LOGITS_BYTES = 256 * 2**20


def rows_per_chunk(vocab_size: int, budget_bytes: int = CHUNK_LOGITS_BYTES) -> int:
    """How many rows of fp32 logits fit in ``budget_bytes`` (at least one)."""
    return max(1, budget_bytes // (4 * vocab_size))


def linear_cross_entropy_reference(h_ND: torch.Tensor, weight_VD: torch.Tensor,
                                   targets_N: torch.Tensor, ignore_index: int = -100
                                   ) -> torch.Tensor:
    """Plain PyTorch: the whole ``[N, V]`` logits, then ``F.cross_entropy`` on them in fp32
    (the model's ``model.loss = "plain"``)."""
    logits_NV = F.linear(h_ND, weight_VD)
    return F.cross_entropy(logits_NV.float(), targets_N, ignore_index=ignore_index)


def _compute_dtype(h_ND: torch.Tensor, weight_VD: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would multiply in here: autocast's, where it is on."""
    device_type = h_ND.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(h_ND.dtype, weight_VD.dtype)


class _LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, ignore_index: int, chunk_rows: int,
                with_grads: bool):
        dtype = _compute_dtype(h_ND, weight_VD)
        h_cast, w_cast = h_ND.to(dtype), weight_VD.to(dtype)
        valid_N = targets_N != ignore_index
        n_valid = valid_N.sum()
        # The mean's 1/n; with every row ignored the loss is 0/0 = NaN and every gradient 0,
        # as F.cross_entropy gives.
        inv_n = 1.0 / n_valid.clamp_min(1).float()
        loss_sum = h_ND.new_zeros((), dtype=torch.float32)
        grad_h_ND = torch.empty_like(h_ND) if with_grads else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=torch.float32,
                                device=weight_VD.device) if with_grads else None
        with torch.autocast(h_ND.device.type, enabled=False):
            for start in range(0, h_ND.shape[0], chunk_rows):
                stop = min(start + chunk_rows, h_ND.shape[0])
                h_cD = h_cast[start:stop]
                logits_cV = (h_cD @ w_cast.T).float()
                valid_c = valid_N[start:stop]
                target_c = torch.where(valid_c, targets_N[start:stop], 0)
                lse_c = torch.logsumexp(logits_cV, dim=-1)
                target_logit_c = logits_cV.gather(1, target_c.unsqueeze(1)).squeeze(1)
                loss_sum = loss_sum + torch.where(valid_c, lse_c - target_logit_c, 0.0).sum()
                if not with_grads:
                    continue
                # dL/dz = (softmax(z) - onehot(target)) / n on the rows not ignored, 0 elsewhere;
                # the softmax overwrites the logits, the chunk's one [c, V] fp32 buffer.
                grad_cV = logits_cV.sub_(lse_c.unsqueeze(1)).exp_()
                grad_cV.scatter_add_(1, target_c.unsqueeze(1), grad_cV.new_full((stop - start, 1),
                                                                                -1.0))
                grad_cV.mul_(torch.where(valid_c, inv_n, 0.0).unsqueeze(1))
                grad_cV = grad_cV.to(dtype)
                grad_h_ND[start:stop] = (grad_cV @ w_cast).to(h_ND.dtype)
                grad_w_VD += (grad_cV.T @ h_cD).float()
        if with_grads:
            ctx.save_for_backward(grad_h_ND, grad_w_VD.to(weight_VD.dtype))
        return loss_sum / n_valid.float()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        grad_h = grad_h_ND * grad_loss.to(grad_h_ND.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_w_VD * grad_loss.to(grad_w_VD.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int = 0) -> torch.Tensor:
    """``F.cross_entropy(h_ND @ weight_VD.T, targets_N, ignore_index=ignore_index)`` (the mean
    over the rows not ignored, in fp32) without the ``[N, V]`` logits: ``chunk_rows`` rows at a
    time (0: as many as :data:`CHUNK_LOGITS_BYTES` of fp32 logits hold). A weight shared with
    the token embedding gets both gradients, as autograd sums them."""
    chunk_rows = chunk_rows or rows_per_chunk(weight_VD.shape[0])
    with_grads = torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad)
    return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, ignore_index, chunk_rows,
                                     with_grads)
