"""MoE router options: sigmoid scores, route scale, group-limited routing (DeepSeek-V3), the
gated shared expert (Qwen2-MoE), capacity per sequence (HF Switch), drop by probability
(Megatron-LM), and the balance loss per sequence (DeepSeek-V3) or over the global batch
(Qiu et al. 2025). HF's modules get the layer's weights copied in and must give the same
outputs, gradients and losses."""

import copy

import pytest
import torch
from helpers import tiny_model_cfg
from ranks import run_ranks

from condcomp.conditional import routing
from condcomp.conditional.moe import MoE, MoEOptions, _build
from condcomp.errors import ConfigError
from condcomp.model import TransformerLM


def _transformers():
    """The HF comparisons need transformers; the rest of the file does not."""
    return pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-4)


def _copy_experts(hf_experts, moe: MoE) -> None:
    """HF's stacked experts: ``gate_up_proj[e]`` = ``[w1[e]^T; w3[e]^T]``, ``down_proj[e]`` =
    ``w2[e]^T``."""
    hf_experts.gate_up_proj.copy_(torch.cat((moe.experts.w1, moe.experts.w3), 2).transpose(1, 2))
    hf_experts.down_proj.copy_(moe.experts.w2.transpose(1, 2))


def _copy_mlp(hf_mlp, mlp) -> None:
    hf_mlp.gate_proj.weight.copy_(mlp.w1.t())
    hf_mlp.up_proj.weight.copy_(mlp.w3.t())
    hf_mlp.down_proj.weight.copy_(mlp.w2.t())


def _assert_same_output_and_input_grad(moe, hf, shape: tuple[int, int, int]) -> torch.Tensor:
    """The two layers' outputs, and the gradients of a random probe of them with respect to the
    input, are equal; returns the input."""
    g = torch.Generator().manual_seed(1)
    x, probe = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    y, x_grad = _backward(moe, x, probe)
    y_hf, x_grad_hf = _backward(hf, x, probe)
    torch.testing.assert_close(y, y_hf, **TOL)
    torch.testing.assert_close(x_grad, x_grad_hf, **TOL)
    return x


def _backward(module, x_BTD: torch.Tensor, probe_BTD: torch.Tensor):
    x_BTD = x_BTD.clone().requires_grad_()
    y_BTD = module(x_BTD)
    (y_BTD * probe_BTD).sum().backward()
    return y_BTD.detach(), x_BTD.grad


# --------------------------------------------------------------- DeepSeek-V3


def _deepseek_pair(groups: int, groups_per_token: int, normalize: bool):
    transformers = _transformers()
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    moe = MoE(16, 12, num_experts=8, top_k=3, score="sigmoid", normalize_topk=normalize,
              route_scale=2.5, expert_groups=groups, groups_per_token=groups_per_token,
              num_shared_experts=1, bias_update_rate=1e-3, router_init_scale=4.0,
              load_balance_coef=0.0, z_loss_coef=0.0)
    moe.init_weights(0.3, 0.3)
    with torch.no_grad():  # a correction bias of the size that changes choices
        moe.selection_bias.copy_(torch.randn(8) * 0.2)
    cfg = transformers.DeepseekV3Config(
        hidden_size=16, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3,
        n_group=groups, topk_group=groups_per_token or groups, norm_topk_prob=normalize,
        routed_scaling_factor=2.5, n_shared_experts=1, hidden_act="silu")
    hf = DeepseekV3MoE(cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
        hf.gate.e_score_correction_bias.copy_(moe.selection_bias)
        _copy_experts(hf.experts, moe)
        _copy_mlp(hf.shared_experts, moe.shared_experts)
    return moe, hf


@pytest.mark.parametrize("groups,groups_per_token,normalize", [(4, 2, True), (2, 1, False),
                                                               (1, 0, True)])
@pytest.mark.parametrize("train", [True, False])
def test_deepseek_v3_moe_block_forward_and_backward(groups, groups_per_token, normalize, train):
    moe, hf = _deepseek_pair(groups, groups_per_token, normalize)
    moe.train(train), hf.train(train)
    _assert_same_output_and_input_grad(moe, hf, (2, 7, 16))
    torch.testing.assert_close(moe.router.weight.grad, hf.gate.weight.grad, **TOL)
    torch.testing.assert_close(moe.experts.w2.grad.transpose(1, 2), hf.experts.down_proj.grad,
                               **TOL)
    torch.testing.assert_close(moe.shared_experts.w1.grad.t(),
                               hf.shared_experts.gate_proj.weight.grad, **TOL)


def test_group_limit_changes_the_choice_and_keeps_it_inside_the_groups():
    moe, _ = _deepseek_pair(4, 2, True)
    x_TD = torch.randn(40, 16)
    scores_TE = torch.sigmoid(moe.router(x_TD))
    limited = routing.token_choice(scores_TE, 2, True, moe.selection_bias, 4, 1)
    groups_TK = limited.expert_ids_TK // 2
    assert (groups_TK == groups_TK[:, :1]).all()  # one group per token: its 2 experts...
    free = routing.token_choice(scores_TE, 2, True, moe.selection_bias)
    assert not torch.equal(free.expert_ids_TK, limited.expert_ids_TK)  # ...which matters
    # The bias picks, the unbiased scores weigh (DeepSeek-V3 eq. 16 and 13).
    w = scores_TE.gather(1, limited.expert_ids_TK)
    torch.testing.assert_close(limited.weights_TK, w / w.sum(-1, keepdim=True))


def test_sigmoid_scores_move_the_aux_loss_free_bias_toward_underloaded_experts():
    torch.manual_seed(0)
    moe = MoE(16, 12, 4, top_k=1, score="sigmoid", bias_update_rate=0.01).train()
    with torch.no_grad():
        moe.router.weight[0] += 1.0  # expert 0 takes most tokens
    moe(torch.randn(2, 8, 16).abs())
    load = moe._load_since_update.clone()
    moe.after_optimizer_step()
    assert torch.equal(moe.selection_bias, 0.01 * torch.sign(load.mean() - load))
    assert moe.selection_bias[load.argmax()] < 0


# --------------------------------------------------------------- Qwen2-MoE


@pytest.mark.parametrize("normalize", [False, True])
def test_qwen2_moe_sparse_block_with_its_gated_shared_expert(normalize):
    transformers = _transformers()
    from transformers.models.qwen2_moe.modeling_qwen2_moe import (
        Qwen2MoeSparseMoeBlock,
        load_balancing_loss_func,
    )

    torch.manual_seed(0)
    moe = MoE(16, 12, num_experts=6, top_k=2, normalize_topk=normalize, num_shared_experts=1,
              d_shared=20, shared_gate="sigmoid", router_init_scale=4.0, load_balance_coef=1.0,
              z_loss_coef=0.0).train()
    moe.init_weights(0.3, 0.3)
    assert moe.shared_gate.weight.shape == (1, 16) and moe.shared_gate.bias is None
    cfg = transformers.Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=12,
                                      shared_expert_intermediate_size=20, num_experts=6,
                                      num_experts_per_tok=2, norm_topk_prob=normalize)
    hf = Qwen2MoeSparseMoeBlock(cfg).train()
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
        _copy_experts(hf.experts, moe)
        _copy_mlp(hf.shared_expert, moe.shared_experts)
        hf.shared_expert_gate.weight.copy_(moe.shared_gate.weight)
    x = _assert_same_output_and_input_grad(moe, hf, (2, 5, 16))
    torch.testing.assert_close(moe.shared_gate.weight.grad, hf.shared_expert_gate.weight.grad,
                               **TOL)
    torch.testing.assert_close(moe.router.weight.grad, hf.gate.weight.grad, **TOL)
    # HF's (Mixtral's) balance loss sums f over the k choices: k times Switch's.
    hf_balance = load_balancing_loss_func((hf.gate(x)[0],), 6, 2)
    torch.testing.assert_close(2 * moe.stats["load_balance_loss"], hf_balance.detach())


# --------------------------------------------------------------- HF Switch


def test_hf_switch_capacity_per_sequence_and_its_losses():
    transformers = _transformers()
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
        load_balancing_loss_func,
        router_z_loss_func,
    )

    torch.manual_seed(0)
    # capacity = ceil(1.0 * 8 tokens * 1 / 4 experts) = 2 per sequence, HF's expert_capacity
    moe = MoE(16, 24, num_experts=4, top_k=1, activation="relu", capacity_factor=1.0,
              capacity_scope="sequence", balance_scope="sequence", router_init_scale=8.0,
              load_balance_coef=1.0, z_loss_coef=1.0).train()
    moe.init_weights(0.3, 0.3)
    cfg = transformers.SwitchTransformersConfig(
        d_model=16, d_ff=24, num_experts=4, expert_capacity=2, router_bias=False,
        router_jitter_noise=0.0, dense_act_fn="relu", dropout_rate=0.0, router_dtype="float32")
    hf = SwitchTransformersSparseMLP(cfg).train()
    with torch.no_grad():
        hf.router.classifier.weight.copy_(moe.router.weight)
        for e in range(4):
            hf.experts[f"expert_{e}"].wi.weight.copy_(moe.experts.w1[e].t())
            hf.experts[f"expert_{e}"].wo.weight.copy_(moe.experts.w2[e].t())
    batch = copy.deepcopy(moe)
    batch.capacity_scope = "batch"
    g = torch.Generator().manual_seed(1)
    x, probe = torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 16, generator=g)
    y, x_grad = _backward(moe, x, probe)
    y_hf, x_grad_hf = _backward(hf, x, probe)
    assert moe.stats["dropped_fraction"] > 0  # the capacity bites
    torch.testing.assert_close(y, y_hf, **TOL)
    torch.testing.assert_close(x_grad, x_grad_hf, **TOL)
    torch.testing.assert_close(moe.experts.w1.grad[1], hf.experts["expert_1"].wi.weight.grad.t(),
                               **TOL)
    logits = hf.router.classifier(x)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(moe.stats["z_loss"], router_z_loss_func(logits).detach())
    torch.testing.assert_close(moe.stats["load_balance_loss"],
                               load_balancing_loss_func(probs, probs.argmax(-1)).detach())
    # Per batch, the same tokens would fill the experts in another order.
    assert not torch.allclose(batch(x), y)


def test_capacity_per_sequence_counts_each_sequences_real_tokens():
    valid_T = torch.ones(12, dtype=torch.bool)
    valid_T[6:9] = False  # sequence 1: 3 padding tokens, then 3 real ones
    capacity = routing.sequence_capacity(valid_T, 2, 6, 1, 2, 1.0)
    assert capacity.tolist() == [3, 2]  # ceil(6 / 2), ceil(3 / 2)
    ids_TK = torch.zeros(12, 1, dtype=torch.long)  # every token wants expert 0
    choice = routing.TokenChoice(ids_TK, torch.ones(12, 1), torch.ones(12, 1, dtype=torch.bool))
    kept_T = routing.apply_capacity(choice, 2, capacity, valid_T, seq_len=6).kept_TK[:, 0]
    assert kept_T.tolist() == [True] * 3 + [False] * 3 + [False] * 3 + [True] * 2 + [False]
    assert routing.sequence_capacity(None, 2, 6, 1, 2, 1.0) == 3


# --------------------------------------------------------------- drop by probability


def test_drop_by_probability_drops_the_least_probable_slots_first():
    ids_TK = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0], [2, 0]])
    weights_TK = torch.tensor([[.5, .3], [.2, .1], [.6, .3], [.7, .25], [.4, .35]])
    choice = routing.TokenChoice(ids_TK, weights_TK, torch.ones_like(ids_TK, dtype=torch.bool))
    kept = routing.apply_capacity(choice, 3, 2, drop_policy="probability").kept_TK
    # expert 0's slots by weight: .6 (t2) .5 (t0) .35 (t4) .25 (t3) .2 (t1): t2 and t0 stay,
    # though t4's and t3's are second choices and t1's a first; expert 1: .7 .3 .1.
    assert kept.tolist() == [[True, True], [False, False], [True, True], [True, False],
                             [True, False]]
    # Position (GShard): every first choice before any second one, earlier tokens first.
    by_position = routing.apply_capacity(choice, 3, 2).kept_TK
    assert by_position[:, 0].tolist() == [True, True, False, True, True]


def test_drop_by_probability_in_the_layer_keeps_each_experts_top_weights():
    torch.manual_seed(0)
    moe = MoE(16, 12, 4, top_k=2, capacity_factor=0.5, drop_policy="probability",
              router_init_scale=4.0).train()
    x_TD = torch.randn(24, 16)
    probs_TE = torch.softmax(moe.router(x_TD), -1)
    choice = routing.token_choice(probs_TE, 2)
    kept = routing.apply_capacity(choice, 4, 6, drop_policy="probability")  # ceil(.5*24*2/4)
    for e in range(4):
        mine = choice.expert_ids_TK == e
        w_kept, w_dropped = choice.weights_TK[mine & kept.kept_TK], choice.weights_TK[
            mine & ~kept.kept_TK]
        assert len(w_kept) == min(6, int(mine.sum()))
        if len(w_dropped):
            assert w_dropped.max() <= w_kept.min()
    moe(x_TD.view(2, 12, 16))
    assert moe.stats["dropped_fraction"] > 0


# --------------------------------------------------------------- balance scopes


def test_sequence_balance_loss_by_hand():
    g = torch.Generator().manual_seed(3)
    probs_TE = torch.softmax(torch.randn(12, 4, generator=g), -1)
    ids_TK = probs_TE.topk(2, -1).indices
    valid_T = torch.ones(12, dtype=torch.bool)
    valid_T[9:] = False  # sequence 2 has 1 real token; a 4th would have none
    losses = []
    for s in range(3):
        rows = [t for t in range(4 * s, 4 * s + 4) if valid_T[t]]
        f = torch.zeros(4)
        for t in rows:
            for e in ids_TK[t]:
                f[e] += 1 / (2 * len(rows))
        P = probs_TE[rows].mean(0)
        losses.append(4 * (f * P).sum())
    expected = torch.stack(losses).mean()
    torch.testing.assert_close(routing.sequence_balance_loss(probs_TE, ids_TK, 4, valid_T),
                               expected)
    # One sequence: the micro-batch loss.
    torch.testing.assert_close(routing.sequence_balance_loss(probs_TE, ids_TK, 12),
                               routing.load_balance_loss(probs_TE, ids_TK))


def test_sigmoid_balance_normalises_the_scores_per_token():
    # DeepSeek-V3 eq. 19: P averages s / sum_j s, a distribution, so uniform routing gives 1.
    moe = MoE(16, 12, 4, top_k=2, score="sigmoid", balance_scope="sequence").train()
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(2, 8, 16))
    assert moe.stats["router_entropy"] == pytest.approx(torch.log(torch.tensor(4.0)).item())


def _global(**kw) -> MoE:
    torch.manual_seed(0)
    return MoE(16, 12, 4, top_k=2, balance_scope="global_batch", load_balance_coef=1.0,
               z_loss_coef=0.0, router_init_scale=4.0, **kw).train()


def test_global_batch_balance_accumulates_over_micro_batches_and_resets_after_the_step():
    moe = _global()
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    micro = copy.deepcopy(moe)
    micro.balance_scope = "micro_batch"
    moe(x1)
    micro(x1)  # the first micro-batch: f is its own
    torch.testing.assert_close(moe.aux_loss, micro.aux_loss)
    moe(x2)  # the second: f over both, P over the second
    ids = [torch.softmax(moe.router(x.view(-1, 16)), -1).topk(2, -1).indices for x in (x1, x2)]
    f = routing.count_per_expert(torch.cat(ids), 4).float() / 24 / 2
    P = torch.softmax(moe.router(x2.view(-1, 16)), -1).mean(0)
    torch.testing.assert_close(moe.aux_loss, 4 * (f * P).sum())
    moe.after_optimizer_step()
    moe(x2)
    micro(x2)
    torch.testing.assert_close(moe.aux_loss, micro.aux_loss)
    moe.eval()(x1)  # eval: the micro-batch's own f, nothing counted
    assert moe._balance_counts[-1] == 24


def _global_rank(rank: int, world_size: int, x_RBTD: torch.Tensor):
    moe = _global()
    moe(x_RBTD[rank])
    moe.aux_loss.backward()
    return moe.aux_loss.detach(), moe.router.weight.grad


def test_global_batch_balance_on_two_ranks_equals_one_process_on_the_whole_batch():
    # One micro-batch per rank: the all-reduced f is the concatenated batch's, so the ranks'
    # mean loss and mean gradient are the single process's on the whole batch.
    x_RBTD = torch.randn(2, 2, 6, 16, generator=torch.Generator().manual_seed(5))
    results = run_ranks(_global_rank, 2, x_RBTD)
    one = _global()
    one.balance_scope = "micro_batch"
    one(x_RBTD.reshape(4, 6, 16))
    one.aux_loss.backward()
    torch.testing.assert_close(sum(r[0] for r in results) / 2, one.aux_loss.detach())
    torch.testing.assert_close(sum(r[1] for r in results) / 2, one.router.weight.grad)


def test_the_model_starts_the_global_count_over_after_each_optimizer_step():
    ffn = dict(kind="moe", options=dict(num_experts=4, top_k=2, balance_scope="global_batch"))
    model = TransformerLM(tiny_model_cfg(ffn=ffn)).train()
    tokens = torch.randint(0, 97, (2, 8))
    for _ in range(2):  # two micro-batches of one step
        model(tokens, tokens)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert [int(m._balance_counts[-1]) for m in layers] == [2 * 16 * 2] * len(layers)
    model.after_optimizer_step()
    assert all(not m._balance_counts.any() for m in layers)


# --------------------------------------------------------------- config


def test_options_reach_the_layer_from_the_config():
    cfg = tiny_model_cfg()
    opts = MoEOptions(num_experts=8, top_k=2, score="sigmoid", route_scale=2.5, expert_groups=4,
                      groups_per_token=2, num_shared_experts=1, shared_gate="sigmoid",
                      capacity_factor=1.25, capacity_scope="sequence", drop_policy="probability",
                      balance_scope="global_batch")
    opts.validate(cfg)
    moe = _build(opts, cfg, 0)
    assert (moe.score, moe.route_scale, moe.expert_groups, moe.groups_per_token) == (
        "sigmoid", 2.5, 4, 2)
    assert (moe.capacity_scope, moe.drop_policy, moe.balance_scope) == (
        "sequence", "probability", "global_batch")
    assert "shared_gate.weight" in dict(moe.named_parameters())
    moe.train()(torch.randn(2, 8, 32)).sum().backward()
    assert moe.shared_gate.weight.grad is not None


@pytest.mark.parametrize("options,match", [
    (dict(num_experts=6, expert_groups=4), "expert_groups = 4 does not divide"),
    (dict(expert_groups=2, groups_per_token=3), "groups_per_token = 3 is more than"),
    (dict(num_experts=8, top_k=3, expert_groups=4, groups_per_token=1),
     "top_k = 3 is more than the 2 experts"),
    (dict(num_experts=8, expert_groups=8), "expert_groups = 8 leaves fewer than 2 experts"),
    (dict(routing="expert_choice", capacity_factor=2.0, score="sigmoid"),
     "score = 'sigmoid' needs .*token_choice"),
    (dict(routing="expert_choice", capacity_factor=2.0, balance_scope="sequence"),
     "balance_scope = 'sequence' needs"),
    (dict(shared_gate="sigmoid"), "shared_gate = 'sigmoid' gates the shared experts"),
    (dict(capacity_scope="sequence"), "capacity_scope = 'sequence' shapes token-choice"),
    (dict(drop_policy="probability"), "drop_policy = 'probability' shapes token-choice"),
    (dict(capacity_factor=1.0, capacity_scope="sequence", no_token_left_behind=True),
     "no_token_left_behind re-routes"),
    (dict(num_experts=8, expert_groups=2, num_noop_experts=2), "expert_groups > 1 .*noop"),
    (dict(routing="expert_choice", capacity_factor=2.0, num_experts=8, expert_groups=2),
     "expert_groups > 1 .*expert_choice"),
    (dict(num_experts=8, expert_groups=2, capacity_factor=1.0, no_token_left_behind=True),
     "expert_groups > 1 .*no_token_left_behind"),
    (dict(score="tanh"), "score = 'tanh' is unknown"),
    (dict(balance_scope="global"), "balance_scope = 'global' is unknown"),
])
def test_impossible_combinations_are_refused_naming_the_keys(options, match):
    cfg = tiny_model_cfg()
    with pytest.raises(ConfigError, match="model.ffn." + match):
        MoEOptions(**options).validate(cfg)
    layer = {"routing_mode" if k == "routing" else k: v for k, v in options.items()}
    layer.setdefault("num_experts", 8)
    with pytest.raises(ConfigError, match="MoE." + match):
        MoE(16, 12, **layer)


def test_defaults_change_nothing():
    torch.manual_seed(0)
    plain = MoE(16, 12, 4, top_k=2, capacity_factor=0.75).train()
    same = copy.deepcopy(plain)
    assert same.shared_gate is None
    for option, value in dict(score="softmax", route_scale=1.0, expert_groups=1,
                              groups_per_token=0, capacity_scope="batch",
                              drop_policy="position", balance_scope="micro_batch").items():
        assert getattr(same, option) == value
    x = torch.randn(2, 8, 16)
    assert torch.equal(plain(x), same(x)) and torch.equal(plain.aux_loss, same.aux_loss)
    assert "shared_gate.weight" not in plain.state_dict()


def test_a_loaded_selection_bias_routes_without_updates():
    """DeepSeek-V3's correction bias, loaded into a layer that does not update it
    (bias_update_rate = 0), still picks the experts; the unbiased scores still weigh them."""
    torch.manual_seed(0)
    layer = MoE(16, 32, 4, top_k=1, score="sigmoid").eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        layer.selection_bias[2] = 10.0
        layer(x)
    assert layer.stats["tokens_per_expert"].tolist() == [0.0, 0.0, 1.0, 0.0]


ROUTERS = {
    "deepseek_v3": ["model.ffn.score='sigmoid'", "model.ffn.normalize_topk=true",
                    "model.ffn.route_scale=2.5", "model.ffn.expert_groups=2",
                    "model.ffn.groups_per_token=1", "model.ffn.top_k=2",
                    "model.ffn.bias_update_rate=0.01", "model.ffn.balance_scope='sequence'",
                    "model.ffn.num_shared_experts=1"],
    "qwen2_moe": ["model.ffn.num_shared_experts=1", "model.ffn.shared_gate='sigmoid'",
                  "model.ffn.top_k=2", "model.ffn.balance_scope='global_batch'",
                  "train.grad_accum=2"],
    "switch_per_sequence": ["model.ffn.capacity_factor=1.0",
                            "model.ffn.capacity_scope='sequence'",
                            "model.ffn.drop_policy='probability'"],
}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_variant_trains_and_decodes(router, corpus, tmp_path):
    """Each released router, end to end: a short run that lowers its loss and logs its
    statistics, then cached decoding of the trained model equal to a full forward."""
    from helpers import assert_cached_decoding_matches, tiny_overrides

    from condcomp.config import load_config
    from condcomp.runs import load_run, read_metrics
    from condcomp.train import train

    sets = [*tiny_overrides(corpus, tmp_path, router, steps=8), "model.ffn.kind='moe'",
            "model.ffn.num_experts=4", "model.dropout=0.0", *ROUTERS[router]]
    result = train(load_config(None, sets), log=lambda _m: None)
    rows = [r for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert sum(rows[-1]["layers.1.block.ffn.tokens_per_expert"]) == pytest.approx(1.0)
    model = load_run(result.run_dir).model
    assert_cached_decoding_matches(model, torch.randint(0, 97, (2, 12)), prefill=5)
