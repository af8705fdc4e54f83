"""Where an MoE layer's forward + backward spends its GPU time: torch.profiler's kernel table
for the shapes of `condcomp bench moe` (d_model 1024, 65536 tokens, bf16 autocast).
    python scripts/profile_moe.py 8:1 64:8"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from condcomp.layers import MoE

d_model, d_ff, tokens = 1024, 2752, 65536
for spec in sys.argv[1:] or ["8:1", "64:8"]:
    e, k = (int(v) for v in spec.split(":"))
    moe = MoE(d_model, d_ff // k, e, k, normalize_topk=True).cuda().train()
    x = torch.randn(64, 1024, d_model, device="cuda", requires_grad=True)
    g = torch.randn_like(x)

    def step(moe=moe, x=x, g=g):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = moe(x)
        y.backward(g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"\n=== E={e} k={k}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=28, max_name_column_width=60))
