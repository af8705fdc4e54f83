"""Configs: dataclasses with validation, loaded from TOML presets with ``--set`` overrides.

A config is a TOML file or the name of a built-in preset (``switch``; see
:mod:`condcomp.presets`).

A run config has three sections, ``[model]``, ``[data]`` and ``[train]``; ``[dist]`` is read
when ``torchrun`` launches it on several processes, ``[distill]`` when a teacher run is named
(:mod:`condcomp.surgery.distill`), and ``[health]`` sets when training warns of a failing
router. The model names,
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
from condcomp.devices import check_device_name
from condcomp.distributed.options import DistConfig
from condcomp.errors import ConfigError
from condcomp.presets import find_preset
from condcomp.ranges import MAX_COUNT, MAX_SEED, MAX_SIZE, MIN_SEED, ranged

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
# How the training loss meets the output head: "plain" forms the [B, T, V] logits; "fused" runs
# the head and the cross-entropy chunk by chunk (condcomp.kernels.linear_cross_entropy).
LOSSES = ("plain", "fused")


def _default_seam(seam: str) -> Any:
    return field(default_factory=lambda: SeamConfig(kind=SEAM_DEFAULTS[seam]))


@dataclass
class ModelConfig:
    vocab_size: int = ranged(0, ge=0, le=MAX_SIZE)  # 0: taken from the tokenizer at the start
    d_model: int = ranged(256, gt=0, le=MAX_SIZE)
    n_layers: int = ranged(4, gt=0, le=MAX_SIZE)
    n_heads: int = ranged(4, gt=0, le=MAX_SIZE)
    n_kv_heads: int = ranged(0, ge=0, le=MAX_SIZE)  # 0: as many as n_heads (no grouped-query)
    # 0: d_model / n_heads. Set, the heads may be wider or narrower than d_model / n_heads
    # (Qwen3-MoE: 32 heads of 128 over a 2048-wide stream); wo maps n_heads * d_head to d_model.
    d_head: int = ranged(0, ge=0, le=MAX_SIZE)
    d_ff: int = ranged(0, ge=0, le=MAX_SIZE)  # 0: 4 * d_model, or 8/3 * d_model for swiglu
    activation: str = "swiglu"
    max_seq_len: int = ranged(256, gt=0, le=MAX_SIZE)
    # Below 1 the rotation frequencies would rise with the channel instead of falling.
    rope_theta: float = ranged(10000.0, ge=1.0)
    # At least 1e-30: a float32 eps below its normal range is flushed to zero, and a zero
    # input would then be divided by zero.
    norm_eps: float = ranged(1e-5, ge=1e-30)
    tie_embeddings: bool = True
    dropout: float = ranged(0.0, ge=0.0, lt=1.0)
    # The weights' standard deviation (GPT-2: 0.02); far above 1 the activations overflow.
    init_std: float = ranged(0.02, gt=0.0, le=1.0)
    loss: str = "plain"  # plain | fused: the head and the cross-entropy without the logits
    ffn: SeamConfig = _default_seam("ffn")
    attention: SeamConfig = _default_seam("attention")
    wrapper: SeamConfig = _default_seam("wrapper")
    residual: SeamConfig = _default_seam("residual")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

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
        tables.check_fields(self, "model")
        if not self.d_head and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads = {self.n_heads} does not divide model.d_model = {self.d_model}; "
                "pick a head count that divides d_model (or set model.d_head)"
            )
        if self.head_dim % 2:
            which = "model.d_head" if self.d_head else "model.d_model / model.n_heads"
            raise ConfigError(
                f"{which} = {self.head_dim} is odd; RoPE needs an even head "
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
        if self.loss not in LOSSES:
            raise ConfigError(f"model.loss = {self.loss!r} is unknown; use one of {list(LOSSES)}")
        for seam_name, seam in self.seams().items():
            registry.validate_seam(seam_name, seam, self)


@dataclass
class DataConfig:
    corpus: str = "shakespeare"  # "shakespeare", or a path: text file, directory, .jsonl, .parquet, .tar.gz/.tar.xz
    tokenizer: str = "byte"  # "byte" (no training) or "bpe" (HF tokenizers, trained on the train split)
    vocab_size: int = ranged(4096, gt=0, le=MAX_SIZE)  # BPE only
    val_fraction: float = ranged(0.05, gt=0.0, lt=0.5)
    text_field: str = "text"  # the field that holds the text in .jsonl / .parquet
    cache_dir: str = ".cache/condcomp"  # packed token shards, keyed by content hash

    def validate(self) -> None:
        tables.check_fields(self, "data")
        if self.tokenizer not in ("byte", "bpe"):
            raise ConfigError(f"data.tokenizer = {self.tokenizer!r} is unknown; use 'byte' or 'bpe'")
        if self.tokenizer == "bpe" and self.vocab_size < 260:
            raise ConfigError(
                f"data.vocab_size = {self.vocab_size} is too small for BPE; use at least 260 "
                "(256 bytes plus special tokens)"
            )
        if not self.corpus:
            raise ConfigError("data.corpus is empty; name 'shakespeare' or a path to your text data")


@dataclass
class TrainConfig:
    batch_size: int = ranged(16, gt=0, le=MAX_SIZE)  # sequences per micro-batch
    grad_accum: int = ranged(1, gt=0, le=MAX_SIZE)  # micro-batches per optimizer step
    seq_len: int = ranged(256, gt=0, le=MAX_SIZE)
    max_steps: int = ranged(1000, ge=0, le=MAX_COUNT)
    # >0: overrides max_steps with ceil(max_tokens / tokens per step)
    max_tokens: int = ranged(0, ge=0, le=MAX_COUNT)
    # No upper bound: a rate too high for the model diverges, and the run stops on
    # train.max_nonfinite non-finite steps with a message.
    lr: float = ranged(3e-3, gt=0.0)
    min_lr_ratio: float = ranged(0.1, ge=0.0, le=1.0)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = ranged(100, ge=0, le=MAX_COUNT)
    weight_decay: float = ranged(0.1, ge=0.0)
    beta1: float = ranged(0.9, ge=0.0, lt=1.0)
    beta2: float = ranged(0.95, ge=0.0, lt=1.0)
    grad_clip: float = ranged(1.0, ge=0.0)  # 0 disables clipping
    eval_every: int = ranged(200, gt=0, le=MAX_COUNT)
    # validation tokens per periodic evaluation
    eval_tokens: int = ranged(131072, gt=0, le=MAX_COUNT)
    ckpt_every: int = ranged(500, gt=0, le=MAX_COUNT)
    keep_last: int = ranged(2, gt=0, le=MAX_COUNT)
    log_every: int = ranged(10, gt=0, le=MAX_COUNT)
    seed: int = ranged(0, ge=MIN_SEED, le=MAX_SEED)  # torch.manual_seed's range
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    # float32 | bfloat16: how matrix weights are stored between steps; bfloat16 keeps fp32
    # master weights in the optimizer and needs bf16 autocast (condcomp.master_weights)
    param_dtype: str = "float32"
    compile: bool = False
    # stop after this many non-finite steps in a row
    max_nonfinite: int = ranged(5, gt=0, le=MAX_COUNT)
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
        tables.check_fields(self, "train")
        if self.total_steps <= 0:
            raise ConfigError("train.max_steps (or train.max_tokens) must be positive")
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
        check_device_name(self.device, "train.device")


INIT_FROM_TEACHER = ("none", "shared")


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained teacher run (``condcomp distill``;
    :mod:`condcomp.surgery.distill`). The student minimises
    ``alpha * CE(student, data) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)``."""

    # A run folder (its newest checkpoint) or one checkpoint of it; "": no distillation.
    teacher: str = ""
    # The weight of the ground-truth cross-entropy; the teacher's KL gets 1 - alpha. Switch
    # (Fedus et al. 2021, sec. 5) mixes 0.25 of the teacher's probabilities with 0.75 of the
    # ground truth.
    alpha: float = ranged(0.75, ge=0.0, le=1.0)
    # Softens both distributions (Hinton et al. 2015); far above 20, both are near uniform.
    temperature: float = ranged(1.0, gt=0.0, le=1e3)
    # "none" | "shared": the student starts from every weight it shares with the teacher by
    # name and shape (a sparse teacher's non-expert weights: Switch sec. 5, Table 6).
    init_from_teacher: str = "none"
    # Sequences per teacher forward (and KL), to bound its memory; 0: the whole micro-batch.
    teacher_chunk: int = ranged(0, ge=0, le=MAX_SIZE)

    def validate(self) -> None:
        tables.check_fields(self, "distill")
        if self.init_from_teacher not in INIT_FROM_TEACHER:
            raise ConfigError(f"distill.init_from_teacher = {self.init_from_teacher!r} is "
                              f"unknown; use one of {list(INIT_FROM_TEACHER)}")
        if self.init_from_teacher != "none" and not self.teacher:
            raise ConfigError(f"distill.init_from_teacher = {self.init_from_teacher!r} copies "
                              "a teacher's weights, but distill.teacher is not set; name the "
                              "teacher run, or set init_from_teacher = 'none'")


@dataclass
class HealthConfig:
    """``[health]``: when the train loop warns that a layer's router is failing
    (:mod:`condcomp.router_health`). Read only while training; a resume may change them."""

    # An expert is dead when no token went to it in this many optimizer steps.
    dead_expert_steps: int = ranged(100, gt=0, le=MAX_COUNT)
    # Collapse: the busiest expert takes more than this share of a layer's tokens (1: never).
    collapse_share: float = ranged(0.5, gt=0.0, le=1.0)
    # Collapse: the mean routing entropy falls under this many nats (0: never).
    min_router_entropy: float = ranged(0.1, ge=0.0, le=1e3)
    # A collapse warns after this many logged steps in a row, so one noisy step does not.
    collapse_logged_steps: int = ranged(3, gt=0, le=MAX_COUNT)

    def validate(self) -> None:
        tables.check_fields(self, "health")


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = ""  # "": runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)  # read under torchrun only
    distill: DistillConfig = field(default_factory=DistillConfig)  # read with a teacher only
    health: HealthConfig = field(default_factory=HealthConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    def validate(self) -> RunConfig:
        tables.check_fields(self, "")
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.dist.validate()
        self.distill.validate()
        self.health.validate()
        self._check_expert_parallel()
        if self.distill.init_from_teacher != "none" and self.train.init_from:
            raise ConfigError(f"train.init_from and distill.init_from_teacher = "
                              f"{self.distill.init_from_teacher!r} both set the first weights; "
                              "keep one of them")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len = {self.train.seq_len} exceeds model.max_seq_len = "
                f"{self.model.max_seq_len}; lower seq_len or raise max_seq_len"
            )
        return self

    def _check_expert_parallel(self) -> None:
        """An expert-parallel degree must split the experts of the FFN slot evenly."""
        ep = self.dist.ep
        if ep == 1:
            return
        options = registry.parse_options("ffn", self.model.ffn)
        resolved = options.resolved(self.model) if hasattr(options, "resolved") else options
        num_experts = getattr(resolved, "num_experts", None)
        if num_experts is None:
            raise ConfigError(f"dist.ep = {ep} shards the experts of the FFN slot, but "
                              f"model.ffn.kind = {self.model.ffn.kind!r} has none; set "
                              "dist.ep = 1")
        if num_experts % ep:
            raise ConfigError(f"dist.ep = {ep} does not divide the {num_experts} experts of "
                              f"model.ffn; pick an expert-parallel degree that divides "
                              f"{num_experts}")

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

