"""AltUp: the K-wide residual stream, its predict/correct steps and its composition."""

import pytest
import torch
from helpers import assert_cached_decoding_matches, tiny_model_cfg

from condcomp.errors import ConfigError
from condcomp.layers import AltUp
from condcomp.model import TransformerLM


def test_k1_with_identity_coefficients_is_the_plain_model():
    plain = TransformerLM(tiny_model_cfg())
    altup = TransformerLM(tiny_model_cfg(residual=dict(kind="altup", options=dict(k=1))))
    missing, unexpected = altup.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"stream.predict", "stream.correct"} and not unexpected
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(altup(x).logits, plain(x).logits)


def test_predict_and_correct_by_hand():
    stream = AltUp(d_model=2, n_layers=2, k=2, recycled=True)
    with torch.no_grad():
        stream.predict[1] = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
        stream.correct[1] = torch.tensor([2.0, 0.5])
    x1, x2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    state = torch.stack((x1, x2)).view(1, 1, 2, 2)
    # Layer 1 computes block j* = 1 mod 2 = 1; the "layer" adds 10 to its input.
    out = stream.apply(1, state, lambda h: h + 10.0)
    x_hat1 = 0.5 * x1 + 0.5 * x2  # (2, 0.5)
    x_hat2 = x2  # (3, -1)
    delta = (x_hat2 + 10.0) - x_hat2  # the layer's change to the active block
    torch.testing.assert_close(out[0, 0, 0], x_hat1 + 2.0 * delta)
    torch.testing.assert_close(out[0, 0, 1], x_hat2 + 0.5 * delta)


def test_embedding_plain_widens_recycled_copies():
    plain = AltUp(d_model=4, n_layers=1, k=3, vocab_size=10)
    recycled = AltUp(d_model=4, n_layers=1, k=3, recycled=True)
    assert plain.extra_embedding.shape == (10, 8) and recycled.extra_embedding is None
    x = torch.randn(1, 2, 4)
    tokens = torch.tensor([[3, 7]])
    wide = plain.expand(x, tokens)
    torch.testing.assert_close(wide[:, :, 0], x)
    torch.testing.assert_close(wide[0, 1, 2], plain.extra_embedding[7, 4:])
    torch.testing.assert_close(recycled.expand(x, tokens), x.unsqueeze(2).expand(1, 2, 3, 4))


@pytest.mark.parametrize("options, extra", [
    (dict(k=2), {}),
    (dict(k=2, recycled=True), {}),
    (dict(k=3, coefficients="dynamic"), {}),
    (dict(k=2), dict(ffn=dict(kind="moe", layers="odd", options=dict(num_experts=4)))),
    (dict(k=2, recycled=True), dict(n_layers=4, wrapper=dict(kind="mod", layers="odd",
                                                             options=dict(capacity=0.5)))),
    (dict(k=2), dict(ffn=dict(kind="sparse_ff", options=dict(block_size=8, d_lowrank=8)),
                     attention=dict(kind="sparse_qkv"), n_kv_heads=4)),
])
def test_trains_and_cached_decoding_equals_the_full_forward(options, extra):
    model = TransformerLM(tiny_model_cfg(residual=dict(kind="altup", options=options), **extra))
    x = torch.randint(0, 97, (2, 18))
    out = model(x, x)
    out.total_loss.backward()
    assert model.stream.predict.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer, "router"):  # let a Mixture-of-Depths router send some tokens
                layer.router.weight.normal_(0, 0.5)
    assert_cached_decoding_matches(model, x, prefill=5)


def test_coefficients_are_not_weight_decayed():
    from condcomp.config import RunConfig
    from condcomp.train import make_optimizer

    model = TransformerLM(tiny_model_cfg(residual=dict(kind="altup")))
    opt = make_optimizer(model.parameters(), RunConfig(), torch.device("cpu"))
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(model.stream.predict) in no_decay and id(model.stream.correct) in no_decay
    assert id(model.stream.extra_embedding) not in no_decay


def test_config_errors():
    with pytest.raises(ConfigError, match="k = 0 must be at least 1"):
        tiny_model_cfg(residual=dict(kind="altup", options=dict(k=0))).validate()
    with pytest.raises(ConfigError, match="coefficients = 'learned' is unknown"):
        tiny_model_cfg(residual=dict(kind="altup", options=dict(coefficients="learned"))).validate()
    with pytest.raises(ConfigError, match="spans the whole model"):
        tiny_model_cfg(residual=dict(kind="altup", layers="odd")).validate()
