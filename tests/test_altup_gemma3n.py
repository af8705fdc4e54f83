"""AltUp's ``coefficients = "gemma3n"`` against HF transformers' Gemma 3n.

Weights of a small random ``Gemma3nTextAltUp`` (and ``Gemma3nTextModel``'s projections) are
copied into condcomp's AltUp; predict, correct, the output scale, their gradients, the in-place
clipping in training and the stream's ends must equal HF's in float32.
"""

import pytest
import torch
from helpers import assert_cached_decoding_matches, tiny_model_cfg

from condcomp.errors import ConfigError
from condcomp.layers import AltUp
from condcomp.model import TransformerLM

transformers = pytest.importorskip("transformers")
from transformers import Gemma3nTextConfig  # noqa: E402
from transformers.models.gemma3n.modeling_gemma3n import (  # noqa: E402
    Gemma3nTextAltUp,
    Gemma3nTextModel,
)

D, K, L, EPS = 32, 3, 2, 1e-6
TOL = dict(atol=1e-6, rtol=1e-5)


def hf_config(active_idx: int = 0, clip: float | None = 0.03) -> Gemma3nTextConfig:
    return Gemma3nTextConfig(
        vocab_size=50, vocab_size_per_layer_input=50, hidden_size=D, hidden_size_per_layer_input=8,
        intermediate_size=64, num_hidden_layers=L, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, laurel_rank=4, altup_num_inputs=K, altup_active_idx=active_idx,
        altup_coef_clip=clip, rms_norm_eps=EPS, activation_sparsity_pattern=[0.0] * L,
        layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0,
        sliding_window=8)


def random_hf_altup(active_idx: int = 0, clip: float | None = 0.03) -> Gemma3nTextAltUp:
    """Weights large enough that the clip at 0.03 bites on some of them."""
    torch.manual_seed(0)
    hf = Gemma3nTextAltUp(hf_config(active_idx, clip))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
        hf.router_norm.weight.add_(1.0)
    return hf


def copy_into(stream: AltUp, hf: Gemma3nTextAltUp, layer_idx: int) -> None:
    """HF ``layers.{l}.altup.X.weight`` -> condcomp ``stream.X[l]``."""
    with torch.no_grad():
        stream.prediction_coefs[layer_idx] = hf.prediction_coefs.weight
        stream.correction_coefs[layer_idx] = hf.correction_coefs.weight
        stream.modality_router[layer_idx] = hf.modality_router.weight
        stream.router_norm[layer_idx] = hf.router_norm.weight
        stream.correct_output_scale[layer_idx] = hf.correct_output_scale


def condcomp_altup(selection: str = "same", clip: float = 0.03) -> AltUp:
    return AltUp(D, L, K, selection=selection, coefficients="gemma3n", clip=clip, eps=EPS)


def to_BTKD(x_KBTD: torch.Tensor) -> torch.Tensor:
    return x_KBTD.permute(1, 2, 0, 3)


# Layer 1 with "alternating" computes block 1, as HF with altup_active_idx = 1.
CASES = [("same", 0, 0), ("same", 0, 1), ("alternating", 1, 1)]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("selection, active_idx, layer_idx", CASES)
def test_predict_and_correct_equal_hf(training, selection, active_idx, layer_idx):
    hf = random_hf_altup(active_idx).train(training)
    ours = condcomp_altup(selection).train(training)
    copy_into(ours, hf, layer_idx)
    with torch.no_grad():
        ours.correct_output_scale[layer_idx].normal_()
        hf.correct_output_scale.copy_(ours.correct_output_scale[layer_idx])
    x_KBTD = torch.randn(K, 2, 5, D) * 3.0
    activated_BTD = torch.randn(2, 5, D) * 3.0
    hf_in, our_in = x_KBTD.clone().requires_grad_(), to_BTKD(x_KBTD).clone().requires_grad_()
    hf_act, our_act = activated_BTD.clone().requires_grad_(), activated_BTD.clone().requires_grad_()

    hf_pred = hf.predict(hf_in)
    our_pred = ours.gemma3n_predict(layer_idx, our_in)
    torch.testing.assert_close(our_pred, to_BTKD(hf_pred), **TOL)
    hf_out = hf.correct(hf_pred, hf_act)
    our_out = ours.gemma3n_correct(layer_idx, our_pred, our_act)
    torch.testing.assert_close(our_out, to_BTKD(hf_out), **TOL)
    hf_scaled = hf.scale_corrected_output(hf_out[active_idx])
    torch.testing.assert_close(ours.scale_corrected_output(layer_idx, our_out[:, :, active_idx]),
                               hf_scaled, **TOL)

    # Clipping in training only: HF clips prediction_coefs' stored weights in place.
    torch.testing.assert_close(ours.prediction_coefs[layer_idx], hf.prediction_coefs.weight)
    assert (hf.prediction_coefs.weight.abs().max() <= 0.03) == training

    weights = torch.randn_like(hf_out)
    (hf_out * weights).sum().backward()
    (our_out * to_BTKD(weights)).sum().backward()
    torch.testing.assert_close(our_in.grad, to_BTKD(hf_in.grad), **TOL)
    torch.testing.assert_close(our_act.grad, hf_act.grad, **TOL)
    for ours_name, hf_param in (("prediction_coefs", hf.prediction_coefs.weight),
                                ("correction_coefs", hf.correction_coefs.weight),
                                ("modality_router", hf.modality_router.weight),
                                ("router_norm", hf.router_norm.weight)):
        grad = getattr(ours, ours_name).grad
        torch.testing.assert_close(grad[layer_idx], hf_param.grad, **TOL)
        assert grad[1 - layer_idx].abs().sum() == 0  # the other layer's slice is untouched
    if training:  # clamp's gradient: nothing for correction weights outside the clip
        outside = hf.correction_coefs.weight.abs() > 0.03
        assert outside.any() and (ours.correction_coefs.grad[layer_idx][outside] == 0).all()


def test_apply_is_predict_layer_on_the_active_block_correct():
    hf = random_hf_altup().train()
    ours = condcomp_altup().train()
    copy_into(ours, hf, 1)
    x_KBTD = torch.randn(K, 2, 4, D)
    hf_pred = hf.predict(x_KBTD)
    hf_out = hf.correct(hf_pred, torch.sin(hf_pred[0]) * 2.0)
    out = ours.apply(1, to_BTKD(x_KBTD), lambda h_BTD: torch.sin(h_BTD) * 2.0)
    torch.testing.assert_close(out, to_BTKD(hf_out), **TOL)


def capture_stream_ends(model: Gemma3nTextModel, embeds_BTD: torch.Tensor):
    """HF's stream as the first layer receives it and the mean the final norm receives, and
    the last layer's output that the mean was made from."""
    seen = {}

    def keep(name):
        def hook(module, args, *out) -> None:  # None: the layer's inputs and outputs stay
            seen[name] = (out[0] if out else args[0]).clone()
        return hook

    hooks = [model.layers[0].register_forward_pre_hook(keep("expanded")),
             model.layers[-1].register_forward_hook(keep("last")),
             model.norm.register_forward_pre_hook(keep("collapsed"))]
    with torch.no_grad():
        model(inputs_embeds=embeds_BTD, per_layer_inputs=torch.randn(2, 5, L, 8))
    for hook in hooks:
        hook.remove()
    return seen["expanded"], seen["last"], seen["collapsed"]


def test_stream_ends_equal_hf_projections():
    torch.manual_seed(1)
    hf = Gemma3nTextModel(hf_config()).eval()
    ours = condcomp_altup()
    with torch.no_grad():  # HF altup_projections.{i-1}.weight -> stream.altup_projections[i-1]
        for i in range(K - 1):
            ours.altup_projections[i] = hf.altup_projections[i].weight
            ours.altup_unembed_projections[i] = hf.altup_unembed_projections[i].weight
    embeds_BTD = torch.randn(2, 5, D) * 4.0
    expanded_KBTD, last_KBTD, collapsed_BTD = capture_stream_ends(hf, embeds_BTD)
    state_BTKD = ours.expand(embeds_BTD, torch.zeros(2, 5, dtype=torch.long))
    torch.testing.assert_close(state_BTKD, to_BTKD(expanded_KBTD), **TOL)
    rms = state_BTKD.pow(2).mean(-1).sqrt()  # every block at the embedding's magnitude
    torch.testing.assert_close(rms, rms[:, :, :1].expand_as(rms))
    torch.testing.assert_close(ours.collapse(to_BTKD(last_KBTD)), collapsed_BTD, **TOL)


def gemma3n_model(**options) -> TransformerLM:
    options = dict(k=3, coefficients="gemma3n", **options)
    return TransformerLM(tiny_model_cfg(residual=dict(kind="altup", options=options)))


@pytest.mark.parametrize("selection", ["same", "alternating"])
def test_model_trains_and_cached_decoding_equals_the_full_forward(selection):
    torch.manual_seed(0)
    model = gemma3n_model(selection=selection, clip=120.0)
    names = {name for name, _ in model.stream.named_parameters()}
    assert names == {"prediction_coefs", "correction_coefs", "modality_router", "router_norm",
                     "altup_projections", "altup_unembed_projections"}
    assert "stream.correct_output_scale" in model.state_dict()
    x = torch.randint(0, 97, (2, 14))
    model(x, x).total_loss.backward()
    for name, p in model.stream.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.flops_per_token() > TransformerLM(tiny_model_cfg()).flops_per_token()
    assert_cached_decoding_matches(model, x, prefill=4)


def test_only_the_router_norm_escapes_weight_decay():
    from condcomp.config import RunConfig
    from condcomp.train import make_optimizer

    model = gemma3n_model()
    opt = make_optimizer(model.parameters(), RunConfig(), torch.device("cpu"))
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(model.stream.router_norm) in no_decay
    assert id(model.stream.prediction_coefs) not in no_decay


def test_clip_applies_in_training_only():
    model = gemma3n_model(clip=0.01)
    x = torch.randint(0, 97, (2, 6))
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.stream.prediction_coefs.abs().max() > 0.01  # N(0, 0.02) init, untouched
    model.train()
    model(x, x)
    assert model.stream.prediction_coefs.abs().max() <= 0.01


def test_config_errors():
    with pytest.raises(ConfigError, match="recycled = true does not go with coefficients = "
                                          "'gemma3n'"):
        tiny_model_cfg(residual=dict(kind="altup", options=dict(
            coefficients="gemma3n", recycled=True))).validate()
    with pytest.raises(ConfigError, match="does not go with"):
        AltUp(D, L, K, recycled=True, coefficients="gemma3n")
    with pytest.raises(ConfigError, match=r"use one of \('static', 'dynamic', 'gemma3n'\)"):
        tiny_model_cfg(residual=dict(kind="altup", options=dict(coefficients="3n"))).validate()
