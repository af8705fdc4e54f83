"""``condcomp plan``: what one rank of a run would hold, move and compute, before any of it is
allocated.

:func:`make_plan` builds the config's model on the ``meta`` device and counts, for rank 0 of
``world_size`` ranks under the config's ``[dist]`` layout:

- parameters, dense and expert, of the model and of the rank (:mod:`.layout`, :mod:`.states`);
- bytes of parameters, gradients, AdamW state and master weights (:mod:`.states`), and FSDP's
  transient all-gather buffers;
- activation memory of the rank's micro-batch (:mod:`.activations`);
- the MoE all-to-all bytes per layer and per step, and training FLOPs (:mod:`.traffic`).

The rank's micro-batch and accumulation come from
:func:`condcomp.distributed.batching.rank_batch`, as the train loop splits the global batch.
The plan assumes the kernels of the device the run names: ``train.device = "cpu"`` the CPU's,
anything else CUDA's (a ``torchrun`` job's GPUs), with the compute dtype the run would use
there (``train.dtype = "auto"``: bf16 autocast on CUDA, fp32 on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from condcomp.config import RunConfig
from condcomp.distributed.batching import rank_batch
from condcomp.master_weights import check_param_dtype
from condcomp.plan.activations import ActivationEstimate, Precision, estimate_activations
from condcomp.plan.layout import Layout, inventory, layout_for, meta_model
from condcomp.plan.states import (
    ParamCounts,
    StateBytes,
    gather_buffer_bytes,
    param_counts,
    state_bytes,
)
from condcomp.plan.traffic import AllToAll, Flops, all_to_all, training_flops
from condcomp.runtime import autocast_dtype


@dataclass(frozen=True)
class RankBatch:
    """The global batch of a step and one rank's share of it."""

    sequences: int  # per step, all ranks (train.batch_size * train.grad_accum)
    seq_len: int
    micro_batch: int  # sequences per forward on a rank
    accum: int  # micro-batches per step on a rank

    @property
    def tokens_per_step(self) -> int:
        return self.sequences * self.seq_len

    @property
    def sequences_per_rank(self) -> int:
        return self.micro_batch * self.accum

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class Plan:
    name: str
    layout: Layout
    precision: Precision
    param_dtype: str
    vocab_size: int
    batch: RankBatch
    params: ParamCounts
    states: StateBytes
    gather_buffers: int  # FSDP's transient all-gather and reduce-scatter buffers (estimate)
    activations: ActivationEstimate
    all_to_all: AllToAll
    flops: Flops

    @property
    def memory_per_rank(self) -> int:
        """Bytes rank 0 holds at its peak: states, FSDP buffers and one micro-batch's
        activations (without the activations when the estimate has no model for them)."""
        return self.states.total + self.gather_buffers + self.activations.total

    def as_dict(self) -> dict[str, Any]:
        """Every number, in plain units (bytes, FLOPs, counts), for ``--json``."""
        p, s, b = self.params, self.states, self.batch
        return {
            "name": self.name,
            "layout": {"world_size": self.layout.world_size, "ep": self.layout.ep,
                       "efsdp": self.layout.efsdp, "data_parallel": self.layout.data_parallel},
            "precision": {"kernels": self.precision.device_type,
                          "compute_dtype": "bfloat16" if self.precision.compute == 2
                          else "float32", "param_dtype": self.param_dtype},
            "vocab_size": self.vocab_size,
            "batch": {"sequences_per_step": b.sequences, "seq_len": b.seq_len,
                      "tokens_per_step": b.tokens_per_step,
                      "sequences_per_rank": b.sequences_per_rank,
                      "micro_batch": b.micro_batch, "accum": b.accum},
            "params": {"total": p.total, "dense": p.dense, "expert": p.expert,
                       "active_per_token": p.active_per_token,
                       "per_rank": {"total": p.total_per_rank, "dense": p.dense_per_rank,
                                    "expert": p.expert_per_rank}},
            "memory_per_rank_bytes": {
                "params": s.params, "grads": s.grads, "optimizer": s.optimizer,
                "masters": s.masters, "gather_buffers": self.gather_buffers,
                "activations": self.activations.as_dict(), "total": self.memory_per_rank},
            "all_to_all": self.all_to_all.as_dict(),
            "flops": self.flops.as_dict(),
        }


def make_plan(cfg: RunConfig, world_size: int) -> Plan:
    """The plan of the validated config ``cfg`` on ``world_size`` ranks. An impossible layout
    or a batch that does not split over the ranks raises :class:`ConfigError`."""
    device_type = "cpu" if cfg.train.device == "cpu" else "cuda"
    layout = layout_for(cfg, world_size, device_type)
    precision = precision_for(cfg, layout, device_type)
    tc = cfg.train
    micro_batch, accum = rank_batch(tc.batch_size, tc.grad_accum, world_size)
    batch = RankBatch(tc.batch_size * tc.grad_accum, tc.seq_len, micro_batch, accum)
    model = meta_model(cfg)
    tensors = inventory(model)
    low_precision = cfg.train.param_dtype == "bfloat16"
    return Plan(
        name=cfg.name, layout=layout, precision=precision, param_dtype=tc.param_dtype,
        vocab_size=model.cfg.vocab_size, batch=batch,
        params=param_counts(tensors, layout, model.num_params(active_only=True)),
        states=state_bytes(tensors, layout, low_precision),
        gather_buffers=gather_buffer_bytes(tensors, layout, low_precision),
        activations=estimate_activations(model, precision, layout, micro_batch, tc.seq_len),
        all_to_all=all_to_all(model, layout.ep, world_size, batch.tokens_per_micro_batch,
                              accum, precision.compute),
        flops=training_flops(model, tc.seq_len, batch.tokens_per_step, world_size),
    )


def precision_for(cfg: RunConfig, layout: Layout, device_type: str) -> Precision:
    """The dtypes the run's forward would use on ``device_type``'s kernels."""
    amp = autocast_dtype(torch.device(device_type), cfg.train.dtype)
    check_param_dtype(cfg.train.param_dtype, amp, "set train.dtype = 'bfloat16', or plan "
                      "for CUDA (train.device = 'auto' or 'cuda')")
    compute = 2 if amp == torch.bfloat16 else 4
    if cfg.train.param_dtype != "bfloat16":
        bf16_weights = "none"
    else:
        bf16_weights = "all" if layout.sharded else "matrix"
    # FSDP's MixedPrecisionPolicy casts the embedding table too, so the stream starts in bf16.
    stream = 2 if bf16_weights == "all" else 4
    return Precision(device_type, compute, stream, bf16_weights)
