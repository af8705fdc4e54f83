"""The Sparse FF section: how evenly each block's controller spreads its choice over the
block's units (Jaszczur et al. 2021, sec. 3.1: one active unit per block of N)."""

from __future__ import annotations

from condcomp.analyze import figures, stats
from condcomp.analyze.context import Context, Section, layer_label, percent
from condcomp.analyze.document import Block, Heading, Image, Paragraph, Table

USAGE_FILE = "sparse_ff_unit_usage.png"


def section(ctx: Context) -> Section | None:
    layers = ctx.recorded.units
    if not layers:
        return None
    rows, numbers, panels = [], {}, []
    for name, units in layers.items():
        usage_KS = stats.unit_usage(units.choice_NK, units.block_size)
        evenness_K = stats.evenness(usage_KS)
        idle = float((usage_KS == 0).double().mean())
        panels.append((layer_label(name), usage_KS))
        rows.append([layer_label(name), f"{usage_KS.shape[0]} x {units.block_size}",
                     f"{float(evenness_K.mean()):.3f}", f"{float(evenness_K.min()):.3f}",
                     percent(float(usage_KS.max())), percent(idle)])
        numbers[name] = {"blocks": usage_KS.shape[0], "block_size": units.block_size,
                         "tokens": units.token_idx_N.numel(), "usage": usage_KS.tolist(),
                         "evenness": evenness_K.tolist(),
                         "mean_evenness": float(evenness_K.mean()), "idle_unit_share": idle}
    figures.heatmaps(ctx.out_dir / USAGE_FILE, panels,
                     "Sparse FF: share of tokens choosing each unit of each block", "unit",
                     "block", "share of tokens")
    blocks: list[Block] = [
        Heading("Sparse FF controller usage"),
        Paragraph("How often the controller picks each unit of each block on the validation "
                  "text (eval mode: the argmax per block). Evenness is a block's normalised "
                  "entropy H(usage) / ln N: 1 when every unit of the block is chosen equally "
                  "often, 0 when one unit always is. Busiest unit: the largest share of tokens "
                  "one unit takes in its block (uniform is 1/N); idle units: the share of units "
                  "no token chose."),
        Table(["layer", "blocks x units", "mean evenness", "lowest evenness", "busiest unit",
               "idle units"], rows),
        Image(USAGE_FILE, "Sparse FF unit usage"),
    ]
    return Section("sparse_ff", blocks, {"layers": numbers})
