"""``condcomp bench import-hf``: ``condcomp import-hf`` against HF ``from_pretrained`` on the
same folder (time and peak memory), and batch-1 decode of the imported model against HF
``generate``.

The folder is a random HF model saved with ``save_pretrained`` (``--arch``: Qwen3-MoE by
default, about 100M parameters; ``--hf-set`` changes its config) or one given with
``--hf-dir``.

**Import** (``--what import``). Each load runs in a fresh Python subprocess, the two sides
taking turns in ABBA order (``--repeats`` each), so that each peak memory is that run's own and a load
change hits both alike. In the subprocess the modules the load needs are imported first
(torch, condcomp's importer or transformers), then the peak resident set is reset (``5`` to
``/proc/self/clear_refs``) and the resident set read (the baseline: interpreter, torch,
modules); after the load, the peak (``VmHWM``) less that baseline is the load's peak memory.
The resident set counts the file pages a memory-mapped read touches, so reading a
checkpoint through one whole-file mapping would count it twice. Our side is the whole
``import_hf``: it writes the run folder (config, tokenizer, the step-0 checkpoint) too; HF's is
``AutoModelForCausalLM.from_pretrained(folder)``, which only loads. The times are medians.
(The import converts the weights as it writes the checkpoint's file, so no part of it is a
"load" that could be timed apart from the write.)

**Decode** (``--what decode``). The folder is imported into a run, and
the runners of ``condcomp bench`` time :func:`condcomp.generate.generate` of the run's
model against HF ``generate`` of ``from_pretrained``'s, both compiled with ``--compile`` (ours:
``decode_one_token``; HF: its static cache and ``CompileConfig``), as ``condcomp bench`` does
for HF Llama; greedy tokens are compared as the check that both compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from condcomp import flags
from condcomp.bench.common import environment, markdown_table, report, si
from condcomp.errors import ConfigError
from condcomp.machine_load import LoadMeter

WHATS = ("import", "decode")
SIDES = ("condcomp", "hf")

# The HF configs the folder is made from: about 100M parameters (Qwen3-MoE, the import goal's
# shape) and a Mixtral big enough that a decode step is not all overhead on two cores.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(vocab_size=16384, hidden_size=512, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                      intermediate_size=1024, moe_intermediate_size=256, num_experts=24,
                      num_experts_per_tok=4, norm_topk_prob=True, tie_word_embeddings=False,
                      max_position_embeddings=2048),
    "mixtral": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048),
}
CONFIG_CLASSES = {"qwen3_moe": "Qwen3MoeConfig", "mixtral": "MixtralConfig"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "import-hf", help="condcomp import-hf against HF from_pretrained (time, peak memory), "
        "and decode of the imported model against HF generate",
        description="Times condcomp import-hf against AutoModelForCausalLM.from_pretrained of "
        "the same save_pretrained folder, each load in a fresh subprocess (peak memory over "
        "the interpreter's), and batch-1 greedy decode of the imported model against HF "
        "generate. The folder is a random HF model unless --hf-dir names one.")
    p.add_argument("--hf-dir", help="a save_pretrained folder (default: a random model of --arch "
                   "saved in a temporary folder)")
    p.add_argument("--arch", choices=sorted(SHAPES), default="qwen3_moe",
                   help="the random model's architecture (default qwen3_moe)")
    p.add_argument("--hf-set", dest="hf_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="a field of the random model's HF config, the value "
                   "as JSON, e.g. --hf-set hidden_size=256 (repeatable)")
    p.add_argument("--what", default="import,decode", help="comma list of: import, decode")
    p.add_argument("--repeats", type=flags.number(int, gt=0), default=3,
                   help="loads per side, in turns (default 3); the median is reported")
    p.add_argument("--pause", type=flags.number(float, ge=0), default=0.0, metavar="SECONDS",
                   help="wait this long before each load (default 0): memory the process before "
                   "freed may cost more to reuse after a while (a virtual machine's free page "
                   "reporting)")
    p.add_argument("--decode-tokens", type=flags.number(int, ge=2), default=128)
    p.add_argument("--prompt-len", type=flags.number(int, gt=0), default=16)
    p.add_argument("--decode-repeats", type=flags.number(int, gt=0), default=3)
    p.add_argument("--compile", action="store_true", help="compile both sides' decode")
    p.add_argument("--seed", type=flags.bench_seed, default=0)
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.set_defaults(func=run)
    return p


def hf_config_fields(arch: str, overrides: list[str]) -> dict[str, Any]:
    fields = dict(SHAPES[arch])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--hf-set {item!r}: use KEY=VALUE")
        try:
            fields[key.strip()] = json.loads(value)
        except ValueError:
            fields[key.strip()] = value
    return fields


def save_random_model(arch: str, fields: dict[str, Any], folder: Path, seed: int) -> int:
    """A random HF model of ``arch`` saved in ``folder``; returns its parameter count."""
    import transformers

    config = getattr(transformers, CONFIG_CLASSES[arch])(
        **fields, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- import


# The child imports torch, its side's entry point and the resident-set helpers (a module of
# the standard library's only), nothing else: what a load imports on first use (HF's
# from_pretrained imports about a thousand modules: sympy, torch's compiler stack, Triton)
# is part of the load's time. A second load in the same process (``again_seconds``; ours into a
# second run folder) is then timed too: what the load itself costs once those are imported.
_CHILD = """
import json, sys, time
side, hf_dir, run_dir = sys.argv[1:4]
import torch
if side == "condcomp":
    from condcomp.hf.folders import import_hf
else:
    from transformers import AutoModelForCausalLM
from condcomp.resident_memory import peak_rss_reset, rss_bytes
peak_rss_reset()
base = rss_bytes("VmRSS")
t0 = time.perf_counter()
if side == "condcomp":
    import_hf(hf_dir, run_dir)
else:
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
seconds = time.perf_counter() - t0
peak = rss_bytes("VmHWM")
if side == "condcomp":
    t0 = time.perf_counter()
    import_hf(hf_dir, run_dir + "-again")
else:
    del model
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
again = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "baseline_rss": base, "peak_rss": peak,
                  "reset": peak_rss_reset.worked, "again_seconds": again}))
"""


def load_once(side: str, hf_dir: Path, run_dir: Path) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _CHILD, side, str(hf_dir), str(run_dir)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the {side} load failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["peak_bytes"] = r["peak_rss"] - r["baseline_rss"]
    return r


def measure_import(hf_dir: Path, repeats: int, work: Path, log: Any, pause: float = 0.0
                   ) -> dict[str, Any]:
    size = folder_bytes(hf_dir)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for i in range(repeats):
        # ABBA: each side follows the other as often as itself (a load's cost here depends on
        # the memory the process before it freed).
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            run_dir = work / f"run-{side}-{i}"
            time.sleep(pause)
            r = load_once(side, hf_dir, run_dir)
            runs[side].append(r)
            log(f"  {side}: {r['seconds']:.2f} s (again in the process: "
                f"{r['again_seconds']:.2f} s), peak {r['peak_bytes'] / 1e6:,.0f} MB "
                f"over {r['baseline_rss'] / 1e6:,.0f} MB")
            if side == "condcomp":
                for folder in (run_dir, Path(f"{run_dir}-again")):
                    shutil.rmtree(folder, ignore_errors=True)
    out: dict[str, Any] = {"checkpoint_bytes": size, "sides": {}}
    for side, rs in runs.items():
        out["sides"][side] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "again_seconds": statistics.median(r["again_seconds"] for r in rs),
            "peak_bytes": statistics.median(r["peak_bytes"] for r in rs),
            "peak_over_checkpoint": statistics.median(r["peak_bytes"] for r in rs) / size,
            "runs": rs}
    c, h = out["sides"]["condcomp"], out["sides"]["hf"]
    out["time_ratio"] = c["seconds"] / h["seconds"]
    out["again_time_ratio"] = c["again_seconds"] / h["again_seconds"]
    out["goals"] = {"time_at_most_1.5x_from_pretrained": out["time_ratio"] <= 1.5,
                    "peak_at_most_1.3x_checkpoint": c["peak_over_checkpoint"] <= 1.3}
    return out


# --------------------------------------------------------------------------- decode


def measure_decode(hf_dir: Path, args: argparse.Namespace, work: Path, log: Any
                   ) -> dict[str, Any]:
    from dataclasses import asdict

    import transformers

    from condcomp.bench.hf import decode_runner_hf
    from condcomp.bench.lm_timing import Plan, decode_runner_ours, time_generations
    from condcomp.hf.folders import import_hf
    from condcomp.runs import load_run

    run_dir = work / "run-decode"
    import_hf(hf_dir, run_dir)
    run = load_run(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    cfg = run.cfg
    if args.prompt_len + args.decode_tokens > cfg.model.max_seq_len:
        raise ConfigError(f"--prompt-len + --decode-tokens exceeds the model's "
                          f"max_seq_len {cfg.model.max_seq_len}")
    plan = Plan(cfg=cfg, device=torch.device("cpu"), amp_dtype=None, batch_size=1,
                seq_len=args.prompt_len, prompt_len=args.prompt_len,
                decode_tokens=args.decode_tokens, steps=0, warmup=0,
                decode_repeats=args.decode_repeats, compile=args.compile, what=("decode",),
                seed=args.seed)
    prompt = torch.randint(0, cfg.model.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    log(f"decode: batch 1, {args.decode_tokens} tokens after a {args.prompt_len}-token "
        f"prompt, {args.decode_repeats} timed rounds{', compiled' if args.compile else ''}")
    runners = {"ours": decode_runner_ours(run.model, prompt, plan),
               "hf": decode_runner_hf(hf, prompt, plan)}
    decoded = time_generations(runners, {"ours": "condcomp (imported)",
                                         "hf": f"HF {type(hf).__name__}"}, plan, log)
    a, b = decoded["ours"].tokens, decoded["hf"].tokens
    ratio = decoded["ours"].tokens_per_s / decoded["hf"].tokens_per_s
    log(f"  greedy tokens agree: {sum(x == y for x, y in zip(a, b)) / len(a):.0%}; "
        f"ours / HF = {ratio:.2f}x")
    return {"params": run.model.num_params(), "active_params":
            run.model.num_params(active_only=True),
            "model": cfg.to_dict()["model"],
            "sides": {"condcomp": asdict(decoded["ours"]), "hf": asdict(decoded["hf"])},
            "tokens_agree": sum(x == y for x, y in zip(a, b)) / len(a),
            "ratio": ratio, "goal_at_least_1.5x": ratio >= 1.5}


# --------------------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    if not what or any(w not in WHATS for w in what):
        raise ConfigError(f"--what {args.what!r}: use a comma list of {list(WHATS)}")
    from condcomp.hf import require_transformers

    require_transformers()
    meter = LoadMeter()
    with tempfile.TemporaryDirectory(prefix="condcomp-bench-import-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {"device": environment(torch.device("cpu")), "dtype": "float32",
                                  "compile": args.compile}
        if args.hf_dir:
            hf_dir = Path(args.hf_dir)
            result["hf_dir"] = str(hf_dir)
        else:
            hf_dir = work / "hf"
            fields = hf_config_fields(args.arch, args.hf_overrides)
            params = save_random_model(args.arch, fields, hf_dir, args.seed)
            result["hf_model"] = {"arch": args.arch, "config": fields, "params": params}
            print(f"bench import-hf: a random {args.arch} of {si(params)} parameters in {hf_dir}")
        result["checkpoint_bytes"] = folder_bytes(hf_dir)
        if "import" in what:
            print(f"import: {args.repeats} loads per side, each in a fresh subprocess, in turns")
            result["import"] = measure_import(hf_dir, args.repeats, work, print, args.pause)
            result["import"]["method"] = (
                "median seconds of --repeats loads per side, each in a fresh subprocess, the "
                "sides in turns, ABBA; peak = VmHWM after the load less VmRSS before it, the peak "
                "reset (clear_refs 5) after the imports of torch and the loader's modules")
        if "decode" in what:
            result["decode"] = measure_decode(hf_dir, args, work, print)
    result["command"] = command_line(args)
    result["argv"] = list(sys.argv)
    report(result, format_table(result), args.json, meter.lap())
    return 0


def command_line(args: argparse.Namespace) -> str:
    parts = ["condcomp", "bench", "import-hf"]
    if args.hf_dir:
        parts += ["--hf-dir", str(args.hf_dir)]
    else:
        parts += ["--arch", args.arch]
        for item in args.hf_overrides:
            parts += ["--hf-set", item]
    parts += ["--what", args.what]
    if "import" in args.what:
        parts += ["--repeats", str(args.repeats)]
        if args.pause:
            parts += ["--pause", str(args.pause)]
    if "decode" in args.what:
        parts += ["--decode-tokens", str(args.decode_tokens), "--prompt-len",
                  str(args.prompt_len), "--decode-repeats", str(args.decode_repeats)]
        if args.compile:
            parts.append("--compile")
    parts += ["--seed", str(args.seed)]
    if args.json:
        parts += ["--json", str(args.json)]
    return shlex.join(parts)


def format_table(result: dict[str, Any]) -> str:
    env = result["device"]
    lines = [f"{env['name']}, torch {env['torch']}, float32; checkpoint "
             f"{result['checkpoint_bytes'] / 1e6:,.0f} MB", ""]
    if "import" in result:
        imp = result["import"]
        rows = [[label, f"{imp['sides'][side]['seconds']:.2f} s",
                 f"{imp['sides'][side]['peak_bytes'] / 1e6:,.0f} MB",
                 f"{imp['sides'][side]['peak_over_checkpoint']:.2f}x"]
                for side, label in (("condcomp", "condcomp import-hf"),
                                    ("hf", "HF from_pretrained"))]
        for row, side in zip(rows, ("condcomp", "hf")):
            row.insert(2, f"{imp['sides'][side]['again_seconds']:.2f} s")
        rows.append(["condcomp / HF", f"{imp['time_ratio']:.2f}x",
                     f"{imp['again_time_ratio']:.2f}x", "", ""])
        lines += [markdown_table(["load", "time (median)", "again in the process",
                                  "peak memory", "peak / checkpoint"], rows), ""]
    if "decode" in result:
        d = result["decode"]
        rows = [[label, f"{d['sides'][side]['tokens_per_s']:,.1f}"]
                for side, label in (("condcomp", "condcomp generate"), ("hf", "HF generate"))]
        rows.append(["condcomp / HF", f"{d['ratio']:.2f}x"])
        lines += [f"decode, batch 1{', compiled' if result['compile'] else ''}; "
                  f"{si(d['params'])} params ({si(d['active_params'])} active)", "",
                  markdown_table(["decode", "tok/s"], rows),
                  f"greedy tokens agree: {d['tokens_agree']:.0%}"]
    return "\n".join(lines)
