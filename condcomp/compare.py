"""``condcomp compare SUITE``: train a suite of models on the same data and token budget,
then write the comparison report.

A suite is a built-in name (``condcomp compare demo``: ``condcomp/presets/suites/demo.toml``)
or a file::

    [suite]
    name = "demo"
    base = "dense_small"           # preset every model starts from: a file relative to the
                                   # suite, else a built-in preset
    budget_tokens = 1_000_000      # training tokens, the same for every model
    decode_tokens = 64             # batch-1 decode tokens timed per model

    [common]                       # config keys set for every model
    train = { batch_size = 16, seq_len = 128 }

    [[models]]
    name = "dense-small"
    config = { model = { d_model = 128 } }   # this model's own keys

    [[models]]
    name = "switch"
    preset = "switch"              # start from another preset instead of the suite's base

    [[models]]
    name = "switch-upcycled"
    preset = "switch"
    budget_tokens = 500_000        # this model's own budget instead of the suite's
    init = "upcycle"               # "scratch" (default) | "continue" | "upcycle"
    init_from = "dense-small"      # the earlier model whose final weights it starts from

    [[models]]
    name = "dense-distilled"
    teacher = "switch"             # distil from this earlier model's run ([distill] keys
    gain_baseline = "dense-small"  # under config); the report gives the teacher's gain kept

Every model trains into ``<out>/<model name>/`` (a name is one folder name, so no model writes
outside ``<out>``). Models train in the file's order, so a model refers to earlier ones only.
``init = "continue"`` trains from the final weights of ``init_from``'s run
(``train.init_from``); ``init = "upcycle"`` first upcycles that run into this model's config
(:func:`condcomp.surgery.upcycle.upcycle`, into ``<out>/<model name>/upcycled/``) and trains
from the result; ``teacher`` sets ``distill.teacher`` to the teacher's run. A model whose run
already finished is not trained again (its run is resumed, which for a finished run only
re-evaluates), nor upcycled again, so a suite can be re-run to refresh the report, or
extended with new models.

The report counts a continued or upcycled model's training FLOPs with those of the model it
started from, and a distilled model's with its teacher's forward passes on its tokens
(:mod:`condcomp.suite_starts`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from condcomp import registry, tables
from condcomp.checkpoint import list_checkpoints
from condcomp.conditional.mod import MixtureOfDepths, blocks_per_token
from condcomp.config import RunConfig, apply_override, deep_merge, from_dict, read_toml
from condcomp.data import prepare_data
from condcomp.errors import ConfigError
from condcomp.generate import decode_tokens_per_s
from condcomp.machine_load import LoadMeter, mean_share
from condcomp.presets import find_preset, find_suite
from condcomp.ranges import MAX_COUNT, MAX_SIZE, ranged
from condcomp.report import RunSummary, write_report
from condcomp.run_changes import ConfigChangedError
from condcomp.run_changes import describe as describe_changes
from condcomp.runs import LoadedRun, check_name, load_run, read_metrics
from condcomp.runtime import device_name, resolve_device
from condcomp.suite_starts import (
    Start,
    add_gain_kept,
    add_start,
    budget_notes,
    check_continue,
    check_upcycle,
    write_upcycled,
)
from condcomp.train import train


@dataclass
class SuiteHead:
    """The suite file's ``[suite]`` table."""

    name: str = ""  # "": the file's name
    base: str = ""  # the preset every model starts from ("": the defaults)
    budget_tokens: int | None = ranged(None, gt=0, le=MAX_COUNT)  # training tokens per model
    decode_tokens: int = ranged(64, gt=0, le=MAX_SIZE)  # batch-1 decode tokens timed per model


@dataclass
class SuiteEntry:
    """One ``[[models]]`` entry of a suite file."""

    UNKNOWN_KEY_HINT: ClassVar[str] = "put config keys under config = { ... }"

    name: str = ""
    preset: str = ""  # "": the suite's base
    config: dict[str, Any] = field(default_factory=dict)  # this model's own config keys
    budget_tokens: int | None = ranged(None, gt=0, le=MAX_COUNT)  # None: the suite's
    # Where it starts (condcomp.suite_starts.Start): "scratch" | "continue" | "upcycle"; for
    # the last two, the earlier model it starts from.
    init: str = "scratch"
    init_from: str = ""
    teacher: str = ""  # an earlier model to distil from ([distill]'s other keys under config)
    # With a teacher: the earlier model that is this one trained without a teacher, against
    # which the report measures the share of the teacher's gain kept.
    gain_baseline: str = ""

    @property
    def start(self) -> Start:
        return Start(self.init, self.init_from, self.teacher, self.gain_baseline)


@dataclass
class SuiteFile:
    """A suite file: ``[suite]``, ``[common]`` (config keys set for every model), and
    ``[[models]]``."""

    suite: SuiteHead = field(default_factory=SuiteHead)
    common: dict[str, Any] = field(default_factory=dict)
    models: list[SuiteEntry] = field(default_factory=list)


@dataclass
class SuiteModel:
    name: str
    config: dict[str, Any]  # its config, but for where it is written and what it starts from
    start: Start = field(default_factory=Start)

    def run_config(self, out: Path) -> RunConfig:
        """Its validated run config when the suite is written into ``out``: its folder, and
        the folders of the runs it starts from or learns from."""
        raw = copy.deepcopy(self.config)
        raw["out_dir"] = str(out / self.name)
        self.start.set_paths(raw, out, self.name)
        return from_dict(raw).validate()


@dataclass
class Suite:
    name: str
    budget_tokens: int  # the suite's; 0 where every model gives its own
    decode_tokens: int
    models: list[SuiteModel] = field(default_factory=list)


def _token_depths(run: LoadedRun, n_tokens: int = 400) -> list[tuple[str, int]] | None:
    """For a Mixture-of-Depths model: the start of the validation text, each token with the
    number of blocks it went through."""
    if not any(isinstance(layer, MixtureOfDepths) for layer in run.model.layers):
        return None
    data = prepare_data(run.cfg.data, tokenizer=run.tokenizer, log=lambda s: None)
    n = min(n_tokens, run.cfg.model.max_seq_len, len(data.val))
    tokens = torch.from_numpy(data.val[:n].astype("int64")).unsqueeze(0)
    depths = blocks_per_token(run.model, tokens)
    return [(run.tokenizer.decode([t]), d) for t, d in zip(tokens[0].tolist(), depths)]


def load_suite(name_or_path: str | Path, overrides: list[str] | None = None) -> Suite:
    path = find_suite(name_or_path)
    try:
        spec = tables.build(SuiteFile, read_toml(path), "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    head = spec.suite
    if head.budget_tokens is None and any(m.budget_tokens is None for m in spec.models):
        raise ConfigError(f"{path}: suite.budget_tokens is missing; give the training tokens "
                          "every model gets, e.g. budget_tokens = 1_000_000")
    base = read_toml(find_preset(head.base, relative_to=path)) if head.base else {}
    if not spec.models:
        raise ConfigError(f"{path}: the suite has no [[models]]; add at least one")
    suite = Suite(head.name or path.name.removesuffix(".toml"), head.budget_tokens or 0,
                  head.decode_tokens)
    check_name(suite.name, f"{path}: suite.name")  # the default output folder is runs/<name>
    names = [entry.name for entry in spec.models]
    for i, entry in enumerate(spec.models):
        if not entry.name:
            raise ConfigError(f"{path}: models[{i}] needs a name")
        check_name(entry.name, f"{path}: models[{i}].name")  # its folder is <out>/<name>
        if entry.name in names[:i]:
            raise ConfigError(f"{path}: two models are named {entry.name!r}")
        try:
            entry.start.check(f"models[{i}]", entry.name, names[:i], names[i:])
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        preset = read_toml(find_preset(entry.preset, relative_to=path)) if entry.preset else base
        merged = deep_merge(deep_merge(preset, spec.common), entry.config)
        for item in overrides or []:
            apply_override(merged, item)
        merged["name"] = entry.name
        merged.setdefault("train", {})["max_tokens"] = entry.budget_tokens or head.budget_tokens
        model = SuiteModel(entry.name, merged, entry.start)
        # Fail now, not after training half the suite.
        try:
            cfg = model.run_config(Path("runs") / suite.name)
        except ConfigError as exc:
            raise ConfigError(f"{path}: model {entry.name!r}: {exc}") from None
        if entry.init != "scratch":
            _check_start(path, model, cfg, suite)
        suite.models.append(model)
    return suite


def _check_start(path: Path, model: SuiteModel, cfg: RunConfig, suite: Suite) -> None:
    """One ConfigError, now, for a start that would fail once its source has trained: weights
    that do not fit (continue), or an upcycle that ``condcomp upcycle`` would refuse."""
    source = next(m for m in suite.models if m.name == model.start.init_from)
    check = check_continue if model.start.init == "continue" else check_upcycle
    try:
        check(source.run_config(Path("runs") / suite.name).model, cfg.model, source.name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: model {model.name!r}: {exc}") from None


def run_suite(name_or_path: str | Path, out_dir: str | Path | None = None,
              overrides: list[str] | None = None, log=print) -> Path:
    """Train every model of the suite (skipping finished ones) and write the report."""
    suite = load_suite(name_or_path, overrides)
    out = Path(out_dir or f"runs/{suite.name}")
    summaries: dict[str, RunSummary] = {}
    for model in suite.models:
        cfg = model.run_config(out)
        log(f"== {model.name}: {registry.describe(cfg.model)}"
            + (f", {model.start.words}" if model.start.words else ""))
        resume = bool(list_checkpoints(cfg.run_dir))
        if model.start.init == "upcycle" and not resume:
            write_upcycled(cfg, out / model.start.init_from, log)
        try:
            result = train(cfg, resume=resume, log=log)
        except ConfigChangedError as exc:
            raise ConfigError(
                f"suite model {model.name!r} in {exc.run_dir} was trained with other values: "
                f"{describe_changes(exc.changes)}; delete {exc.run_dir} to train it again with "
                "the suite's values, or write the suite into another --out") from None
        summaries[model.name] = _summarise(model.name, result.run_dir, suite.decode_tokens)
        add_start(summaries, model.name, model.start, cfg)
    gain_notes = [add_gain_kept(summaries, model.name, model.start)
                  for model in suite.models if model.start.gain_baseline]
    device = resolve_device(suite.models[0].run_config(out).train.device)
    notes = [*budget_notes(summaries, [model.start for model in suite.models]), *gain_notes,
             "Decode speed: batch 1, greedy, static KV cache, timed after the prefill."]
    return write_report(out, suite.name, list(summaries.values()), notes=notes,
                        device=device_name(device))


def _training_load(trains: list[dict[str, Any]]) -> float | None:
    """Other processes' share of the CPUs over the whole training, from the share each train
    row logged for the steps since the row before (weighted by those steps' time); None for a
    run that logged none (trained before it was measured)."""
    elapsed = [row.get("elapsed_s", 0.0) for row in trains]
    return mean_share((row.get("other_cpu_share"), now - before)
                      for row, before, now in zip(trains, [0.0, *elapsed], elapsed))


def _summarise(name: str, run_dir: Path, decode_tokens: int) -> RunSummary:
    run = load_run(run_dir)  # the CPU: decode speed is the single-stream latency users see
    metrics = read_metrics(run_dir)
    evals = [row for row in metrics if "val_loss" in row]
    trains = [row for row in metrics if row.get("kind") == "train"]
    last = trains[-1] if trains else {"tokens": 0, "elapsed_s": 0.0}
    seq_len = run.cfg.train.seq_len
    meter = LoadMeter()
    decode = decode_tokens_per_s(run.model, new_tokens=decode_tokens)
    decode_load = meter.lap()
    return RunSummary(
        name=name, run_dir=str(run_dir), family=registry.describe(run.cfg.model),
        total_params=run.model.num_params(), active_params=run.model.num_params(active_only=True),
        flops_per_token=run.model.flops_per_token(seq_len),
        final_val_loss=evals[-1]["val_loss"] if evals else float("nan"),
        bits_per_byte=evals[-1]["val_bpb"] if evals else float("nan"),
        train_tokens_per_s=last["tokens"] / last["elapsed_s"] if last["elapsed_s"] else 0.0,
        decode_tokens_per_s=decode, train_other_cpu_share=_training_load(trains),
        decode_other_cpu_share=decode_load.other_cpu_share, metrics=metrics,
        token_depths=_token_depths(run),
        n_layers=run.cfg.model.n_layers)
