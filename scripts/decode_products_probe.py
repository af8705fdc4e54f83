"""What bounds Sparse FF's batch-1 decode speed-up per block: the block's weight products alone
against the whole block, dense and Sparse FF side by side (the probe issue 5's d_model 1024
goal was set from: "the dense FFN plus attention projections" against the gathered rows).

For each variant, a stack of ``--stack`` blocks (as ``condcomp bench decode``) decodes one
token at a time two ways, taking turns step by step:
- *block*: the whole block (norms, Q/K/V, RoPE, KV-cache write, SDPA, output projection, the
  FFN slot), exactly what ``bench decode`` times;
- *products*: only the block's weight products: the four attention projections and the FFN
  slot (for Sparse FF its controller, argmax and gathered rows), on the same input.

If the products alone do not reach a speed-up, no amount of trimming the rest of the block
will: the rest is shared by both variants and only dilutes the ratio. Last, it prints the
bandwidth at which this machine streams the matrices of the block's shapes through a
matrix-vector product (distinct matrices, so they come from memory, not cache).

    python scripts/decode_products_probe.py [--d-model 1024] [--compile] [--tokens 64]
"""

import argparse
import statistics
import time

import torch

from condcomp.bench_decode import (
    SHAPES,
    WARMUP_STEPS,
    BlockDecoder,
    maybe_compile,
    time_side_by_side,
    variant_config,
)
from condcomp.model import TransformerLM


class ProductsDecoder:
    """The attention projections and the FFN slot of each block in the stack, nothing else."""

    def __init__(self, model: TransformerLM, compile: bool) -> None:
        self.blocks = [getattr(layer, "block", layer) for layer in model.layers]
        self.x = torch.randn(1, 1, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
        self._step = maybe_compile(self._products, compile, torch.device("cpu"))

    def _products(self, x_11D: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for block in self.blocks:
            qkv = block.attn.qkv
            outs += [qkv.wq(x_11D), qkv.wk(x_11D), qkv.wv(x_11D), block.attn.wo(x_11D),
                     block.ffn(x_11D)]
        return outs

    @torch.no_grad()
    def step(self) -> None:
        self._step(self.x)


def matvec_bandwidth(d_model: int, total_bytes: int = 192 * 2**20, repeats: int = 10) -> None:
    x = torch.randn(d_model)
    for rows in (d_model, 4 * d_model):
        mats = [torch.randn(rows, d_model) for _ in range(total_bytes // (4 * rows * d_model))]
        for m in mats:  # warm-up
            m @ x
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m in mats:
                m @ x
            seconds.append(time.perf_counter() - t0)
        gb = len(mats) * rows * d_model * 4 / 1e9
        print(f"matrix-vector, {len(mats)} distinct {rows} x {d_model} fp32 matrices: "
              f"{gb / statistics.median(seconds):.1f} GB/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=1024, choices=sorted(SHAPES))
    p.add_argument("--stack", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--d-lowrank", type=int, default=64)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    cache_len = args.context + WARMUP_STEPS + args.tokens
    decoders = {}
    for variant in ("dense", "sparse_ff"):
        model = TransformerLM(variant_config(SHAPES[args.d_model], variant, args.stack,
                                             args.block_size, args.d_lowrank, 256, cache_len)
                              ).eval()
        decoders[(variant, "block")] = BlockDecoder(model, args.context, args.compile)
        decoders[(variant, "products")] = ProductsDecoder(model, args.compile)
    seconds = time_side_by_side(decoders, args.tokens, torch.device("cpu"))
    ms = {key: 1e3 * s / args.stack for key, s in seconds.items()}
    mode = "compiled" if args.compile else "eager"
    print(f"d_model {args.d_model}, {mode}, stack {args.stack}, N = {args.block_size}, "
          f"ms per block (median of {args.tokens} steps)")
    print("| what is timed | dense | sparse_ff | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for what in ("products", "block"):
        dense, sparse = ms[("dense", what)], ms[("sparse_ff", what)]
        print(f"| {what} | {dense:.3f} | {sparse:.3f} | {dense / sparse:.2f}x |")
    rest_dense = ms[("dense", "block")] - ms[("dense", "products")]
    rest_sparse = ms[("sparse_ff", "block")] - ms[("sparse_ff", "products")]
    print(f"the rest of the block (block - products): dense {rest_dense:.3f} ms, "
          f"sparse_ff {rest_sparse:.3f} ms")
    matvec_bandwidth(args.d_model)


if __name__ == "__main__":
    main()
