"""``condcomp import-hf`` and ``export-hf``: an HF ``save_pretrained`` folder to a condcomp
run folder, and a run's checkpoint to a folder ``AutoModelForCausalLM.from_pretrained`` loads.

An imported run folder is what ``condcomp train`` leaves, with one checkpoint (step 0)::

    RUN_DIR/config.json      the run config: the HF model's [model], default [data] / [train]
    RUN_DIR/model.toml       [model], [data] and [train] as TOML, for ``condcomp train --config`` (a
                             new run from these weights: --set train.init_from=RUN_DIR) and
                             for a suite model's ``preset`` in ``condcomp compare``
    RUN_DIR/tokenizer/       the tokenizer (below)
    RUN_DIR/checkpoints/step_00000000/   model.safetensors, state.pt, manifest.json

Tokenizer: condcomp runs hold a ``byte`` tokenizer or condcomp's byte-level BPE (an HF
``tokenizers`` file with an ``<|endoftext|>`` end-of-document token). ``tokenizer="auto"``
takes the HF folder's ``tokenizer.json`` when it has one (and refuses one condcomp cannot use,
naming ``byte`` as the way out), else the byte tokenizer; ``"byte"`` always records the byte
tokenizer (ids 0..256, so the model's vocabulary must hold at least 257). Export writes the
run's BPE ``tokenizer.json`` beside the weights; a byte tokenizer has no HF file, so none is
written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from condcomp.checkpoint import Checkpoint, give_default_mode, save_checkpoint
from condcomp.config import DataConfig, RunConfig, TrainConfig, apply_override, from_dict
from condcomp.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer
from condcomp.errors import CondcompError, ConfigError, DataError, storage_error
from condcomp.hf.architectures import (
    Architecture,
    architecture_for,
    hf_config_dict,
    model_config_from_hf_dict,
)
from condcomp.hf.weights import (
    ConvertedWeights,
    SafetensorsFolder,
    fused_expert_pairs,
    hf_tensors,
    weight_pairs,
)
from condcomp.model import TransformerLM
from condcomp.runs import TOKENIZER_DIR, load_run, save_config, write_atomically

TOKENIZERS = ("auto", "byte")
MODEL_TOML = "model.toml"


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{hf_dir} is not a save_pretrained folder (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a config (it holds a {type(raw).__name__})")
    return raw


def _num_experts(cfg: Any) -> int:
    from condcomp import registry

    if cfg.ffn.kind != "moe":
        return 0
    return registry.parse_options("ffn", cfg.ffn).resolved(cfg).num_experts


def _d_expert(cfg: Any) -> int:
    from condcomp import registry

    return registry.parse_options("ffn", cfg.ffn).resolved(cfg).d_expert or cfg.ffn_hidden


def _pick_tokenizer(hf_dir: Path, choice: str, vocab_size: int) -> Tokenizer:
    if choice not in TOKENIZERS:
        raise ConfigError(f"--tokenizer {choice!r} is unknown; use one of {list(TOKENIZERS)}")
    tokenizer: Tokenizer = ByteTokenizer()
    if choice == "auto" and (hf_dir / TOKENIZER_FILE).is_file():
        try:
            tokenizer = load_tokenizer(hf_dir)
        except DataError as exc:
            raise ConfigError(
                f"{hf_dir / TOKENIZER_FILE} cannot be a condcomp tokenizer ({exc}); condcomp "
                "runs use the byte tokenizer or condcomp's byte-level BPE. Pass --tokenizer "
                "byte to record the byte tokenizer instead") from None
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but "
                          f"the model's vocab_size is {vocab_size}; the model could not embed "
                          "them all")
    return tokenizer


def _run_config(run_dir: Path, model_cfg: Any, tokenizer: Tokenizer,
                overrides: list[str]) -> RunConfig:
    data = DataConfig(tokenizer=tokenizer.kind)
    if tokenizer.kind == "bpe":
        data.vocab_size = tokenizer.vocab_size
    train = TrainConfig(seq_len=min(TrainConfig.seq_len, model_cfg.max_seq_len))
    cfg = RunConfig(name=run_dir.name or "imported", out_dir=str(run_dir), model=model_cfg,
                    data=data, train=train)
    if not overrides:
        return cfg.validate()
    raw = cfg.to_dict()
    for item in overrides:
        if item.strip().startswith("model."):
            raise ConfigError(f"--set {item!r}: the model's keys come from the HF config.json; "
                              "only data.* and train.* keys can be set")
        apply_override(raw, item)
    return from_dict(raw).validate()


_INITS = ("normal_", "trunc_normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_",
          "xavier_uniform_", "xavier_normal_", "ones_", "zeros_", "constant_")


@contextlib.contextmanager
def _without_random_init() -> Iterator[None]:
    """Modules built inside leave their parameters as ``torch.empty`` made them (memory not
    yet touched) instead of initialising them: the import takes only their names and shapes
    and writes the weights from the HF files straight into the checkpoint. Buffers (RoPE's
    tables, ...) are built as usual."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _check_filled(state: dict[str, torch.Tensor], model: TransformerLM,
                  pairs: list[Any]) -> None:
    """Every parameter is one an HF tensor filled (a tied head shares the embedding's)."""
    filled = {state[p.ours].data_ptr() for p in pairs}
    left = [name for name, p in model.named_parameters() if p.data_ptr() not in filled]
    if left:
        raise CondcompError(f"import-hf has no HF tensor for {left[:3]}")


def import_hf(hf_dir: str | Path, run_dir: str | Path, tokenizer: str = "auto",
              overrides: list[str] | None = None) -> tuple[Architecture, Path]:
    """Write the run folder of the HF model in ``hf_dir``; returns its architecture and the
    checkpoint folder. ``overrides`` (``data.*`` / ``train.*`` keys) go into the run config."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    raw = read_hf_config(hf_dir)
    arch, model_cfg = model_config_from_hf_dict(raw)
    tok = _pick_tokenizer(hf_dir, tokenizer, model_cfg.vocab_size)
    cfg = _run_config(run_dir, model_cfg, tok, overrides or [])
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CondcompError(f"{run_dir} exists and is not empty; import into a new folder")
    folder = SafetensorsFolder(hf_dir)
    try:
        # The model gives the names, shapes and buffers of the checkpoint; its parameters are
        # never filled: the weights go from the HF files straight into the checkpoint's file.
        with _without_random_init():
            model = TransformerLM(model_cfg)
        state = model.state_dict()
        pairs = weight_pairs(arch, model_cfg, _num_experts(model_cfg))
        if arch.moe:
            pairs = fused_expert_pairs(pairs, model_cfg, _d_expert(model_cfg), folder)
        _check_filled(state, model, pairs)
        with torch.no_grad():
            for name, tensor in state.items():
                if name.endswith("selection_bias"):  # HF routers have no selection bias
                    tensor.zero_()
        weights = ConvertedWeights(folder, pairs, state)  # checks every tensor's shape first
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
        write_atomically(run_dir / MODEL_TOML, model_toml(cfg, hf_dir))
        tok.save(run_dir / TOKENIZER_DIR)
        state_file = {"step": 0, "imported_from": str(hf_dir), "hf_model_type": arch.model_type}
        ckpt = save_checkpoint(run_dir, 0, weights, state_file, keep_last=1)
    finally:
        folder.close()
    return arch, ckpt


def export_hf(run_dir: str | Path, hf_dir: str | Path, checkpoint: str | Path | None = None
              ) -> tuple[Architecture, Checkpoint]:
    """Write the run's checkpoint (the newest unless one is named) as an HF folder."""
    hf_dir = Path(hf_dir)
    run = load_run(run_dir, checkpoint)
    arch = architecture_for(run.cfg.model)
    if any(bool(m.selection_bias.any()) for m in run.model.modules()
           if hasattr(m, "selection_bias")):
        raise ConfigError(f"{run.checkpoint.path} routes with a selection bias (its "
                          "selection_bias is not zero): no HF architecture (Llama, Mixtral, "
                          "Qwen3-MoE, Qwen2-MoE, OLMoE) has an equivalent")
    if hf_dir.exists() and any(hf_dir.iterdir()):
        raise CondcompError(f"{hf_dir} exists and is not empty; export into a new folder")
    pairs = weight_pairs(arch, run.cfg.model, _num_experts(run.cfg.model))
    tensors = hf_tensors(pairs, run.model.state_dict())
    # Written beside the target and renamed into place: a failed export leaves no folder
    # that looks like a model.
    tmp = hf_dir.with_name(f".{hf_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        give_default_mode(tmp / "model.safetensors")
        config = hf_config_dict(run.cfg.model, arch, run.tokenizer.eos_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if run.tokenizer.kind == "bpe":
            shutil.copyfile(Path(run_dir) / TOKENIZER_DIR / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
            tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                                "eos_token": "<|endoftext|>"}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config) + "\n",
                                                       encoding="utf-8")
        if hf_dir.exists():
            hf_dir.rmdir()  # empty, checked above
        os.replace(tmp, hf_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(exc, f"cannot write {hf_dir}") from None
    return arch, run.checkpoint


# ----------------------------------------------------------------------------- model.toml


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _toml_table(name: str, table: dict[str, Any], out: list[str]) -> None:
    out.append(f"[{name}]")
    out += [f"{key} = {_toml_value(value)}" for key, value in table.items()
            if value is not None and not isinstance(value, dict)]
    out.append("")
    for key, value in table.items():
        if isinstance(value, dict) and value:
            _toml_table(f"{name}.{key}", value, out)


def model_toml(cfg: RunConfig, hf_dir: Path) -> str:
    """The run's config as TOML: every model key, so that a run trained from it builds the
    same model as the imported weights, and the [data] and [train] tables it was given."""
    raw = cfg.to_dict()
    out = [f"# The model imported from {hf_dir} by condcomp import-hf.", ""]
    for section in ("model", "data", "train"):
        _toml_table(section, raw[section], out)
    return "\n".join(out)
