"""The model a plan describes, built without memory, and where each of its tensors lives.

The model is built on the ``meta`` device: every parameter has its shape and dtype and no
storage, so a 1.6T-parameter config is inspected in about a second. :class:`Layout` says how
the ranks split it (``docs/design.md``, torchtitan's layout): every rank is data-parallel;
with ``dist.ep = E_p`` the stacked ``[E, ...]`` expert weights are split on dim 0 over E_p
ranks, and FSDP shards dense tensors over all ranks and expert tensors over the
``world / E_p`` ranks that hold the same experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from condcomp.conditional.experts import GroupedExperts
from condcomp.config import RunConfig
from condcomp.data.tokenizers import ByteTokenizer
from condcomp.distributed.context import check_layout
from condcomp.master_weights import matrix_weights
from condcomp.model import TransformerLM

SINGLE_PROCESS = "single"  # the data_parallel mode of a run started without torchrun


@dataclass(frozen=True)
class Layout:
    """How ``world_size`` ranks hold the model. ``data_parallel`` is ``"single"`` for one
    process (``condcomp train`` without torchrun), else the config's ``dist.data_parallel``."""

    world_size: int
    ep: int
    data_parallel: str

    @property
    def efsdp(self) -> int:
        """Ranks that hold the same experts (and FSDP-shard them between them)."""
        return self.world_size // self.ep

    @property
    def sharded(self) -> bool:
        return self.data_parallel == "fsdp"


def layout_for(cfg: RunConfig, world_size: int, device_type: str) -> Layout:
    """The layout of ``cfg`` on ``world_size`` ranks; an impossible one raises the
    :class:`ConfigError` that ``torchrun`` would (the experts are checked against ``dist.ep``
    when the config is validated)."""
    check_layout(cfg.dist, world_size, device_type)
    mode = SINGLE_PROCESS if world_size == 1 else cfg.dist.data_parallel
    return Layout(world_size, cfg.dist.ep, mode)


def meta_model(cfg: RunConfig) -> TransformerLM:
    """The model of ``cfg`` with shapes and no storage. A vocabulary of 0 (taken from the
    tokenizer at the start of a run) becomes the tokenizer's: 257 bytes, or the BPE target."""
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        import dataclasses

        vocab = ByteTokenizer.vocab_size if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
    with torch.device("meta"):
        return TransformerLM(model_cfg).train()


@dataclass(frozen=True)
class Tensor:
    """One parameter as the plan sees it."""

    name: str
    shape: tuple[int, ...]
    expert: bool  # a stacked [E, ...] expert weight: split over dist.ep on dim 0
    # Stored in bf16 under train.param_dtype = "bfloat16" (condcomp.master_weights), with an
    # fp32 master copy, when the run is not FSDP-sharded.
    matrix: bool
    unit: str  # the FSDP unit that all-gathers it: "root", "layers.3", "layers.3.experts"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, layout: Layout) -> tuple[int, ...]:
        """The shape of the part one rank holds before FSDP: its E / ep experts."""
        if not self.expert:
            return self.shape
        return (self.shape[0] // layout.ep, *self.shape[1:])

    def held(self, layout: Layout) -> int:
        """Elements rank 0 holds between steps. FSDP2 splits a tensor into ``n`` chunks of
        ``ceil(rows / n)`` rows and pads every rank's chunk to that size; rank 0 always has a
        full one, the largest shard. Expert tensors are FSDP-sharded over efsdp on dim 0, or
        on dim 1 when a rank has fewer experts than efsdp ranks (torchtitan's rule)."""
        shape = self.local_shape(layout)
        if not layout.sharded:
            return math.prod(shape)
        ranks = layout.efsdp if self.expert else layout.world_size
        dim = 1 if self.expert and shape[0] < ranks and len(shape) > 1 else 0
        rows = -(-shape[dim] // ranks)
        return rows * math.prod(shape) // shape[dim]

    def gathered(self, layout: Layout) -> int:
        """Elements of the tensor once FSDP has all-gathered it for compute."""
        return math.prod(self.local_shape(layout))


def inventory(model: nn.Module) -> list[Tensor]:
    """Every parameter of ``model`` once (tied weights once), in ``parameters()`` order."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts)
                  for p in m.parameters()}
    matrix_ids = {id(p) for p in matrix_weights(model)}
    return [Tensor(name, tuple(p.shape), id(p) in expert_ids, id(p) in matrix_ids,
                   _fsdp_unit(name, id(p) in expert_ids))
            for name, p in model.named_parameters()]


def _fsdp_unit(name: str, expert: bool) -> str:
    """FSDP2 wraps each block (``layers.i``), each block's experts on their own mesh, and the
    root (embedding, final norm, output head)."""
    parts = name.split(".")
    if parts[0] != "layers":
        return "root"
    block = ".".join(parts[:2])
    return f"{block}.experts" if expert else block
