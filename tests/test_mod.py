"""Mixture-of-Depths: top-k routing in training, the causal decode routers, the KV cache of a
routed block, MoDE in both forms."""

import pytest
import torch
from helpers import assert_cached_decoding_matches, tiny_model_cfg

from condcomp.conditional.mod import MixtureOfDepths, ragged_selection
from condcomp.errors import ConfigError
from condcomp.model import TransformerLM
from condcomp.model.rope import RotaryEmbedding


class Recorder(torch.nn.Module):
    """A stand-in block: records what it was given, returns a fixed update."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x_BKD, positions):
        self.seen.append((x_BKD.clone(), positions))
        return torch.ones_like(x_BKD)

    def flops_per_token(self, seq_len):
        return 100.0 + seq_len


@pytest.mark.parametrize("router_weight", ["logit", "sigmoid"])
def test_training_sends_exactly_the_top_k_tokens_and_scales_only_the_update(router_weight):
    block = Recorder()
    mod = MixtureOfDepths(block, d_model=8, capacity=0.25, router_weight=router_weight).train()
    x = torch.randn(2, 16, 8)
    positions = RotaryEmbedding(4, 32).positions(16)
    y = mod(x, positions)
    x_in, pos = block.seen[0]
    assert x_in.shape == (2, 4, 8)  # gathered: the block runs on k = 4 tokens, not 16
    r = mod.router(x).squeeze(-1)
    top = r.topk(4, dim=1).indices.sort(dim=1).values
    assert torch.equal(pos.pos_BT, top)  # original positions, in order
    chosen = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, top, True)
    weight = torch.sigmoid(r) if router_weight == "sigmoid" else r
    expected = x + (weight * chosen).unsqueeze(-1) * torch.ones_like(x)  # x + w(r) f(x), chosen
    torch.testing.assert_close(y, expected)
    assert mod.stats["routed_fraction"] == pytest.approx(0.25)


def test_k_is_never_zero():
    mod = MixtureOfDepths(Recorder(), d_model=8, capacity=0.01).train()
    assert mod.tokens_in_block(16) == 1


@pytest.mark.parametrize("router_weight", ["logit", "sigmoid"])
def test_router_gets_a_gradient_through_the_scaled_update(router_weight):
    mod = MixtureOfDepths(Recorder(), d_model=8, capacity=0.5, aux_loss_coef=0.0,
                          router_weight=router_weight).train()
    y = mod(torch.randn(1, 8, 8), RotaryEmbedding(4, 32).positions(8))
    y.sum().backward()
    assert mod.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("decode_router", ["aux_loss", "predictor"])
def test_decode_routing_losses_and_accuracy(decode_router):
    mod = MixtureOfDepths(Recorder(), d_model=8, capacity=0.25, decode_router=decode_router,
                          aux_loss_coef=0.5).train()
    x = torch.randn(2, 16, 8)
    mod(x, RotaryEmbedding(4, 32).positions(16))
    assert mod.aux_loss > 0
    assert 0 <= mod.stats["predictor_accuracy"] <= 1
    mod.aux_loss.backward()
    if decode_router == "predictor":
        # Stop-gradient: the predictor's loss trains the predictor, never the router.
        assert mod.router.weight.grad is None
        assert mod.predictor[0].weight.grad.abs().sum() > 0
    else:
        assert mod.router.weight.grad.abs().sum() > 0


def test_ragged_selection_pads_with_skipped_tokens_after_the_real_ones():
    chosen = torch.tensor([[False, True, False, True, True],
                           [True, False, False, False, False]])
    idx, valid = ragged_selection(chosen)
    assert idx.tolist() == [[1, 3, 4], [0, 1, 2]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def mod_model(decode_router="aux_loss", router_weight="logit", **extra):
    cfg = tiny_model_cfg(n_layers=4, wrapper=dict(
        kind="mod", layers="odd", options=dict(capacity=0.25, decode_router=decode_router,
                                               router_weight=router_weight)),
        **extra)
    model = TransformerLM(cfg).eval()
    with torch.no_grad():  # a router that sends about half the tokens through
        for layer in (model.layers[1], model.layers[3]):
            layer.router.weight.normal_(0, 0.5)
            if layer.predictor is not None:
                layer.predictor[2].weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize(("decode_router", "router_weight"),
                         [("aux_loss", "logit"), ("predictor", "logit"), ("aux_loss", "sigmoid")])
@pytest.mark.parametrize("batch", [3, 1])  # batch 1 decodes through the one-token path
def test_cached_decoding_equals_the_full_forward_with_the_same_routing(decode_router,
                                                                       router_weight, batch):
    model = mod_model(decode_router, router_weight)
    x = torch.randint(0, 97, (batch, 24))
    with torch.no_grad():
        model(x)
        assert 0 < model.layers[1].stats["routed_fraction"] < 1
    assert_cached_decoding_matches(model, x, prefill=9)


def test_compiled_decoding_equals_eager_decoding():
    # compile_decode_step compiles one graph (fullgraph=True): a decoding token's routing
    # decision stays on the device when traced (tests/test_mod_decode_sync.py).
    from condcomp.generate import Sampling, compile_decode_step, generate

    torch._dynamo.reset()
    model = mod_model()
    sampling = Sampling(temperature=1.0)  # varied tokens, so routing varies; seeded below
    decisions = []
    hooks = [layer.register_forward_hook(
        lambda layer, args, out: decisions.append(bool(layer.routed_BT.all())))
        for layer in (model.layers[1], model.layers[3])]
    eager = generate(model, [5, 17, 3], 16, sampling, seed=0)
    for hook in hooks:
        hook.remove()
    assert True in decisions[2:] and False in decisions[2:]  # both branches were decoded
    compiled = generate(model, [5, 17, 3], 16, sampling, seed=0,
                        decode_step=compile_decode_step(model))
    assert compiled == eager


def test_a_routed_blocks_cache_holds_only_the_tokens_that_went_through():
    model = mod_model()
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        model.setup_cache(1, 32)
        for t in range(20):
            model(x[:, t:t + 1], input_pos=torch.tensor([t]))
        filled_routed = model.layers[1].block.attn.kv_cache.filled_BL[0, :20]
        filled_full = model.layers[0].block.attn.kv_cache.filled_BL[0, :20]
    assert filled_full.all()
    assert 0 < filled_routed.sum() < 20  # some positions skipped this block: no K/V there


def test_mod_saves_flops():
    dense = TransformerLM(tiny_model_cfg(n_layers=4))
    mod = mod_model()
    assert mod.flops_per_token(32) < 0.8 * dense.flops_per_token(32)


def test_staged_mode_mod_around_an_moe_block_trains_and_decodes():
    cfg = tiny_model_cfg(n_layers=2, wrapper=dict(kind="mod", layers="odd",
                                                  options=dict(capacity=0.5)),
                         ffn=dict(kind="moe", layers="odd", options=dict(num_experts=4)))
    model = TransformerLM(cfg).train()
    x = torch.randint(0, 97, (2, 16))
    out = model(x, x)
    out.total_loss.backward()
    assert "layers.1.block.ffn.tokens_per_expert" in out.stats
    assert "layers.1.routed_fraction" in out.stats
    with torch.no_grad():
        model.layers[1].router.weight.normal_(0, 0.5)
    assert_cached_decoding_matches(model, x)


def test_integrated_mode_noop_experts_skip_the_layer():
    from condcomp.layers import MoE

    moe = MoE(16, 32, num_experts=4, top_k=1, num_noop_experts=4).train()
    assert moe.router.weight.shape == (8, 16)
    with torch.no_grad():  # everyone picks a no-op expert
        moe.router.weight.zero_()
        moe.router.weight[6] = 1.0
    x = torch.rand(2, 5, 16) + 0.5
    y = moe(x)
    assert (y == 0).all()
    assert moe.stats["noop_fraction"] == 1.0 and moe.stats["dropped_fraction"] == 0.0
    with pytest.raises(ConfigError, match="no-op experts"):
        MoE(16, 32, 4, routing_mode="expert_choice", capacity_factor=2.0, num_noop_experts=2)


def test_mod_config_errors():
    with pytest.raises(ConfigError, match="capacity = 0.0 must be in"):
        tiny_model_cfg(wrapper=dict(kind="mod", options=dict(capacity=0.0))).validate()
    with pytest.raises(ConfigError, match="decode_router = 'oracle' is unknown"):
        tiny_model_cfg(wrapper=dict(kind="mod", options=dict(decode_router="oracle"))).validate()
    with pytest.raises(ConfigError, match="router_weight = 'softmax' is unknown"):
        tiny_model_cfg(wrapper=dict(kind="mod", options=dict(router_weight="softmax"))).validate()


def test_active_params_count_the_block_for_the_routed_share_only():
    dense = TransformerLM(tiny_model_cfg(n_layers=4))
    mod = mod_model()
    assert mod.num_params() == dense.num_params() + 2 * 32  # two routers
    block = sum(p.numel() for p in mod.layers[1].block.parameters())
    assert mod.num_params(active_only=True) == mod.num_params() - 2 * round(0.75 * block)
