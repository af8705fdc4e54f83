"""``condcomp bench models``: training step and batch-1 decode of several presets, side by side
in one process, each against the first (the baseline).

This is the measurement behind the step-time goals of the conditional families: Mixture-of-
Depths against the dense model of the same shape, AltUp K = 2 against the width-d model, Mixture
of Tokens against the equal-FLOP dense model. Every preset gets the same ``--set`` overrides
(so one flag resizes them all alike), the same random batches, precision and compile mode, and
the same measurement as ``condcomp bench`` (:mod:`condcomp.bench.lm_timing`: the median of the
timed steps of forward + backward + AdamW; decode: greedy, batch 1, from the first new token to
the last, the models taking turns).

Besides the speed-up, the table gives each model's analytic ``flops_per_token`` as a ratio to
the baseline's, so that the FLOPs a family claims to save can be set against the time it saves.
For models whose decode routing is data dependent (Mixture-of-Depths) the table also gives the
share of tokens the routed blocks took while decoding: an untrained router decides about half
the tokens in, a trained one about its capacity, and the decode speed follows that share.

``--count-bytes`` counts instead of timing the training step: the bytes each model's compiled
forward + backward reads and writes (:mod:`condcomp.bench.compiled_bytes`), per token and
against the baseline. That measures a family's memory-bound overhead (AltUp's K-times wider residual
stream, say) on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from condcomp import flags
from condcomp.bench.common import environment, markdown_table, report, si
from condcomp.bench.compiled_bytes import count_compiled_bytes
from condcomp.bench.lm_timing import (
    Plan,
    add_measure_options,
    bench_train,
    decode_copy,
    decode_runner_ours,
    loss_ours,
    make_batches,
    make_plan,
    on_device,
    time_generations,
)
from condcomp.errors import ConfigError
from condcomp.machine_load import LoadMeter
from condcomp.master_weights import master_weights_for
from condcomp.runtime import autocast


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models", help="train step and decode of several presets side by side, against the "
        "first", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", required=True,
                   help="comma list of presets (names or TOML files); the first is the "
                   "baseline, e.g. dense_small,mod")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key in every preset, e.g. --set model.d_model=1024")
    add_measure_options(p, decode_tokens=64)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step of every model (decode stays eager, "
                   "where Mixture-of-Depths skips the blocks a token does not enter, and every "
                   "model is decoded the same way)")
    p.add_argument("--train-routers", type=flags.number(int, ge=0), default=0, metavar="STEPS",
                   help="before decoding, train the decode routers (Mixture-of-Depths' router "
                   "or predictor) for STEPS steps on their own routing loss alone, so that "
                   "decode routes the share a trained model routes rather than an untrained "
                   "router's (about half); the LM weights are untouched (default 0)")
    p.add_argument("--what", default="train,decode", help="comma list of: train, decode")
    p.add_argument("--count-bytes", action="store_true",
                   help="instead of timing the training step, count the bytes its compiled "
                   "forward + backward reads and writes (inductor's schedule, one step per "
                   "model; no GPU needed), per token and against the baseline")
    p.add_argument("--seed", type=flags.bench_seed, default=0)
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=run)
    return p


def make_plans(args: argparse.Namespace) -> dict[str, Plan]:
    """One :class:`~condcomp.bench.lm_timing.Plan` per preset, keyed by the preset's name."""
    paths = [c.strip() for c in args.configs.split(",") if c.strip()]
    if len(paths) < 2:
        raise ConfigError("--configs needs at least two presets: the baseline first, then the "
                          "models to set against it")
    plans: dict[str, Plan] = {}
    for path in paths:
        plan = make_plan(argparse.Namespace(**{**vars(args), "config": path}))
        name = plan.cfg.name or Path(path).stem
        while name in plans:
            name += "'"
        plans[name] = plan
    base = next(iter(plans.values()))
    for name, plan in plans.items():
        if (plan.batch_size, plan.seq_len) != (base.batch_size, base.seq_len):
            raise ConfigError(f"{name} trains on {plan.batch_size} x {plan.seq_len} tokens and "
                              f"the baseline on {base.batch_size} x {base.seq_len}; set "
                              "--batch-size and --seq-len so that they match")
    return plans


def run(args: argparse.Namespace) -> int:
    plans = make_plans(args)
    if args.count_bytes and "train" not in next(iter(plans.values())).what:
        raise ConfigError("--count-bytes counts the training step: keep train in --what")
    meter = LoadMeter()
    result = benchmark(plans, log=print, router_steps=args.train_routers,
                       count_bytes=args.count_bytes)
    result["argv"] = ["condcomp", *sys.argv[1:]]
    report(result, format_table(result), args.json, meter.lap())
    return 0


def benchmark(plans: dict[str, Plan], log=print, router_steps: int = 0,
              count_bytes: bool = False) -> dict[str, Any]:
    from condcomp.model import TransformerLM

    base_name, base = next(iter(plans.items()))
    models = {}
    for name, plan in plans.items():
        torch.manual_seed(plan.seed)
        models[name] = TransformerLM(plan.cfg.model)
    result: dict[str, Any] = {
        "device": environment(base.device), "dtype": base.dtype_name,
        "compile": base.compile, "baseline": base_name,
        "shapes": {"batch_size": base.batch_size, "seq_len": base.seq_len,
                   "prompt_len": base.prompt_len, "decode_tokens": base.decode_tokens},
        "models": {name: {"config": plans[name].cfg.to_dict(),
                          "params": m.num_params(), "active_params": m.num_params(active_only=True),
                          "flops_per_token": m.flops_per_token(base.seq_len)}
                   for name, m in models.items()},
    }
    log(f"bench models: {result['device']['name']}, torch {torch.__version__}, "
        f"{base.dtype_name}{', compiled training' if base.compile else ''}; baseline {base_name}")
    # Decode first: a trained module keeps its last step's statistics, which hold autograd
    # graphs that the decode copy could not deepcopy.
    if "decode" in base.what:
        measure_decode(models, plans, result, log, router_steps)
    if "train" in base.what and count_bytes:
        x_BT = make_batches(base)[0]
        for name, model in models.items():
            per_token = train_step_bytes(model, x_BT, plans[name]) / x_BT.numel()
            result["models"][name]["train_bytes_per_token"] = per_token
            log(f"train: {name}: the compiled step moves {per_token:,.0f} bytes per token")
    elif "train" in base.what:
        batches = make_batches(base)  # the same batches for every model
        for name, model in models.items():
            log(f"train: {name}, batch {base.batch_size} x {base.seq_len}, {base.warmup} warmup "
                f"+ {base.steps} timed steps")
            t = bench_train(model, loss_ours, batches, plans[name], model)
            result["models"][name]["train"] = asdict(t)
            log(f"  {t.tokens_per_s:,.0f} tokens/s, {t.step_s_median * 1e3:.1f} ms/step")
    base_row = result["models"][base_name]
    for row in result["models"].values():
        row["flops_ratio"] = row["flops_per_token"] / base_row["flops_per_token"]
        if "train" in row:
            row["train_speedup"] = base_row["train"]["step_s_median"] / row["train"]["step_s_median"]
        if "train_bytes_per_token" in row:
            row["train_bytes_ratio"] = (row["train_bytes_per_token"]
                                        / base_row["train_bytes_per_token"])
        if "decode" in row:
            row["decode_speedup"] = row["decode"]["tokens_per_s"] / base_row["decode"]["tokens_per_s"]
    return result


def train_step_bytes(model: torch.nn.Module, x_BT: torch.Tensor, plan: Plan) -> int:
    """Bytes the compiled forward + backward of one training step reads and writes, with the
    weights stored as the run's ``train.param_dtype`` says (:mod:`condcomp.bench.compiled_bytes`;
    bf16 weights add their gradient hooks' bytes, which no compiled graph holds)."""
    with on_device(model, plan.device):
        model.train()
        masters = master_weights_for(model, plan.cfg.train.param_dtype)
        try:
            with count_compiled_bytes(masters) as count:
                with autocast(plan.device, plan.amp_dtype):
                    loss = loss_ours(torch.compile(model), x_BT.to(plan.device))
                loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            if masters is not None:
                masters.close()
    return count.bytes


def measure_decode(models: dict[str, torch.nn.Module], plans: dict[str, Plan],
                   result: dict[str, Any], log, router_steps: int = 0) -> None:
    base = next(iter(plans.values()))
    prompt = torch.randint(0, base.cfg.model.vocab_size, (base.prompt_len,),
                           generator=torch.Generator().manual_seed(base.seed)).tolist()
    log(f"decode: batch 1, {base.decode_tokens} tokens after a {base.prompt_len}-token prompt, "
        f"{base.decode_repeats} timed rounds, eager")
    eager = {name: _uncompiled(plan) for name, plan in plans.items()}
    if router_steps:
        for name, model in models.items():
            if train_routers(model, eager[name], router_steps):
                log(f"  {name}: trained its decode routers for {router_steps} steps")
    runners = {name: decode_runner_ours(model, prompt, eager[name])
               for name, model in models.items()}
    decoded = time_generations(runners, {n: n for n in runners}, base, log)
    for name, d in decoded.items():
        row = result["models"][name]
        row["decode"] = asdict(d)
        share = decode_routed_share(models[name], prompt + d.tokens, eager[name])
        if share is not None:
            row["decode"]["routed_share"] = share
            log(f"  {name}: routed blocks took {share:.1%} of the decoded tokens")
            warning = routing_unlike_training(models[name], share)
            if warning:
                row["decode"]["routing_unlike_training"] = True
                log(f"  {name}: {warning}")


def train_routers(model: torch.nn.Module, plan: Plan, steps: int) -> bool:
    """Train only the Mixture-of-Depths routers (and predictors) of ``model``, on random
    sequences, by the routing loss alone: BCE against each sequence's top-k membership (Raposo
    et al. sec. 3.5), which is what teaches the causal decode decision its share. Returns
    whether the model had any such router."""
    from condcomp.conditional.mod import MixtureOfDepths

    routers = [m for m in model.modules() if isinstance(m, MixtureOfDepths)]
    if not routers:
        return False
    params = [p for m in routers for p in
              [*m.router.parameters(), *(m.predictor.parameters() if m.predictor else [])]]
    wanted = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in wanted and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(plan.seed + 2)
    try:
        with on_device(model, plan.device):
            model.train()
            opt = torch.optim.Adam(params, lr=1e-2)
            for _ in range(steps):
                x_BT = torch.randint(0, plan.cfg.model.vocab_size,
                                     (min(plan.batch_size, 4), plan.seq_len), generator=g)
                with autocast(plan.device, plan.amp_dtype):
                    out = model(x_BT.to(plan.device))
                # The routing losses alone (there are no targets, so no LM loss).
                loss = sum(m.aux_loss for m in routers)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            for m in routers:
                m.aux_loss = m.aux_loss.detach()  # let the decode copy deepcopy the model
            del out
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return True


def _uncompiled(plan: Plan) -> Plan:
    plan = copy.copy(plan)
    plan.compile = False
    return plan


@torch.no_grad()
def decode_routed_share(model: torch.nn.Module, tokens: list[int], plan: Plan
                        ) -> float | None:
    """The share of tokens that routed blocks took, with decode-time (causal, per-token) routing:
    eval mode routes each token alone, so one forward over the generated sequence makes the
    decisions decoding made. ``None`` for a model without data-dependent routing."""
    m = decode_copy(model, plan)
    m(torch.tensor([tokens], device=plan.device))
    shares = [float(mod.stats["routed_fraction"]) for mod in m.modules()
              if isinstance(getattr(mod, "stats", None), dict) and "routed_fraction" in mod.stats]
    return sum(shares) / len(shares) if shares else None


def routing_unlike_training(model: torch.nn.Module, share: float) -> str | None:
    """A warning when the decode routing share is far (over 2x either way) from the share the
    routed blocks were trained to take: then the decode speed is not what a trained model's
    would be. An untrained bias-free router routes about half of the tokens or almost none,
    whatever ``--train-routers`` asks of it, because an untrained residual stream has almost no
    mean direction to set a threshold with (docs/benchmarks.md)."""
    from condcomp.conditional.mod import MixtureOfDepths

    capacities = [m.capacity for m in model.modules() if isinstance(m, MixtureOfDepths)]
    if not capacities:
        return None
    capacity = sum(capacities) / len(capacities)
    if capacity / 2 <= share <= 2 * capacity:
        return None
    return (f"its routed blocks took {share:.1%} of the decoded tokens against a trained "
            f"capacity of {capacity:.1%}, so this decode speed is not a trained router's; "
            "time trained runs instead (scripts/gpu_checks.sh mod-decode, "
            "condcomp bench runs --feed val)")


def format_table(result: dict[str, Any]) -> str:
    head = ["model", "params", "active params", "FLOPs/token", "FLOPs vs base", "train tok/s",
            "step speed-up", "MFU", "peak mem", "decode tok/s", "decode speed-up"]
    counted = any("train_bytes_per_token" in m for m in result["models"].values())
    if counted:  # bytes in place of the step's time
        head[5:9] = ["train bytes/token", "bytes vs base"]
    rows = []
    for name, m in result["models"].items():
        t, d = m.get("train"), m.get("decode")
        decode = f"{d['tokens_per_s']:,.1f}" if d else "-"
        if d and "routed_share" in d:
            untrained = ", unlike training" if d.get("routing_unlike_training") else ""
            decode += f" ({d['routed_share']:.0%} routed{untrained})"
        rows.append([
            name, si(m["params"]), si(m["active_params"]),
            si(m["flops_per_token"]), f"{m['flops_ratio']:.2f}",
            f"{t['tokens_per_s']:,.0f}" if t else "-",
            f"{m['train_speedup']:.2f}x" if t else "-",
            f"{t['mfu']:.1%}" if t and t["mfu"] is not None else "-",
            f"{t['peak_mem_gb']:.2f} GB" if t and t["peak_mem_gb"] is not None else "-",
            decode, f"{m['decode_speedup']:.2f}x" if d else "-"])
        if counted:
            rows[-1][5:9] = [f"{m['train_bytes_per_token']:,.0f}", f"{m['train_bytes_ratio']:.3f}"]
    shapes = result["shapes"]
    caption = (f"{result['device']['name']}, torch {result['device']['torch']}, {result['dtype']}"
               f"{', compiled training' if result['compile'] or counted else ''}; train batch "
               f"{shapes['batch_size']} x {shapes['seq_len']}; decode batch 1, eager, "
               f"{shapes['decode_tokens']} tokens after {shapes['prompt_len']}; speed-ups "
               f"against {result['baseline']}")
    return caption + "\n\n" + markdown_table(head, rows)
