"""The ``[dist]`` config table: how a run launched by ``torchrun`` spreads over its processes.

A run started without ``torchrun`` is one process and ignores the table, except that an
expert-parallel degree above 1 is checked against the model's experts early, so a layout
that cannot work fails before any cluster time is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

from condcomp import tables
from condcomp.errors import ConfigError
from condcomp.ranges import MAX_SIZE, ranged

DATA_PARALLEL_MODES = ("fsdp", "ddp")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class DistConfig:
    # fsdp: FSDP2 (fully_shard per block and at the root: parameters, gradients and optimizer
    # state sharded over the data-parallel ranks); ddp: every rank holds the whole model and
    # gradients are all-reduced (DistributedDataParallel)
    data_parallel: str = "fsdp"
    # Expert-parallel degree: each MoE layer's experts are split over groups of this many
    # ranks, and tokens travel to their experts by all-to-all. 1: every rank has all experts.
    ep: int = ranged(1, gt=0, le=MAX_SIZE)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on the CPU
    # How long a collective may wait for the other ranks before the job fails.
    timeout_s: float = ranged(600.0, gt=0.0, le=7 * 24 * 3600.0)

    def validate(self) -> None:
        tables.check_fields(self, "dist")
        if self.data_parallel not in DATA_PARALLEL_MODES:
            raise ConfigError(f"dist.data_parallel = {self.data_parallel!r} is unknown; use one "
                              f"of {list(DATA_PARALLEL_MODES)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"dist.backend = {self.backend!r} is unknown; use one of "
                              f"{list(BACKENDS)}")
