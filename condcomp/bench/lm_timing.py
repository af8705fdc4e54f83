"""Timing a whole language model: its training step and its batch-1 greedy generation, planned
from a run config and the shape options that ``condcomp bench`` and ``condcomp bench models``
share.

- **train step**: forward + backward + AdamW step (fused on CUDA), reported as tokens/s
  (``batch_size * seq_len`` tokens per step over the *median* step time of the timed steps),
  achieved TFLOP/s from our analytic ``3 * flops_per_token(seq_len)`` (backward = 2x forward,
  Kaplan et al. 2020), MFU (PaLM, Chowdhery et al. 2022, app. B) where the device's peak is
  known, and peak CUDA memory;
- **batch-1 decode**: greedy tokens/s timed from the first new token to the last (prefill
  excluded), the *median* over ``--decode-repeats`` generations; the models take turns, so that
  a load change on a shared machine hits them alike.

Precision. ``--dtype auto`` trains under bf16 autocast on CUDA with fp32 master weights
(nanoGPT, gpt-fast) and in fp32 on the CPU; decoding casts a copy of each model's weights to
that dtype (bf16 weights and KV cache on CUDA, as gpt-fast and HF serve), since autocast would
re-cast every weight at every token of a memory-bound step.

Compilation. Training compiles the whole model with ``torch.compile(model)``. Decoding compiles
``decode_one_token`` with ``fullgraph=True`` (gpt-fast; a Mixture-of-Depths model too, whose
compiled step decides on the device whether a routed block's update counts), in mode
"reduce-overhead" (CUDA graphs) on CUDA and "default" on the CPU, where CUDA graphs do not
exist.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from condcomp import flags
from condcomp.bench.common import sync
from condcomp.config import RunConfig, load_config
from condcomp.errors import ConfigError
from condcomp.master_weights import check_param_dtype, master_weights_for
from condcomp.ranges import MAX_SIZE
from condcomp.runtime import autocast, autocast_dtype, resolve_device

DEFAULT_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 128 (nanoGPT), for the tensor cores
WHATS = ("train", "decode")


def add_measure_options(p: argparse.ArgumentParser, decode_tokens: int) -> None:
    """The shape, timing and device options shared by ``bench`` and ``bench models``."""
    size = flags.number(int, gt=0, le=MAX_SIZE)
    p.add_argument("--vocab-size", type=size, default=None,
                   help=f"default: model.vocab_size if set, else {DEFAULT_VOCAB}")
    p.add_argument("--batch-size", type=size, default=None, help="default: train.batch_size")
    p.add_argument("--seq-len", type=size, default=None, help="default: train.seq_len")
    p.add_argument("--steps", type=flags.number(int, gt=0), default=10,
                   help="timed train steps (default 10)")
    p.add_argument("--warmup", type=flags.number(int, ge=0), default=3,
                   help="untimed train steps first (default 3)")
    p.add_argument("--decode-tokens", type=flags.number(int, ge=2), default=decode_tokens,
                   help=f"new tokens per generation (default {decode_tokens}); at least 2: the "
                   "first comes from the prefill, decode speed is timed from the second on")
    p.add_argument("--prompt-len", type=flags.number(int, gt=0), default=16,
                   help="random prompt tokens (default 16)")
    p.add_argument("--decode-repeats", type=flags.number(int, gt=0), default=3,
                   help="timed generations per model, after one untimed (default 3); the "
                   "median is reported")
    p.add_argument("--device", type=flags.device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")


@dataclass
class Plan:
    """The resolved benchmark: config, shapes, device, precision and what to measure."""

    cfg: RunConfig
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32
    batch_size: int
    seq_len: int
    prompt_len: int
    decode_tokens: int
    steps: int
    warmup: int
    decode_repeats: int
    compile: bool
    what: tuple[str, ...]
    seed: int

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.amp_dtype == torch.bfloat16 else "float32"


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve the options against the config; every impossible value is a ConfigError."""
    overrides = list(args.overrides or [])
    # Shapes given as options go through the config, so its validation (seq_len against
    # max_seq_len, ...) speaks for them too.
    if args.seq_len is not None:
        overrides.append(f"train.seq_len={args.seq_len}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.vocab_size is not None:
        overrides.append(f"model.vocab_size={args.vocab_size}")
    cfg = load_config(args.config, overrides)
    if cfg.model.vocab_size <= 0:
        cfg.model.vocab_size = DEFAULT_VOCAB
    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    unknown = [w for w in what if w not in WHATS]
    if unknown or not what:
        raise ConfigError(f"--what {args.what!r}: use a comma list of {list(WHATS)}")
    if "decode" in what and args.prompt_len + args.decode_tokens > cfg.model.max_seq_len:
        raise ConfigError(
            f"--prompt-len {args.prompt_len} + --decode-tokens {args.decode_tokens} exceeds "
            f"model.max_seq_len = {cfg.model.max_seq_len}; lower them or add "
            f"--set model.max_seq_len={args.prompt_len + args.decode_tokens}")
    device = resolve_device(args.device)
    amp_dtype = autocast_dtype(device, args.dtype)
    check_param_dtype(cfg.train.param_dtype, amp_dtype, "add --dtype bfloat16")
    return Plan(cfg=cfg, device=device, amp_dtype=amp_dtype,
                batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, steps=args.steps,
                warmup=args.warmup, decode_repeats=args.decode_repeats, compile=args.compile,
                what=what, seed=args.seed)


@dataclass
class TrainResult:
    tokens_per_s: float  # batch_size * seq_len / median step time
    step_s_median: float
    step_s_total: float  # all timed steps together
    tflops: float  # achieved, from the analytic training FLOPs
    mfu: float | None  # None where the device's peak is unknown (the CPU)
    first_loss: float  # the loss of the first step, before any update
    peak_mem_gb: float | None  # CUDA only
    step_s: list[float] = field(default_factory=list)


@dataclass
class DecodeResult:
    tokens_per_s: float  # (new tokens - 1) / (last - first new token), median over generations
    tokens_per_s_runs: list[float]
    # 1 / the median time between two new tokens: the speed without one-off slow steps
    # (recompilation, CUDA-graph re-recording); far above tokens_per_s means there were some.
    steady_tokens_per_s: float
    new_tokens: int
    tokens: list[int]  # the greedy tokens of the last timed generation


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Move ``model`` to ``device`` for one measurement and back to the CPU afterwards, so that
    only the model being measured holds device memory (and its peak memory is its own)."""
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def make_batches(plan: Plan) -> list[torch.Tensor]:
    """Random token batches ``[B, T]``, one per step, the same for every model."""
    g = torch.Generator().manual_seed(plan.seed + 1)
    shape = (plan.batch_size, plan.seq_len)
    return [torch.randint(0, plan.cfg.model.vocab_size, shape, generator=g)
            for _ in range(plan.warmup + plan.steps)]


def loss_ours(model: Callable, x_BT: torch.Tensor) -> torch.Tensor:
    """Our targets are the inputs shifted left, the last position ignored (-100): the same
    ``B * (T - 1)`` predictions HF makes when it shifts ``labels`` itself."""
    y_BT = torch.cat([x_BT[:, 1:], torch.full_like(x_BT[:, :1], -100)], dim=1)
    return model(x_BT, y_BT).total_loss


def bench_train(model: torch.nn.Module, loss_fn: Callable, batches: list[torch.Tensor],
                plan: Plan, ours: Any) -> TrainResult:
    """Forward + backward + AdamW step per batch; the first ``plan.warmup`` steps untimed.

    With ``train.param_dtype = "bfloat16"`` the model trains as ``condcomp train`` trains it:
    bf16 matrix weights, fp32 masters in the optimizer, the copy-back inside the timed step.
    """
    device, tc = plan.device, plan.cfg.train
    state = copy.deepcopy(model.state_dict())  # leave the weights as we found them
    with on_device(model, device):
        model.train()
        masters = master_weights_for(model, tc.param_dtype)
        step_model = torch.compile(model) if plan.compile else model
        opt = torch.optim.AdamW(model.parameters() if masters is None
                                else masters.optimizer_params(), lr=tc.lr,
                                betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay,
                                fused=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, first_loss = [], float("nan")
        for i, batch in enumerate(batches):
            x_BT = batch.to(device, non_blocking=True)
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, plan.amp_dtype):
                loss = loss_fn(step_model, x_BT)
            loss.backward()
            opt.step()
            if masters is not None:
                masters.copy_to_model()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i >= plan.warmup:
                times.append(time.perf_counter() - t0)
            if i == 0:
                first_loss = loss.item()  # outside the timed region
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        del opt, step_model
        if masters is not None:
            masters.close()
    model.load_state_dict(state)
    median = statistics.median(times)
    tokens_per_s = plan.batch_size * plan.seq_len / median
    train_flops = 3 * ours.flops_per_token(plan.seq_len)
    return TrainResult(tokens_per_s=tokens_per_s, step_s_median=median, step_s_total=sum(times),
                       tflops=train_flops * tokens_per_s / 1e12,
                       mfu=ours.estimate_mfu(tokens_per_s, plan.seq_len, device, training=True),
                       first_loss=first_loss, peak_mem_gb=peak, step_s=times)


def decode_copy(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """The model as it is served: a copy in the run's dtype (bf16 weights on CUDA), eval mode."""
    dtype = plan.amp_dtype or torch.float32
    return copy.deepcopy(model).to(device=plan.device, dtype=dtype).eval()


def decode_compile_mode(plan: Plan) -> str:
    """CUDA graphs hide a batch-1 step's launch overhead on CUDA; the CPU has none."""
    return "reduce-overhead" if plan.device.type == "cuda" else "default"


def _tokens_per_s(stamps: list[float]) -> float:
    """Decode speed from the times each new token was ready: the first comes from the prefill,
    each later one from one decode step."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _steady_tokens_per_s(stamps: list[float]) -> float:
    """1 / the median gap between consecutive new tokens."""
    return 1.0 / statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


Runner = Callable[[], tuple[list[int], list[float]]]  # one generation: (tokens, stamps)


def decode_runner_ours(model: torch.nn.Module, prompt: list[int], plan: Plan) -> Runner:
    """One greedy generation with :func:`condcomp.generate.generate` per call."""
    from condcomp.generate import Sampling, compile_decode_step, decode_one_token, generate

    m = decode_copy(model, plan)
    step = decode_one_token
    if plan.compile:
        # gpt-fast: fixed shapes (a static KV cache, one token at input_pos), so one graph
        # serves every step and generation.
        step = compile_decode_step(m, decode_compile_mode(plan))

    def run_once() -> tuple[list[int], list[float]]:
        stamps: list[float] = []
        # generate() reads each token with .item() before on_token: the device is in sync.
        tokens = generate(m, prompt, plan.decode_tokens, Sampling(temperature=0),
                          on_token=lambda _: stamps.append(time.perf_counter()), decode_step=step)
        return tokens, stamps

    return run_once


def time_generations(runners: dict[str, Runner], labels: dict[str, str], plan: Plan,
                     log: Callable[[str], None] = print) -> dict[str, DecodeResult]:
    """One untimed generation per runner, then ``plan.decode_repeats`` timed rounds in turn."""
    for runner in runners.values():
        runner()
    runs: dict[str, list[float]] = {name: [] for name in runners}
    steady: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, list[int]] = {}
    for _ in range(plan.decode_repeats):
        for name, runner in runners.items():
            tokens[name], stamps = runner()
            if len(tokens[name]) != plan.decode_tokens or len(stamps) != plan.decode_tokens:
                raise RuntimeError(f"{labels[name]} generated {len(tokens[name])} tokens, not "
                                   f"{plan.decode_tokens}")
            runs[name].append(_tokens_per_s(stamps))
            steady[name].append(_steady_tokens_per_s(stamps))
    results = {name: DecodeResult(statistics.median(runs[name]), runs[name],
                                  statistics.median(steady[name]), plan.decode_tokens,
                                  tokens[name]) for name in runners}
    for name, r in results.items():
        log(f"  {labels[name]}: {r.tokens_per_s:,.1f} tokens/s "
            f"(runs: {', '.join(f'{x:,.1f}' for x in r.tokens_per_s_runs)}; "
            f"steady {r.steady_tokens_per_s:,.1f})")
        if r.steady_tokens_per_s > 1.25 * r.tokens_per_s:
            log(f"  warning: {labels[name]} had slow one-off steps inside the timed decode "
                "(recompilation? CUDA-graph re-recording?): steady speed is "
                f"{r.steady_tokens_per_s / r.tokens_per_s:.2f}x the end-to-end one")
    return results

