"""The plain residual stream of a dense model as AltUp's K blocks (``condcomp upcycle``).

AltUp (Baykal et al. 2023, Alg. 1) starts as the dense model when its K blocks start equal and
each layer's prediction is the identity and its correction adds the layer's update to every
block: the blocks then stay equal, and their mean (the output head's input) is the dense
stream. What that takes, per form of the stream:

- static coefficients: ``predict`` the identity and ``correct`` ones (their own init); plain
  AltUp's ``extra_embedding`` holds copies of the embedding table, so that blocks 1..K-1
  start as block 0 (Recycled-AltUp copies the embedding by itself);
- dynamic coefficients: the same, and ``router_weight`` zero, so the per-token delta starts
  at zero; a ``clip`` below 1 clips the identity itself;
- Gemma 3n's coefficients: ``prediction_coefs`` and ``correction_coefs`` zero (the fixed
  identity and ones are all that is left), and ``altup_projections`` /
  ``altup_unembed_projections`` the identity, so that the stream's two ends copy the
  embedding in and average equal blocks out. Their rescaling to the embedding's RMS is exact
  but for a token whose mean square is below HF's floor of 1e-5.
"""

from __future__ import annotations

import torch
from torch import nn

from condcomp.surgery.transplant import Transplant

STREAM = "stream"


def upcycle_altup(t: Transplant, altup: nn.Module) -> None:
    """Fill the AltUp stream ``altup`` (the target's ``stream``) so the model starts dense."""
    K = altup.k
    if altup.coefficients == "gemma3n":
        _gemma3n(t, altup)
        return
    t.set(f"{STREAM}.predict", torch.eye(K).repeat(altup.n_layers, 1, 1),
          "the identity: each block predicts itself")
    t.set(f"{STREAM}.correct", torch.ones(altup.n_layers, K),
          "ones: every block takes the layer's whole update")
    if altup.extra_embedding is not None:
        embedding = t.read("tok_emb.weight")
        blocks = "block 1" if K == 2 else f"blocks 1..{K - 1}"
        t.write(f"{STREAM}.extra_embedding", embedding.repeat(1, K - 1),
                f"tok_emb.weight, repeated for {blocks}")
    if altup.router_weight is not None:
        t.set(f"{STREAM}.router_weight", torch.zeros_like(altup.router_weight),
              "zero: the per-token delta starts at zero")
        if altup.clip < 1.0:
            t.note(STREAM, f"clip = {altup.clip:g} clips the identity coefficients "
                   "themselves; a clip of at least 1 starts as the dense model")


def _gemma3n(t: Transplant, altup: nn.Module) -> None:
    eye = torch.eye(altup.d_model).expand_as(altup.altup_projections)
    for name in ("prediction_coefs", "correction_coefs"):
        t.set(f"{STREAM}.{name}", torch.zeros_like(getattr(altup, name)),
              "zero: only the fixed identity (predict) and ones (correct) are left")
    for name in ("altup_projections", "altup_unembed_projections"):
        t.set(f"{STREAM}.{name}", eye, "the identity: equal blocks in and out")
