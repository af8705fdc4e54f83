"""Sparse FF and Sparse QKV ("Sparse is Enough in Scaling Transformers")."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cached_decoding_matches, tiny_model_cfg

from condcomp.errors import ConfigError
from condcomp.layers import MultiplicativeDense, SparseFF, SparseQKV
from condcomp.model import TransformerLM
from condcomp.model.rope import RotaryEmbedding


def capture_masks(layer: SparseFF, monkeypatch) -> list[torch.Tensor]:
    masks = []
    original = layer.forward_masked

    def spy(x, mask):
        masks.append(mask)
        return original(x, mask)

    monkeypatch.setattr(layer, "forward_masked", spy)
    return masks


def test_quantized_mask_has_one_active_unit_per_block(monkeypatch):
    layer = SparseFF(16, 64, block_size=8, d_lowrank=4, quantized_share=1.0).train()
    masks = capture_masks(layer, monkeypatch)
    layer(torch.randn(2, 5, 16))
    (mask,) = masks
    assert mask.shape == (10, 8, 8)
    assert torch.equal(mask.detach().sum(-1), torch.ones(10, 8))
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}


def test_soft_mask_batches_use_the_softmax(monkeypatch):
    layer = SparseFF(16, 64, block_size=8, d_lowrank=4, quantized_share=0.0).train()
    masks = capture_masks(layer, monkeypatch)
    x = torch.randn(2, 5, 16)
    layer(x)
    expected = layer.controller_logits(x.reshape(10, 16)).softmax(-1)
    torch.testing.assert_close(masks[0], expected)


@pytest.mark.parametrize("quantized_share", [0.0, 1.0])
def test_gradients_reach_the_controller(quantized_share):
    layer = SparseFF(16, 64, block_size=8, d_lowrank=4, quantized_share=quantized_share).train()
    layer(torch.randn(2, 5, 16)).square().sum().backward()
    for p in (layer.controller_down, layer.controller_up, layer.controller_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_inference_gather_path_equals_the_quantized_dense_product():
    layer = SparseFF(16, 64, block_size=8, d_lowrank=4).eval()
    x = torch.randn(1, 24, 16)  # 24 tokens: the dense masked path
    with torch.no_grad():
        dense = layer(x)
        gathered = torch.cat([layer(x[:, t:t + 1]) for t in range(24)], dim=1)
        # and by definition: (ReLU(x W1 + b1) * one_hot) W2 + b2
        choice = layer.controller_logits(x[0]).argmax(-1)
        mask = F.one_hot(choice, 8).reshape(24, 64).float()
        by_hand = (F.relu(x[0] @ layer.w1.t() + layer.b1) * mask) @ layer.w2 + layer.b2
    torch.testing.assert_close(gathered, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense[0], by_hand, atol=1e-5, rtol=1e-5)


def test_sparse_ff_counts_only_the_active_units():
    layer = SparseFF(64, 256, block_size=32, d_lowrank=8)
    # controller 2*8*(64+256) + two gathered rows of 64 per block (8 blocks).
    assert layer.flops_per_token() == 2 * 8 * (64 + 256) + 2 * 2 * 8 * 64
    # controller 8 * (64 + 256) + 256, rows of W1 and W2 for 8 units, their b1, and b2.
    assert layer.active_params() == 8 * (64 + 256) + 256 + 2 * 8 * 64 + 8 + 64


def test_multiplicative_layer_matches_its_definition():
    layer = SparseQKV(d_model=12, n_heads=3, head_dim=4)
    x = torch.randn(2, 5, 12)
    y = layer.multiplicative(x)
    expected = torch.zeros(2, 5, 3, 4)
    for s in range(3):
        expected[:, :, s] = (x * layer.gate[s]) @ layer.proj
    torch.testing.assert_close(y, expected + layer.bias.view(3, 4))


def test_multiplicative_output_layer_matches_its_definition():
    layer = MultiplicativeDense(d_in=6, d_out=12, n_modules=3)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 5, 6)
    expected = torch.cat([(x * layer.gate[s]) @ layer.proj for s in range(3)], dim=-1)
    torch.testing.assert_close(layer(x), expected + layer.bias)
    # An effective weight W[i, s * 4 + m] = D[s, i] E[i, m]: 3 * 6 + 6 * 4 weights, not 6 * 12.
    assert sum(p.numel() for p in layer.parameters()) == 3 * 6 + 6 * 4 + 12


@pytest.mark.parametrize("output, wo_type", [("dense", torch.nn.Linear),
                                             ("multiplicative", MultiplicativeDense),
                                             ("none", torch.nn.Identity)])
def test_sparse_qkv_output_layer(output, wo_type):
    model = TransformerLM(tiny_model_cfg(n_kv_heads=4, attention=dict(
        kind="sparse_qkv", options=dict(output=output))))
    attn = model.layers[0].block.attn
    assert isinstance(attn.wo, wo_type)
    assert_cached_decoding_matches(model, torch.randint(0, 97, (2, 16)), prefill=5)
    if output == "multiplicative":  # it writes into the residual stream: the small init
        residual_std = model.cfg.init_std / (2 * model.cfg.n_layers) ** 0.5
        effective_std = (attn.wo.gate.std() * attn.wo.proj.std()).item()
        assert effective_std == pytest.approx(residual_std, rel=0.3)


def test_sparse_qkv_is_causal():
    layer = SparseQKV(d_model=12, n_heads=3, head_dim=4)
    positions = RotaryEmbedding(4, 32).positions(10)
    x = torch.randn(1, 10, 12)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 4, 12)
    with torch.no_grad():
        a, b = layer(x, positions), layer(y, positions)
    for before, after in zip(a, b):
        torch.testing.assert_close(before[:, :6], after[:, :6])
        assert not torch.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("kw", [
    dict(ffn=dict(kind="sparse_ff", options=dict(block_size=8, d_lowrank=8))),
    dict(attention=dict(kind="sparse_qkv")),
    dict(ffn=dict(kind="sparse_ff", options=dict(block_size=8, d_lowrank=8)),
         attention=dict(kind="sparse_qkv")),
])
def test_cached_decoding_equals_the_full_forward(kw):
    model = TransformerLM(tiny_model_cfg(n_kv_heads=4, **kw))
    assert_cached_decoding_matches(model, torch.randint(0, 97, (2, 22)), prefill=6)


def test_sparse_model_trains():
    model = TransformerLM(tiny_model_cfg(n_kv_heads=4, attention=dict(kind="sparse_qkv"),
                                         ffn=dict(kind="sparse_ff",
                                                  options=dict(block_size=8, d_lowrank=8))))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 20, (4, 24))
    losses = []
    for _ in range(30):
        out = model(x[:, :-1], x[:, 1:])
        out.total_loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_config_errors():
    with pytest.raises(ConfigError, match="block_size = 7 must be at least 2 and divide"):
        tiny_model_cfg(ffn=dict(kind="sparse_ff", options=dict(block_size=7))).validate()
    with pytest.raises(ConfigError, match="needs n_kv_heads = n_heads"):
        tiny_model_cfg(n_kv_heads=2, attention=dict(kind="sparse_qkv")).validate()
    with pytest.raises(ConfigError, match="'mod' wrapper"):
        tiny_model_cfg(n_kv_heads=4, attention=dict(kind="sparse_qkv"),
                       wrapper=dict(kind="mod")).validate()
    with pytest.raises(ConfigError, match=r"output = 'sparse' is unknown; use one of"):
        tiny_model_cfg(n_kv_heads=4, attention=dict(kind="sparse_qkv", options=dict(
            output="sparse"))).validate()
    with pytest.raises(ConfigError, match="must be d_model = 12 wide"):
        SparseQKV(d_model=12, n_heads=3, head_dim=8, output="none")


def test_compiled_sparse_decode_step_equals_eager():
    # `condcomp bench decode --compile` times one fullgraph-compiled step per variant: it must
    # compute what the eager step computes (gathers, the multiplicative layer, the conv history).
    from condcomp.bench.decode import BlockDecoder, variant_config

    torch._dynamo.reset()
    cfg = variant_config(dict(d_model=32, d_ff=64, n_heads=2), "sparse_ff+qkv", 1, 8, 8, 64, 1029)
    outs = []
    for compile in (False, True):
        torch.manual_seed(0)
        decoder = BlockDecoder(TransformerLM(cfg).eval(), context=5, compile=compile)
        with torch.no_grad():
            outs.append(torch.cat([decoder._step(decoder.x_step * (i + 1),
                                                 torch.tensor([5 + i])) for i in range(3)]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
