"""The analysis report's figures: heat maps and line plots, written as PNG.

Drawn as :mod:`condcomp.report` draws: on a bare :class:`~matplotlib.figure.Figure` with the
Agg canvas, not through ``pyplot``, so no display is needed and the caller's matplotlib
backend is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_DPI = 110
_PANEL_IN = 3.2  # the side of one heat-map panel, in inches
_MAX_COLUMNS = 4
_LEGEND_MAX = 12  # more lines than this go without a legend, which would hide the plot


def heatmaps(path: Path, panels: Sequence[tuple[str, torch.Tensor]], title: str, xlabel: str,
             ylabel: str, colour_label: str, vmax: float | None = None,
             row_names: Sequence[str] | None = None) -> None:
    """One heat map per ``(panel title, matrix)``, on one colour scale (0 to ``vmax``, or the
    largest value), in a grid of up to four columns; ``row_names`` label the rows."""
    columns = min(len(panels), _MAX_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    top = vmax if vmax is not None else max(float(m.max()) for _, m in panels if m.numel())
    fig = Figure(figsize=(1.2 + _PANEL_IN * columns, 0.6 + _PANEL_IN * 0.85 * rows), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    for ax, (name, matrix) in zip(axes.flat, panels):
        image = ax.imshow(matrix.float().numpy(), aspect="auto", origin="upper", cmap="viridis",
                          vmin=0.0, vmax=top or 1.0, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if row_names is not None:
            ax.set_yticks(range(len(row_names)), row_names)
        else:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=list(axes.flat), label=colour_label)
    fig.savefig(path, dpi=_DPI)


def lines(path: Path, xs: Sequence[int], series: dict[str, Sequence[float]], title: str,
          xlabel: str, ylabel: str) -> None:
    """One line per named series over the whole numbers ``xs``."""
    fig = Figure(figsize=(7.5, 4.2), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, ys in series.items():
        ax.plot(list(xs), list(ys), marker="o" if len(xs) < 20 else None, markersize=3,
                linewidth=1.2, label=label)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers and positions
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if 0 < len(series) <= _LEGEND_MAX:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=_DPI)
