"""Every preset on CUDA: the same numbers as the CPU reference, cached decoding equal to the
full forward, bf16 training that stays finite, and the MoE hot path compiling as one graph.

These run only where CUDA is (marked ``cuda``); the CPU suite holds the reference paths."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_cached_decoding_matches

from condcomp.conditional.experts import GroupedExperts
from condcomp.config import load_config
from condcomp.layers import MoE
from condcomp.model import TransformerLM
from condcomp.presets import list_presets

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Every preset at its own shape, except the 125M one (its shape is the same code, larger) and
# the cluster-sized ones that exist for `condcomp plan` (7.4B and 1.6T parameters).
TOO_LARGE = {"gpt_125m", "switch_base_128", "switch_c"}
PRESETS = [name for name, _ in list_presets() if name not in TOO_LARGE]
VOCAB, BATCH, SEQ = 256, 8, 64  # a batch of 8: Mixture of Tokens groups 8 sequences


def build(preset: str) -> TransformerLM:
    cfg = load_config(preset, [f"model.vocab_size={VOCAB}"])
    torch.manual_seed(0)
    return TransformerLM(cfg.model)


def has_moe(model: torch.nn.Module) -> bool:
    return any(isinstance(m, GroupedExperts) for m in model.modules())


def tokens(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def tolerance(model: torch.nn.Module) -> float:
    # The grouped GEMM runs in bf16 on Hopper whatever the input dtype: the outputs of MoE (and
    # of transitioned MoT, which dispatches through it) carry bf16 rounding; everything else is
    # fp32 on both devices.
    return 5e-2 if has_moe(model) else 2e-4


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_on_cuda_equals_the_cpu_reference(preset):
    cpu = build(preset).eval()
    gpu = build(preset).cuda().eval()
    x = tokens()
    with torch.no_grad():
        want = cpu(x).logits
        got = gpu(x.cuda()).logits.cpu()
    tol = tolerance(cpu)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_in_bf16_on_cuda(preset):
    model = build(preset).cuda().train()
    x = tokens().cuda()
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        fp32_loss = model(x, y).loss.item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, y)
    out.total_loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), \
        "a parameter got no gradient or a non-finite one"
    # Training-time noise (Gumbel, jitter) differs between the two passes, hence the margin.
    assert out.loss.item() == pytest.approx(fp32_loss, rel=5e-2)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_cached_decoding_on_cuda_equals_full_forward(preset):
    model = build(preset).cuda()
    if model.cfg.ffn.kind == "mot" and model.cfg.ffn.options.get("routing") != "token_choice":
        pytest.skip("continuous Mixture of Tokens mixes sequences: it decodes only after the "
                    "transition (mot_sparse)")
    assert_cached_decoding_matches(model, tokens(2, 24).cuda(), prefill=9,
                                   atol=tolerance(model))


def test_the_moe_hot_path_compiles_as_one_graph_on_cuda():
    moe = MoE(d_model=64, d_expert=128, num_experts=8, top_k=2).cuda().train()
    x = torch.randn(4, 32, 64, device="cuda")
    explanation = torch._dynamo.explain(moe)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_moe_training_step_equals_eager_on_cuda():
    eager = build("switch").cuda().train()
    compiled = torch.compile(build("switch").cuda().train())
    x = tokens().cuda()
    y = torch.roll(x, -1, dims=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = eager(x, y).total_loss
        b = compiled(x, y).total_loss
    a.backward()
    b.backward()
    assert b.item() == pytest.approx(a.item(), rel=1e-2)
    ga = eager.layers[1].block.ffn.experts.w1.grad
    gb = compiled._orig_mod.layers[1].block.ffn.experts.w1.grad
    torch.testing.assert_close(gb, ga, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("compile_model", [False, True])
def test_master_weights_step_on_cuda_equals_autocast(compile_model):
    """bf16-stored matrix weights with fp32 masters: one training step computes what bf16
    autocast over fp32 weights computes, with the grouped-GEMM fast path, eager and compiled
    (the gradient hooks must fire under torch.compile too)."""
    from condcomp.master_weights import MasterWeights

    x = tokens().cuda()
    y = torch.roll(x, -1, dims=1)
    losses, grads = [], []
    for bf16_weights in (False, True):
        model = build("switch").cuda().train()
        masters = MasterWeights(model) if bf16_weights else None
        forward = torch.compile(model) if compile_model else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(x, y).total_loss
        loss.backward()
        losses.append(loss.item())
        w1 = model.layers[1].block.ffn.experts.w1
        if masters is not None:
            assert w1.dtype == torch.bfloat16 and w1.grad is None
            w1 = masters.masters[[id(p) for p in masters.weights].index(id(w1))]
        grads.append(w1.grad)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], atol=1e-3, rtol=1e-2)
