"""``condcomp upcycle``: a trained dense model as the first checkpoint of a conditional one.

Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from
Dense Checkpoints"; Megatron-LM's ``--moe-use-upcycling``) starts a conditional model from a
dense checkpoint instead of from scratch. The target config must have the source's dense
skeleton (width, depth, heads, vocabulary, FFN width, attention); every weight the two share
is copied, and each seam's family gets a mapping of its own:

- FFN slot: MoE, Mixture of Tokens and Sparse FF from the dense FFN
  (:mod:`condcomp.surgery.ffn_upcycling`);
- block wrapper: Mixture-of-Depths wraps the dense block as it is, with a fresh router (its
  blocks then run on the routed tokens only, so the function changes by design);
- residual stream: AltUp's K blocks start equal (:mod:`condcomp.surgery.altup_upcycling`);
- Sparse QKV has no mapping from the dense projections and is refused.

Weights no mapping fills keep the target's own initialisation (seeded by ``train.seed``). The
result says which tensors came from where, which are fresh, which source tensors went unused,
whether the upcycled model computes what the source computes (measured: the largest logit
difference on random tokens, in evaluation mode) and, on request, both models' validation
loss. The output run folder is what ``condcomp import-hf`` writes: ``config.json``,
``model.toml``, the source's tokenizer and ``checkpoints/step_00000000``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from condcomp import registry
from condcomp.checkpoint import save_checkpoint
from condcomp.config import (
    SEAM_DEFAULTS,
    ModelConfig,
    RunConfig,
    apply_override,
    from_dict,
    read_toml,
    select_layers,
)
from condcomp.data import Tokenizer, prepare_data
from condcomp.errors import CondcompError, ConfigError, storage_error
from condcomp.evaluate import EvalResult, evaluate
from condcomp.hf.folders import MODEL_TOML, import_hf, model_toml, read_hf_config
from condcomp.model import TransformerLM
from condcomp.presets import find_preset
from condcomp.runs import TOKENIZER_DIR, LoadedRun, load_run, save_config, write_atomically
from condcomp.surgery.altup_upcycling import upcycle_altup
from condcomp.surgery.ffn_upcycling import FFN_UPCYCLERS
from condcomp.surgery.transplant import Transplant

# The ModelConfig fields a target must share with its source, and the key that sets each.
SKELETON = {"vocab_size": "model.vocab_size", "d_model": "model.d_model",
            "n_layers": "model.n_layers", "n_heads": "model.n_heads",
            "kv_heads": "model.n_kv_heads", "head_dim": "model.d_head",
            "ffn_hidden": "model.d_ff", "activation": "model.activation",
            "rope_theta": "model.rope_theta", "norm_eps": "model.norm_eps",
            "tie_embeddings": "model.tie_embeddings"}
# The families each seam can be upcycled into (the dense default included).
UPCYCLED_KINDS = {"ffn": ("mlp", *FFN_UPCYCLERS), "attention": ("dense",),
                  "wrapper": ("full", "mod"), "residual": ("plain", "altup")}
WHY_NOT = {("attention", "sparse_qkv"): "its multiplicative layer and its convolutions over "
           "(length, heads) have no counterpart in the dense Q/K/V projections; keep "
           "[model.attention] as the source's"}
# fp32 logits of equal functions differ by the rounding of sums taken in another order.
PRESERVED_ATOL = 1e-4
PROBE_SHAPE = (2, 32)  # random token sequences the function is compared on
DEFAULT_EVAL_TOKENS = 8192


@dataclass
class UpcycleResult:
    out_dir: Path
    source: str  # the checkpoint read (or the HF folder)
    checkpoint: Path  # the checkpoint written
    model: ModelConfig
    transplant: Transplant
    max_logit_difference: float
    probe_shape: tuple[int, int]
    source_eval: EvalResult | None
    upcycled_eval: EvalResult | None

    @property
    def preserved(self) -> bool:
        """The upcycled model computes the source's function in evaluation mode."""
        return self.max_logit_difference <= PRESERVED_ATOL


def upcycle(source: str | Path, config: str | Path, out_dir: str | Path,
            overrides: list[str] | None = None, checkpoint: str | Path | None = None,
            noise: float = 0.0, eval_tokens: int = DEFAULT_EVAL_TOKENS) -> UpcycleResult:
    """Write the run folder ``out_dir``: the model of ``config`` (a preset or TOML file, with
    ``--set`` ``overrides``) upcycled from the dense run or HF Llama folder ``source``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CondcompError(f"{out_dir} exists and is not empty; upcycle into a new folder")
    with _source_run(Path(source), checkpoint) as (run, described):
        cfg = target_config(config, overrides or [], run.cfg, out_dir)
        check_skeleton(run.cfg.model, cfg.model)
        torch.manual_seed(cfg.train.seed)  # the fresh weights: as a new run would draw them
        model = TransformerLM(cfg.model)
        transplant = Transplant(run.model.state_dict(), model.state_dict())
        fill_target(transplant, model, cfg.model, noise, torch.Generator().manual_seed(
            cfg.train.seed + 1))
        probe = (PROBE_SHAPE[0], min(PROBE_SHAPE[1], cfg.model.max_seq_len,
                                     run.cfg.model.max_seq_len))
        difference = max_logit_difference(run.model, model, probe)
        evals = (validation_losses(cfg, run, model, eval_tokens) if eval_tokens > 0
                 else (None, None))
        ckpt = write_run(out_dir, cfg, run.tokenizer, model, described)
    return UpcycleResult(out_dir, described, ckpt, cfg.model, transplant, difference, probe,
                         *evals)


# ----------------------------------------------------------------------------- the source


@contextlib.contextmanager
def _source_run(source: Path, checkpoint: str | Path | None
                ) -> Iterator[tuple[LoadedRun, str]]:
    """The dense source as a loaded run, and what was read. An HF folder is imported into a
    temporary run folder first (``condcomp import-hf``)."""
    if (source / "checkpoints").is_dir() or not (source / "config.json").is_file() \
            or "model_type" not in read_hf_config(source):
        run = load_run(source, checkpoint)
        check_dense(run.cfg.model, str(run.checkpoint.path))
        yield run, str(run.checkpoint.path)
        return
    if checkpoint is not None:
        raise ConfigError(f"--checkpoint names a checkpoint of a run folder; {source} is an "
                          "HF folder, which holds one model: drop --checkpoint")
    with tempfile.TemporaryDirectory(prefix="condcomp-upcycle-") as tmp:
        arch, _ = import_hf(source, Path(tmp) / "run")
        run = load_run(Path(tmp) / "run")
        check_dense(run.cfg.model, f"{source} ({arch.class_name})")
        yield run, str(source)


def check_dense(model: ModelConfig, where: str) -> None:
    """Upcycling starts from a dense model: every seam its default family."""
    conditional = [f"model.{seam}.kind = {s.kind!r}" for seam, s in model.seams().items()
                   if s.kind != SEAM_DEFAULTS[seam]]
    if conditional:
        raise ConfigError(f"{where} is not a dense model ({', '.join(conditional)}); upcycle "
                          "starts from a dense run or an HF Llama folder")


# ----------------------------------------------------------------------------- the target


def target_config(config: str | Path, overrides: list[str], source: RunConfig,
                  out_dir: Path) -> RunConfig:
    """The target's run config: the model and training of ``config``, the source's data (its
    tokenizer travels with the weights), the ``overrides`` on top; its vocabulary the
    source's unless the config sets one. A family no mapping fills is refused before the
    config's own checks, which might otherwise name a key of it that changing would not help."""
    raw = read_toml(find_preset(config))
    raw["data"] = dataclasses.asdict(source.data)
    for item in overrides:
        apply_override(raw, item)
    raw["name"], raw["out_dir"] = out_dir.name or "upcycled", str(out_dir)
    cfg = from_dict(raw)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = source.model.vocab_size
    check_families(cfg.model)
    return cfg.validate()


def check_families(model: ModelConfig) -> None:
    """One ConfigError for a seam whose family has no mapping from the dense model."""
    for seam, seam_cfg in model.seams().items():
        if seam_cfg.kind in UPCYCLED_KINDS[seam]:
            continue
        why = WHY_NOT.get((seam, seam_cfg.kind),
                          f"condcomp upcycle maps the {seam} families "
                          f"{list(UPCYCLED_KINDS[seam])}")
        raise ConfigError(f"model.{seam}.kind = {seam_cfg.kind!r} cannot be upcycled from a "
                          f"dense model: {why}")


def check_skeleton(source: ModelConfig, target: ModelConfig) -> None:
    """One ConfigError naming every key in which the target's dense skeleton differs."""
    differ = [f"{key} (source {getattr(source, field)!r}, target {getattr(target, field)!r})"
              for field, key in SKELETON.items()
              if getattr(source, field) != getattr(target, field)]
    attention = [registry.parse_options("attention", m.attention) for m in (source, target)]
    if attention[0] != attention[1]:
        differ.append(f"model.attention (source {attention[0]}, target {attention[1]})")
    if differ:
        raise ConfigError("the target config does not have the source's dense skeleton: "
                          f"{'; '.join(differ)}; upcycling keeps every dense weight, so set "
                          "these keys as the source has them")


def fill_target(t: Transplant, model: TransformerLM, cfg: ModelConfig, noise: float,
                generator: torch.Generator) -> None:
    """Each seam's mapping, then every tensor the two models share by name."""
    for i in range(cfg.n_layers):
        upcycler = FFN_UPCYCLERS.get(cfg.ffn.kind) if cfg.ffn.selects(i, cfg.n_layers) else None
        if upcycler is not None:
            prefix = f"layers.{i}.block.ffn"
            upcycler(t, prefix, model.get_submodule(prefix), noise, generator)
    if cfg.wrapper.kind == "mod":
        # The block inside the wrapper keeps its names (layers.i.block.*): copied by name.
        for i in sorted(select_layers(cfg.wrapper.layers, cfg.n_layers, "model.wrapper.layers")):
            t.note(f"layers.{i}", "Mixture-of-Depths lets only the routed tokens into the "
                   "block and scales their update by a fresh router (Raposo et al. 2024, eq. 1)")
    if cfg.residual.kind == "altup":
        upcycle_altup(t, model.stream)
    t.copy_by_name()


# ----------------------------------------------------------------------------- checks


@torch.no_grad()
def max_logit_difference(source: torch.nn.Module, target: torch.nn.Module,
                         shape: tuple[int, int]) -> float:
    """The largest |logit difference| of the two models, in evaluation mode and float32, on
    random token sequences of ``shape`` (the same ones every time)."""
    vocab = target.cfg.vocab_size
    tokens_BT = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
    source.eval()
    target.eval()
    return float((source(tokens_BT).logits - target(tokens_BT).logits).abs().max())


def validation_losses(cfg: RunConfig, run: LoadedRun, model: TransformerLM,
                      eval_tokens: int) -> tuple[EvalResult, EvalResult]:
    """The source's and the upcycled model's loss on the first ``eval_tokens`` validation
    tokens of the run's data, on the CPU in float32."""
    data = prepare_data(cfg.data, tokenizer=run.tokenizer,
                        log=lambda s: print(s, file=sys.stderr))
    seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len, run.cfg.model.max_seq_len)
    source_eval, upcycled_eval = (
        evaluate(m, data.val, batch_size=cfg.train.batch_size, seq_len=seq_len,
                 max_tokens=eval_tokens, bytes_per_token=data.val_bytes_per_token,
                 device=torch.device("cpu"))
        for m in (run.model, model))
    return source_eval, upcycled_eval


# ----------------------------------------------------------------------------- the run folder


def write_run(out_dir: Path, cfg: RunConfig, tokenizer: Tokenizer, model: TransformerLM,
              source: str) -> Path:
    """The run folder ``condcomp import-hf`` writes, with the upcycled model at step 0."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out_dir / TOKENIZER_DIR)
    except OSError as exc:
        raise storage_error(exc, f"cannot write the run folder {out_dir}") from None
    save_config(cfg, out_dir)
    # model_toml's first line says where the model came from; this one came from upcycling.
    body = model_toml(cfg, Path(source)).split("\n", 1)[1]
    write_atomically(out_dir / MODEL_TOML,
                     f"# The model upcycled from {source} by condcomp upcycle.\n{body}")
    return save_checkpoint(out_dir, 0, model, {"step": 0, "upcycled_from": source},
                           keep_last=1)


# ----------------------------------------------------------------------------- the report


def format_report(result: UpcycleResult) -> str:
    """What the command prints: where every tensor came from and what the model computes."""
    t = result.transplant
    copied = [name for name, how in t.mapped.items() if how == "copied"]
    lines = [f"upcycled {result.source} into {result.out_dir}: "
             f"{registry.describe(result.model)}",
             f"  mapped from the source: {len(t.mapped)} tensors, {len(copied)} of them "
             "copied by name"]
    lines += [f"    {name} <- {how}" for name, how in t.mapped.items() if how != "copied"]
    lines += [f"  set: {name}: {why}" for name, why in t.set_by_rule.items()]
    lines.append(f"  initialised fresh: {', '.join(t.fresh()) or 'none'}")
    lines.append(f"  source tensors not used: {', '.join(t.unused()) or 'none'}")
    lines.append(f"  function preserved: {_verdict(result)}")
    lines += [f"    {', '.join(where)}: {why}" for why, where in t.changes.items()]
    lines += [f"    in training, {', '.join(where)}: {why}"
              for why, where in t.training_changes.items()]
    if result.source_eval is not None and result.upcycled_eval is not None:
        before, after = result.source_eval.loss, result.upcycled_eval.loss
        lines.append(f"  validation loss over {result.upcycled_eval.tokens:,} tokens: source "
                     f"{before:.4f}, upcycled {after:.4f} ({after - before:+.4f})")
    lines.append(f"wrote {result.checkpoint}")
    return "\n".join(lines)


def _verdict(result: UpcycleResult) -> str:
    measured = (f"max |logit difference| {result.max_logit_difference:.2e} on "
                f"{result.probe_shape[0]} x {result.probe_shape[1]} random tokens")
    if not result.preserved:
        return f"no ({measured})"
    if result.transplant.training_changes:
        return f"in evaluation and generation ({measured}); not in training"
    return f"yes ({measured})"
