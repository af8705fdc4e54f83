"""``condcomp bench decode``: the shape of Table 1 of "Sparse is Enough in Scaling
Transformers" (Jaszczur et al. 2021): batch-1, one-token-at-a-time decode time with a KV cache,
for a dense block, +Sparse FF, +Sparse QKV and +both, measured side by side in one run.

Two scales: the paper's ~800M shape (d_model 1024, d_ff 4096, 16 heads) per block and for the
whole model (24 layers, vocab 32k), and a large block (d_model 4096, d_ff 16384, 32 heads) per
block only. Each measurement prefills ``--context`` tokens, then times ``--tokens`` decode
steps; the variants take turns, so a load change on a shared machine hits all of them alike,
and the median step time is reported.

"+Sparse QKV" is the paper's: the Q/K/V *and output* layers are sparse (sec. 1), so by default
its output layer is multiplicative too (``--qkv-output dense`` keeps the dense ``wo``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from condcomp import flags
from condcomp.bench.common import command_line, median_seconds, report, time_in_turns
from condcomp.conditional.sparse_ff import SparseFFOptions
from condcomp.conditional.sparse_qkv import OUTPUTS
from condcomp.config import ModelConfig, SeamConfig
from condcomp.errors import ConfigError
from condcomp.machine_load import LoadMeter
from condcomp.model import TransformerLM
from condcomp.model.accounting import active_param_count
from condcomp.ranges import MAX_SIZE
from condcomp.runtime import device_name, resolve_device

WARMUP_STEPS = 3  # untimed decode steps per variant
VARIANTS = ("dense", "sparse_ff", "sparse_qkv", "sparse_ff+qkv")
# Speed-ups over dense as the paper reports them: per block at d_model 1024, and for whole
# models in the abstract (800M and 17B parameters).
PAPER = {("block", 1024, "sparse_ff"): 1.9, ("block", 1024, "sparse_ff+qkv"): 3.05,
         ("model", 1024, "sparse_ff+qkv"): 2.6, ("model", 4096, "sparse_ff+qkv"): 20.0}
SHAPES = {1024: dict(d_model=1024, d_ff=4096, n_heads=16), 4096: dict(d_model=4096,
                                                                     d_ff=16384, n_heads=32)}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("decode", help="Sparse FF / QKV decode table (Jaszczur et al. 2021)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1024,4096", help="d_model of the shapes to run")
    p.add_argument("--whole-model", choices=["on", "off"], default="on",
                   help="also time the 24-layer d_model 1024 model")
    positive = flags.number(int, gt=0, le=MAX_SIZE)
    p.add_argument("--layers", type=positive, default=24, help="layers of the whole model")
    p.add_argument("--stack", type=positive, default=4,
                   help="per-block rows: blocks run per timed step (the time is divided by "
                   "it); 1 times a lone block, paying a model's per-step costs in every block")
    p.add_argument("--block-size", type=flags.like(SparseFFOptions, "block_size"), default=64,
                   help="Sparse FF: units per block (N)")
    p.add_argument("--d-lowrank", type=flags.like(SparseFFOptions, "d_lowrank"), default=64,
                   help="Sparse FF controller rank")
    p.add_argument("--qkv-output", choices=OUTPUTS, default="multiplicative",
                   help="Sparse QKV's attention output layer (default: multiplicative, the "
                   "paper's sparse output layer; dense keeps wo)")
    p.add_argument("--context", type=positive, default=64, help="prefilled tokens before timing")
    p.add_argument("--tokens", type=positive, default=32, help="timed decode steps per variant")
    p.add_argument("--device", type=flags.device, default="cpu", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each variant's decode step (one graph per variant, on "
                   "the CPU with Inductor's C++ wrapper; removes most of eager PyTorch's "
                   "per-op overhead, which at batch 1 is a large share of a step and hides "
                   "what sparsity saves)")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=run)
    return p


def variant_config(shape: dict[str, int], variant: str, n_layers: int, block_size: int,
                   d_lowrank: int, vocab: int, max_len: int,
                   qkv_output: str = "multiplicative") -> ModelConfig:
    cfg = ModelConfig(vocab_size=vocab, n_layers=n_layers, activation="relu",
                      max_seq_len=max_len, **shape)
    if "ff" in variant:
        cfg.ffn = SeamConfig("sparse_ff", options={"block_size": block_size,
                                                   "d_lowrank": d_lowrank})
    if "qkv" in variant:
        cfg.attention = SeamConfig("sparse_qkv", options={"output": qkv_output})
    return cfg


class BlockDecoder:
    """A stack of blocks (``model.layers``, no embedding or head) decoding one token at a time
    against their own KV caches. The step time divided by the stack's depth is the time of one
    block inside a model: the per-step costs a model pays once per token (calling the step,
    the compiled graph's guards, the RoPE angles) are shared by the stack, as they are by a
    model's layers, instead of being charged to a single block."""

    def __init__(self, model: TransformerLM, context: int, compile: bool = False) -> None:
        self.model = model
        model.setup_cache(1, model.cfg.max_seq_len)
        d = model.cfg.d_model
        g = torch.Generator().manual_seed(0)
        device = model.tok_emb.weight.device
        self.x_prefill = torch.randn(1, context, d, generator=g).to(device)
        self.x_step = torch.randn(1, 1, d, generator=g).to(device)
        with torch.no_grad():
            self._forward(self.x_prefill, torch.arange(context, device=device))
        self.pos = context
        self._step = maybe_compile(self._forward, compile, device)

    def _forward(self, x_1TD: torch.Tensor, pos_T: torch.Tensor) -> torch.Tensor:
        positions = self.model.rope.positions(x_1TD.shape[1], pos_T)
        for layer in self.model.layers:
            x_1TD = layer(x_1TD, positions)
        return x_1TD

    @torch.no_grad()
    def step(self) -> None:
        self._step(self.x_step, torch.tensor([self.pos], device=self.x_step.device))
        self.pos += 1


class ModelDecoder:
    def __init__(self, model: TransformerLM, context: int, compile: bool = False) -> None:
        self.model = model
        model.setup_cache(1, model.cfg.max_seq_len)
        device = model.tok_emb.weight.device
        with torch.no_grad():
            model(torch.zeros(1, context, dtype=torch.long, device=device),
                  input_pos=torch.arange(context, device=device))
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = context
        self._step = maybe_compile(self._forward, compile, device)

    def _forward(self, token_11: torch.Tensor, pos_1: torch.Tensor) -> torch.Tensor:
        return self.model(token_11, input_pos=pos_1).logits

    @torch.no_grad()
    def step(self) -> None:
        self._step(self.token, torch.tensor([self.pos], device=self.token.device))
        self.pos += 1


def maybe_compile(fn, compile: bool, device: torch.device):
    # One token at a tensor position: fixed shapes, so one graph serves every step (gpt-fast).
    # On the CPU, Inductor's C++ wrapper calls the step's kernels from C++ instead of a Python
    # function (0.16 ms per block of Sparse FF + QKV at d_model 1024 in a kernel profile), as a
    # deployed CPU decoder would; every variant is compiled the same way.
    if not compile:
        return fn
    options = {"cpp_wrapper": True} if device.type == "cpu" else None
    return torch.compile(fn, fullgraph=True, options=options)


def time_side_by_side(decoders: dict[str, Any], tokens: int, device: torch.device
                      ) -> dict[str, float]:
    """Median seconds per decode step of each decoder; they take turns step by step."""
    steppers = {name: decoder.step for name, decoder in decoders.items()}
    return median_seconds(time_in_turns(steppers, tokens, device, warmup=WARMUP_STEPS))


def parse_shapes(text: str) -> list[int]:
    """``--shapes``: a comma list of positive d_model values."""
    try:
        shapes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or min(shapes) < 1:
        raise ConfigError(f"--shapes {text!r}: give a comma list of d_model values, "
                          "e.g. --shapes 1024,4096")
    return shapes


def run(args: argparse.Namespace) -> int:
    shapes = parse_shapes(args.shapes)
    device = resolve_device(args.device)
    # The KV cache holds what the run decodes (prefill, warm-up and timed steps) and no more:
    # a step attends over the whole static cache under a mask, so a cache sized for 1024 more
    # tokens than are ever written would add the same wasted K/V reads to every variant.
    cache_len = args.context + WARMUP_STEPS + args.tokens
    meter = LoadMeter()
    rows: list[dict[str, Any]] = []
    for d in shapes:
        shape = SHAPES.get(d) or dict(d_model=d, d_ff=4 * d, n_heads=max(1, d // 64))
        models = {v: TransformerLM(variant_config(shape, v, args.stack, args.block_size,
                                                  args.d_lowrank, 256, cache_len, args.qkv_output)
                                   ).to(device).eval()
                  for v in VARIANTS}
        decoders = {v: BlockDecoder(m, args.context, args.compile) for v, m in models.items()}
        seconds = time_side_by_side(decoders, args.tokens, device)
        rows += _rows("block", d, {v: s / args.stack for v, s in seconds.items()}, models)
        print(f"per block, d_model {d}: done")
        del models, decoders
    if args.whole_model == "on":
        shape = SHAPES[1024]
        base = TransformerLM(variant_config(shape, "dense", args.layers, args.block_size,
                                            args.d_lowrank, 32000, cache_len))
        models = {"dense": base.to(device).eval()}
        for v in VARIANTS[1:]:
            models[v] = TransformerLM(variant_config(shape, v, args.layers, args.block_size,
                                                     args.d_lowrank, 32000, cache_len,
                                                     args.qkv_output)).to(device).eval()
        decoders = {v: ModelDecoder(m, args.context, args.compile) for v, m in models.items()}
        rows += _rows("model", 1024, time_side_by_side(decoders, args.tokens, device), models)
        del models, decoders, base
    result = {"device": device_name(device), "torch": torch.__version__,
              "command": command_line(), "block_size": args.block_size,
              "d_lowrank": args.d_lowrank, "qkv_output": args.qkv_output, "stack": args.stack,
              "context": args.context, "compile": args.compile,
              "rows": rows}
    report(result, format_table(result), args.json, meter.lap())
    return 0


def weights_read_per_token(model: TransformerLM, scope: str) -> int:
    """Parameters one decode step reads: the block's (``scope = "block"``) or the model's. A
    batch-1 step is bound by reading weights, so the ratio of these counts is the speed-up a
    step could reach if nothing but weight traffic cost time (KV cache reads excluded).
    Sparse FF reads only its controller and the chosen rows (its ``active_params``)."""
    if scope == "block":
        return active_param_count(model.layers[0])
    total = active_param_count(model)
    if not model.cfg.tie_embeddings:  # the input embedding is one row per token
        total -= model.tok_emb.weight.numel() - model.cfg.d_model
    return total


def _rows(scope: str, d_model: int, seconds: dict[str, float],
          models: dict[str, TransformerLM]) -> list[dict[str, Any]]:
    dense = seconds["dense"]
    dense_reads = weights_read_per_token(models["dense"], scope)
    rows = []
    for variant, s in seconds.items():
        model = models[variant]
        reads = weights_read_per_token(model, scope)
        rows.append({"scope": scope, "d_model": d_model, "variant": variant,
                     "layers": model.cfg.n_layers,
                     "params": model.num_params() if scope == "model" else
                     sum(p.numel() for p in model.layers[0].parameters()),
                     "params_read": reads, "weight_bound": dense_reads / reads,
                     "step_ms": 1e3 * s, "speedup": dense / s,
                     "paper_speedup": PAPER.get((scope, d_model, variant))})
    return rows


def format_table(result: dict[str, Any]) -> str:
    mode = "compiled" if result.get("compile") else "eager"
    lines = [f"{result['device']}, torch {result['torch']}, batch 1, fp32, {mode}, Sparse FF N = "
             f"{result['block_size']}, d_lowrank {result['d_lowrank']}, Sparse QKV output "
             f"{result.get('qkv_output', 'dense')}, context {result['context']}; per block: the "
             f"step of a stack of {result.get('stack', 1)} blocks / {result.get('stack', 1)}",
             "",
             "| scope | d_model | variant | params | read per token | decode ms/token | "
             "speed-up | weight-traffic bound | paper |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        paper = f"{r['paper_speedup']:.2f}x" if r["paper_speedup"] else ""
        scope = r["scope"] if r["scope"] == "block" else f"model ({r['layers']} layers)"
        lines.append(f"| {scope} | {r['d_model']} | {r['variant']} | {r['params'] / 1e6:.1f}M | "
                     f"{r['params_read'] / 1e6:.2f}M | {r['step_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['weight_bound']:.2f}x | {paper} |")
    return "\n".join(lines)
