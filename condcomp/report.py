"""Comparison report for ``condcomp compare``: plots, a markdown table and a JSON summary.

``condcomp compare SUITE`` trains several models on the same data with the same token
budget, then hands one :class:`RunSummary` per model to :func:`write_report`, which writes::

    out_dir/
        report.md                 # table + how-to-read + embedded plots + notes
        summary.json              # the table data, machine readable
        val_loss_vs_tokens.png    # sample efficiency
        val_loss_vs_flops.png     # compute efficiency (training FLOPs = 3x forward)
        val_loss_vs_time.png      # wall-clock efficiency on this device

Plots are drawn on a bare :class:`~matplotlib.figure.Figure` with the Agg canvas rather than
through ``pyplot``: that needs no display, leaves the caller's global matplotlib backend
alone (``matplotlib.use`` would switch it for a notebook user too) and keeps no figure alive
in pyplot's registry, so nothing has to be closed and nothing leaks across calls.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import EngFormatter

from condcomp.machine_load import BUSY_SHARE, is_busy

__all__ = ["RunSummary", "write_report", "train_flops", "human_count", "human_si", "PLOT_FILES"]

# Training FLOPs per token = forward + backward, with the backward pass costing about twice
# the forward one (Kaplan et al. 2020). Shared by the FLOPs plot and the how-to-read text.
TRAIN_FLOPS_MULTIPLIER = 3

# Plot file names, in the order they appear in report.md.
PLOT_FILES = {
    "tokens": "val_loss_vs_tokens.png",
    "flops": "val_loss_vs_flops.png",
    "time": "val_loss_vs_time.png",
}

_DPI = 120
_FIGSIZE = (7.5, 4.8)
_MISSING = "n/a"
_BUSY_MARK = "*"  # on a throughput measured while other processes were busy on the CPUs
_LOSS_LABEL = "validation loss (cross-entropy, nats/token)"


@dataclass
class RunSummary:
    """What the report needs to know about one trained model of a suite.

    ``metrics`` holds the rows of the run's ``metrics.jsonl``. Every row has ``step``,
    ``tokens`` and ``elapsed_s``; rows written at an evaluation also have ``val_loss``.
    Other keys (``train_loss``, ``lr``, aux losses, routing stats...) are ignored here.
    Float fields may be NaN when a quantity was not measured; the report shows "n/a".
    """

    name: str  # model name in the suite, e.g. "dense-small"
    run_dir: str  # path to that model's run directory
    family: str  # short description, e.g. "dense" or "moe(top2) on odd layers"
    total_params: int
    active_params: int  # params touched per token (== total for dense)
    flops_per_token: float  # forward FLOPs per token (analytic); training FLOPs = 3x this
    final_val_loss: float
    bits_per_byte: float
    train_tokens_per_s: float
    decode_tokens_per_s: float  # batch-1 decode
    # The share of the CPUs other processes used while the model trained / decoded
    # (condcomp.machine_load); None where it was not measured.
    train_other_cpu_share: float | None = None
    decode_other_cpu_share: float | None = None
    metrics: list[dict] = dataclasses.field(default_factory=list)
    # Mixture-of-Depths runs: a validation text as (token text, blocks it went through).
    token_depths: list[tuple[str, int]] | None = None
    n_layers: int = 0
    # Where the model started, for one that did not start from scratch: "continued from
    # dense-1m", "upcycled from dense-1m", "distilled from switch" ("": from scratch).
    start: str = ""
    # What the model it continued or was upcycled from spent before it (0 for the others):
    # the start's own training tokens and FLOPs, its start's included.
    start_tokens: float = 0.0
    start_train_flops: float = 0.0
    # A distilled model's teacher: its forward FLOPs per token of the student's training.
    teacher_flops_per_token: float = 0.0
    # A distilled model: (L_base - L_student) / (L_base - L_teacher), None where not asked.
    teacher_gain_kept: float | None = None


# --------------------------------------------------------------------------- formatting


def _finite(value: object) -> float | None:
    """``value`` as a float if it is a finite real number, else None.

    Metrics rows come from JSON written by other code, so values may be missing, None, NaN
    (a diverged eval) or of an unexpected type; all of those count as "no value".
    ``bool`` is excluded explicitly because it is an ``int`` subclass.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _human(value: object, suffixes: Sequence[str]) -> str:
    """Format with three significant digits and a thousands suffix: 45.6k, 1.23M, 512."""
    x = _finite(value)
    if x is None:
        return _MISSING
    sign = "-" if x < 0 else ""
    scaled = abs(x)
    for i, suffix in enumerate(suffixes):
        text = f"{scaled:.3g}"
        # Move up a suffix only once rounding to 3 digits reaches 1000, so 999.6k prints
        # as 1M rather than "1e+03k".
        if float(text) < 1000:
            return f"{sign}{text}{suffix}"
        if i == len(suffixes) - 1:  # beyond the largest suffix: plain digits, no exponent
            return f"{sign}{scaled:,.0f}{suffix}"
        scaled /= 1000
    raise AssertionError("unreachable: the last suffix always returns")


def human_count(value: object) -> str:
    """Human-readable count (parameters, tokens): 512, 45.6k, 1.23M, 7B, 1.5T."""
    return _human(value, ("", "k", "M", "B", "T"))


def human_si(value: object) -> str:
    """Human-readable SI quantity (FLOPs, rates): 512, 45.6k, 1.23M, 3.1G, 2P."""
    return _human(value, ("", "k", "M", "G", "T", "P", "E"))


def _fmt_loss(value: object) -> str:
    x = _finite(value)
    return _MISSING if x is None else f"{x:.4f}"


def _md_cell(text: str) -> str:
    """Escape text for a markdown table cell: a bare '|' would split the cell."""
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- curves


# An x-axis is a function of (run, metrics row) -> x value, or None if the row lacks it.
XOf = Callable[[RunSummary, dict], "float | None"]


def _x_tokens(run: RunSummary, row: dict) -> float | None:
    tokens = _finite(row.get("tokens"))
    return None if tokens is None else run.start_tokens + tokens


def _x_train_flops(run: RunSummary, row: dict) -> float | None:
    """The training FLOPs spent to reach ``row``: the model's own forward and backward on its
    tokens, a teacher's forward on them, and what the model it started from spent."""
    tokens = _finite(row.get("tokens"))
    fpt = _finite(run.flops_per_token)
    if tokens is None or fpt is None:
        return None
    own = TRAIN_FLOPS_MULTIPLIER * fpt + run.teacher_flops_per_token
    return run.start_train_flops + tokens * own


def train_flops(run: RunSummary) -> float | None:
    """The training FLOPs of the whole run (as the FLOPs plot counts them), from its last
    metrics row that counts tokens; None for a run that logged none."""
    rows = [row for row in run.metrics if _finite(row.get("tokens")) is not None]
    return _x_train_flops(run, max(rows, key=lambda row: row["tokens"])) if rows else None


def _x_elapsed(run: RunSummary, row: dict) -> float | None:
    return _finite(row.get("elapsed_s"))


def _val_curve(run: RunSummary, x_of: XOf, positive_x: bool) -> tuple[list[float], list[float]]:
    """(xs, ys) of the run's validation points, sorted by x.

    Rows without a finite ``val_loss`` or x are dropped; with ``positive_x`` (log axes) so
    are x <= 0, e.g. an eval at step 0 before any token was seen.
    """
    points = []
    for row in run.metrics:
        y = _finite(row.get("val_loss"))
        x = x_of(run, row)
        if y is None or x is None or (positive_x and x <= 0):
            continue
        points.append((x, y))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def _has_val_rows(run: RunSummary) -> bool:
    return any(_finite(row.get("val_loss")) is not None for row in run.metrics)


def _plot_val_loss(
    path: Path,
    runs: Sequence[RunSummary],
    x_of: XOf,
    title: str,
    xlabel: str,
    log_x: bool = False,
    eng_x_unit: str | None = None,
) -> None:
    """Write one PNG with a validation-loss line per run that has validation points."""
    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)  # attach the non-interactive Agg canvas explicitly
    ax = fig.add_subplot()
    plotted = 0
    for run in runs:
        xs, ys = _val_curve(run, x_of, positive_x=log_x)
        if xs:  # runs without validation rows get no line (the table says n/a)
            # Markers because evals are sparse: a 2-point "line" should still read as data.
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=run.name)
            plotted += 1
    if log_x and plotted:
        ax.set_xscale("log")
    elif eng_x_unit is not None:
        ax.xaxis.set_major_formatter(EngFormatter(unit=eng_x_unit))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_LOSS_LABEL)
    ax.grid(True, which="major", alpha=0.3)
    if plotted:
        ax.legend(loc="upper right", fontsize="small")
    else:
        # An empty axes with no explanation looks like a plotting bug.
        ax.text(
            0.5,
            0.5,
            "no validation points",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def _write_plots(out_dir: Path, suite_name: str, runs: Sequence[RunSummary]) -> None:
    # A model that started from another counts its start's tokens and FLOPs (and a
    # teacher's forward FLOPs): the labels say so where one did.
    started = any(run.start for run in runs)
    _plot_val_loss(
        out_dir / PLOT_FILES["tokens"],
        runs,
        _x_tokens,
        title=f"{suite_name}: validation loss vs training tokens",
        xlabel="training tokens" + (", the start's included" if started else ""),
        eng_x_unit="",
    )
    flops = (f"{TRAIN_FLOPS_MULTIPLIER} x forward FLOPs/token x tokens" if not started
             else "the start's and a teacher's forward included")
    _plot_val_loss(
        out_dir / PLOT_FILES["flops"],
        runs,
        _x_train_flops,
        title=f"{suite_name}: validation loss vs training compute",
        xlabel=f"training FLOPs ({flops}, log scale)",
        log_x=True,
    )
    _plot_val_loss(
        out_dir / PLOT_FILES["time"],
        runs,
        _x_elapsed,
        title=f"{suite_name}: validation loss vs wall-clock time",
        xlabel="elapsed training time (s)",
    )


# --------------------------------------------------------------------------- expert load

# Metrics keys ending so hold a per-expert vector (the fraction of routed tokens per expert).
EXPERT_LOAD_SUFFIX = ".tokens_per_expert"


def expert_load_history(run: RunSummary) -> dict[str, tuple[list[int], list[list[float]]]]:
    """Per MoE layer: the logged steps and, at each, the fraction of tokens per expert."""
    history: dict[str, tuple[list[int], list[list[float]]]] = {}
    for row in run.metrics:
        for key, value in row.items():
            if key.endswith(EXPERT_LOAD_SUFFIX) and isinstance(value, list):
                steps, loads = history.setdefault(key[: -len(EXPERT_LOAD_SUFFIX)], ([], []))
                steps.append(int(row["step"]))
                loads.append([float(v) for v in value])
    return history


def expert_load_file(run: RunSummary) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in run.name)
    return f"expert_load_{safe}.png"


def plot_expert_load(path: Path, run: RunSummary) -> bool:
    """A heat map per MoE layer (experts x training steps, colour = share of tokens), stacked
    as layers; False when the run has no MoE layer."""
    history = expert_load_history(run)
    if not history:
        return False
    fig = Figure(figsize=(_FIGSIZE[0], 1.0 + 1.6 * len(history)), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(history), 1, squeeze=False)[:, 0]
    # One colour scale for every layer, so the shared colour bar reads right on each panel.
    vmax = max(max(max(load) for load in loads) for _, loads in history.values()) or 1.0
    image = None
    for ax, (layer, (steps, loads)) in zip(axes, sorted(history.items())):
        matrix = [list(col) for col in zip(*loads)]  # experts x steps
        image = ax.imshow(matrix, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax,
                          extent=(steps[0], steps[-1], -0.5, len(matrix) - 0.5),
                          interpolation="nearest")
        ax.set_ylabel(f"{layer}\nexpert", fontsize=7)
    axes[-1].set_xlabel("training step")
    axes[0].set_title(f"{run.name}: share of routed tokens per expert")
    fig.colorbar(image, ax=list(axes), label="share of tokens")
    fig.savefig(path, dpi=_DPI)
    return True


# --------------------------------------------------------------------------- token depth


def token_depth_file(run: RunSummary) -> str:
    return expert_load_file(run).replace("expert_load_", "token_depth_", 1)


def _plot_token_depths(path: Path, run: RunSummary, chars_per_line: int = 100) -> bool:
    """The sample text, each token on a background as dark as the number of blocks it went
    through (Mixture-of-Depths); False when the run has no such sample."""
    if not run.token_depths:
        return False
    lines: list[list[tuple[str, int]]] = [[]]
    width = 0
    for text, depth in run.token_depths:
        for piece in text.split("\n")[:-1]:  # a newline ends the line
            lines[-1].append((piece, depth))
            lines.append([])
            width = 0
        last = text.split("\n")[-1]
        if width + len(last) > chars_per_line:
            lines.append([])
            width = 0
        lines[-1].append((last, depth))
        width += len(last)
    lines = lines[:30]
    width_in = 9.0
    # A monospace glyph is 0.6 em wide: size the font so one character fills one x unit.
    fontsize = width_in * 0.98 * 72 / chars_per_line / 0.6
    fig = Figure(figsize=(width_in, 0.8 + 0.24 * len(lines)), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98 - 0.5 / (0.8 + 0.24 * len(lines))))
    ax.set_xlim(0, chars_per_line)
    ax.set_ylim(len(lines), 0)
    ax.axis("off")
    cmap = matplotlib.colormaps["Blues"]
    top = max(run.n_layers, max(d for _, d in run.token_depths), 1)
    for row, line in enumerate(lines):
        col = 0
        for piece, depth in line:
            if piece:
                ax.add_patch(Rectangle((col, row), len(piece), 1,
                                       color=cmap(0.05 + 0.55 * depth / top), linewidth=0))
                ax.text(col, row + 0.75, piece, fontfamily="monospace", fontsize=fontsize)
            col += len(piece)
    fig.suptitle(f"{run.name}: darker tokens went through more of the {top} blocks", fontsize=9)
    fig.savefig(path, dpi=_DPI)
    return True


# --------------------------------------------------------------------------- markdown

_COLUMNS = (
    "model",
    "family",
    "total params",
    "active params",
    "FLOPs/token (fwd)",
    "final val loss",
    "bits/byte",
    "train tokens/s",
    "decode tokens/s (batch 1)",
)


# With a model that started from another: after "family", where it started; after
# "FLOPs/token (fwd)", its training FLOPs, the start's included.
_START_COLUMNS = ("start", "training FLOPs")


def _columns(with_starts: bool) -> list[str]:
    columns = list(_COLUMNS)
    if with_starts:
        columns.insert(2, _START_COLUMNS[0])
        columns.insert(6, _START_COLUMNS[1])
    return columns


def _best_val_loss(runs: Sequence[RunSummary]) -> float | None:
    losses = [x for x in (_finite(r.final_val_loss) for r in runs) if x is not None]
    return min(losses) if losses else None


def _table_row(run: RunSummary, best: float | None, with_starts: bool) -> str:
    loss = _fmt_loss(run.final_val_loss)
    if best is not None and _finite(run.final_val_loss) == best:
        loss = f"**{loss}**"  # ties are all bold: none of them is "the" winner
    cells = [
        _md_cell(run.name),
        _md_cell(run.family),
        human_count(run.total_params),
        human_count(run.active_params),
        human_si(run.flops_per_token),
        loss,
        _fmt_loss(run.bits_per_byte),
        _throughput(run.train_tokens_per_s, run.train_other_cpu_share),
        _throughput(run.decode_tokens_per_s, run.decode_other_cpu_share),
    ]
    if with_starts:
        cells.insert(2, _md_cell(run.start or "scratch"))
        cells.insert(6, human_si(train_flops(run)))
    return "| " + " | ".join(cells) + " |"


def _throughput(tokens_per_s: float, other_cpu_share: float | None) -> str:
    return human_si(tokens_per_s) + (_BUSY_MARK if is_busy(other_cpu_share) else "")


def _busy_note(runs: Sequence[RunSummary]) -> list[str]:
    """The note under the table that explains the mark on throughputs taken on a busy machine,
    naming each and how busy it was; nothing when none was."""
    busy = [f"{share:.0%} while {run.name} {what}" for run in runs
            for what, share in (("trained", run.train_other_cpu_share),
                                ("decoded", run.decode_other_cpu_share)) if is_busy(share)]
    if not busy:
        return []
    # Escaped: a line that starts with "* " is a list item in markdown.
    return ["", f"\\{_BUSY_MARK} Measured while other processes used more than "
            f"{BUSY_SHARE:.0%} of the CPUs ({'; '.join(busy)}): such a throughput understates "
            "the model's and does not compare with the others; rerun on an idle machine."]


def _table(runs: Sequence[RunSummary]) -> list[str]:
    best = _best_val_loss(runs)
    with_starts = any(run.start for run in runs)
    columns = _columns(with_starts)
    # Text columns left-aligned, numbers right-aligned.
    align = [":---" if name in ("model", "family", "start") else "---:" for name in columns]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += [_table_row(run, best, with_starts) for run in runs]
    return lines + _busy_note(runs)


def _how_to_read(device: str, with_starts: bool) -> list[str]:
    budget = ("All runs were trained on the same data with the same token budget, so the "
              "loss-vs-tokens plot compares sample efficiency. ")
    if with_starts:
        budget = ("All runs were trained on the same data. A model that started from another "
                  "(*start*) counts the training tokens and FLOPs of that model as its own "
                  "(*training FLOPs*; the x-axes of the loss-vs-tokens and loss-vs-FLOPs "
                  "plots), and a distilled model counts its teacher's forward passes in its "
                  "FLOPs (the notes say how), so an equal x is equal spending from scratch; the "
                  "loss-vs-time plot shows each run's own training time. ")
    return [
        "## How to read this",
        "",
        budget + "*FLOPs/token* is the analytic "
        "forward-pass cost per token of the parameters a token actually touches (*active "
        "params*); training compute is taken as "
        f"{TRAIN_FLOPS_MULTIPLIER}x that (forward + backward), which is the x-axis of the "
        "loss-vs-FLOPs plot. Conditional-computation models pay off when they reach a lower "
        "loss at equal FLOPs despite more total parameters. The loss-vs-time plot and the "
        f"throughput columns are measurements on `{device}` and include implementation "
        "overheads (routing, dispatch, kernels) that FLOP counts ignore. Losses are "
        "cross-entropy in nats/token (lower is better; the best final val loss is in bold); "
        "bits/byte does not depend on the tokenizer.",
    ]


def _plots_section(runs: Sequence[RunSummary]) -> list[str]:
    captions = {
        "tokens": "Validation loss vs training tokens",
        "flops": "Validation loss vs training FLOPs",
        "time": "Validation loss vs wall-clock time",
    }
    lines = ["## Plots", ""]
    for key, filename in PLOT_FILES.items():
        # Relative links so the report directory can be moved or zipped as a whole.
        lines += [f"![{captions[key]}]({filename})", ""]
    missing = [run.name for run in runs if not _has_val_rows(run)]
    if missing:
        lines += [f"Not plotted (no validation points): {', '.join(missing)}.", ""]
    routed = [run for run in runs if expert_load_history(run)]
    if routed:
        lines += ["## Expert load", "",
                  "Share of each MoE layer's routed tokens that each expert received, over "
                  "training (uniform is 1/E; a dark row is an expert left idle).", ""]
        lines += [f"![Expert load of {run.name}]({expert_load_file(run)})\n" for run in routed]
    deep = [run for run in runs if run.token_depths]
    if deep:
        lines += ["## Blocks per token", "",
                  "Validation text, each token shaded by how many blocks it went through "
                  "(Mixture-of-Depths, with the causal routing that generation uses).", ""]
        lines += [f"![Blocks per token of {run.name}]({token_depth_file(run)})\n"
                  for run in deep]
    return lines


def _render_markdown(
    suite_name: str, runs: Sequence[RunSummary], notes: Sequence[str], device: str
) -> str:
    lines = [f"# Comparison report: {suite_name}", "", f"Device: `{device}`", ""]
    lines += _table(runs) if runs else ["No runs."]
    lines += [""] + _how_to_read(device, any(run.start for run in runs)) + [""]
    lines += _plots_section(runs)
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- json


def _json_value(value: object) -> object:
    """NaN/inf are not valid JSON; write them as null like the table writes n/a."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _summary(suite_name: str, runs: Sequence[RunSummary], device: str) -> dict:
    rows = [
        {
            f.name: _json_value(getattr(run, f.name))
            for f in dataclasses.fields(RunSummary)
            if f.name not in ("metrics", "token_depths")
        }
        for run in runs
    ]
    return {
        "suite": suite_name,
        "device": device,
        "train_flops_multiplier": TRAIN_FLOPS_MULTIPLIER,
        # *_other_cpu_share above this marked the throughput as taken on a busy machine
        "busy_share": BUSY_SHARE,
        "runs": rows,
    }


# --------------------------------------------------------------------------- entry point


def write_report(
    out_dir: Path,
    suite_name: str,
    runs: list[RunSummary],
    notes: list[str] | None = None,
    device: str = "cpu",
) -> Path:
    """Write the comparison report of a suite into ``out_dir`` and return ``report.md``'s path.

    ``out_dir`` is created if needed; existing report files in it are overwritten. Runs
    without validation rows are listed in the table with "n/a" and left out of the plots.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_plots(out_dir, suite_name, runs)
    for run in runs:
        plot_expert_load(out_dir / expert_load_file(run), run)
        _plot_token_depths(out_dir / token_depth_file(run), run)
    summary_path = out_dir / "summary.json"
    summary_path.write_text(
        json.dumps(_summary(suite_name, runs, device), indent=2, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    report_path = out_dir / "report.md"
    report_path.write_text(
        _render_markdown(suite_name, runs, notes or [], device), encoding="utf-8"
    )
    return report_path
