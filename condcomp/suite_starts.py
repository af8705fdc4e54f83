"""Where the models of a comparison suite start, and what the report counts for them.

A suite model (:mod:`condcomp.compare`) trains from scratch, or from an earlier model of the
suite: ``init = "continue"`` from its final weights (``train.init_from``), ``init =
"upcycle"`` from its weights upcycled into this model's families
(:func:`condcomp.surgery.upcycle.upcycle`), and with ``teacher`` distilled from its run
(``distill.teacher``). The report then counts what the start spent: a continued or upcycled
model's training tokens and FLOPs include those of the model it started from, and a distilled
model's FLOPs its teacher's forward passes on its tokens; a distilled model measured against
the same student from scratch (``gain_baseline``) gets the share of its teacher's gain it kept.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from condcomp.checkpoint import list_checkpoints
from condcomp.config import ModelConfig, RunConfig
from condcomp.errors import ConfigError
from condcomp.hf.folders import model_toml
from condcomp.model import TransformerLM
from condcomp.report import TRAIN_FLOPS_MULTIPLIER, RunSummary, train_flops
from condcomp.runs import read_config
from condcomp.surgery.upcycle import check_dense, check_families, check_skeleton, upcycle

# Where a model's weights start: fresh, a copy of an earlier model's final weights, or an
# earlier dense model's upcycled into this model's families.
INITS = ("scratch", "continue", "upcycle")
STARTED = {"continue": "continued", "upcycle": "upcycled"}  # the report's words for them
UPCYCLED_DIR = "upcycled"  # <out>/<model>/upcycled: the upcycled start of an "upcycle" model
# Switch Transformer (Fedus et al. 2021, sec. 5, Table 6): a dense student distilled from a
# sparse teacher keeps about 30% of the teacher's quality gain over the dense model.
SWITCH_GAIN_KEPT = 0.30


@dataclass(frozen=True)
class Start:
    """A suite model's start: the ``init``, ``init_from``, ``teacher`` and ``gain_baseline``
    of its entry, each name an earlier model's."""

    init: str = "scratch"  # one of INITS
    init_from: str = ""  # with init "continue" or "upcycle": the model it starts from
    teacher: str = ""  # the model it is distilled from
    gain_baseline: str = ""  # with a teacher: this model trained from scratch, no teacher

    def check(self, key: str, name: str, earlier: list[str], later: list[str]) -> None:
        """One ConfigError for a value that does not hold; ``key`` is the entry's key
        (``models[3]``), ``name`` its model's name."""
        if self.init not in INITS:
            raise ConfigError(f"{key}.init = {self.init!r} is unknown; use one of {list(INITS)}")
        if self.init != "scratch" and not self.init_from:
            raise ConfigError(f"{key}.init = {self.init!r} starts from another model's weights; "
                              f"name it with {key}.init_from = \"<an earlier model's name>\"")
        if self.init_from and self.init == "scratch":
            raise ConfigError(f"{key}.init_from = {self.init_from!r} names a model to start "
                              f"from, but {key}.init is 'scratch'; set init = 'continue' "
                              "(its final weights) or 'upcycle' (upcycled into this model)")
        if self.gain_baseline and not self.teacher:
            raise ConfigError(f"{key}.gain_baseline = {self.gain_baseline!r} measures what a "
                              f"distilled model kept of its teacher's gain; set {key}.teacher "
                              "too, or drop gain_baseline")
        for ref in ("init_from", "teacher", "gain_baseline"):
            other = getattr(self, ref)
            if not other or other in earlier:
                continue
            where = ("the model itself" if other == name else
                     f"listed after {name!r}" if other in later else "no model of the suite")
            raise ConfigError(f"{key}.{ref} = {other!r} is {where}; models train in the "
                              f"file's order, so name one listed above {name!r}: {earlier}")

    def set_paths(self, raw: dict[str, Any], out: Path, name: str) -> None:
        """Point the raw config of model ``name`` at the runs under ``out`` it starts from."""
        if self.init == "continue":
            raw.setdefault("train", {})["init_from"] = str(out / self.init_from)
        elif self.init == "upcycle":
            raw.setdefault("train", {})["init_from"] = str(out / name / UPCYCLED_DIR)
        if self.teacher:
            raw.setdefault("distill", {})["teacher"] = str(out / self.teacher)

    @property
    def words(self) -> str:
        """Where it starts, for the report ("": from scratch, without a teacher)."""
        starts = [f"{STARTED[self.init]} from {self.init_from}"] if self.init_from else []
        if self.teacher:
            starts.append(f"distilled from {self.teacher}")
        return ", ".join(starts)


# ----------------------------------------------------------------------------- the checks


def check_continue(source: ModelConfig, target: ModelConfig, source_name: str) -> None:
    """A continued model loads its source's weights, so both must hold the same tensors; one
    ConfigError before any model trains, naming the first that differ."""
    # vocab_size 0 takes the tokenizer's, the same for every model of the suite.
    vocab = source.vocab_size or target.vocab_size or 1
    source_shapes, target_shapes = (
        _weight_shapes(dataclasses.replace(m, vocab_size=m.vocab_size or vocab))
        for m in (source, target))
    differ = sorted(name for name in source_shapes.keys() | target_shapes.keys()
                    if source_shapes.get(name) != target_shapes.get(name))
    if differ:
        shown = ", ".join(f"{name} ({_shape(source_shapes.get(name))} in {source_name!r}, "
                          f"{_shape(target_shapes.get(name))} here)" for name in differ[:3])
        more = ", ..." if len(differ) > 3 else ""
        raise ConfigError(f"init = 'continue' loads the weights of {source_name!r}, which do not "
                          f"fit this model: {shown}{more}; give it the model keys of "
                          f"{source_name!r}, or use init = 'upcycle' to change its families")


def _weight_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model's state dict and its shape, built on the meta device (no
    memory, no initialisation)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in TransformerLM(model).state_dict().items()}


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(list(shape))


def check_upcycle(source: ModelConfig, target: ModelConfig, source_name: str) -> None:
    """What ``condcomp upcycle`` would refuse, before any model trains: a source that is not
    dense, a target family without a mapping, or another dense skeleton."""
    check_dense(source, f"model {source_name!r}")
    check_families(target)
    check_skeleton(source, target)


def write_upcycled(cfg: RunConfig, source: Path, log: Callable[[str], None]) -> None:
    """Upcycle the run ``source`` into the model of ``cfg``, in the folder its
    ``train.init_from`` names, unless an earlier run of the suite wrote it already."""
    target = Path(cfg.train.init_from)
    if list_checkpoints(target):
        log(f"starting from {target}, upcycled before")
        return
    # A folder without a checkpoint is an upcycle that was stopped halfway: write it again.
    shutil.rmtree(target, ignore_errors=True)
    # upcycle() reads its target from a config file: this model's, without the start it is
    # about to write (the [distill] table, not in the file, plays no part in the weights).
    target_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=""))
    with tempfile.TemporaryDirectory(prefix="condcomp-suite-") as tmp:
        config_file = Path(tmp) / "model.toml"
        config_file.write_text(model_toml(target_cfg, source), encoding="utf-8")
        result = upcycle(source, config_file, target, eval_tokens=0)
    verdict = ("preserved" if result.preserved else
               f"changed (max |logit difference| {result.max_logit_difference:.2e})")
    log(f"upcycled {result.source} into {target}; the function is {verdict}")


# ----------------------------------------------------------------------------- the report


def add_start(summaries: Mapping[str, RunSummary], name: str, start: Start,
              cfg: RunConfig) -> None:
    """Say in model ``name``'s summary where it started, and count what its start spent: the
    training tokens and FLOPs of the model it continued or was upcycled from (whose summary
    is in ``summaries`` already), and its teacher's forward FLOPs per token."""
    summary = summaries[name]
    summary.start = start.words
    if start.init_from:
        source = summaries[start.init_from]
        summary.start_tokens = source.start_tokens + trained_tokens(source)
        summary.start_train_flops = train_flops(source) or 0.0
    if start.teacher:
        summary.teacher_flops_per_token = forward_flops_per_token(
            Path(cfg.distill.teacher), cfg.train.seq_len)


def trained_tokens(summary: RunSummary) -> float:
    """The tokens the run itself trained on (its start's not included)."""
    return max((row.get("tokens", 0) for row in summary.metrics), default=0)


def forward_flops_per_token(run_dir: Path, seq_len: int) -> float:
    """A run's analytic forward FLOPs per token at ``seq_len``: its model built on the meta
    device, as the count needs the shapes only."""
    with torch.device("meta"):
        return TransformerLM(read_config(run_dir).model).flops_per_token(seq_len)


def teacher_gain_kept(baseline_loss: float, student_loss: float, teacher_loss: float) -> float:
    """The share of the teacher's gain over the baseline that the distilled student keeps,
    ``(L_base - L_student) / (L_base - L_teacher)`` (Fedus et al. 2021, sec. 5); NaN when the
    teacher is no better than the baseline."""
    gain = baseline_loss - teacher_loss
    return (baseline_loss - student_loss) / gain if gain > 0 else float("nan")


def add_gain_kept(summaries: Mapping[str, RunSummary], name: str, start: Start) -> str:
    """Put the share of its teacher's gain that the distilled model ``name`` kept into its
    summary (and its start's words); return the report's note on it."""
    summary = summaries[name]
    names = (start.gain_baseline, name, start.teacher)
    kept = teacher_gain_kept(*(summaries[n].final_val_loss for n in names))
    summary.teacher_gain_kept = kept
    if math.isfinite(kept):
        summary.start += f" (keeps {kept:.0%} of its gain over {start.gain_baseline})"
        share = f"keeps {kept:.0%} of its teacher's gain"
    else:
        share = ("keeps no measurable share of its teacher's gain (the teacher is no better "
                 "than the baseline)")
    losses = ", ".join(f"{n} {summaries[n].final_val_loss:.4f}" for n in names)
    return (f"Share of the teacher's gain kept: {name} {share} ((L_base - L_student) / "
            f"(L_base - L_teacher) on the final validation loss; {losses}). Switch Transformer "
            f"reports about {SWITCH_GAIN_KEPT:.0%} distilling its sparse models into dense ones "
            "(Fedus et al. 2021, sec. 5, Table 6).")


def budget_notes(summaries: Mapping[str, RunSummary], starts: list[Start]) -> list[str]:
    """The report's notes on how many tokens each model trained on, and how the FLOPs of the
    models that started from others count."""
    tokens = {name: trained_tokens(s) + s.start_tokens for name, s in summaries.items()}
    if not any(start.words for start in starts) and len({*tokens.values()}) == 1:
        return [f"Every model trained on {next(iter(tokens.values())):,.0f} tokens of the "
                "same data."]
    notes = ["Training tokens, the start's included (the same data for every model): "
             + "; ".join(f"{name} {count:,.0f}" for name, count in tokens.items()) + "."]
    if any(start.init_from for start in starts):
        notes.append("A continued or upcycled model's training tokens and FLOPs (the "
                     "training FLOPs column, the x-axes of the loss-vs-tokens and "
                     "loss-vs-FLOPs plots) count those of the model it started from, its "
                     "start's included, so models at equal training FLOPs have spent equal "
                     "compute from scratch.")
    if any(start.teacher for start in starts):
        notes.append(f"A distilled model's training FLOPs are its own ({TRAIN_FLOPS_MULTIPLIER} "
                     "x its forward FLOPs/token, per token) plus its teacher's forward FLOPs "
                     "on the same tokens; the teacher's own training is its own row, not "
                     "counted again.")
    return notes
