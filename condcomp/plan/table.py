"""A plan as a table to read: bytes in KiB..TiB, counts in k/M/B/T, FLOPs in GFLOP..PFLOP."""

from __future__ import annotations

from condcomp.plan import Plan

_LABEL, _VALUE = 24, 12


def format_plan(plan: Plan) -> str:
    return "\n".join([*_heading(plan), "", *_params(plan), "", *_memory(plan), "",
                      *_all_to_all(plan), "", *_flops(plan)])


def human_bytes(n: float) -> str:
    """``512 B``, ``1.50 KiB`` ... ``3.07 TiB``: three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:,.3g} TiB" if abs(n) < 1000 else f"{n:,.0f} TiB"


def human_count(n: float) -> str:
    """``512``, ``45.6k``, ``785M``, ``1.57T``."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def human_flops(n: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9),
                        ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def _row(label: str, value: str, note: str = "") -> str:
    return f"  {label:<{_LABEL}}{value:>{_VALUE}}" + (f"   {note}" if note else "")


def _heading(plan: Plan) -> list[str]:
    lay, prec, b = plan.layout, plan.precision, plan.batch
    if lay.data_parallel == "single":
        where = "1 process (no torchrun)"
    else:
        where = (f"{lay.world_size} ranks: {lay.data_parallel}, ep {lay.ep} x efsdp "
                 f"{lay.efsdp}")
    compute = "bf16 autocast" if prec.compute == 2 else "fp32"
    params = {"none": "fp32 params", "matrix": "bf16 matrix weights + fp32 masters",
              "all": "fp32 shards cast to bf16 by FSDP"}[prec.bf16_weights]
    return [f"plan: {plan.name} on {where}",
            f"  {prec.device_type.upper()} kernels, {compute}, {params}; "
            f"vocabulary {plan.vocab_size:,}",
            f"  batch: {b.sequences:,} sequences x {b.seq_len:,} tokens per step "
            f"({human_count(b.tokens_per_step)} tokens); per rank {b.sequences_per_rank:,} "
            f"sequences: {b.accum} micro-batch{'es' if b.accum > 1 else ''} of "
            f"{b.micro_batch:,}"]


def _params(plan: Plan) -> list[str]:
    p = plan.params
    return [f"{'parameters':<{_LABEL + 2}}{'model':>{_VALUE}}{'rank 0':>{_VALUE}}",
            _row("dense", human_count(p.dense)) + f"{human_count(p.dense_per_rank):>{_VALUE}}",
            _row("expert", human_count(p.expert))
            + f"{human_count(p.expert_per_rank):>{_VALUE}}",
            _row("total", human_count(p.total)) + f"{human_count(p.total_per_rank):>{_VALUE}}",
            _row("active per token", human_count(p.active_per_token))]


def _memory(plan: Plan) -> list[str]:
    s, act, b = plan.states, plan.activations, plan.batch
    stored = {"none": "fp32", "matrix": "bf16 matrix weights, fp32 others",
              "all": "fp32 shards"}[plan.precision.bf16_weights]
    lines = ["memory of rank 0 (between steps, plus one micro-batch's activations)",
             _row("parameters", human_bytes(s.params), stored),
             _row("gradients", human_bytes(s.grads), "fp32"),
             _row("AdamW state", human_bytes(s.optimizer), "m and v, fp32"),
             _row("master weights", human_bytes(s.masters), "fp32" if s.masters else "")]
    if plan.layout.sharded:
        lines.append(_row("FSDP buffers", human_bytes(plan.gather_buffers),
                          "2 units gathered + 1 unit's gradients (estimate)"))
    if act.unmodelled:
        lines.append(_row("activations", "?", f"no model for the {act.unmodelled}"))
        lines.append(_row("total", human_bytes(plan.memory_per_rank), "without activations"))
        return lines
    lines += [_row("activations", human_bytes(act.total),
                   f"micro-batch {b.micro_batch:,} x {b.seq_len:,} tokens: "
                   f"{human_bytes(act.saved)} saved for backward + "
                   f"{human_bytes(act.logits)} logits"),
              _row("total", human_bytes(plan.memory_per_rank))]
    return lines


def _all_to_all(plan: Plan) -> list[str]:
    a = plan.all_to_all
    if a.moe_layers == 0:
        return ["all-to-all: none (no MoE layer)"]
    if a.ep == 1:
        return ["all-to-all: none (dist.ep = 1: every rank has every expert)"]
    return [f"all-to-all per rank (dispatch + combine, forward + backward; ep {a.ep}: "
            f"{a.ep - 1}/{a.ep} leaves the rank)",
            _row("per MoE layer, step", human_bytes(a.per_layer),
                 f"sent; {human_bytes(a.leaving_per_layer)} leaves the rank"),
            _row(f"per step, {a.moe_layers} layers", human_bytes(a.per_step),
                 f"sent; {human_bytes(a.leaving_per_step)} leaves the rank, "
                 f"{human_bytes(a.world_leaving_per_step)} for all ranks")]


def _flops(plan: Plan) -> list[str]:
    f, b = plan.flops, plan.batch
    return ["training FLOPs (3 x forward)",
            _row("per step", human_flops(f.per_step),
                 f"{human_flops(f.forward_per_token)}/token forward x "
                 f"{human_count(b.tokens_per_step)} tokens"),
            _row("per rank", human_flops(f.per_rank))]
