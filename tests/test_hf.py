"""Equivalence with HF ``LlamaForCausalLM`` (condcomp.hf).

Logits that agree with HF Llama to float32 rounding are our strongest check that the RoPE
layout (rotate half), grouped-query attention, RMSNorm, SwiGLU roles (w1 gate, w3 up) and the
tied head follow the LLaMA conventions; greedy decoding through our static KV cache must then
pick the same tokens as HF generate.
"""

from __future__ import annotations

import pytest
import torch

from condcomp.config import ModelConfig, SeamConfig
from condcomp.errors import ConfigError
from condcomp.generate import Sampling, generate
from condcomp.model import TransformerLM

pytest.importorskip("transformers")

from condcomp.hf import from_hf_llama, hf_llama_config, to_hf_llama  # noqa: E402

VOCAB = 300


def tiny_model(tie: bool = True, seed: int = 0, **overrides) -> TransformerLM:
    """A tiny GQA model whose norm gains are random, so a swapped or dropped norm shows."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 max_seq_len=64, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=tie,
                 init_std=0.05)
    cfg = ModelConfig(**{**shape, **overrides})
    model = TransformerLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_match_hf_llama(tie: bool, impl: str) -> None:
    model = tiny_model(tie)
    hf = to_hf_llama(model, attn_implementation=impl).eval()
    assert hf.config.tie_word_embeddings == tie
    tokens_BT = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens_BT).logits
        theirs = hf(tokens_BT).logits
    assert ours.abs().max() > 0.1  # the check is not vacuous
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_training_loss_matches_hf_llama(tie: bool) -> None:
    """HF shifts ``labels`` inside; we take shifted targets with the last position ignored."""
    model = tiny_model(tie)
    hf = to_hf_llama(model)
    x_BT = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    y_BT = torch.cat([x_BT[:, 1:], torch.full_like(x_BT[:, :1], -100)], dim=1)
    with torch.no_grad():
        ours = model(x_BT, y_BT).total_loss
        theirs = hf(input_ids=x_BT, labels=x_BT).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_greedy_decode_matches_hf_generate() -> None:
    """Our prefill + static-KV-cache decode picks the same greedy tokens as HF generate."""
    model = tiny_model(tie=True, init_std=0.3)  # peaked logits: no argmax near-ties
    hf = to_hf_llama(model).eval()
    prompt = [5, 17, 200, 3, 99, 42]
    ours = generate(model, prompt, max_new_tokens=12, sampling=Sampling(temperature=0))
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_is_exact(tie: bool) -> None:
    model = tiny_model(tie)
    back = from_hf_llama(to_hf_llama(model))
    assert back.cfg.kv_heads == 2 and back.cfg.rope_theta == 500.0 and back.cfg.norm_eps == 1e-6
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert (back.lm_head.weight is back.tok_emb.weight) == tie


def test_copy_is_independent() -> None:
    model = tiny_model()
    hf = to_hf_llama(model)
    with torch.no_grad():
        hf.model.embed_tokens.weight.zero_()
    assert model.tok_emb.weight.abs().sum() > 0


def test_hf_llama_config_has_same_shape() -> None:
    model = tiny_model(tie=False)
    import transformers

    hf = transformers.LlamaForCausalLM(hf_llama_config(model.cfg))
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()
    assert hf.config.intermediate_size == model.cfg.ffn_hidden


@pytest.mark.parametrize("overrides, match", [
    ({"activation": "gelu"}, "activation"),
    ({"activation": "relu"}, "activation"),
])
def test_non_swiglu_raises(overrides: dict, match: str) -> None:
    model = tiny_model(**overrides)
    with pytest.raises(ConfigError, match="HF Llama has no equivalent"):
        to_hf_llama(model)
    with pytest.raises(ConfigError, match=match):
        hf_llama_config(model.cfg)


def test_conditional_family_raises() -> None:
    # Checked on the config, before anything is built: any non-default family is refused.
    cfg = ModelConfig(vocab_size=VOCAB, ffn=SeamConfig(kind="moe"))
    with pytest.raises(ConfigError, match="HF Llama has no equivalent"):
        hf_llama_config(cfg)


def test_rope_scaling_is_refused() -> None:
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, vocab_size=VOCAB,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="RoPE scaling"):
        from_hf_llama(transformers.LlamaForCausalLM(cfg))


# --------------------------------------------------------------- Mixtral's MoE block


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_equals_hf_mixtral_block_forward_and_backward(top_k):
    from condcomp.hf import hf_experts_implementations, to_hf_mixtral_block
    from condcomp.layers import MoE

    torch.manual_seed(0)
    moe = MoE(32, 48, num_experts=4, top_k=top_k, normalize_topk=True, load_balance_coef=0.0,
              z_loss_coef=0.0).train()
    x = torch.randn(2, 6, 32)
    y = moe(x)
    y.square().sum().backward()
    for impl in ("eager", "batched_mm", "grouped_mm"):
        if impl not in hf_experts_implementations():
            continue
        hf = to_hf_mixtral_block(moe, impl).train()
        y_hf = hf(x)
        y_hf.square().sum().backward()
        torch.testing.assert_close(y_hf, y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf.gate.weight.grad, moe.router.weight.grad, atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(hf.experts.down_proj.grad, moe.experts.w2.grad.transpose(1, 2),
                                   atol=1e-5, rtol=1e-4)


def test_moe_without_an_hf_twin_is_refused():
    from condcomp.hf import to_hf_mixtral_block
    from condcomp.layers import MoE

    with pytest.raises(ConfigError, match="normalize_topk = false.*shared experts"):
        to_hf_mixtral_block(MoE(16, 32, 4, 1, num_shared_experts=1))
