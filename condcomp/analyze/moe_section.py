"""The Mixture-of-Experts section: expert load over training and by layer, co-activation,
the tokens each expert prefers, and how consistent a token's expert is across layers."""

from __future__ import annotations

from typing import Any

import torch

from condcomp.analyze import figures, stats
from condcomp.analyze.collect import ExpertChoices
from condcomp.analyze.context import Context, Section, layer_label, percent
from condcomp.analyze.document import Block, Heading, Image, Paragraph, Table
from condcomp.report import expert_load_history, plot_expert_load

LOAD_FILE = "expert_load_by_layer.png"
HISTORY_FILE = "expert_load_over_training.png"
COACTIVATION_FILE = "expert_coactivation.png"
# Layers whose preferred tokens are tabled in the report (the first and the last); every
# layer's are in analysis.json.
TABLED_LAYERS = 2


def section(ctx: Context) -> Section | None:
    layers = ctx.recorded.experts
    if not layers:
        return None
    blocks: list[Block] = [Heading("Mixture of Experts")]
    numbers: dict[str, Any] = {}
    for part in (_over_training, _by_layer, _coactivation, _preferences, _consistency):
        part_blocks, part_numbers = part(ctx, layers)
        blocks += part_blocks
        numbers.update(part_numbers)
    return Section("moe", blocks, numbers)


def _imbalance(load_E: torch.Tensor) -> float:
    """The largest expert's load over the uniform one, 1/E: 1 is balanced."""
    return float(load_E.max()) * load_E.numel()


def _choice_names(choices: ExpertChoices) -> str:
    noop = choices.num_choices - choices.num_experts
    return f"{choices.num_experts} experts" + (f" + {noop} no-op" if noop else "")


def _over_training(ctx: Context, layers: dict[str, ExpertChoices]
                   ) -> tuple[list[Block], dict[str, Any]]:
    blocks: list[Block] = [Heading("Expert load over training", 3)]
    history = expert_load_history(ctx.run)
    if not ctx.has_metrics:
        return blocks + [Paragraph("Skipped: the run has no `metrics.jsonl` (an imported "
                                   "model has no training history).")], {"over_training": None}
    if not history or max(len(steps) for steps, _ in history.values()) < 2:
        return blocks + [Paragraph("Skipped: `metrics.jsonl` holds fewer than two logged steps "
                                   "with `tokens_per_expert`.")], {"over_training": None}
    plot_expert_load(ctx.out_dir / HISTORY_FILE, ctx.run)
    rows = [[layer_label(name), str(steps[0]), f"{_imbalance(torch.tensor(loads[0])):.2f}",
             str(steps[-1]), f"{_imbalance(torch.tensor(loads[-1])):.2f}"]
            for name, (steps, loads) in sorted(history.items())]
    blocks += [
        Paragraph("Share of each layer's routed tokens that each expert received in training, "
                  "from `metrics.jsonl`. Imbalance is the largest expert's share over the "
                  "uniform share 1/E: 1 is perfectly balanced, E is one expert taking "
                  "everything."),
        Table(["layer", "first step", "imbalance", "last step", "imbalance"], rows),
        Image(HISTORY_FILE, "Expert load over training"),
    ]
    numbers = {name: {"steps": steps, "tokens_per_expert": loads}
               for name, (steps, loads) in sorted(history.items())}
    return blocks, {"over_training": numbers}


def _by_layer(ctx: Context, layers: dict[str, ExpertChoices]
              ) -> tuple[list[Block], dict[str, Any]]:
    loads = {name: stats.choice_load(c.expert_ids_NK, c.num_choices) for name, c in layers.items()}
    widest = max(c.num_choices for c in layers.values())
    matrix = torch.zeros(len(layers), widest, dtype=torch.float64)
    for row, load_E in enumerate(loads.values()):
        matrix[row, :load_E.numel()] = load_E
    figures.heatmaps(ctx.out_dir / LOAD_FILE, [("each MoE layer's routed slots", matrix)],
                     "Expert load on the validation text", "expert", "",
                     "share of routed slots", row_names=[layer_label(n) for n in layers])
    rows = [[layer_label(name), _choice_names(c), str(c.top_k), f"{c.token_idx_N.numel():,}",
             f"{_imbalance(loads[name]):.2f}", str(int((loads[name] == 0).sum()))]
            for name, c in layers.items()]
    blocks: list[Block] = [
        Heading("Expert load by layer", 3),
        Paragraph("Share of each layer's routed slots (tokens x k) that each expert takes on "
                  "the validation text, with the routing of validation and generation "
                  "(dropless; expert choice routes as token choice). Experts after a layer's "
                  "real ones are its no-op experts."),
        Table(["layer", "choices", "k", "tokens", "imbalance", "idle experts"], rows),
        Image(LOAD_FILE, "Expert load by layer"),
    ]
    numbers = {name: {"num_experts": c.num_experts, "num_choices": c.num_choices,
                      "top_k": c.top_k, "tokens": c.token_idx_N.numel(),
                      "load": loads[name].tolist(), "imbalance": _imbalance(loads[name])}
               for name, c in layers.items()}
    return blocks, {"layers": numbers}


def _coactivation(ctx: Context, layers: dict[str, ExpertChoices]
                  ) -> tuple[list[Block], dict[str, Any]]:
    multi = {name: c for name, c in layers.items() if c.top_k > 1}
    if not multi:
        return [], {"coactivation": None}
    matrices = {name: stats.coactivation(c.expert_ids_NK, c.num_choices)
                for name, c in multi.items()}
    figures.heatmaps(ctx.out_dir / COACTIVATION_FILE,
                     [(layer_label(name), m) for name, m in matrices.items()],
                     "Co-activation: share of expert i's tokens also routed to j",
                     "expert j", "expert i", "share of expert i's tokens", vmax=1.0)
    rows = []
    for name, m in matrices.items():
        off_EE = m - torch.diag(m.diagonal())
        i, j = divmod(int(off_EE.argmax()), m.shape[1])
        c = multi[name]
        rows.append([layer_label(name), f"{i} -> {j}", percent(float(off_EE[i, j])),
                     percent((c.top_k - 1) / max(c.num_choices - 1, 1))])
    blocks: list[Block] = [
        Heading("Co-activation", 3),
        Paragraph("For top-k > 1: row i, column j is the share of the tokens routed to expert "
                  "i that were also routed to expert j (OLMoE, Muennighoff et al. 2024, sec. 5). "
                  "The diagonal is 1, and each row of an expert that got tokens sums to k. "
                  "Routing without preference would put (k - 1) / (E - 1) off the diagonal."),
        Table(["layer", "strongest pair i -> j", "share", "without preference"], rows),
        Image(COACTIVATION_FILE, "Co-activation of experts"),
    ]
    return blocks, {"coactivation": {name: m.tolist() for name, m in matrices.items()}}


def _preferences(ctx: Context, layers: dict[str, ExpertChoices]
                 ) -> tuple[list[Block], dict[str, Any]]:
    tokens_T = ctx.recorded.tokens_T
    names = list(layers)
    tabled = names if len(names) <= TABLED_LAYERS else [names[0], names[-1]]
    blocks: list[Block] = [
        Heading("Tokens each expert prefers", 3),
        Paragraph(f"For each expert, the tokens with the largest share of their occurrences "
                  f"routed to it (among the k choices), for tokens seen at least "
                  f"{ctx.min_count} times (OLMoE, Muennighoff et al. 2024, sec. 5, token "
                  f"specialisation); (routed/seen) after each share. A share near 1 means the "
                  f"expert gets that token wherever it occurs."
                  + ("" if tabled == names else
                     f" Shown for {' and '.join(map(layer_label, tabled))}; every layer's are "
                     "in `analysis.json`.")),
    ]
    numbers: dict[str, Any] = {}
    for name, c in layers.items():
        prefs = stats.token_preferences(tokens_T[c.token_idx_N], c.expert_ids_NK,
                                        c.num_choices, ctx.min_count, ctx.top)
        numbers[name] = [ctx.shares_numbers(p) for p in prefs]
        if name in tabled:
            rows = [[str(e), ctx.shares_text(p)] for e, p in enumerate(prefs)]
            blocks += [Heading(layer_label(name), 4),
                       Table(["expert", "preferred tokens"], rows)]
    return blocks, {"token_preferences": numbers}


def _consistency(ctx: Context, layers: dict[str, ExpertChoices]
                 ) -> tuple[list[Block], dict[str, Any]]:
    if len(layers) < 2:
        return [], {"consistency": []}
    n = ctx.recorded.tokens_T.numel()
    top1 = {}
    for name, c in layers.items():  # top-1 choice per analysed token, -1 where not seen
        first_T = torch.full((n,), -1, dtype=torch.long)
        first_T[c.token_idx_N] = c.expert_ids_NK[:, 0].long()
        top1[name] = first_T
    names = list(layers)
    rows, numbers = [], []
    for a, b in zip(names, names[1:]):
        both = (top1[a] >= 0) & (top1[b] >= 0)
        agree = stats.agreement(top1[a][both], top1[b][both], layers[a].num_choices,
                                layers[b].num_choices)
        rows.append([f"{layer_label(a)} -> {layer_label(b)}", f"{agree.tokens:,}",
                     percent(agree.successor_share), percent(agree.independent_share),
                     f"{agree.mutual_information_bits:.3f}",
                     f"{agree.normalised_mutual_information:.3f}"])
        numbers.append({"from": a, "to": b, **vars(agree)})
    blocks: list[Block] = [
        Heading("Consistency across layers", 3),
        Paragraph("For each pair of consecutive MoE layers, over the tokens both saw, with each "
                  "token's top-1 expert a in the first and b in the second: the 'successor "
                  "share' is the share of tokens whose b is the most common successor of their "
                  "a (sum over a of max over b of n(a, b), over n); 'if independent' is what "
                  "that share would be if b did not depend on a (the most common b's share); "
                  "the mutual information I(a; b) in bits, and normalised by min(H(a), H(b)) "
                  "to [0, 1]: 0 when the layers route independently, 1 when one layer's expert "
                  "determines the other's. With few tokens per pair of experts both read high."),
        Table(["layers", "tokens", "successor share", "if independent", "MI (bits)",
               "normalised MI"], rows),
    ]
    return blocks, {"consistency": numbers}
