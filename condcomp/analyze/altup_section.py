"""The AltUp section: the predict and correct coefficients each layer learned (Baykal et al.
2023, Alg. 1), averaged over the validation tokens where they depend on the token."""

from __future__ import annotations

import torch
from torch import nn

from condcomp.analyze import figures
from condcomp.analyze.context import Context, Section
from condcomp.analyze.document import Block, Heading, Image, Paragraph, Table
from condcomp.conditional.altup import AltUp

PREDICT_FILE = "altup_predict.png"
CORRECT_FILE = "altup_correct.png"


def section(ctx: Context, stream: nn.Module) -> Section | None:
    """``stream``: the model's residual stream; no section unless it is AltUp's."""
    sums = ctx.recorded.altup
    if sums is None or not isinstance(stream, AltUp):
        return None
    predict_LKK, correct_LK = sums.means()
    predict_spread_LKK, correct_spread_LK = sums.spreads()
    n_layers, K = correct_LK.shape
    layers = list(range(n_layers))
    figures.lines(ctx.out_dir / PREDICT_FILE, layers,
                  {f"p[{i},{j}]": predict_LKK[:, i, j].tolist()
                   for i in range(K) for j in range(K)},
                  "AltUp: prediction coefficients p[i, j] (block i from block j)", "layer",
                  "coefficient (mean over tokens)")
    figures.lines(ctx.out_dir / CORRECT_FILE, layers,
                  {f"g[{i}]": correct_LK[:, i].tolist() for i in range(K)},
                  "AltUp: correction coefficients g[i]", "layer", "coefficient (mean over tokens)")
    spread_L = torch.maximum(predict_spread_LKK.flatten(1).max(dim=1).values,
                             correct_spread_LK.max(dim=1).values)
    rows = [[str(layer), str(stream.active_block(layer)), _matrix(predict_LKK[layer]),
             _matrix(correct_LK[layer]), f"{float(spread_L[layer]):.3g}"] for layer in layers]
    numbers = {"k": K, "coefficients": stream.coefficients, "tokens": sums.tokens,
               "layers": [{"layer": layer, "active_block": stream.active_block(layer),
                           "predict": predict_LKK[layer].tolist(),
                           "predict_spread": predict_spread_LKK[layer].tolist(),
                           "correct": correct_LK[layer].tolist(),
                           "correct_spread": correct_spread_LK[layer].tolist()}
                          for layer in layers]}
    kind = {"static": "learned scalars, the same for every token",
            "dynamic": "learned scalars plus a per-token delta read off the active block "
                       "(clipped), averaged over the validation tokens",
            "gemma3n": "Gemma 3n's: the identity (predict) and 1 (correct) plus a function of "
                       "the token's router output, averaged over the validation tokens"}
    blocks: list[Block] = [
        Heading("AltUp coefficients"),
        Paragraph(f"The stream holds K = {K} blocks; each layer computes on its active block "
                  f"and predicts the others, x_hat = P x, then corrects every block by "
                  f"g[i] times the layer's innovation (Baykal et al. 2023, Alg. 1). The "
                  f"coefficients here are `{stream.coefficients}`: {kind[stream.coefficients]}. "
                  f"At initialisation P is the identity and g is 1. Spread: the largest "
                  f"standard deviation of a coefficient over the tokens (0 for static ones)."),
        Table(["layer", "active block", "predict P (mean)", "correct g (mean)", "spread"], rows),
        Image(PREDICT_FILE, "AltUp prediction coefficients by layer"),
        Image(CORRECT_FILE, "AltUp correction coefficients by layer"),
    ]
    return Section("altup", blocks, numbers)


def _matrix(values: torch.Tensor) -> str:
    """A vector or matrix of coefficients in three decimals: ``[[1.000, 0.012], ...]``."""
    if values.dim() == 1:
        return "[" + ", ".join(f"{v:.3f}" for v in values.tolist()) + "]"
    return "[" + ", ".join(_matrix(row) for row in values) + "]"
