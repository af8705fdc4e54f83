"""``condcomp bench``: training and decoding throughput of a model, beside HF Llama.

Two measurements (:mod:`condcomp.bench.lm_timing`: the train step and batch-1 greedy decode),
each taken side by side in one process, on the same shapes, in the same precision, so that the
ratios mean something (docs/design.md, "Conventions"). Our decode is
:func:`condcomp.generate.generate`, HF's is its ``generate``; the models take turns.

The peer is HF ``LlamaForCausalLM`` holding the *same weights* (:func:`condcomp.hf.to_hf_llama`),
so it is the same computation, and two sanity checks say so: the first training step's losses
agree, and greedy decoding picks the same tokens.

Compilation (``--compile``). Training compiles the whole model, ours and HF's, with
``torch.compile(model)``. Decoding compiles our ``decode_one_token`` (see
:mod:`condcomp.bench.lm_timing`), and HF's forward the way HF ``generate`` does it itself: a
static cache (``cache_implementation="static"``) and a ``CompileConfig`` with the same mode and
``fullgraph=True``. HF auto-compiles only on accelerators unless its
``CompileConfig._compile_all_devices`` flag is set (what HF's own tests do); we set it on the
CPU, and check afterwards that HF really ran compiled. On the CPU compiling decode costs 20-30 s
per model once and pays back within a few hundred tokens (about 3x for ours).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from condcomp import flags
from condcomp.bench.common import environment, markdown_table, report, si
from condcomp.bench.lm_timing import (
    DecodeResult,
    Plan,
    Runner,
    add_measure_options,
    bench_train,
    decode_compile_mode,
    decode_copy,
    decode_runner_ours,
    loss_ours,
    make_batches,
    make_plan,
    time_generations,
)
from condcomp.errors import ConfigError
from condcomp.machine_load import LoadMeter

OURS, PEER = "ours", "hf"
LABELS = {OURS: "condcomp", PEER: "HF Llama"}


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
    p.add_argument("--seed", type=flags.bench_seed, default=0)
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``condcomp bench``: measure, print the table, write the JSON; returns the exit code."""
    plan = make_plan(args)
    peer = resolve_peer(args.peer, plan)
    meter = LoadMeter()
    result = benchmark(plan, peer, log=print)
    result["command"] = command_line(args, plan, peer)
    result["argv"] = list(sys.argv)
    report(result, format_table(result), args.json, meter.lap())
    return 0


def resolve_peer(peer: str | None, plan: Plan) -> str:
    """``--peer``: HF Llama by default where transformers is installed, refused (with the way
    out) for a model HF Llama cannot hold or compute alike."""
    peer = peer or (PEER if importlib.util.find_spec("transformers") else "none")
    if peer != PEER:
        return peer
    from condcomp.hf import check_llama_compatible, require_transformers

    require_transformers()
    model_cfg = plan.cfg.model
    try:
        check_llama_compatible(model_cfg)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; run with --peer none to benchmark this model alone") from None
    if model_cfg.dropout > 0:
        raise ConfigError(f"model.dropout = {model_cfg.dropout}: HF Llama drops no block "
                          "outputs, so the comparison would not be like for like; add "
                          "--set model.dropout=0")
    return peer


def command_line(args: argparse.Namespace, plan: Plan, peer: str) -> str:
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
              str(plan.device), "--dtype", plan.dtype_name, "--peer", peer, "--what",
              ",".join(plan.what), "--seed", str(plan.seed)]
    if plan.compile:
        parts.append("--compile")
    if args.json:
        parts += ["--json", str(args.json)]
    return shlex.join(parts)


def benchmark(plan: Plan, peer: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement of ``plan``, beside ``peer`` (``hf`` or ``none``); every figure
    in one JSON-ready dict."""
    from condcomp.model import TransformerLM

    torch.manual_seed(plan.seed)
    ours = TransformerLM(plan.cfg.model)  # built on the CPU; each measurement moves a copy
    models: dict[str, torch.nn.Module] = {OURS: ours}
    if peer == PEER:
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
        f"{', compiled' if plan.compile else ''}; peer: {peer}")
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


def loss_hf(model: Callable, x_BT: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x_BT, labels=x_BT).loss


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


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the figures, with a ratio row ours/HF."""
    head = ["model", "params", "active params", "FLOPs/token", "train tok/s", "TFLOP/s", "MFU",
            "peak mem", "decode tok/s"]
    rows = []
    for m in result["models"].values():
        t, d = m.get("train"), m.get("decode")
        rows.append([
            m["label"], si(m["params"]), si(m["active_params"]), si(m["flops_per_token"]),
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
