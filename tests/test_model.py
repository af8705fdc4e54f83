"""The dense model: shapes, causality, cached decoding, accounting, the MLP contract."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cached_decoding_matches, tiny_model_cfg

from condcomp import registry
from condcomp.config import SeamConfig
from condcomp.errors import ConfigError
from condcomp.generate import check_fits, decode_one_token, generate, prefill
from condcomp.layers import MLP
from condcomp.model import TransformerLM


def test_forward_shapes_and_initial_loss():
    model = TransformerLM(tiny_model_cfg())
    x = torch.randint(0, 97, (3, 16))
    out = model(x, torch.randint(0, 97, (3, 16)))
    assert out.logits.shape == (3, 16, 97)
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    # Small init: the first prediction is close to uniform over the vocabulary.
    assert abs(out.loss.item() - math.log(97)) < 0.1


def test_causal_future_tokens_do_not_change_past_logits():
    model = TransformerLM(tiny_model_cfg()).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_cached_decoding_equals_full_forward(n_kv_heads):
    model = TransformerLM(tiny_model_cfg(n_kv_heads=n_kv_heads))
    assert_cached_decoding_matches(model, torch.randint(0, 97, (2, 24)), prefill=9)


def test_prefill_and_decode_helpers_match_forward():
    model = TransformerLM(tiny_model_cfg()).eval()
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(x).logits
        model.setup_cache(1, 32)
        last = prefill(model, x[:, :8])
        steps = [decode_one_token(model, x[:, t:t + 1], torch.tensor([t])) for t in range(8, 12)]
        model.clear_cache()
    torch.testing.assert_close(last, full[:, 7])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:12], atol=1e-5, rtol=1e-5)


def test_greedy_generation_follows_the_argmax_of_the_full_forward():
    model = TransformerLM(tiny_model_cfg()).eval()
    prompt = [5, 17, 3, 42]
    from condcomp.generate import Sampling

    new = generate(model, prompt, 10, Sampling(temperature=0.0))
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model(seq).logits[0]
    expected = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    assert new == expected


def test_prompt_longer_than_context_is_refused_clearly():
    from condcomp.errors import GenerationError

    with pytest.raises(GenerationError, match="context is 32 tokens"):
        check_fits(40, 1, 32)
    with pytest.raises(GenerationError, match="lower --max-new-tokens to at most 12"):
        check_fits(20, 30, 32)


def test_num_params_tied_and_untied():
    tied = TransformerLM(tiny_model_cfg(tie_embeddings=True))
    untied = TransformerLM(tiny_model_cfg(tie_embeddings=False))
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert tied.num_params(active_only=True) == tied.num_params()  # dense: all active


def test_flops_per_token_by_hand():
    cfg = tiny_model_cfg(n_kv_heads=2)
    model = TransformerLM(cfg)
    D, H, hd, Hkv, F_, V, L, T = 32, 4, 8, 2, 64, 97, 2, 16
    qkv = 2 * D * (H * hd + 2 * Hkv * hd)
    wo = 2 * H * hd * D
    scores = 4 * H * hd * (T + 1) / 2
    mlp = 2 * D * F_ * 3
    expected = L * (qkv + wo + scores + mlp) + 2 * D * V
    assert model.flops_per_token(T) == pytest.approx(expected)


def test_qkv_biases_are_zero_initialised_parameters_the_plan_counts():
    """``qkv_bias``: ``wq/wk/wv.bias`` (not ``wo``), zero at init so the model starts as the
    bias-free one does; the plan counts them (its activations and FLOPs do not change), and
    cached decoding still equals the full forward."""
    from condcomp.config import RunConfig, TrainConfig
    from condcomp.plan import make_plan

    plain = tiny_model_cfg()
    cfg = tiny_model_cfg(attention=dict(kind="dense", options={"qkv_bias": True}))
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    names = {n: p.shape for n, p in model.named_parameters() if n.endswith(".bias")}
    assert names == {f"layers.{i}.block.attn.qkv.{w}.bias": (n,) for i in range(2)
                     for w, n in (("wq", 32), ("wk", 16), ("wv", 16))}
    assert all(p.eq(0).all() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert model.num_params() == TransformerLM(plain).num_params() + 2 * (32 + 16 + 16)
    assert model.flops_per_token(16) == TransformerLM(plain).flops_per_token(16)
    run = RunConfig(model=cfg, train=TrainConfig(seq_len=32, batch_size=2, device="cpu"))
    run.validate()
    assert make_plan(run, 1).params.total == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-1.0, 1.0)
    assert_cached_decoding_matches(model.eval(), torch.randint(0, 97, (2, 12)), prefill=5)


def test_mfu_is_none_on_cpu():
    model = TransformerLM(tiny_model_cfg())
    assert model.estimate_mfu(1e6, 16, "cpu") is None


def test_residual_projections_get_scaled_init():
    model = TransformerLM(tiny_model_cfg(n_layers=8, d_model=256, n_heads=4, n_kv_heads=4,
                                         d_ff=1024))
    block = model.layers[0].block
    assert block.ffn.w1.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.ffn.w2.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2*8)
    assert block.attn.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


# --------------------------------------------------------------- the MLP contract


@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu"])
def test_mlp_contract(activation):
    mlp = MLP(d_model=16, d_hidden=40, activation=activation)
    assert mlp.w1.shape == (16, 40) and mlp.w2.shape == (40, 16)
    x = torch.randn(2, 5, 16)
    y = mlp(x)
    assert y.shape == x.shape
    if activation == "swiglu":
        assert mlp.w3.shape == (16, 40)
        expected = (F.silu(x @ mlp.w1) * (x @ mlp.w3)) @ mlp.w2
    else:
        assert mlp.w3 is None
        expected = {"relu": F.relu, "gelu": F.gelu}[activation](x @ mlp.w1) @ mlp.w2
    torch.testing.assert_close(y, expected)
    assert mlp.aux_loss.shape == () and float(mlp.aux_loss) == 0.0
    assert mlp.stats == {}
    names = {n for n, _ in mlp.named_parameters()}
    assert names == ({"w1", "w2", "w3"} if activation == "swiglu" else {"w1", "w2"})


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ConfigError, match="activation"):
        MLP(8, 16, activation="tanh")


# --------------------------------------------------------------- the registry


def test_registry_builds_the_family_on_selected_layers_only():
    calls = []

    class Doubling(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.inner = MLP(d, 2 * d)
            self.register_buffer("aux_loss", torch.tensor(0.5), persistent=False)
            self.stats = {"seen": 1.0}

        def forward(self, x):
            return self.inner(x)

        def flops_per_token(self):
            return self.inner.flops_per_token()

    from dataclasses import dataclass

    @dataclass
    class Opts:
        scale: int = 1

    def build(options, cfg, layer_idx):
        calls.append((layer_idx, options.scale))
        return Doubling(cfg.d_model)

    registry.register(registry.Family("test_doubling", "ffn", Opts, build))
    cfg = tiny_model_cfg(n_layers=4, ffn=dict(kind="test_doubling", layers="odd",
                                              options={"scale": 3}))
    model = TransformerLM(cfg)
    assert calls == [(1, 3), (3, 3)]
    assert isinstance(model.layers[0].block.ffn, MLP)
    out = model(torch.randint(0, 97, (1, 8)))
    assert out.aux_loss.item() == pytest.approx(1.0)  # two layers x 0.5
    assert out.stats["layers.1.block.ffn.seen"] == 1.0
    assert registry.describe(cfg) == "test_doubling on odd layers"


def test_registry_names_unknown_families_and_options():
    with pytest.raises(ConfigError, match="model.ffn.kind = 'nope'.*known"):
        tiny_model_cfg(ffn=dict(kind="nope")).validate()
    with pytest.raises(ConfigError, match="unknown key model.ffn.widht"):
        tiny_model_cfg(ffn=dict(kind="mlp", options={"widht": 3})).validate()
    with pytest.raises(ConfigError, match="layers \\[7\\] that do not exist"):
        tiny_model_cfg(ffn=SeamConfig(kind="mlp", layers=[7])).validate()


def test_generate_keeps_its_cache_and_training_ignores_it():
    from condcomp.generate import Sampling

    model = TransformerLM(tiny_model_cfg()).eval()
    first = generate(model, [1, 2, 3], 5, Sampling(temperature=0.0))
    k_tensor = model.layers[0].block.attn.kv_cache.k_BHLd
    second = generate(model, [1, 2, 3], 5, Sampling(temperature=0.0))
    assert first == second
    assert model.layers[0].block.attn.kv_cache.k_BHLd is k_tensor  # reused, not reallocated
    x = torch.randint(0, 97, (2, 16))
    with_cache = model(x).logits
    model.clear_cache()
    torch.testing.assert_close(with_cache, model(x).logits)


def test_every_family_is_registered_at_its_seam():
    assert {"mlp", "moe", "mot", "sparse_ff"} <= set(registry.families("ffn"))
    assert {"dense", "sparse_qkv"} <= set(registry.families("attention"))
    assert {"full", "mod"} <= set(registry.families("wrapper"))
    assert {"plain", "altup"} <= set(registry.families("residual"))
