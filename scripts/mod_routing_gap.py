"""How much of a Mixture-of-Depths run's validation loss is the causal router's doing: the
loss with the routing decode uses (each token alone: sigmoid(r) > 0.5, or the predictor)
against the loss with the training routing (top-k of each sequence, which sees the future).
    python scripts/mod_routing_gap.py RUN_DIR [--max-tokens N]"""

import argparse

import torch

from condcomp.conditional.mod import MixtureOfDepths
from condcomp.data import prepare_data
from condcomp.evaluate import evaluate
from condcomp.runs import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--max-tokens", type=int, default=131072)
    args = p.parse_args()
    run = load_run(args.run_dir, None, torch.device("cpu"))
    data = prepare_data(run.cfg.data, tokenizer=run.tokenizer, log=lambda s: None)
    routers = [m for m in run.model.modules() if isinstance(m, MixtureOfDepths)]
    if not routers:
        raise SystemExit(f"{args.run_dir} has no Mixture-of-Depths layer")
    tc = run.cfg.train
    for name, top_k in (("causal (decode) routing", False), ("top-k (training) routing", True)):
        # evaluate() puts the model in eval mode; a pre-forward hook sets only the wrapper's own
        # flag (not its block's: no dropout) to training, whose forward is the top-k selection.
        hooks = [m.register_forward_pre_hook(
            lambda mod, _, on=top_k: setattr(mod, "training", on)) for m in routers]
        result = evaluate(run.model, data.val, batch_size=tc.batch_size, seq_len=tc.seq_len,
                          max_tokens=args.max_tokens, bytes_per_token=data.val_bytes_per_token,
                          device=torch.device("cpu"))
        for h in hooks:
            h.remove()
        routed = [round(float(m.stats["routed_fraction"]), 3) for m in routers]
        print(f"{name}: val loss {result.loss:.4f}; routed fraction per layer (last batch) "
              f"{routed}")


if __name__ == "__main__":
    main()
