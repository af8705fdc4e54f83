"""Mixture of Tokens: group weights, causality across the group, padding, the transition to
sparse, and batch-1 generation after it."""

import pytest
import torch
from helpers import assert_cached_decoding_matches, tiny_model_cfg

from condcomp.errors import ConfigError
from condcomp.layers import MixtureOfTokens
from condcomp.model import TransformerLM


def layer(**kw) -> MixtureOfTokens:
    args = dict(d_model=16, d_expert=24, num_experts=4, group_size=4)
    args.update(kw)
    return MixtureOfTokens(**args)


def test_group_weights_sum_to_one_per_expert_and_match_the_definition():
    mot = layer()
    x = torch.randn(4, 3, 16)
    y = mot(x)
    # By hand for position t = 1: the group is x[:, 1] (one token per sequence).
    group = x[:, 1]  # [G, D]
    w = torch.softmax(group @ mot.controller, dim=0)  # [G, E], over the group
    torch.testing.assert_close(w.sum(0), torch.ones(4))
    merged = w.t() @ group  # [E, D]
    out = mot.experts.forward_batched(merged.unsqueeze(1)).squeeze(1)  # [E, D]
    torch.testing.assert_close(y[:, 1], w @ out, atol=1e-5, rtol=1e-5)


def test_no_token_sees_the_future_of_any_sequence():
    mot = layer()
    x = torch.randn(8, 10, 16)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(8, 4, 16)  # change every sequence's future
    torch.testing.assert_close(mot(x)[:, :6], mot(x2)[:, :6])


def test_a_batch_that_is_not_a_multiple_of_the_group_is_padded_with_masked_sequences():
    mot = layer(group_size=4)
    x = torch.randn(6, 5, 16)  # one full group of 4, one group of 2 real + 2 padding
    y = mot(x)
    assert y.shape == x.shape
    # The padding takes no weight: the last two sequences give what a group of two gives.
    torch.testing.assert_close(y[4:], layer_like(mot, group_size=2)(x[4:]), atol=1e-5,
                               rtol=1e-5)


def layer_like(mot: MixtureOfTokens, group_size: int) -> MixtureOfTokens:
    other = layer(group_size=group_size)
    other.load_state_dict(mot.state_dict())
    return other


def test_flop_matched_experts_spend_the_dense_ffn_flops():
    dense = TransformerLM(tiny_model_cfg(d_ff=64)).layers[0].block.ffn
    mot = TransformerLM(tiny_model_cfg(d_ff=64, ffn=dict(kind="mot", options=dict(
        num_experts=4, group_size=4, expert_size="flop_matched"))))
    moe_layer = mot.layers[0].block.ffn
    assert moe_layer.experts.d_expert == 64
    expert_part = moe_layer.num_experts * moe_layer.experts.flops_per_expert_token() / 4
    assert expert_part == dense.flops_per_token()


def test_gradients_reach_the_controller():
    mot = layer()
    mot(torch.randn(4, 3, 16)).square().sum().backward()
    assert mot.controller.grad.abs().sum() > 0


def test_temperature_anneals_with_optimizer_steps():
    mot = layer(temperature=1.0, temperature_final=0.1, anneal_steps=10)
    for _ in range(5):
        mot.after_optimizer_step()
    assert mot.temperature().item() == pytest.approx(0.55)
    for _ in range(20):
        mot.after_optimizer_step()
    assert mot.temperature().item() == pytest.approx(0.1)


def test_transitioned_model_decodes_at_batch_1_like_its_full_forward():
    cfg = tiny_model_cfg(ffn=dict(kind="mot", layers="odd", options=dict(
        num_experts=4, group_size=4, routing="token_choice")))
    assert_cached_decoding_matches(TransformerLM(cfg), torch.randint(0, 97, (1, 20)))


def test_train_then_transition_then_generate(tmp_path, capsys):
    from condcomp.cli import main
    from condcomp.runs import load_run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"d{i}.txt").write_text(("the course of true love never did run smooth "
                                           f"{i}\n") * 40)
    common = ["--set", f'data.corpus="{corpus}"', "--set", f'data.cache_dir="{tmp_path}/c"',
              "--set", "train.max_steps=8", "--set", "train.batch_size=4",
              "--set", "train.seq_len=32", "--set", "train.eval_every=8",
              "--set", "train.eval_tokens=256", "--set", "train.progress=false",
              "--set", "model.d_model=32", "--set", "model.n_layers=2",
              "--set", "model.n_heads=4", "--set", "model.d_ff=64",
              "--set", "model.max_seq_len=64", "--set", "model.ffn.kind=mot",
              "--set", "model.ffn.group_size=4", "--set", "model.ffn.num_experts=4"]
    assert main(["train", "--set", f'out_dir="{tmp_path}/mot"', *common]) == 0
    assert main(["train", "--set", f'out_dir="{tmp_path}/sparse"', *common,
                 "--set", "model.ffn.routing=token_choice",
                 "--set", f'train.init_from="{tmp_path}/mot"']) == 0
    continuous = load_run(tmp_path / "mot").model
    transitioned = load_run(tmp_path / "sparse").model
    assert transitioned.layers[0].block.ffn.routing == "token_choice"
    assert "initialised the weights from" in capsys.readouterr().out
    # The transition started from the continuous weights (then trained 8 more steps).
    assert not torch.equal(continuous.layers[0].block.ffn.controller,
                           transitioned.layers[0].block.ffn.controller)
    assert main(["generate", str(tmp_path / "sparse"), "--prompt", "the course",
                 "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("the course")


def test_a_shared_expert_takes_its_width_out_of_the_flop_matched_budget():
    dense = TransformerLM(tiny_model_cfg(d_ff=64)).layers[0].block.ffn
    mot = TransformerLM(tiny_model_cfg(d_ff=64, ffn=dict(kind="mot", options=dict(
        num_experts=4, group_size=4, expert_size="flop_matched", d_shared=16))))
    layer_ = mot.layers[0].block.ffn
    assert layer_.experts.d_expert == 48 and layer_.shared_experts.d_hidden == 16
    expert_part = layer_.num_experts * layer_.experts.flops_per_expert_token() / 4
    assert expert_part + layer_.shared_experts.flops_per_token() == dense.flops_per_token()
    with pytest.raises(ConfigError, match="leaves no FFN width"):
        tiny_model_cfg(d_ff=64, ffn=dict(kind="mot", options=dict(d_shared=64))).validate()


@pytest.mark.parametrize("routing", ["continuous", "token_choice"])
def test_the_shared_expert_adds_a_per_token_mlp_to_the_mixture(routing):
    with_shared = layer(d_shared=8, routing=routing)
    without = layer(routing=routing)
    without.load_state_dict(with_shared.state_dict(), strict=False)
    x = torch.randn(4, 5, 16)
    torch.testing.assert_close(with_shared(x), without(x) + with_shared.shared_experts(x))
    if routing == "token_choice":
        assert with_shared.active_params() == without.active_params() + 3 * 16 * 8
    # Causality holds with it: the shared expert sees one token at a time.
    x2 = x.clone()
    x2[:, 3:] = torch.randn(4, 2, 16)
    torch.testing.assert_close(with_shared(x)[:, :3], with_shared(x2)[:, :3])


def test_active_params_after_the_transition_are_one_expert():
    continuous = layer()
    sparse = layer(routing="token_choice")
    assert continuous.active_params() == sum(p.numel() for p in continuous.parameters())
    assert sparse.active_params() == 16 * 4 + 3 * 16 * 24


def test_transitioned_routing_is_the_same_on_the_sorted_and_gathered_paths():
    mot = layer(routing="token_choice")
    x = torch.randn(2, 12, 16)  # 24 tokens: the sorted (training) path
    with torch.no_grad():
        batched = mot(x)
        one_by_one = torch.cat([mot(x[:, t:t + 1]) for t in range(12)], dim=1)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
