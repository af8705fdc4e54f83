"""Parameters, gradients and optimizer state: what one rank holds between steps.

Per data-parallel mode (rank 0, which FSDP gives the largest shard):

- ``single`` (one process) and ``ddp``: every dense parameter whole, and the rank's E / ep
  experts of each MoE layer. fp32 parameters and gradients; with ``train.param_dtype =
  "bfloat16"`` the matrix weights are stored in bf16 (2 bytes) beside fp32 master copies, whose
  fp32 gradients the optimizer reads (condcomp.master_weights). DDP's gradient buckets are
  assumed to be the gradients themselves (``gradient_as_bucket_view=True``); without it DDP
  keeps a second copy of every gradient.
- ``fsdp``: each tensor's FSDP2 shard, fp32, gradients and optimizer state alike; with
  ``param_dtype = "bfloat16"`` FSDP casts the all-gathered shards to bf16 for compute
  (MixedPrecisionPolicy), so no masters.

AdamW keeps two fp32 tensors per parameter (``exp_avg``, ``exp_avg_sq``) and a 4-byte step
count per parameter tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from condcomp.plan.layout import Layout, Tensor

FP32, BF16 = 4, 2
ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32 each
ADAMW_STEP_BYTES = 4  # the per-tensor step count, a float32 scalar


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the model and of rank 0, dense and expert."""

    dense: int
    expert: int
    dense_per_rank: int
    expert_per_rank: int
    active_per_token: int

    @property
    def total(self) -> int:
        return self.dense + self.expert

    @property
    def total_per_rank(self) -> int:
        return self.dense_per_rank + self.expert_per_rank


@dataclass(frozen=True)
class StateBytes:
    """Bytes rank 0 holds between steps."""

    params: int
    grads: int
    optimizer: int
    masters: int  # fp32 master copies of bf16-stored weights (0 unless single/ddp + bf16)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.masters


def param_counts(tensors: list[Tensor], layout: Layout, active_per_token: int) -> ParamCounts:
    def total(expert: bool) -> int:
        return sum(t.numel for t in tensors if t.expert == expert)

    def held(expert: bool) -> int:
        return sum(t.held(layout) for t in tensors if t.expert == expert)

    return ParamCounts(total(False), total(True), held(False), held(True), active_per_token)


def state_bytes(tensors: list[Tensor], layout: Layout, low_precision_params: bool
                ) -> StateBytes:
    """Rank 0's parameters, gradients, AdamW state and master weights."""
    held = sum(t.held(layout) for t in tensors)
    optimizer = ADAMW_MOMENTS * FP32 * held + ADAMW_STEP_BYTES * len(tensors)
    if layout.sharded or not low_precision_params:
        return StateBytes(FP32 * held, FP32 * held, optimizer, 0)
    matrix = sum(t.held(layout) for t in tensors if t.matrix)
    # bf16 matrix weights, fp32 for the rest; the optimizer steps the fp32 masters, whose
    # gradients are fp32 (each micro-batch's bf16 gradient is added in and dropped).
    params = BF16 * matrix + FP32 * (held - matrix)
    return StateBytes(params, FP32 * held, optimizer, FP32 * matrix)


def gather_buffer_bytes(tensors: list[Tensor], layout: Layout, low_precision_params: bool
                        ) -> int:
    """FSDP's transient buffers at their peak, an estimate: two units all-gathered (the one
    computing and the one prefetched) and one unit's unsharded gradients before its
    reduce-scatter, each the size of the largest unit, in the compute dtype of the parameters
    (bf16 under MixedPrecisionPolicy, else fp32). 0 unless FSDP."""
    if not layout.sharded:
        return 0
    units: dict[str, int] = {}
    for t in tensors:
        units[t.unit] = units.get(t.unit, 0) + t.gathered(layout)
    element = BF16 if low_precision_params else FP32
    return 3 * max(units.values()) * element
