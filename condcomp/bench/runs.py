"""``condcomp bench runs``: batch-1 greedy decode time of trained runs, side by side.

The runs take turns token by token (so a load change on a shared machine hits them alike), and
the median step is reported with each run's speed-up over the first. For Mixture-of-Depths runs
it also gives how many routed blocks a token entered, on average. On CUDA each step is timed to
its last kernel.

A step's cost does not depend on where its input token came from, but routing does: a model
trained briefly decodes greedily into repetitive text, which its routers treat unlike real
text. ``--feed val`` therefore feeds every run the same validation tokens of the first run's
corpus, one per step through the KV cache (teacher forcing), instead of each run's own greedy
output.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from condcomp import flags
from condcomp.bench.common import command_line, report, time_in_turns
from condcomp.conditional.mod import MixtureOfDepths
from condcomp.data import prepare_data
from condcomp.errors import ConfigError
from condcomp.generate import compile_decode_step, decode_one_token
from condcomp.machine_load import LoadMeter
from condcomp.model import TransformerLM
from condcomp.ranges import MAX_SIZE
from condcomp.runs import LoadedRun, load_run
from condcomp.runtime import device_name, resolve_device


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "runs", help="batch-1 decode time of trained runs side by side, against the first",
        description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders; the first is the baseline")
    p.add_argument("--tokens", type=flags.number(int, ge=0, le=MAX_SIZE), default=0,
                   help="decode steps per pass (default 0: the smallest max_seq_len - 1)")
    p.add_argument("--repeats", type=flags.number(int, gt=0), default=3,
                   help="passes over the tokens (default 3)")
    p.add_argument("--device", type=flags.device, default="cpu", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights and cache while decoding (auto: bfloat16 on CUDA, else float32)")
    p.add_argument("--feed", choices=["greedy", "val"], default="greedy",
                   help="greedy: each run decodes its own argmax; val: every run is fed the same "
                   "validation tokens of the first run's corpus")
    p.add_argument("--compile", action="store_true",
                   help="decode through compile_decode_step (CUDA: mode reduce-overhead, CUDA "
                   "graphs; a Mixture-of-Depths step is then one graph without a host sync)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.set_defaults(func=run)
    return p


class RunDecoder:
    """One run's model decoding one token per :meth:`step` through its KV cache, fed its own
    greedy choice or, with ``fed_T``, the next of those tokens."""

    def __init__(self, model: TransformerLM, tokens: int, fed_T: torch.Tensor | None,
                 decode_step: Callable = decode_one_token) -> None:
        self.model, self.tokens, self.fed_T = model, tokens, fed_T
        self.decode_step = decode_step
        self.device = model.tok_emb.weight.device
        # Positions made once: a step slices its own, with no host-to-device copy in the timing.
        self.positions_T = torch.arange(tokens, device=self.device)
        self.routers = [m for m in model.modules() if isinstance(m, MixtureOfDepths)]
        # Each step's routing decisions, summed after the timing (a sum reads the device).
        self.routed: list[torch.Tensor] = []
        self.steps = 0

    def start(self) -> None:
        """An empty cache and the first input token: a new pass."""
        self.model.setup_cache(1, self.tokens + 1)
        self.pos = 0
        first = self.fed_T[:1] if self.fed_T is not None else torch.zeros(
            1, dtype=torch.long, device=self.device)
        self.token_11 = first.view(1, 1)

    @torch.no_grad()
    def step(self) -> None:
        logits_1V = self.decode_step(self.model, self.token_11,
                                     self.positions_T[self.pos:self.pos + 1])
        self.token_11 = (logits_1V.argmax(-1, keepdim=True) if self.fed_T is None else
                         self.fed_T[self.pos + 1:self.pos + 2].view(1, 1))
        # Copied: a CUDA graph's replay overwrites the tensors of the step before.
        self.routed += [m.routed_BT.clone() for m in self.routers]
        self.pos += 1
        self.steps += 1

    def routed_blocks_entered_per_token(self) -> float | None:
        if not self.routers:
            return None
        return sum(int(r.sum()) for r in self.routed) / self.steps


def load_runs(paths: list[str], device: torch.device) -> dict[str, LoadedRun]:
    """The runs by folder name (a repeated name gets a prime)."""
    runs: dict[str, LoadedRun] = {}
    for path in paths:
        name = Path(path).name
        while name in runs:
            name += "'"
        runs[name] = load_run(path, device=device)
    return runs


def validation_tokens(first: LoadedRun, tokens: int, device: torch.device) -> torch.Tensor:
    """``--feed val``: the first ``tokens + 1`` validation tokens of the first run's corpus."""
    val = prepare_data(first.cfg.data, tokenizer=first.tokenizer, log=lambda s: None).val
    if len(val) < tokens + 1:
        raise ConfigError(f"--feed val: the validation split holds {len(val)} tokens, fewer "
                          f"than the {tokens + 1} a pass needs; lower --tokens")
    return torch.from_numpy(val[:tokens + 1].astype("int64")).to(device)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    runs = load_runs(args.runs, device)
    models = {name: loaded.model.to(dtype) for name, loaded in runs.items()}
    tokens = args.tokens or min(m.cfg.max_seq_len for m in models.values()) - 1
    fed_T = validation_tokens(next(iter(runs.values())), tokens, device) \
        if args.feed == "val" else None
    mode = "reduce-overhead" if device.type == "cuda" else None
    decoders = {name: RunDecoder(model, tokens, fed_T,
                                 compile_decode_step(model, mode) if args.compile
                                 else decode_one_token)
                for name, model in models.items()}
    if args.compile:  # compiled (and CUDA graphs recorded) before the timing
        for decoder in decoders.values():
            decoder.start()
            for _ in range(min(3, tokens)):
                decoder.step()
    meter = LoadMeter()
    seconds: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(args.repeats):
        for decoder in decoders.values():
            decoder.start()
        steppers = {name: decoder.step for name, decoder in decoders.items()}
        for name, times in time_in_turns(steppers, tokens, device).items():
            seconds[name] += times
    base = statistics.median(next(iter(seconds.values())))
    rows = {}
    for path, (name, times) in zip(args.runs, seconds.items()):
        step_s = statistics.median(times)
        rows[name] = {"run_dir": path, "ms_per_token": 1e3 * step_s, "speedup": base / step_s,
                      "routed_blocks": len(decoders[name].routers),
                      "routed_blocks_entered_per_token":
                          decoders[name].routed_blocks_entered_per_token()}
    result = {"device": device_name(device), "torch": torch.__version__, "dtype": str(dtype),
              "feed": args.feed, "compile": args.compile, "tokens": tokens, "repeats": args.repeats,
              "command": command_line(), "runs": rows}
    report(result, format_table(result), args.json, meter.lap())
    return 0


def format_table(result: dict[str, Any]) -> str:
    """A line per run: its median step and its speed-up over the first (and, for a
    Mixture-of-Depths run, the routed blocks a token entered)."""
    lines = [f"{result['device']}, torch {result['torch']}, {result['dtype']}, batch 1, "
             f"{result['repeats']} passes of {result['tokens']} tokens (--feed {result['feed']}); "
             "median time per decode step"]
    for name, r in result["runs"].items():
        routed = r["routed_blocks_entered_per_token"]
        lines.append(f"{name}: {r['ms_per_token']:.3f} ms/token, {r['speedup']:.2f}x the first run"
                     + (f", routed blocks entered per token {routed:.2f} of {r['routed_blocks']}"
                        if r["routed_blocks"] else ""))
    return "\n".join(lines)
