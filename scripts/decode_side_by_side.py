"""Batch-1 greedy decode time of trained runs, side by side: the runs take turns token by
token (so a load change on a shared machine hits them alike), and the median step is reported
with each run's speed-up over the first. For Mixture-of-Depths runs it also prints how many
routed blocks a token entered, on average. On CUDA each step is timed to its last kernel.

A step's cost does not depend on where its input token came from, but routing does: a model
trained briefly decodes greedily into repetitive text, which its routers treat unlike real
text. ``--feed val`` therefore feeds every run the same validation tokens of the first run's
corpus, one per step through the KV cache (teacher forcing), instead of each run's own
greedy output.
    python scripts/decode_side_by_side.py BASELINE_RUN OTHER_RUN [...] [--tokens N] [--repeats R]
        [--device cuda] [--feed greedy|val]"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from condcomp.conditional.mod import MixtureOfDepths
from condcomp.data import prepare_data
from condcomp.runs import load_run
from condcomp.runtime import resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders; the first is the baseline")
    p.add_argument("--tokens", type=int, default=0, help="tokens per pass (0: max_seq_len - 1)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights and cache while decoding (auto: bfloat16 on CUDA, else float32)")
    p.add_argument("--feed", choices=["greedy", "val"], default="greedy",
                   help="greedy: each run decodes its own argmax; val: every run is fed the "
                   "same validation tokens (see above)")
    args = p.parse_args()
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {Path(r).name: load_run(r, device=device) for r in args.runs}
    models = {name: run.model.to(dtype) for name, run in runs.items()}
    tokens = args.tokens or min(m.cfg.max_seq_len for m in models.values()) - 1
    fed = None
    if args.feed == "val":
        first = next(iter(runs.values()))
        val = prepare_data(first.cfg.data, tokenizer=first.tokenizer, log=lambda s: None).val
        fed = torch.from_numpy(val[:tokens + 1].astype("int64")).to(device)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    entered = dict.fromkeys(models, 0)
    with torch.no_grad():
        for _ in range(args.repeats):
            last = {}
            for name, model in models.items():
                model.setup_cache(1, tokens + 1)
                last[name] = (fed[:1] if fed is not None else
                              torch.zeros(1, dtype=torch.long, device=device)).view(1, 1)
            for t in range(tokens):
                pos = torch.tensor([t], device=device)
                for name, model in models.items():
                    sync()
                    t0 = time.perf_counter()
                    logits = model(last[name], input_pos=pos).logits
                    last[name] = (logits[:, -1:].argmax(-1) if fed is None else
                                  fed[t + 1:t + 2].view(1, 1))
                    sync()
                    seconds[name].append(time.perf_counter() - t0)
                    entered[name] += sum(int(m.routed_BT.sum()) for m in model.modules()
                                         if isinstance(m, MixtureOfDepths))
    base = statistics.median(seconds[next(iter(models))])
    for name, ts in seconds.items():
        step = statistics.median(ts)
        routed_blocks = sum(isinstance(m, MixtureOfDepths) for m in models[name].modules())
        routed = entered[name] / (tokens * args.repeats)
        print(f"{name}: {step * 1e3:.3f} ms/token, {base / step:.2f}x the first run"
              + (f", routed blocks entered per token {routed:.2f} of {routed_blocks}"
                 if routed_blocks else ""))


if __name__ == "__main__":
    main()
