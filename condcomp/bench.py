"""``condcomp bench``: training and decoding throughput of a model, beside HF Llama.

Two measurements, each taken side by side in one process, on the same shapes, in the same
precision, so that the ratios mean something (DESIGN.md, "Conventions"):

- **train step**: forward + backward + AdamW step (fused on CUDA), reported as tokens/s
  (``batch_size * seq_len`` tokens per step over the *median* step time of the timed steps),
  achieved TFLOP/s from our analytic ``3 * flops_per_token(seq_len)`` (backward = 2x forward,
  Kaplan et al. 2020), MFU (PaLM, Chowdhery et al. 2022, app. B) where the device's peak is
  known, and peak CUDA memory;
- **batch-1 decode**: greedy tokens/s of :func:`condcomp.generate.generate` against HF
  ``generate``, timed from the first new token to the last (prefill excluded), the *median*
  over ``--decode-repeats`` generations; the models take turns, so that a load change on a
  shared machine hits both alike.

The peer is HF ``LlamaForCausalLM`` holding the *same weights* (:func:`condcomp.hf.to_hf_llama`),
so it is the same computation, and two sanity checks say so: the first training step's losses
agree, and greedy decoding picks the same tokens.

Precision. ``--dtype auto`` trains under bf16 autocast on CUDA with fp32 master weights
(nanoGPT, gpt-fast) and in fp32 on the CPU; decoding casts a copy of each model's weights to
that dtype (bf16 weights and KV cache on CUDA, as gpt-fast and HF serve), since autocast would
re-cast every weight at every token of a memory-bound step.

Compilation (``--compile``). Training compiles the whole model, ours and HF's, with
``torch.compile(model)``. Decoding compiles our ``decode_one_token`` with ``fullgraph=True``
(gpt-fast; a Mixture-of-Depths model, whose decoding tokens skip blocks on a host-side
decision, compiles into the pieces between those decisions), and HF's forward the way HF
``generate`` does it itself: a static cache (``cache_implementation="static"``) and a
``CompileConfig`` with the same mode and ``fullgraph=True``. The mode is "reduce-overhead"
(CUDA graphs) on CUDA and "default" on the CPU, where CUDA graphs do not exist. HF
auto-compiles only on accelerators unless its ``CompileConfig._compile_all_devices`` flag is
set (what HF's own tests do); we set it on the CPU, and check afterwards that HF really ran
compiled. On the CPU compiling decode costs 20-30 s per model once and pays back within a
few hundred tokens (about 3x for ours).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from condcomp.config import RunConfig, load_config
from condcomp.errors import ConfigError
from condcomp.master_weights import check_param_dtype, master_weights_for
from condcomp.runtime import autocast, autocast_dtype, device_name, resolve_device

DEFAULT_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 128 (nanoGPT), for the tensor cores
WHATS = ("train", "decode")
OURS, PEER = "ours", "hf"
LABELS = {OURS: "condcomp", PEER: "HF Llama"}


# ----------------------------------------------------------------------------- the command


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object (``run`` is the handler)."""
    p = subparsers.add_parser(
        "bench", help="train-step and decode throughput, side by side with HF Llama",
        description="Train-step and batch-1 decode throughput of a model, measured side by "
        "side with HF LlamaForCausalLM holding the same weights, on the same shapes and in "
        "the same precision. Prints a table; --json writes every figure.")
    p.add_argument("--config", help="a preset name, e.g. gpt_125m, or a TOML file (default: the "
                   "ModelConfig defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.n_layers=6 (repeatable)")
    add_measure_options(p, decode_tokens=128)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peer", choices=["hf", "none"], default=None,
                   help="the model to compare with (default: hf if transformers is installed)")
    p.add_argument("--what", default="train,decode", help="comma list of: train, decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.set_defaults(func=run)
    # Layer-level benchmarks: `condcomp bench moe ...`, `condcomp bench decode ...`.
    from condcomp import bench_decode, bench_models, bench_moe

    targets = p.add_subparsers(dest="target", metavar="{moe,decode,models}")
    bench_moe.add_parser(targets)
    bench_decode.add_parser(targets)
    bench_models.add_parser(targets)
    return p


def add_measure_options(p: argparse.ArgumentParser, decode_tokens: int) -> None:
    """The shape, timing and device options shared by ``bench`` and ``bench models``."""
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"default: model.vocab_size if set, else {DEFAULT_VOCAB}")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: train.seq_len")
    p.add_argument("--steps", type=int, default=10, help="timed train steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed train steps first (default 3)")
    p.add_argument("--decode-tokens", type=int, default=decode_tokens,
                   help=f"new tokens per generation (default {decode_tokens})")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens (default 16)")
    p.add_argument("--decode-repeats", type=int, default=3,
                   help="timed generations per model, after one untimed (default 3); the "
                   "median is reported")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
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
    peer: str
    what: tuple[str, ...]
    seed: int

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.amp_dtype == torch.bfloat16 else "float32"


def run(args: argparse.Namespace) -> int:
    """``condcomp bench``: measure, print the table, write the JSON; returns the exit code."""
    plan = make_plan(args)
    result = benchmark(plan, log=print)
    result["command"] = command_line(args, plan)
    result["argv"] = list(sys.argv)
    report(result, format_table(result), args.json)
    return 0


def report(result: dict[str, Any], table: str, json_path: str | None) -> None:
    """Print the table and, if asked, write every figure as JSON."""
    print()
    print(table)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {path}")


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
    for name in ("steps", "decode_repeats", "prompt_len"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise ConfigError("--warmup must not be negative")
    if args.decode_tokens < 2:
        raise ConfigError("--decode-tokens must be at least 2 (the first new token comes from "
                          "the prefill; decode speed is timed from the second on)")
    if "decode" in what and args.prompt_len + args.decode_tokens > cfg.model.max_seq_len:
        raise ConfigError(
            f"--prompt-len {args.prompt_len} + --decode-tokens {args.decode_tokens} exceeds "
            f"model.max_seq_len = {cfg.model.max_seq_len}; lower them or add "
            f"--set model.max_seq_len={args.prompt_len + args.decode_tokens}")
    peer = args.peer or ("hf" if importlib.util.find_spec("transformers") else "none")
    if peer == "hf":
        from condcomp.hf import check_llama_compatible, require_transformers

        require_transformers()
        try:
            check_llama_compatible(cfg.model)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; run with --peer none to benchmark this model alone") from None
        if cfg.model.dropout > 0:
            raise ConfigError(f"model.dropout = {cfg.model.dropout}: HF Llama drops no block "
                              "outputs, so the comparison would not be like for like; add "
                              "--set model.dropout=0")
    device = resolve_device(args.device)
    amp_dtype = autocast_dtype(device, args.dtype)
    check_param_dtype(cfg.train.param_dtype, amp_dtype, "add --dtype bfloat16")
    return Plan(cfg=cfg, device=device, amp_dtype=amp_dtype,
                batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, steps=args.steps,
                warmup=args.warmup, decode_repeats=args.decode_repeats, compile=args.compile,
                peer=peer, what=what, seed=args.seed)


def command_line(args: argparse.Namespace, plan: Plan) -> str:
    """The command, with every shape resolved, that reproduces these figures."""
    parts = ["condcomp", "bench"]
    if args.config:
        parts += ["--config", str(args.config)]
    for item in args.overrides or []:
        parts += ["--set", item]
    parts += ["--vocab-size", str(plan.cfg.model.vocab_size), "--batch-size", str(plan.batch_size),
              "--seq-len", str(plan.seq_len), "--steps", str(plan.steps), "--warmup",
              str(plan.warmup), "--decode-tokens", str(plan.decode_tokens), "--prompt-len",
              str(plan.prompt_len), "--decode-repeats", str(plan.decode_repeats), "--device",
              str(plan.device), "--dtype", plan.dtype_name, "--peer", plan.peer, "--what",
              ",".join(plan.what), "--seed", str(plan.seed)]
    if plan.compile:
        parts.append("--compile")
    if args.json:
        parts += ["--json", str(args.json)]
    return shlex.join(parts)


# ----------------------------------------------------------------------------- measuring


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


def benchmark(plan: Plan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement of ``plan``; every figure in one JSON-ready dict."""
    from condcomp.model import TransformerLM

    torch.manual_seed(plan.seed)
    ours = TransformerLM(plan.cfg.model)  # built on the CPU; each measurement moves a copy
    models: dict[str, torch.nn.Module] = {OURS: ours}
    if plan.peer == "hf":
        from condcomp.hf import to_hf_llama

        # SDPA, like ours (and HF's default); eager attention would handicap the peer.
        models[PEER] = to_hf_llama(ours, attn_implementation="sdpa")
    flops_fwd = ours.flops_per_token(plan.seq_len)
    result: dict[str, Any] = {
        "device": environment(plan.device),
        "dtype": plan.dtype_name,
        "compile": plan.compile,
        "config": plan.cfg.to_dict(),
        "shapes": {"batch_size": plan.batch_size, "seq_len": plan.seq_len,
                   "vocab_size": plan.cfg.model.vocab_size, "prompt_len": plan.prompt_len,
                   "decode_tokens": plan.decode_tokens},
        "method": {
            "train": f"median step time over {plan.steps} timed steps after {plan.warmup} "
                     "warmup steps; tokens/s = batch_size * seq_len / median; TFLOP/s from "
                     "3 * analytic forward FLOPs/token",
            "decode": f"batch 1, greedy; first to last new token (prefill excluded); median "
                      f"tokens/s over {plan.decode_repeats} timed generations per model after "
                      "1 untimed, the models alternating",
        },
        "models": {name: {"label": LABELS[name], "params": _num_params(m),
                          "active_params": ours.num_params(active_only=True) if name == OURS
                          else _num_params(m),
                          "flops_per_token": flops_fwd} for name, m in models.items()},
        "checks": {},
        "ratios": {},
    }
    log(f"bench: {result['device']['name']}, torch {torch.__version__}, {plan.dtype_name}"
        f"{', compiled' if plan.compile else ''}; peer: {plan.peer}")
    if "decode" in plan.what:
        measure_decode(models, plan, result, log)
    if "train" in plan.what:
        measure_train(models, plan, result, log)
    return result


def measure_decode(models: dict[str, torch.nn.Module], plan: Plan, result: dict[str, Any],
                   log: Callable[[str], None]) -> None:
    """Decode figures into ``result``, with the ratio and the greedy-token check."""
    prompt = torch.randint(0, plan.cfg.model.vocab_size, (plan.prompt_len,),
                           generator=torch.Generator().manual_seed(plan.seed)).tolist()
    log(f"decode: batch 1, {plan.decode_tokens} tokens after a {plan.prompt_len}-token prompt, "
        f"{plan.decode_repeats} timed rounds")
    decoded = bench_decode(models, prompt, plan, log)
    for name, d in decoded.items():
        result["models"][name]["decode"] = asdict(d)
    if PEER in decoded:
        a, b = decoded[OURS].tokens, decoded[PEER].tokens
        # Same weights: fp32 picks the same tokens; bf16 may part ways after a near-tie.
        agree = sum(x == y for x, y in zip(a, b)) / max(len(a), 1)
        result["checks"]["decode_tokens_agree"] = agree
        result["ratios"]["decode_tokens_per_s"] = (decoded[OURS].tokens_per_s
                                                   / decoded[PEER].tokens_per_s)
        log(f"  greedy tokens agree: {agree:.0%}; ours / HF = "
            f"{result['ratios']['decode_tokens_per_s']:.2f}x")


def measure_train(models: dict[str, torch.nn.Module], plan: Plan, result: dict[str, Any],
                  log: Callable[[str], None]) -> None:
    """Train-step figures into ``result``, with the ratio and the first-step loss check."""
    batches = make_batches(plan)
    ours = models[OURS]
    trained = {}
    for name, model in models.items():
        log(f"train: {LABELS[name]}, batch {plan.batch_size} x {plan.seq_len}, "
            f"{plan.warmup} warmup + {plan.steps} timed steps")
        loss_fn = loss_ours if name == OURS else loss_hf
        trained[name] = bench_train(model, loss_fn, batches, plan, ours)
        result["models"][name]["train"] = asdict(trained[name])
        log(f"  {trained[name].tokens_per_s:,.0f} tokens/s, first loss "
            f"{trained[name].first_loss:.5f}")
    if PEER in trained:
        a, b = trained[OURS].first_loss, trained[PEER].first_loss
        # Same weights, same batch: fp32 agrees to rounding, bf16 autocast to about 1%.
        tol = 1e-4 if plan.amp_dtype is None else 2e-2
        match = abs(a - b) <= tol * max(abs(b), 1.0)
        result["checks"]["first_step_loss"] = {OURS: a, PEER: b, "match": match}
        result["ratios"]["train_tokens_per_s"] = (trained[OURS].tokens_per_s
                                                  / trained[PEER].tokens_per_s)
        verdict = "agree" if match else "DISAGREE: the two models do not compute the same thing"
        log(f"  first-step loss: ours {a:.6f}, HF {b:.6f} ({verdict}); ours / HF = "
            f"{result['ratios']['train_tokens_per_s']:.2f}x")


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ----------------------------------------------------------------------------- training


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


def loss_hf(model: Callable, x_BT: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x_BT, labels=x_BT).loss


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
            _sync(device)
            t0 = time.perf_counter()
            with autocast(device, plan.amp_dtype):
                loss = loss_fn(step_model, x_BT)
            loss.backward()
            opt.step()
            if masters is not None:
                masters.copy_to_model()
            opt.zero_grad(set_to_none=True)
            _sync(device)
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


# ----------------------------------------------------------------------------- decoding


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
        # (or, for Mixture-of-Depths, one set of pieces) serves every step and generation.
        step = compile_decode_step(m, decode_compile_mode(plan))

    def run_once() -> tuple[list[int], list[float]]:
        stamps: list[float] = []
        # generate() reads each token with .item() before on_token: the device is in sync.
        tokens = generate(m, prompt, plan.decode_tokens, Sampling(temperature=0),
                          on_token=lambda _: stamps.append(time.perf_counter()), decode_step=step)
        return tokens, stamps

    return run_once


def decode_runner_hf(model: torch.nn.Module, prompt: list[int], plan: Plan) -> Runner:
    """One greedy ``generate`` of HF per call, forced to ``decode_tokens`` new tokens."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        """Times each new token; HF hands the streamer the prompt first, then each token."""

        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.seen_prompt = False

        def put(self, value: torch.Tensor) -> None:
            if self.seen_prompt:
                self.stamps.append(time.perf_counter())  # value is on the CPU: in sync
            self.seen_prompt = True

        def end(self) -> None:
            pass

    m = decode_copy(model, plan)
    input_ids = torch.tensor([prompt], device=plan.device)
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(input_ids), max_new_tokens=plan.decode_tokens,
        min_new_tokens=plan.decode_tokens, do_sample=False, pad_token_id=0)
    if plan.compile:
        # HF's own compiled path: with a static cache, generate compiles the forward.
        from transformers import CompileConfig

        config = CompileConfig(mode=decode_compile_mode(plan), fullgraph=True)
        config._compile_all_devices = True  # without it HF compiles on accelerators only
        kwargs.update(cache_implementation="static", compile_config=config)

    def run_once() -> tuple[list[int], list[float]]:
        streamer = Stamps()
        with torch.no_grad():
            out = m.generate(input_ids, streamer=streamer, **kwargs)
        if plan.compile and not hasattr(m, "_compiled_call"):  # where HF keeps its compiled call
            print("bench: warning: HF generate seems not to have compiled its forward "
                  "(transformers changed its auto-compile rules?); the compiled decode "
                  "comparison may be one-sided", file=sys.stderr)
        return out[0, len(prompt):].tolist(), streamer.stamps

    return run_once


def bench_decode(models: dict[str, torch.nn.Module], prompt: list[int], plan: Plan,
                 log: Callable[[str], None] = print) -> dict[str, DecodeResult]:
    """Batch-1 greedy decode speed of each model: one untimed generation each (compilation,
    allocator warm-up), then ``decode_repeats`` timed rounds that alternate the models, so
    that a load change on a shared machine hits both alike."""
    makers = {OURS: decode_runner_ours, PEER: decode_runner_hf}
    runners = {name: makers[name](model, prompt, plan) for name, model in models.items()}
    return time_generations(runners, LABELS, plan, log)


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


# ----------------------------------------------------------------------------- reporting


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"name": device_name(device), "type": device.type,
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cpu":
        env["name"] = device_name(device).rsplit(" (", 1)[0] + f" ({os.cpu_count()} cores)"
        if hasattr(os, "getloadavg"):  # other work on a shared CPU skews the figures: say so
            env["load_avg_1m_at_start"] = os.getloadavg()[0]
    if importlib.util.find_spec("transformers"):
        import transformers

        env["transformers"] = transformers.__version__
    return env


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{prefix}{unit}"
    return f"{x:.2f}{unit}"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """Aligned markdown table text."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the figures, with a ratio row ours/HF."""
    head = ["model", "params", "active params", "FLOPs/token", "train tok/s", "TFLOP/s", "MFU",
            "peak mem", "decode tok/s"]
    rows = []
    for m in result["models"].values():
        t, d = m.get("train"), m.get("decode")
        rows.append([
            m["label"], _si(m["params"]), _si(m["active_params"]), _si(m["flops_per_token"]),
            f"{t['tokens_per_s']:,.0f}" if t else "-",
            f"{t['tflops']:.3g}" if t else "-",
            f"{t['mfu']:.1%}" if t and t["mfu"] is not None else "-",
            f"{t['peak_mem_gb']:.2f} GB" if t and t["peak_mem_gb"] is not None else "-",
            f"{d['tokens_per_s']:,.1f}" if d else "-",
        ])
    ratios = result["ratios"]
    if ratios:
        train_r = ratios.get("train_tokens_per_s")
        decode_r = ratios.get("decode_tokens_per_s")
        rows.append(["ours / HF", "", "", "", f"{train_r:.2f}x" if train_r else "-",
                     f"{train_r:.2f}x" if train_r else "-", "", "",
                     f"{decode_r:.2f}x" if decode_r else "-"])
    shapes = result["shapes"]
    caption = (f"{result['device']['name']}, torch {result['device']['torch']}, {result['dtype']}"
               f"{', compiled' if result['compile'] else ''}; train batch {shapes['batch_size']} x "
               f"{shapes['seq_len']}; decode batch 1, {shapes['decode_tokens']} tokens after "
               f"{shapes['prompt_len']}")
    lines = [caption, "", markdown_table(head, rows)]
    checks = result["checks"]
    if "first_step_loss" in checks:
        c = checks["first_step_loss"]
        lines.append(f"\nfirst-step loss: ours {c[OURS]:.6f}, HF {c[PEER]:.6f} "
                     f"({'agree' if c['match'] else 'DISAGREE'})")
    if "decode_tokens_agree" in checks:
        lines.append(f"greedy decode tokens agree with HF: {checks['decode_tokens_agree']:.0%}")
    return "\n".join(lines)
