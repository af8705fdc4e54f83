"""AltUp's coefficients as a model used them, token by token, read off a replay of its stream.

The stream's state between layers lives inside :meth:`AltUp.apply`, which no hook reaches. It
is rebuilt from what hooks do see: the embedding, and each layer's output ``x_tilde``. Replaying
``apply`` with a layer that returns the recorded output gives the same states the forward
computed (``apply`` calls its layer once and depends on nothing else), without running a layer
twice.

The coefficients at layer l (Baykal et al. 2023, Alg. 1: ``x_hat = P x``, then
``x_i <- x_hat_i + g_i (x_tilde - x_hat_j*)``), per token:

- ``static``: the learned ``predict[l]`` (K x K) and ``correct[l]`` (K), the same for every
  token;
- ``dynamic``: those plus a linear function of the raw active block, clipped, as
  :meth:`AltUp.apply` computes them;
- ``gemma3n``: ``P = I + C(m(x_j*))`` and ``g = 1 + W_c m(x_tilde)``, with Gemma 3n's router
  ``m`` (:mod:`condcomp.conditional.altup_gemma3n`).

Letters: K the stream's blocks (AltUp's, not an MoE's k), N tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from condcomp.conditional import altup_gemma3n as g3n
from condcomp.conditional.altup import AltUp


def replay_states(stream: AltUp, emb_BTD: torch.Tensor, tokens_BT: torch.Tensor,
                  outputs: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The stream's state ``[B, T, K, D]`` before each layer, then the final one (``len(outputs)
    + 1`` states), from the embedding and each layer's recorded output."""
    state_BTKD = stream.expand(emb_BTD, tokens_BT)
    for i, out_BTD in enumerate(outputs):
        yield state_BTKD
        state_BTKD = stream.apply(i, state_BTKD, lambda _h, out=out_BTD: out)
    yield state_BTKD


def layer_coefficients(stream: AltUp, layer_idx: int, state_BTKD: torch.Tensor,
                       out_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predict_NKK, correct_NK)`` in float32: the coefficients of layer ``layer_idx`` for
    each token, given the state before it and its output (eval mode: nothing is clipped in
    Gemma 3n's variant)."""
    K = stream.k
    n = state_BTKD.shape[0] * state_BTKD.shape[1]
    active_BTD = state_BTKD[:, :, stream.active_block(layer_idx)]
    if stream.coefficients == "gemma3n":
        norm_D, router_KD = stream.router_norm[layer_idx], stream.modality_router[layer_idx]
        m_BTK = g3n.router_modalities(active_BTD, norm_D, router_KD, stream.eps)
        mix_BTQ = F.linear(m_BTK.float(), stream.prediction_coefs[layer_idx].float())
        predict_NKK = torch.eye(K, device=mix_BTQ.device) + mix_BTQ.reshape(n, K, K)
        m_out_BTK = g3n.router_modalities(out_BTD, norm_D, router_KD, stream.eps)
        correct_NK = 1.0 + F.linear(m_out_BTK.float(),
                                    stream.correction_coefs[layer_idx].float()).reshape(n, K)
        return predict_NKK, correct_NK
    predict_NKK = stream.predict[layer_idx].float().expand(n, K, K)
    correct_NK = stream.correct[layer_idx].float().expand(n, K)
    if stream.coefficients == "dynamic":
        delta_NQ = active_BTD.reshape(n, -1).float() @ stream.router_weight[layer_idx].float().t()
        predict_NKK = (predict_NKK + delta_NQ[:, :K * K].reshape(n, K, K)).clamp(
            -stream.clip, stream.clip)
        correct_NK = (correct_NK + delta_NQ[:, K * K:]).clamp(-stream.clip, stream.clip)
    return predict_NKK, correct_NK


@dataclass
class CoefficientSums:
    """Running sums of each layer's coefficients over the tokens, for their mean and spread."""

    predict_LKK: torch.Tensor
    predict_sq_LKK: torch.Tensor
    correct_LK: torch.Tensor
    correct_sq_LK: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, n_layers: int, k: int) -> CoefficientSums:
        zeros = torch.zeros
        return cls(zeros(n_layers, k, k, dtype=torch.float64),
                   zeros(n_layers, k, k, dtype=torch.float64),
                   zeros(n_layers, k, dtype=torch.float64), zeros(n_layers, k, dtype=torch.float64))

    def add(self, stream: AltUp, emb_BTD: torch.Tensor, tokens_BT: torch.Tensor,
            outputs: Sequence[torch.Tensor]) -> None:
        """Add one batch: the embedding, its tokens and every layer's output."""
        states = replay_states(stream, emb_BTD, tokens_BT, outputs)
        for i, (state_BTKD, out_BTD) in enumerate(zip(states, outputs)):
            predict_NKK, correct_NK = layer_coefficients(stream, i, state_BTKD, out_BTD)
            predict_NKK, correct_NK = predict_NKK.double().cpu(), correct_NK.double().cpu()
            self.predict_LKK[i] += predict_NKK.sum(0)
            self.predict_sq_LKK[i] += predict_NKK.square().sum(0)
            self.correct_LK[i] += correct_NK.sum(0)
            self.correct_sq_LK[i] += correct_NK.square().sum(0)
        self.tokens += tokens_BT.numel()

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predict_LKK, correct_LK)`` averaged over the tokens."""
        n = max(self.tokens, 1)
        return self.predict_LKK / n, self.correct_LK / n

    def spreads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predict_LKK, correct_LK)``: each coefficient's standard deviation over the tokens
        (0 for static coefficients)."""
        n = max(self.tokens, 1)
        predict, correct = self.means()
        return ((self.predict_sq_LKK / n - predict.square()).clamp_min(0.0).sqrt(),
                (self.correct_sq_LK / n - correct.square()).clamp_min(0.0).sqrt())
