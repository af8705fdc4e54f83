"""Configs: dataclasses with validation, loaded from TOML presets with ``--set`` overrides.

A config is a TOML file or the name of a built-in preset (``switch``; see
:mod:`condcomp.presets`).

A run config has three sections, ``[model]``, ``[data]`` and ``[train]``. The model names,
for each of the four seams of docs/design.md, the family that fills it and (for per-layer seams)
on which layers::

    [model.ffn]            # the FFN slot
    kind = "mlp"           # a registered family (see ``condcomp.registry``)
    layers = "all"         # "all" | "even" | "odd" | [0, 2, ...]; other layers get the dense MLP
    # ...the family's own options, validated by its options dataclass

Every impossible value raises :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from condcomp import registry, tables
from condcomp.errors import ConfigError
from condcomp.presets import find_preset

# Re-exported: users and family modules import the seam types from here.
from condcomp.seams import SEAM_DEFAULTS as SEAM_DEFAULTS
from condcomp.seams import LayerSelection as LayerSelection
from condcomp.seams import SeamConfig as SeamConfig
from condcomp.seams import select_layers as select_layers
from condcomp.tables import build as options_from_dict  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from condcomp.presets import Source

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ACTIVATIONS = ("relu", "gelu", "swiglu")


def _default_seam(seam: str) -> Any:
    return field(default_factory=lambda: SeamConfig(kind=SEAM_DEFAULTS[seam]))


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer when the run starts
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: as many as n_heads (no grouped-query attention)
    d_ff: int = 0  # 0: 4 * d_model, or 8/3 * d_model rounded to 64 for swiglu
    activation: str = "swiglu"
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    ffn: SeamConfig = _default_seam("ffn")
    attention: SeamConfig = _default_seam("attention")
    wrapper: SeamConfig = _default_seam("wrapper")
    residual: SeamConfig = _default_seam("residual")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.activation == "swiglu":
            # LLaMA's choice: 2/3 of 4*d so the gated MLP has the params of a 4*d plain one.
            return max(64, int(round(8 * self.d_model / 3 / 64)) * 64)
        return 4 * self.d_model

    def seams(self) -> dict[str, SeamConfig]:
        return {"ffn": self.ffn, "attention": self.attention, "wrapper": self.wrapper,
                "residual": self.residual}

    def validate(self) -> None:
        _positive(self, "model", ["d_model", "n_layers", "n_heads", "max_seq_len"])
        _non_negative(self, "model", ["vocab_size", "n_kv_heads", "d_ff"])
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads = {self.n_heads} does not divide model.d_model = {self.d_model}; "
                "pick a head count that divides d_model"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model.d_model / model.n_heads = {self.head_dim} is odd; RoPE needs an even head "
                "dimension"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_heads = {self.kv_heads} does not divide model.n_heads = {self.n_heads}; "
                "grouped-query attention needs n_heads to be a multiple of n_kv_heads"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation = {self.activation!r} is unknown; use one of {list(ACTIVATIONS)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout = {self.dropout} must be in [0, 1)")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.rope_theta, model.norm_eps and model.init_std must be positive")
        for seam_name, seam in self.seams().items():
            registry.validate_seam(seam_name, seam, self)


@dataclass
class DataConfig:
    corpus: str = "shakespeare"  # "shakespeare", or a path: text file, directory, .jsonl, .parquet, .tar.gz/.tar.xz
    tokenizer: str = "byte"  # "byte" (no training) or "bpe" (HF tokenizers, trained on the train split)
    vocab_size: int = 4096  # BPE only
    val_fraction: float = 0.05
    text_field: str = "text"  # the field that holds the text in .jsonl / .parquet
    cache_dir: str = ".cache/condcomp"  # packed token shards, keyed by content hash

    def validate(self) -> None:
        if self.tokenizer not in ("byte", "bpe"):
            raise ConfigError(f"data.tokenizer = {self.tokenizer!r} is unknown; use 'byte' or 'bpe'")
        if self.tokenizer == "bpe" and not 260 <= self.vocab_size <= 2**31 - 1:
            raise ConfigError(
                f"data.vocab_size = {self.vocab_size} is too small for BPE; use at least 260 "
                "(256 bytes plus special tokens)"
            )
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction = {self.val_fraction} must be in (0, 0.5)")
        if not self.corpus:
            raise ConfigError("data.corpus is empty; name 'shakespeare' or a path to your text data")


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    max_steps: int = 1000
    max_tokens: int = 0  # >0: overrides max_steps with ceil(max_tokens / tokens per step)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 200
    eval_tokens: int = 131072  # validation tokens per periodic evaluation
    ckpt_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    # float32 | bfloat16: how matrix weights are stored between steps; bfloat16 keeps fp32
    # master weights in the optimizer and needs bf16 autocast (condcomp.master_weights)
    param_dtype: str = "float32"
    compile: bool = False
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    progress: bool = True
    init_from: str = ""  # a run directory or checkpoint whose weights start a new run



    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_tokens > 0:
            return -(-self.max_tokens // self.tokens_per_step)
        return self.max_steps

    def validate(self) -> None:
        _positive(self, "train", ["batch_size", "grad_accum", "seq_len", "eval_every", "eval_tokens",
                                   "ckpt_every", "keep_last", "log_every", "max_nonfinite"])
        _non_negative(self, "train", ["max_steps", "max_tokens", "warmup_steps", "weight_decay",
                                       "grad_clip"])
        if self.total_steps <= 0:
            raise ConfigError("train.max_steps (or train.max_tokens) must be positive")
        if self.lr <= 0:
            raise ConfigError(f"train.lr = {self.lr} must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"train.{key} = {getattr(self, key)} must be in [0, 1)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(
                f"train.dtype = {self.dtype!r} is unknown; use 'auto', 'float32' or 'bfloat16'"
            )
        if self.param_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.param_dtype = {self.param_dtype!r} is unknown; use "
                              "'float32' or 'bfloat16'")
        if self.param_dtype == "bfloat16" and self.dtype == "float32":
            raise ConfigError("train.param_dtype = 'bfloat16' stores the weights that bf16 "
                              "autocast would cast; with train.dtype = 'float32' nothing is "
                              "cast. Set train.dtype = 'bfloat16' (or 'auto' on CUDA)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"train.device = {self.device!r} is unknown; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
            )


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = ""  # "": runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    def validate(self) -> RunConfig:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len = {self.train.seq_len} exceeds model.max_seq_len = "
                f"{self.model.max_seq_len}; lower seq_len or raise max_seq_len"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def load_config(config: str | Path | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """Load a config (a TOML file, or a built-in preset by name; ``None``: the defaults),
    apply ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if config is not None:
        raw = read_toml(find_preset(config))
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw).validate()


def read_toml(source: Source, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a TOML config file. A top-level ``extends = "other"`` (a file relative to this one,
    else a built-in preset) starts from that config and overrides its keys, so a preset states
    only what it changes."""
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config file {source}: extends must name a preset or a TOML file, "
                          f"got {base!r}")
    base_source = find_preset(base, relative_to=source)
    key = str(base_source.resolve() if isinstance(base_source, Path) else base_source)
    if key in _seen:
        raise ConfigError(f"config file {source}: 'extends' makes a cycle through {key}")
    return deep_merge(read_toml(base_source, (*_seen, key)), raw)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys on top; tables merge key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is read as TOML, else as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} needs the form section.key=value, e.g. train.lr=1e-3")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: the key {key!r} is malformed")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict[str, Any]) -> RunConfig:
    return tables.build(RunConfig, raw, "")


def _positive(obj: Any, section: str, names: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name} = {value} must be positive")


def _non_negative(obj: Any, section: str, names: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ConfigError(f"{section}.{name} = {value} must not be negative")
