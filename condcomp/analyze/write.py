"""``condcomp analyze RUN``: load a run, record its routing on validation text, write the
report (``report.md``, ``report.html``, the figures and ``analysis.json``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from condcomp import registry
from condcomp.analyze import (
    DEFAULT_TOKENS,
    altup_section,
    mod_section,
    moe_section,
    sparse_ff_section,
)
from condcomp.analyze.collect import Recorded, record_routing, routed_modules
from condcomp.analyze.context import Context, Section
from condcomp.analyze.document import Block, Heading, Paragraph, Table, code, to_html, to_markdown
from condcomp.data import eval_batches, prepare_data
from condcomp.errors import storage_error
from condcomp.report import RunSummary, human_count, human_si
from condcomp.runs import METRICS_FILE, LoadedRun, load_run, read_metrics, write_atomically
from condcomp.runtime import autocast_dtype, device_name
from condcomp.seams import SEAM_DEFAULTS, SEAMS

# The families whose routing the report analyses; any other (mot, sparse_qkv, a plugin's) is
# named in a note.
ANALYSED = ("moe", "mod", "sparse_ff", "altup")


def analyze_run(run_dir: str | Path, checkpoint: str | Path | None = None,
                tokens: int = DEFAULT_TOKENS, out_dir: str | Path | None = None,
                device: torch.device | str = "cpu",
                log: Callable[[str], object] = print) -> Path:
    """Write the analysis of ``run_dir``'s checkpoint (the newest unless one is named) into
    ``out_dir`` (default: ``<run>/analysis``), on the first ``tokens`` validation tokens, and
    return the path of ``report.md``."""
    run_dir, device = Path(run_dir), torch.device(device)
    run = load_run(run_dir, checkpoint, device)
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, f"cannot create the report folder {out}") from None
    summary = _run_summary(run_dir, run, read_metrics(run_dir))
    numbers: dict[str, Any] = {"run": str(run_dir), "checkpoint": str(run.checkpoint.path),
                               "step": run.checkpoint.step, "families": summary.family,
                               "tokens": 0, "window": 0}
    sections: list[Section] = []
    if routed_modules(run.model):
        recorded = _record(run, tokens, device, log)
        numbers.update(tokens=recorded.tokens_T.numel(), window=recorded.window)
        ctx = Context(recorded, out, run.tokenizer, summary, (run_dir / METRICS_FILE).is_file())
        sections = [s for s in (moe_section.section(ctx), mod_section.section(ctx),
                                sparse_ff_section.section(ctx),
                                altup_section.section(ctx, run.model.stream)) if s is not None]
    numbers["sections"] = {s.key: s.numbers for s in sections}
    blocks = _header(summary, run, numbers, device) + _body(summary, run, sections)
    title = f"What the routers learned: {run_dir.name}"
    write_atomically(out / "report.md", to_markdown(title, blocks))
    write_atomically(out / "report.html", to_html(title, blocks))
    write_atomically(out / "analysis.json",
                     json.dumps(_finite(numbers), indent=1, allow_nan=False) + "\n")
    return out / "report.md"


def _record(run: LoadedRun, tokens: int, device: torch.device,
            log: Callable[[str], object]) -> Recorded:
    """The run's routing decisions on the first ``tokens`` tokens of its validation split, in
    windows of its training length (or of ``tokens``, if fewer)."""
    data = prepare_data(run.cfg.data, tokenizer=run.tokenizer, log=log)
    window = max(1, min(run.cfg.train.seq_len, run.cfg.model.max_seq_len, tokens))
    batches = eval_batches(data.val, run.cfg.train.batch_size, window, tokens)
    return record_routing(run.model, (x for x, _ in batches), device,
                          autocast_dtype(device, run.cfg.train.dtype))


def _body(summary: RunSummary, run: LoadedRun, sections: list[Section]) -> list[Block]:
    if not sections:
        return [Heading("Routing"),
                Paragraph(f"This run has no routing to analyse ({summary.family}): "
                          f"`condcomp analyze` reports on the families "
                          f"{', '.join(map(code, ANALYSED))}.")]
    return [block for section in sections for block in section.blocks] + _not_analysed(run)


def _run_summary(run_dir: Path, run: LoadedRun, metrics: list[dict[str, Any]]) -> RunSummary:
    """The run as the comparison report describes one; its metrics rows carry the expert load
    over training."""
    evals = [row for row in metrics if "val_loss" in row]
    nan = float("nan")
    return RunSummary(
        name=run_dir.name, run_dir=str(run_dir), family=registry.describe(run.cfg.model),
        total_params=run.model.num_params(), active_params=run.model.num_params(active_only=True),
        flops_per_token=run.model.flops_per_token(run.cfg.train.seq_len),
        final_val_loss=evals[-1]["val_loss"] if evals else nan,
        bits_per_byte=evals[-1].get("val_bpb", nan) if evals else nan,
        train_tokens_per_s=nan, decode_tokens_per_s=nan, metrics=metrics,
        n_layers=run.cfg.model.n_layers)


def _header(summary: RunSummary, run: LoadedRun, numbers: dict[str, Any],
            device: torch.device) -> list[Block]:
    rows = [["folder", code(summary.run_dir)],
            ["checkpoint", f"{code(str(run.checkpoint.path))} (step {run.checkpoint.step})"],
            ["families", summary.family],
            ["parameters (active per token)",
             f"{human_count(summary.total_params)} ({human_count(summary.active_params)})"],
            ["forward FLOPs per token", human_si(summary.flops_per_token)],
            ["validation tokens analysed",
             f"{numbers['tokens']:,} (windows of {numbers['window']})" if numbers["tokens"]
             else "none (nothing is routed)"],
            ["device", device_name(device)]]
    return [Table(["run", summary.name], rows)]


def _not_analysed(run: LoadedRun) -> list[Block]:
    """A note naming the run's conditional families that the report does not cover."""
    others = sorted({getattr(run.cfg.model, seam).kind for seam in SEAMS}
                    - set(ANALYSED) - set(SEAM_DEFAULTS.values()))
    if not others:
        return []
    return [Heading("Not analysed"),
            Paragraph(f"The run also has {', '.join(map(code, others))}, which this report "
                      f"does not cover (it analyses {', '.join(map(code, ANALYSED))}).")]


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as None: JSON has no NaN, and a number the report
    cannot state is better missing than wrong."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

