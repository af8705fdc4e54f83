"""The Mixture-of-Depths section: which tokens enter the routed blocks, and at which
positions of a window."""

from __future__ import annotations

from condcomp.analyze import figures, stats
from condcomp.analyze.context import Context, Section, layer_label, percent
from condcomp.analyze.document import Block, Heading, Image, Paragraph, Table

POSITION_FILE = "mod_routed_by_position.png"


def section(ctx: Context) -> Section | None:
    depths = ctx.recorded.depths
    if not depths:
        return None
    rec = ctx.recorded
    rows, numbers, by_position = [], {}, {}
    for name, routed_T in depths.items():
        tokens_U, counts_U, hits_U1 = stats.hits_by_token(rec.tokens_T, routed_T.unsqueeze(1))
        most = stats.ranked_by_share(tokens_U, counts_U, hits_U1[:, 0], ctx.min_count, ctx.top)
        least = stats.ranked_by_share(tokens_U, counts_U, hits_U1[:, 0], ctx.min_count, ctx.top,
                                      most=False)
        position_L = stats.share_by_position(routed_T, rec.positions_T, rec.window)
        share = float(routed_T.double().mean()) if routed_T.numel() else 0.0
        by_position[layer_label(name)] = position_L.tolist()
        rows.append([layer_label(name), percent(share), ctx.shares_text(most), ctx.shares_text(least)])
        numbers[name] = {"routed_share": share, "by_position": position_L.tolist(),
                         "most_routed": ctx.shares_numbers(most),
                         "least_routed": ctx.shares_numbers(least)}
    figures.lines(ctx.out_dir / POSITION_FILE, list(range(rec.window)), by_position,
                  "Mixture-of-Depths: share of tokens that enter the block, by position",
                  "position in the window", "share routed into the block")
    blocks: list[Block] = [
        Heading("Mixture-of-Depths"),
        Paragraph(f"Which tokens enter each routed block on the validation text, with the "
                  f"causal routing of validation and generation (a token enters when its "
                  f"router logit, or the predictor's, is positive; training takes the top "
                  f"`capacity` of each sequence instead). Most and least routed: the tokens with "
                  f"the largest and smallest share of their occurrences routed into the block, "
                  f"among tokens seen at least {ctx.min_count} times; (routed/seen) after "
                  f"each share."),
        Table(["layer", "routed share", "most routed tokens", "least routed tokens"], rows),
        Image(POSITION_FILE, "Routed share by position"),
    ]
    return Section("mod", blocks, {"layers": numbers})

