"""``condcomp bench moe``: MoE layer forward+backward throughput, side by side in one process
with (a) the dense SwiGLU FFN of equal active FLOPs and (b) HF Mixtral's MoE block holding
the same weights, in each expert kernel HF offers.

For each ``E:k`` configuration the MoE has E experts of width ``d_ff / k`` and routes each
token to k of them (dropless, renormalised top-k, as Mixtral), so a token's expert FLOPs equal
the dense FFN's ``d_ff``: the fraction ``MoE tokens/s / dense tokens/s`` is what routing and
permutation cost. Timing is the median of ``--steps`` forward+backward passes (the output's
gradient is a fixed random tensor) after ``--warmup`` untimed ones, synchronised on CUDA.

``--count-bytes`` times nothing: it compiles each layer's forward + backward once and reports
the memory traffic inductor schedules for it (:mod:`condcomp.bench.compiled_bytes`), per token
and as a fraction of the dense FFN's, with the grouped-GEMM fast path on the CPU too. That
compares the memory-bound work around the matrix products (casts, permutations, the combine) on
a machine without a GPU. With ``--param-dtype bfloat16`` the count adds what the gradient hooks
move outside the compiled graph (:meth:`condcomp.master_weights.MasterWeights.hook_bytes`).

``--ep-path`` also runs each ``E:k`` MoE layer through the expert-parallel code path with a
group of one rank (:func:`condcomp.distributed.expert_parallel.shard_experts_over`): the counts
and the rows go through all-to-all exchanges with this one rank, the rows are permuted from
rank-major to expert-major order, and the experts run on the local shard, which is all of
them. The plain and the EP-path layers (the same weights) take turns pass by pass, and the
table gives the EP path's time over the plain path's: what the expert-parallel code costs
before any other rank takes part. It starts a process group of one rank (gloo on the CPU,
nccl on CUDA) when none exists.

``--profile`` adds, for each ``E:k``, torch.profiler's table of where the MoE layer's passes
spend their time: which kernels (or, on the CPU, which operators) routing, permutation and the
expert products cost.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from condcomp import flags
from condcomp.bench.common import command_line, median_seconds, report, sync, time_in_turns
from condcomp.bench.compiled_bytes import count_compiled_bytes
from condcomp.conditional.experts import expert_kernel
from condcomp.distributed.expert_parallel import shard_experts_over
from condcomp.errors import ConfigError
from condcomp.kernels.expert_ffn import EXPERT_KERNELS
from condcomp.kernels.grouped_gemm import fast_path_on_cpu
from condcomp.layers import MLP, MoE
from condcomp.machine_load import LoadMeter
from condcomp.master_weights import (
    PARAM_DTYPES,
    MasterWeights,
    check_param_dtype,
    master_weights_for,
    matrix_weights,
)
from condcomp.ranges import MAX_COUNT, MAX_SIZE
from condcomp.runtime import autocast, autocast_dtype, device_name, resolve_device

PROFILED_PASSES = 3  # --profile: passes profiled after the timed ones


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "moe", help="MoE layer throughput vs the equal-FLOP dense FFN and HF Mixtral",
        description=__doc__.split("\n\n")[0])
    size = flags.number(int, gt=0, le=MAX_SIZE)
    p.add_argument("--d-model", type=size, default=None, help="default: 1024 on CUDA, 256 on CPU")
    p.add_argument("--d-ff", type=size, default=None,
                   help="dense FFN width (SwiGLU); default: 8/3 d_model rounded to 64")
    p.add_argument("--tokens", type=flags.number(int, gt=0, le=MAX_COUNT), default=None,
                   help="tokens per batch; default: 65536 on CUDA, 4096 on CPU")
    p.add_argument("--experts", default="8:1,64:8",
                   help="comma list of E:k (experts : experts per token), e.g. 8:1,64:8")
    p.add_argument("--steps", type=flags.number(int, gt=0), default=10,
                   help="timed forward + backward steps (default 10)")
    p.add_argument("--warmup", type=flags.number(int, ge=0), default=3)
    p.add_argument("--device", type=flags.device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="how the layers store their matrix weights: bfloat16 is what "
                   "train.param_dtype = 'bfloat16' trains with (no per-step weight casts; "
                   "needs bf16 compute)")
    p.add_argument("--compile", action="store_true", help="torch.compile every layer")
    p.add_argument("--count-bytes", action="store_true",
                   help="instead of timing, count the bytes each compiled layer's forward + "
                   "backward reads and writes (inductor's schedule; runs on the CPU)")
    p.add_argument("--profile", action="store_true",
                   help="after timing each E:k MoE layer, print torch.profiler's table of where "
                   f"{PROFILED_PASSES} more forward + backward passes spend their time (on CUDA "
                   "its kernels, by device time; on the CPU its operators, by their own CPU "
                   "time); the JSON keeps the tables")
    p.add_argument("--ep-path", action="store_true",
                   help="also time each MoE layer through the expert-parallel dispatch with a "
                   "group of one rank, in turns with the plain layer, and give EP path time / "
                   "plain time (eager, fp32-stored weights)")
    p.add_argument("--expert-kernel", choices=EXPERT_KERNELS, default="grouped_mm",
                   help="also time each MoE layer with its experts through this path "
                   "(condcomp.kernels.expert_ffn: triton = the gather-on-load kernels), in a "
                   "row beside the default grouped-GEMM path's (default: grouped_mm, no row)")
    p.add_argument("--peer", choices=["hf", "none"], default=None,
                   help="HF Mixtral's MoE block (default: hf if transformers is installed)")
    p.add_argument("--hf-impls", default="all",
                   help="comma list of HF experts_implementation to time (default: all HF has; "
                   "batched_mm materialises per-token expert weights and is very slow on CPU)")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=run)
    return p


def parse_experts(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        try:
            e, k = (int(v) for v in item.split(":"))
        except ValueError:
            raise ConfigError(f"--experts {text!r}: write E:k pairs, e.g. 8:1,64:8") from None
        if not 1 <= k <= e:
            raise ConfigError(f"--experts {item}: k must be between 1 and E")
        pairs.append((e, k))
    return pairs


def fwd_bwd_pass(layer: nn.Module, x_BTD: torch.Tensor, grad_BTD: torch.Tensor,
                 amp: torch.dtype | None) -> None:
    """One forward + backward pass, the gradients cleared after it as between steps."""
    x = x_BTD.detach().requires_grad_(True)
    with autocast(x_BTD.device, amp):
        y = layer(x)
    y.backward(grad_BTD.to(y.dtype))
    for p in layer.parameters():
        p.grad = None


def time_fwd_bwd(layer: nn.Module, x_BTD: torch.Tensor, grad_BTD: torch.Tensor, steps: int,
                 warmup: int, amp: torch.dtype | None,
                 masters: Sequence[nn.Parameter] = ()) -> float:
    """Median seconds of one forward + backward pass (``masters``: fp32 master weights whose
    gradients the pass fills, cleared between passes like the layer's own)."""
    device = x_BTD.device
    times = []
    for i in range(warmup + steps):
        x = x_BTD.detach().requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, amp):
            y = layer(x)
        y.backward(grad_BTD.to(y.dtype))
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        for p in (*layer.parameters(), *masters):
            p.grad = None  # as the optimizer's zero_grad between steps
    return statistics.median(times)


def profile_table(layer: nn.Module, x_BTD: torch.Tensor, grad_BTD: torch.Tensor,
                  amp: torch.dtype | None, masters: Sequence[nn.Parameter] = ()) -> str:
    """torch.profiler's table of :data:`PROFILED_PASSES` forward + backward passes of a warmed-up
    ``layer``: on CUDA by the kernels' device time (their own rows say which kernels cost
    what), elsewhere by each operator's own CPU time (a total would put the whole pass first)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x_BTD.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        time_fwd_bwd(layer, x_BTD, grad_BTD, PROFILED_PASSES, 0, amp, masters)
    return prof.key_averages().table(
        sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=28,
        max_name_column_width=60)


def check_args(args: argparse.Namespace) -> None:
    if args.count_bytes and args.expert_kernel != "grouped_mm":
        raise ConfigError("--count-bytes counts what inductor compiles, and the Triton expert "
                          "kernels run outside the compiled graph; drop --expert-kernel")
    if args.profile and args.count_bytes:
        raise ConfigError("--profile profiles the timed passes and --count-bytes times none; "
                          "drop one of them")
    if args.ep_path and (args.count_bytes or args.compile or args.param_dtype != "float32"):
        raise ConfigError("--ep-path times the expert-parallel path eager with fp32-stored "
                          "weights, as the expert-parallel training runs it; drop "
                          "--count-bytes, --compile and --param-dtype")


@contextlib.contextmanager
def one_rank_mesh(device: torch.device) -> Iterator[Any]:
    """A device mesh of this one rank, named ``ep``, over the default process group: the one
    already started, or a group of one started here (and ended after)."""
    from torch.distributed.device_mesh import init_device_mesh

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    try:
        if dist.get_world_size() != 1:
            raise ConfigError("--ep-path measures the expert-parallel path on one rank; run "
                              "`condcomp bench moe` in one process, not under torchrun")
        yield init_device_mesh(device.type, (1,), mesh_dim_names=("ep",))
    finally:
        if started:
            dist.destroy_process_group()


def ep_path_copy(moe: MoE, blank: MoE, mesh: Any) -> MoE:
    """``blank``, a layer built as ``moe`` was, with ``moe``'s weights and its experts sharded
    over ``mesh``: its passes take the expert-parallel path even on a mesh of one rank. (A
    layer that has run keeps its last pass's losses and statistics, which deepcopy refuses.)"""
    blank.load_state_dict(moe.state_dict())
    shard_experts_over(blank, mesh)
    return blank


def time_in_turns_fwd_bwd(layers: dict[str, nn.Module], x_BTD: torch.Tensor,
                          grad_BTD: torch.Tensor, steps: int, warmup: int,
                          amp: torch.dtype | None) -> dict[str, float]:
    """Median seconds of a forward + backward pass of each layer, the layers taking turns
    pass by pass (:func:`condcomp.bench.common.time_in_turns`)."""
    passes = {name: functools.partial(fwd_bwd_pass, layer, x_BTD, grad_BTD, amp)
              for name, layer in layers.items()}
    return median_seconds(time_in_turns(passes, steps, x_BTD.device, warmup))


def bench_ep_path(moe: MoE, ep_moe: MoE, ek: str, x_BTD: torch.Tensor, grad_BTD: torch.Tensor,
                  args: argparse.Namespace, amp: torch.dtype | None, flops: float,
                  dense_s: float) -> dict[str, Any]:
    """``ep_moe``, the EP-path copy of ``moe`` (:func:`ep_path_copy`), timed in turns with
    ``moe`` itself: its row, with its time over the plain path's in the same turns and how far
    its forward output is from the plain one's (the same weights and tokens: not at all)."""
    seconds = time_in_turns_fwd_bwd({"plain": moe, "ep": ep_moe}, x_BTD, grad_BTD, args.steps,
                                    args.warmup, amp)
    with torch.no_grad(), autocast(x_BTD.device, amp):
        diff = (ep_moe(x_BTD).float() - moe(x_BTD).float()).abs().max().item()
    tokens = x_BTD.shape[0] * x_BTD.shape[1]
    row = _row("condcomp MoE [EP path, 1 rank]", ek, seconds["ep"], tokens, flops,
               dense_s / seconds["ep"])
    row["ep_over_plain"] = seconds["ep"] / seconds["plain"]
    # The plain layer's own time in these turns, which the ratio divides by: it may differ
    # from the plain row's, timed alone (passes in turns share the caches).
    row["plain_step_s_in_turns"] = seconds["plain"]
    row["max_abs_diff_forward"] = diff
    print(f"MoE E:k={ek} through the EP path (1 rank): {_say(row)}, "
          f"{row['ep_over_plain']:.3f}x the plain path's time in turns; forward max |diff| "
          f"{diff:.3g}")
    return row


def run(args: argparse.Namespace) -> int:
    check_args(args)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    d_model = args.d_model or (1024 if cuda else 256)
    d_ff = args.d_ff or max(64, round(8 * d_model / 3 / 64) * 64)
    tokens = args.tokens or (65536 if cuda else 4096)
    amp = autocast_dtype(device, args.dtype)
    check_param_dtype(args.param_dtype, amp, f"add --dtype {args.param_dtype}", "--param-dtype")
    param_dtype = PARAM_DTYPES[args.param_dtype]
    peer = args.peer or ("hf" if _has_transformers() and not args.count_bytes else "none")
    configs = parse_experts(args.experts)
    for e, k in configs:
        if d_ff % k:
            raise ConfigError(f"--experts {e}:{k}: k must divide d_ff = {d_ff}")

    meter = LoadMeter()
    torch.manual_seed(0)
    seq = 1024 if tokens % 1024 == 0 else tokens
    x = torch.randn(tokens // seq, seq, d_model, device=device)
    grad = torch.randn_like(x)
    compile_fn: Callable[[nn.Module], nn.Module] = (
        torch.compile if args.compile else (lambda m: m))

    def stored_for(layer: nn.Module) -> MasterWeights | None:
        # As training stores them: bf16 weights whose gradients the backward adds into fp32
        # masters (part of the measured pass); the copy-back is per optimizer step, like the
        # update, and is not measured. The HF peer, built from the MoE's weights, is already
        # bf16 and keeps bf16 gradients.
        return master_weights_for(layer, args.param_dtype) \
            if layer_dtype(layer) == torch.float32 else None

    profiles: dict[str, str] = {}

    def timed(layer: nn.Module, profile_as: str | None = None) -> float:
        stored = stored_for(layer)
        masters = stored.masters if stored is not None else []
        ready = compile_fn(layer)
        seconds = time_fwd_bwd(ready, x, grad, args.steps, args.warmup, amp, masters)
        if profile_as is not None:  # warmed up (and compiled) by the timing
            profiles[profile_as] = profile_table(ready, x, grad, amp, masters)
            print(f"\n=== {profile_as}\n{profiles[profile_as]}")
        return seconds

    def counted(layer: nn.Module) -> float:
        stored = stored_for(layer)
        with fast_path_on_cpu(), count_compiled_bytes(stored) as count:  # one pass, counted
            time_fwd_bwd(torch.compile(layer), x, grad, 1, 0, amp,
                         stored.masters if stored is not None else [])
        return float(count.bytes)

    measure = counted if args.count_bytes else timed
    dense = MLP(d_model, d_ff, "swiglu").to(device)
    dense_m = measure(dense)
    dense_flops = 3 * dense.flops_per_token()
    row = _bytes_row if args.count_bytes else _row
    rows: list[dict[str, Any]] = [row("dense SwiGLU FFN", "-", dense_m, tokens, dense_flops, 1.0)]
    print(f"dense d_ff={d_ff}: {_say(rows[0])}")
    with one_rank_mesh(device) if args.ep_path else contextlib.nullcontext() as mesh:
        for e, k in configs:
            shape = (d_model, d_ff // k, e, k)
            moe = MoE(*shape, normalize_topk=True).to(device)
            moe_m = counted(moe) if args.count_bytes else timed(
                moe, f"E={e} k={k}" if args.profile else None)
            flops = 3 * moe.flops_per_token()
            rows.append(row("condcomp MoE", f"{e}:{k}", moe_m, tokens, flops, dense_m / moe_m))
            print(f"MoE E={e} k={k}: {_say(rows[-1])} ({dense_m / moe_m:.2f}x dense)")
            if args.expert_kernel != "grouped_mm":
                with expert_kernel(moe, args.expert_kernel):
                    kernel_s = timed(moe)
                rows.append(_row(f"condcomp MoE [{args.expert_kernel} experts]", f"{e}:{k}",
                                 kernel_s, tokens, flops, dense_m / kernel_s))
                print(f"MoE E={e} k={k}, {args.expert_kernel} experts: {_say(rows[-1])} "
                      f"({dense_m / kernel_s:.2f}x dense)")
            if mesh is not None:
                ep_moe = ep_path_copy(moe, MoE(*shape, normalize_topk=True).to(device), mesh)
                rows.append(bench_ep_path(moe, ep_moe, f"{e}:{k}", x, grad, args, amp, flops,
                                          dense_m))
            if peer == "hf":
                rows += _bench_hf(moe, e, k, args.hf_impls, tokens, flops, dense_m, moe_m, timed)
            del moe
    result = {"device": device_name(device), "torch": torch.__version__, "d_model": d_model,
              "d_ff": d_ff, "tokens": tokens, "dtype": str(amp or torch.float32),
              "param_dtype": str(param_dtype),
              "compile": args.compile or args.count_bytes, "measure":
              "bytes" if args.count_bytes else "time", "command": command_line(),
              "rows": rows}
    if profiles:
        result["profiles"] = profiles
    report(result, format_table(result), args.json, meter.lap())
    return 0


def _bench_hf(moe: MoE, e: int, k: int, hf_impls: str, tokens: int, flops: float,
              dense_s: float, moe_s: float, timed: Callable[[nn.Module], float]
              ) -> list[dict[str, Any]]:
    from condcomp.hf import hf_experts_implementations, to_hf_mixtral_block

    rows = []
    wanted = None if hf_impls == "all" else set(hf_impls.split(","))
    for impl in hf_experts_implementations():
        if wanted is not None and impl not in wanted:
            continue
        block = to_hf_mixtral_block(moe, impl).train()
        try:
            hf_s = timed(block)
        except Exception as exc:  # an HF kernel this machine lacks (deepgemm, sonicmoe, ...)
            print(f"HF Mixtral [{impl}]: skipped ({str(exc).splitlines()[0][:100]})")
            continue
        row = _row(f"HF Mixtral [{impl}]", f"{e}:{k}", hf_s, tokens, flops, dense_s / hf_s)
        row["ours_over_hf"] = hf_s / moe_s
        rows.append(row)
        print(f"HF Mixtral [{impl}] E={e} k={k}: {tokens / hf_s:,.0f} tokens/s "
              f"(ours {hf_s / moe_s:.2f}x faster)")
    return rows


def _row(layer: str, ek: str, seconds: float, tokens: int, flops_per_token: float,
         of_dense: float) -> dict[str, Any]:
    return {"layer": layer, "E:k": ek, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "tflops": flops_per_token * tokens / seconds / 1e12, "fraction_of_dense": of_dense}


def _bytes_row(layer: str, ek: str, num_bytes: float, tokens: int, flops_per_token: float,
               of_dense: float) -> dict[str, Any]:
    """``--count-bytes``: ``fraction_of_dense`` is the dense FFN's bytes over this layer's."""
    return {"layer": layer, "E:k": ek, "bytes": num_bytes, "bytes_per_token": num_bytes / tokens,
            "flops_per_byte": flops_per_token * tokens / num_bytes, "fraction_of_dense": of_dense}


def _say(row: dict[str, Any]) -> str:
    if "bytes" in row:
        return f"{row['bytes_per_token']:,.0f} bytes/token"
    return f"{row['tokens_per_s']:,.0f} tokens/s"


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['device']}, {result['dtype']} compute, "
             f"{result.get('param_dtype', 'torch.float32')} weights, d_model {result['d_model']}, "
             f"d_ff {result['d_ff']}, {result['tokens']:,} tokens, compile={result['compile']}"]
    if result.get("measure") == "bytes":
        lines += ["", "Memory traffic of the compiled forward + backward (inductor's count; "
                  "`/ dense` is the dense FFN's bytes over the layer's)", "",
                  "| layer | E:k | bytes/token | FLOPs/byte | / dense |",
                  "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['layer']} | {r['E:k']} | {r['bytes_per_token']:,.0f} | "
                  f"{r['flops_per_byte']:.1f} | {r['fraction_of_dense']:.3f} |"
                  for r in result["rows"]]
        return "\n".join(lines)
    ep_path = any("ep_over_plain" in r for r in result["rows"])
    # --ep-path: the EP path's time over the plain path's, the two timed in turns.
    ep_head, ep_rule = (" EP time / plain |", " ---: |") if ep_path else ("", "")
    lines += ["", "| layer | E:k | tokens/s | TFLOP/s | / dense | ours / this |" + ep_head,
              "| --- | --- | ---: | ---: | ---: | ---: |" + ep_rule]
    for r in result["rows"]:
        ratio = f"{r['ours_over_hf']:.2f}x" if "ours_over_hf" in r else ""
        ep_cell = (f" {r['ep_over_plain']:.3f} |" if "ep_over_plain" in r else " |") \
            if ep_path else ""
        lines.append(f"| {r['layer']} | {r['E:k']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops']:.3f} | {r['fraction_of_dense']:.2f} | {ratio} |" + ep_cell)
    return "\n".join(lines)


def layer_dtype(layer: nn.Module) -> torch.dtype:
    weights = matrix_weights(layer)
    return weights[0].dtype if weights else torch.float32


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None
