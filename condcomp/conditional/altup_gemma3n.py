"""Gemma 3n's AltUp arithmetic: the functions behind ``coefficients = "gemma3n"``.

Gemma 3n (its ``Gemma3nTextAltUp`` and ``Gemma3nTextModel`` in HF transformers) extends AltUp
(Baykal et al. 2023) with token-dependent coefficients read off a *modality router*:

- router: ``m = tanh(W_r (rms_norm(x) * w_n / D))``, ``m`` of size K per token;
- predict, from the active block ``x_j*`` of the layer's input:
  ``x_hat_i = x_i + sum_j C_ij x_j`` with ``C = (W_p m)`` reshaped to K x K (row i = output
  block i); the static part (the identity) is fixed, not learned;
- correct, from the layer's *output* ``x_tilde`` (the router reads the innovation's source,
  not the input): ``x_i <- x_hat_i + (1 + (W_c m(x_tilde))_i) (x_tilde - x_hat_j*)``;
- the stream starts as the embedding in block 0 and, in block i > 0, a learned D x D
  projection of it rescaled to the embedding's per-token RMS; it ends as the mean of block 0
  and the other blocks projected back by their own D x D maps, rescaled to block 0's RMS.

The numerics follow HF's step by step (float32 norm with ``(ms + eps) ** -0.5``, tanh in
float32, magnitudes with a ``1e-5`` floor on the projected side only), so that weights copied
from HF give the same values to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# HF's floor on the projected blocks' mean square before the square root (Gemma3nTextModel).
MAGNITUDE_FLOOR = 1e-5


def rms_norm(x_BTD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3nRMSNorm: in float32, ``x * (mean(x^2) + eps) ** -0.5 * w``, back in x's dtype.
    Written with ``pow(-0.5)`` as HF's is (they chose it over rsqrt to match JAX)."""
    x = x_BTD.float()
    normed = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return (normed * weight_D.float()).type_as(x_BTD)


def router_modalities(x_BTD: torch.Tensor, norm_D: torch.Tensor, router_KD: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """``[B, T, K]``: Gemma 3n's ``compute_router_modalities``. The 1/D scale keeps the
    router's logits small whatever the width, so tanh starts in its linear range."""
    scale = torch.tensor(x_BTD.shape[-1] ** -1.0)  # HF's router_input_scale buffer (float32)
    inputs_BTD = rms_norm(x_BTD, norm_D, eps) * scale.to(x_BTD.device)
    routed_BTK = F.linear(inputs_BTD, router_KD.to(inputs_BTD.dtype))
    return torch.tanh(routed_BTK.float()).type_as(x_BTD)


def predict(state_BTKD: torch.Tensor, j: int, coefs_QK: torch.Tensor, norm_D: torch.Tensor,
            router_KD: torch.Tensor, eps: float) -> torch.Tensor:
    """``x_hat [B, T, K, D]``: ``x + C(m(x_j)) x`` with ``coefs_QK`` ``[K*K, K]``."""
    K = state_BTKD.shape[2]
    m_BTK = router_modalities(state_BTKD[:, :, j], norm_D, router_KD, eps)
    c_BTKK = F.linear(m_BTK, coefs_QK.to(m_BTK.dtype)).unflatten(-1, (K, K))
    mixed_BTKD = torch.einsum("btij,btjd->btid", c_BTKK.to(state_BTKD.dtype), state_BTKD)
    return (mixed_BTKD + state_BTKD).type_as(state_BTKD)


def correct(x_hat_BTKD: torch.Tensor, x_tilde_BTD: torch.Tensor, j: int,
            coefs_KK: torch.Tensor, norm_D: torch.Tensor, router_KD: torch.Tensor,
            eps: float) -> torch.Tensor:
    """``[B, T, K, D]``: ``x_hat + (1 + W_c m(x_tilde)) (x_tilde - x_hat_j)``."""
    m_BTK = router_modalities(x_tilde_BTD, norm_D, router_KD, eps)
    g_BTK = F.linear(m_BTK, coefs_KK.to(m_BTK.dtype)) + 1.0
    innovation_BTD = x_tilde_BTD - x_hat_BTKD[:, :, j]
    corrected_BTKD = innovation_BTD.unsqueeze(2) * g_BTK.unsqueeze(-1)
    return (corrected_BTKD + x_hat_BTKD).type_as(x_tilde_BTD)


def rms(x_BTD: torch.Tensor) -> torch.Tensor:
    """``[B, T, 1]``: the per-token RMS (HF's ``target_magnitude``, no floor)."""
    return torch.mean(x_BTD ** 2, dim=-1, keepdim=True) ** 0.5


def project_to_magnitude(x_BTD: torch.Tensor, weight_DD: torch.Tensor,
                         target_BT1: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` rescaled to ``target`` per token (``W`` in ``nn.Linear``'s [out, in])."""
    proj_BTD = F.linear(x_BTD, weight_DD.to(x_BTD.dtype))
    magnitude_BT1 = torch.sqrt(torch.mean(proj_BTD ** 2, dim=-1, keepdim=True)
                               .clamp(min=MAGNITUDE_FLOOR))
    return proj_BTD * target_BT1 / magnitude_BT1


def expand(x_BTD: torch.Tensor, projections_PDD: torch.Tensor) -> torch.Tensor:
    """``[B, T, K, D]``: the embedding, then ``altup_projections`` of it at its magnitude."""
    target_BT1 = rms(x_BTD)
    blocks = [x_BTD] + [project_to_magnitude(x_BTD, w_DD, target_BT1)
                        for w_DD in projections_PDD]
    return torch.stack(blocks, dim=2)


def collapse(state_BTKD: torch.Tensor, unembed_PDD: torch.Tensor) -> torch.Tensor:
    """``[B, T, D]``: the mean of block 0 and ``altup_unembed_projections`` of the others,
    each at block 0's magnitude."""
    x0_BTD = state_BTKD[:, :, 0]
    target_BT1 = rms(x0_BTD)
    blocks = [x0_BTD] + [project_to_magnitude(state_BTKD[:, :, i + 1], w_DD, target_BT1)
                         for i, w_DD in enumerate(unembed_PDD)]
    return torch.stack(blocks).mean(dim=0)
