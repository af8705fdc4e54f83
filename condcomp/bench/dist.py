"""``condcomp bench dist``: training steps of a preset in the layout ``torchrun`` gives it (or
in one process), timed through the training loop's own pieces.

Launched by the user, as a training run would be::

    condcomp bench dist --config switch                                   # one process
    torchrun --nproc-per-node 2 -m condcomp bench dist --config switch --set dist.ep=2

Each process builds what ``condcomp train`` builds (:class:`condcomp.train.Trainer`: the
model from the seed, its experts sharded over the ``ep`` ranks, FSDP2 or DDP around it, AdamW)
and runs the loop's step (every micro-batch's forward and backward, the gradient fixes and the
global gradient norm, the update) on random tokens from the config's vocabulary; the global
batch is the config's ``train.batch_size * train.grad_accum`` sequences whatever the number of
ranks, so every layout trains on the same tokens per step. After ``--warmup`` untimed steps it
times ``--steps`` steps; the step time is the median over the steps of the slowest rank's
time, and tokens/s is the global batch's tokens over it. ``--plain`` (in a ``torchrun`` job of
one process) also builds the plain single-process trainer in the same process and times the
two in turns, step by step, so that FSDP's cost on one device is measured side by side.
``--against PATH`` sets the figures beside an earlier run's JSON (one process, say): the
tokens/s ratio between layouts that ``torchrun`` cannot hold in one job.

**The share of all-to-all.** After the timed steps, ``--profile-steps`` more steps run under
``torch.profiler`` (CPU activity), each inside a named range; the timed steps themselves are
not profiled, since the profiler's cost per operator (about 10% of a small model's step on
the CPU) would lower the tokens/s. In each step range, on the thread that called the step
(on the CPU the backward runs there too), the share is the time inside the all-to-all
operators over the range's time, counting only the outermost of nested matches:

- ``_c10d_functional::all_to_all_single``: the token exchanges, forward and backward
  (``all_to_all_single_autograd``), and their gloo ``c10d::alltoall_base_``;
- ``_c10d_functional::wait_tensor``: the waits for them (in a condcomp step only the
  expert-parallel exchanges use the functional collectives; gloo runs a collective on its
  own threads, and the calling thread blocks here until it is done);
- ``condcomp::ep_exchange_counts``: the synchronous exchange of the per-expert counts, whose
  wait inside ``dist.all_to_all_single`` is no operator of its own.

The FSDP share is the same over FSDP2's own ranges: ``FSDP::all_gather*`` (the parameters'
all-gathers with their copies in and out and their waits) and ``FSDP::post_backward_reduce`` /
``FSDP::post_backward_rs_wait`` (the gradients' reduce-scatters). DDP's all-reduces overlap
the backward and their wait is no range or operator, so DDP has no such figure. Both shares
are the mean over the ranks. On CUDA the calling thread only launches the collectives, so the
shares would time launches, not exchanges: there they are not reported.

Rank 0 prints the table and writes ``--json``, with the machine's load while the steps ran
(other processes' share of the CPUs, the job's other ranks on the machine left out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condcomp import flags
from condcomp.bench.common import environment, markdown_table, report, si, time_in_turns
from condcomp.config import RunConfig, load_config
from condcomp.data.loader import TrainBatches
from condcomp.data.tokenizers import ByteTokenizer
from condcomp.distributed.context import (
    SINGLE,
    DistContext,
    init_distributed,
    launched_by_torchrun,
    shutdown,
)
from condcomp.distributed.expert_parallel import EXCHANGE_COUNTS_RANGE
from condcomp.errors import ConfigError
from condcomp.machine_load import LoadMeter, own_cpu_s
from condcomp.runtime import resolve_device
from condcomp.train import Trainer

STEP_RANGE = "condcomp bench dist step: "  # + the layout's name; one range per profiled step
ALL_TO_ALL_OPS = frozenset({"_c10d_functional::all_to_all_single", "c10d::alltoall_base_",
                            "_c10d_functional::wait_tensor", EXCHANGE_COUNTS_RANGE})
FSDP_RANGES = ("FSDP::all_gather", "FSDP::post_backward_reduce", "FSDP::post_backward_rs_wait")
TOKEN_POOL_BATCHES = 8  # random tokens to draw windows from: this many global batches' worth


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dist", help="training steps of a preset in torchrun's layout (or one process): "
        "tokens/s and the share of all-to-all", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a preset name or TOML file, e.g. switch")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set dist.ep=2 or --set train.batch_size=32")
    p.add_argument("--steps", type=flags.number(int, gt=0), default=10,
                   help="timed training steps (default 10)")
    p.add_argument("--warmup", type=flags.number(int, ge=0), default=3,
                   help="untimed steps first (default 3)")
    p.add_argument("--profile-steps", type=flags.number(int, ge=0), default=5,
                   help="steps profiled after the timed ones for the collectives' share of the "
                   "step (default 5; 0: none)")
    p.add_argument("--plain", action="store_true",
                   help="in a torchrun job of one process: also time the plain single-process "
                   "trainer (no FSDP or DDP), in turns with the job's layout")
    p.add_argument("--against", metavar="JSON",
                   help="an earlier `bench dist --json` of the same preset and batch (one "
                   "process, say): the table gives tokens/s against its first layout")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=run)
    return p


@dataclass
class RankFigures:
    """What one rank measured for one layout."""

    step_s: list[float]
    all_to_all_share: float | None
    fsdp_share: float | None


# ----------------------------------------------------------------------------- setting up


def timing_config(args: argparse.Namespace) -> RunConfig:
    """The preset with ``--set``, its vocabulary resolved without preparing any data."""
    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size <= 0:  # automatic: what the config's tokenizer would give
        cfg.model.vocab_size = (ByteTokenizer.vocab_size if cfg.data.tokenizer == "byte"
                                else cfg.data.vocab_size)
    return cfg


def random_batches(cfg: RunConfig) -> TrainBatches:
    """Windows of random tokens: timing needs the batch's shape, not text. (The routers of an
    untrained MoE route them about uniformly, as they route text at the start of a run.)"""
    tc = cfg.train
    rng = np.random.default_rng(tc.seed)
    tokens = rng.integers(0, cfg.model.vocab_size, size=TOKEN_POOL_BATCHES * tc.tokens_per_step
                          + tc.seq_len + 1, dtype=np.int64)
    return TrainBatches(tokens, tc.batch_size, tc.seq_len, tc.seed)


def layout_name(ctx: DistContext) -> str:
    if not ctx.distributed:
        return "1 process"
    layout = ctx.describe()
    ranks = f"{ctx.world_size} rank{'s' if ctx.world_size > 1 else ''}"
    return f"{ranks}, {layout['data_parallel']}, ep {ctx.ep}"


def check_args(args: argparse.Namespace, ctx: DistContext) -> None:
    if args.plain and not (ctx.distributed and ctx.world_size == 1):
        raise ConfigError("--plain times the plain process beside a torchrun job of one "
                          "process: launch with `torchrun --nproc-per-node 1 -m condcomp bench "
                          "dist ...`; for more ranks, time one process on its own and pass its "
                          "JSON with --against")
    if args.against and not Path(args.against).is_file():
        raise ConfigError(f"--against {args.against}: no such file; give the --json of an "
                          "earlier `condcomp bench dist`")


def build_trainers(cfg: RunConfig, ctx: DistContext, plain: bool) -> dict[str, Trainer]:
    """The trainers to time, by layout name: the job's, and with ``plain`` the single
    process's first (the baseline of the table)."""
    contexts = ([SINGLE] if plain else []) + [ctx]
    trainers = {}
    for layout_ctx in contexts:
        trainer = Trainer(cfg, cfg.run_dir, layout_ctx, log=print)
        trainer.build_for_timing(random_batches(cfg))
        trainers[layout_name(layout_ctx)] = trainer
    return trainers


def steppers(trainers: Mapping[str, Trainer]) -> dict[str, Callable[[], object]]:
    """One training step per call, each trainer on its own next step (its next batch)."""
    def stepper(trainer: Trainer) -> Callable[[], object]:
        steps = itertools.count()
        return lambda: trainer.train_step(next(steps))

    return {name: stepper(trainer) for name, trainer in trainers.items()}


# ----------------------------------------------------------------------------- the profile


def outermost_time_us(root: Any, matches: Callable[[str], bool]) -> float:
    """Microseconds that ``root``'s descendants matching by name take, each counted once: a
    match's own matching descendants (a wait inside an exchange) are inside its time."""
    total, todo = 0.0, list(root.cpu_children)
    while todo:
        event = todo.pop()
        if matches(event.name):
            total += event.cpu_time_total
        else:
            todo += event.cpu_children
    return total


def share_in_ranges(events: Iterable[Any], range_name: str, matches: Callable[[str], bool]
                    ) -> float | None:
    """The share of the time of the ranges named ``range_name`` spent in matching events."""
    ranges = [e for e in events if e.name == range_name]
    total = sum(e.cpu_time_total for e in ranges)
    if total <= 0:
        return None
    return sum(outermost_time_us(e, matches) for e in ranges) / total


def is_all_to_all(name: str) -> bool:
    return name in ALL_TO_ALL_OPS


def is_fsdp_collective(name: str) -> bool:
    return name.startswith(FSDP_RANGES)


def profile_shares(step_by_layout: Mapping[str, Callable[[], object]], steps: int,
                   trainers: Mapping[str, Trainer]) -> dict[str, tuple[float | None, ...]]:
    """``(all-to-all share, FSDP share)`` of each layout's step over ``steps`` profiled steps,
    in turns (module doc)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            for name, step in step_by_layout.items():
                with record_function(STEP_RANGE + name):
                    step()
    events = prof.events()
    shares = {}
    for name, trainer in trainers.items():
        a2a = share_in_ranges(events, STEP_RANGE + name, is_all_to_all)
        fsdp = None
        if uses_fsdp(trainer.ctx):
            fsdp = share_in_ranges(events, STEP_RANGE + name, is_fsdp_collective)
        shares[name] = (a2a, fsdp)
    return shares


def uses_fsdp(ctx: DistContext) -> bool:
    return ctx.distributed and ctx.options.data_parallel == "fsdp"


# ----------------------------------------------------------------------------- measuring


def measure(trainers: Mapping[str, Trainer], args: argparse.Namespace, device: torch.device
            ) -> dict[str, RankFigures]:
    """This rank's figures per layout: the timed steps, then the profiled ones."""
    step_by_layout = steppers(trainers)
    seconds = time_in_turns(step_by_layout, args.steps, device, warmup=args.warmup)
    profile_steps = args.profile_steps if device.type == "cpu" else 0
    shares: dict[str, tuple[float | None, ...]] = {name: (None, None) for name in trainers}
    if profile_steps:
        shares = profile_shares(step_by_layout, profile_steps, trainers)
    return {name: RankFigures(seconds[name], *shares[name]) for name in trainers}


def layout_row(name: str, ranks: list[RankFigures], trainer: Trainer) -> dict[str, Any]:
    """One layout's figures over every rank: the median over steps of the slowest rank's step
    (a step ends on every rank together: its loss is all-reduced), the shares' means."""
    step_s = statistics.median(max(times) for times in zip(*(r.step_s for r in ranks)))
    ctx = trainer.ctx
    return {"layout": name, "world_size": ctx.world_size, "ep": ctx.ep,
            "data_parallel": ctx.describe()["data_parallel"], "threads": torch.get_num_threads(),
            "micro_batch_per_rank": trainer.micro_batch, "grad_accum_per_rank": trainer.accum,
            "step_s": step_s, "tokens_per_s": trainer.tc.tokens_per_step / step_s,
            "all_to_all_share": mean_or_none(r.all_to_all_share for r in ranks),
            "fsdp_share": mean_or_none(r.fsdp_share for r in ranks),
            "per_rank": [asdict(r) for r in ranks]}


def mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


# ----------------------------------------------------------------------------- reporting


def command_line() -> str:
    """The command as launched: under torchrun, with its process count."""
    command = shlex.join(["condcomp", *sys.argv[1:]])
    if not launched_by_torchrun():
        return command
    ranks_here = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    return f"torchrun --nproc-per-node {ranks_here} -m {command}"


def read_baseline(path: str, result: dict[str, Any]) -> dict[str, Any]:
    """The first layout of an earlier ``--json``, checked to time the same preset and batch."""
    try:
        earlier = json.loads(Path(path).read_text(encoding="utf-8"))
        first = earlier["layouts"][0]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ConfigError(f"--against {path}: not a `condcomp bench dist --json` file "
                          f"({exc})") from None
    for key in ("config", "tokens_per_step", "params"):
        if earlier.get(key) != result[key]:
            raise ConfigError(f"--against {path}: it timed {key} = {earlier.get(key)!r}, this "
                              f"run {result[key]!r}; compare runs of the same preset and batch")
    return {"path": path, "layout": first["layout"], "threads": first["threads"],
            "tokens_per_s": first["tokens_per_s"], "command": earlier.get("command")}


def add_ratios(result: dict[str, Any]) -> None:
    """Each layout's tokens/s over the baseline's: ``--against``'s, else the first row's."""
    base = result.get("against") or result["layouts"][0]
    for row in result["layouts"]:
        row["tokens_per_s_vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"]


def percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def format_table(result: dict[str, Any]) -> str:
    env = result["environment"]
    base = result.get("against")
    head = (f"{result['config']}: {result['tokens_per_step']:,} tokens a step "
            f"({result['batch']}), {si(result['params'])} params, {env['name']}, torch "
            f"{env['torch']}")
    if base:
        head += f"\nbaseline: {base['layout']} x {base['threads']} threads, {base['path']}"
    rows = [[r["layout"], f"{r['world_size']} x {r['threads']}", f"{r['step_s'] * 1e3:.1f} ms",
             f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_vs_baseline']:.2f}",
             percent(r["all_to_all_share"]), percent(r["fsdp_share"])]
            for r in result["layouts"]]
    table = markdown_table(["layout", "ranks x threads", "step", "tokens/s", "/ baseline",
                            "all-to-all", "FSDP collectives"], rows)
    return head + "\n\n" + table


def build_result(cfg: RunConfig, trainers: Mapping[str, Trainer], rows: list[dict[str, Any]],
                 args: argparse.Namespace) -> dict[str, Any]:
    trainer = next(iter(trainers.values()))
    tc = cfg.train
    result: dict[str, Any] = {
        "config": cfg.name, "tokens_per_step": tc.tokens_per_step,
        "batch": f"{tc.batch_size * tc.grad_accum} x {tc.seq_len}",
        "params": trainer.n_params, "vocab_size": cfg.model.vocab_size,
        "dtype": str(trainer.amp_dtype or torch.float32), "steps": args.steps,
        "warmup": args.warmup, "profile_steps": args.profile_steps,
        "environment": environment(trainer.device), "command": command_line(),
        "layouts": rows}
    if args.against:
        result["against"] = read_baseline(args.against, result)
    add_ratios(result)
    return result


# ----------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    cfg = timing_config(args)
    ctx = init_distributed(cfg.dist, resolve_device(cfg.train.device).type)
    try:
        check_args(args, ctx)
        return bench(cfg, ctx, args)
    finally:
        shutdown(ctx)


def bench(cfg: RunConfig, ctx: DistContext, args: argparse.Namespace) -> int:
    if ctx.is_main and not ctx.distributed:
        print("one process (not launched by torchrun): the [dist] table is not used")
    trainers = build_trainers(cfg, ctx, args.plain)
    device = next(iter(trainers.values())).device
    meter, own_start = LoadMeter(), own_cpu_s()
    figures = measure(trainers, args, device)
    load = meter.lap()
    others_s = ctx.other_ranks_cpu_s(own_cpu_s() - own_start)
    by_rank = ctx.gather_object(figures)

    def write_report() -> None:
        rows = [layout_row(name, [rank[name] for rank in by_rank], trainer)
                for name, trainer in trainers.items()]
        result = build_result(cfg, trainers, rows, args)
        report(result, format_table(result), args.json, load.excluding(others_s))

    # On rank 0, the others waiting for it, so that a user error there (an unwritable JSON
    # path) stops every rank with one line.
    ctx.on_main(write_report)
    return 0
