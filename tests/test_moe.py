"""Mixture of Experts: routing invariants, capacity, balance losses, the three expert paths,
decoding, and the public weight layout."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cached_decoding_matches, tiny_model_cfg

from condcomp.conditional import routing
from condcomp.conditional.moe import MoE, MoEOptions
from condcomp.errors import ConfigError
from condcomp.kernels.grouped_gemm import grouped_mm, grouped_mm_fast, grouped_mm_reference
from condcomp.layers import MLP
from condcomp.model import TransformerLM


def naive_moe(layer: MoE, x_TD: torch.Tensor, ids_TK, weights_TK) -> torch.Tensor:
    """Token by token, slot by slot: y_t = sum_j w_tj * expert_{e_tj}(x_t)."""
    ex = layer.experts
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(ids_TK.shape[1]):
            e = int(ids_TK[t, j])
            h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
            y[t] += weights_TK[t, j] * (h @ ex.w2[e])
    return y


def make_moe(**kw) -> MoE:
    defaults = dict(d_model=16, d_expert=24, num_experts=4, top_k=2, z_loss_coef=0.0,
                    load_balance_coef=0.0)
    defaults.update(kw)
    return MoE(**defaults)


# --------------------------------------------------------------- contract


def test_weight_layout_is_the_public_contract():
    moe = MoE(d_model=16, d_expert=24, num_experts=4, top_k=1, num_shared_experts=2)
    assert moe.router.weight.shape == (4, 16) and moe.router.bias is None
    assert moe.experts.w1.shape == (4, 16, 24)
    assert moe.experts.w2.shape == (4, 24, 16)
    assert moe.experts.w3.shape == (4, 16, 24)
    assert isinstance(moe.shared_experts, MLP) and moe.shared_experts.w1.shape == (16, 48)
    names = {n for n, _ in moe.named_parameters()}
    assert {"router.weight", "experts.w1", "experts.w2", "experts.w3",
            "shared_experts.w1", "shared_experts.w2", "shared_experts.w3"} == names


@pytest.mark.parametrize("options", [dict(top_k=2, num_shared_experts=1),
                                     dict(routing_mode="expert_choice", capacity_factor=2.0)])
def test_output_is_in_the_compute_dtype_like_the_dense_mlp(options):
    # Under autocast the dense FFN returns bf16; an MoE in its slot returns the same dtype
    # (an fp32 copy would double the bytes its output and its gradient move).
    moe, mlp = make_moe(**options).train(), MLP(16, 24, "swiglu")
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_dense = moe(x), mlp(x)
    assert y.dtype == y_dense.dtype == torch.bfloat16
    assert moe(x).dtype == torch.float32  # no autocast: fp32 throughout


@pytest.mark.parametrize("normalize", [False, True])
def test_token_choice_output_matches_the_definition(normalize):
    moe = make_moe(normalize_topk=normalize).train()
    x = torch.randn(2, 5, 16)
    y = moe(x)
    x_TD = x.reshape(-1, 16)
    probs = torch.softmax(moe.router(x_TD).float(), -1)
    top = probs.topk(2, dim=-1)
    w = top.values / top.values.sum(-1, keepdim=True) if normalize else top.values
    torch.testing.assert_close(y.reshape(-1, 16), naive_moe(moe, x_TD, top.indices, w),
                               atol=1e-5, rtol=1e-5)


def test_k_distinct_experts_and_probability_weights():
    probs = torch.softmax(torch.randn(50, 8), -1)
    choice = routing.token_choice(probs, 3)
    assert all(len(set(row.tolist())) == 3 for row in choice.expert_ids_TK)
    torch.testing.assert_close(choice.weights_TK, probs.gather(1, choice.expert_ids_TK))
    normed = routing.token_choice(probs, 3, normalize_topk=True)
    torch.testing.assert_close(normed.weights_TK.sum(-1), torch.ones(50))


# --------------------------------------------------------------- capacity


def test_capacity_is_respected_and_first_choices_come_first():
    # Every token prefers expert 0, then 1, then 2, then 3.
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).repeat(6, 1)
    choice = routing.apply_capacity(routing.token_choice(probs, 2), num_experts=4, capacity=3)
    kept = choice.kept_TK
    # Expert 0 takes the first three tokens' first choices; expert 1 the first three seconds.
    assert kept[:, 0].tolist() == [True] * 3 + [False] * 3
    assert kept[:, 1].tolist() == [True] * 3 + [False] * 3
    assert (choice.weights_TK[~kept] == 0).all()
    load = routing.count_per_expert(choice.expert_ids_TK, 4, kept.long())
    assert (load <= 3).all()


def test_dropped_tokens_pass_through_unchanged():
    torch.manual_seed(1)
    cfg = tiny_model_cfg(ffn=dict(kind="moe", options=dict(num_experts=4, top_k=1,
                                                           capacity_factor=0.25)))
    model = TransformerLM(cfg).train()
    layer = model.layers[0].block.ffn
    x = torch.randn(2, 8, 32)
    y = layer(x)
    untouched = (y.reshape(-1, 32).abs().sum(-1) == 0)
    # capacity = ceil(0.25 * 16 * 1 / 4) = 1 token per expert: at most 4 tokens processed.
    assert untouched.sum() >= 12
    assert float(layer.stats["dropped_fraction"]) == pytest.approx(untouched.float().mean().item())


def test_no_token_left_behind_reroutes_to_the_next_choice_with_room():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).repeat(6, 1)
    capped = routing.apply_capacity(routing.token_choice(probs, 1), num_experts=4, capacity=2)
    assert capped.kept_TK.sum() == 2
    rerouted = routing.reroute_overflow(capped, probs, capacity=2)
    assert rerouted.kept_TK.all()
    assert rerouted.expert_ids_TK[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(rerouted.weights_TK[:, 0], torch.tensor([.4, .4, .3, .3, .2, .2]))
    load = routing.count_per_expert(rerouted.expert_ids_TK, 4)
    assert (load <= 2).all()


def test_expert_choice_takes_exactly_its_quota():
    moe = make_moe(routing_mode="expert_choice", capacity_factor=2.0, top_k=1).train()
    x = torch.randn(2, 8, 16)
    moe(x)
    # 16 tokens, 4 experts, factor 2: each expert takes 8 tokens.
    torch.testing.assert_close(moe.stats["tokens_per_expert"], torch.full((4,), 0.25))
    probs = torch.softmax(torch.randn(16, 4), -1)
    idx, w = routing.expert_choice(probs, 8)
    assert idx.shape == (4, 8)
    assert all(len(set(row.tolist())) == 8 for row in idx)
    torch.testing.assert_close(w, probs.t().gather(1, idx))


def test_expert_choice_decodes_causally_by_token_choice():
    moe = make_moe(routing_mode="expert_choice", capacity_factor=2.0, top_k=1).eval()
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        full = moe(x)
        one = moe(x[:, 3:4])
    torch.testing.assert_close(full[:, 3:4], one, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------- losses


def test_load_balance_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    ids = probs.argmax(-1, keepdim=True)  # experts 0, 0, 2, 0
    # f = (3/4, 0, 1/4); P = mean probs = (0.475, 0.25, 0.275); loss = 3 * (0.35625 + 0.06875)
    assert routing.load_balance_loss(probs, ids).item() == pytest.approx(3 * 0.425)
    uniform = torch.full((4, 4), 0.25)
    ids = torch.tensor([[0], [1], [2], [3]])
    assert routing.load_balance_loss(uniform, ids).item() == pytest.approx(1.0)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4.
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert routing.router_z_loss(logits).item() == pytest.approx(expected)


def test_aux_loss_combines_the_coefficients():
    moe = make_moe(load_balance_coef=0.5, z_loss_coef=0.25).train()
    moe(torch.randn(2, 4, 16))
    expected = 0.5 * moe.stats["load_balance_loss"] + 0.25 * moe.stats["z_loss"]
    torch.testing.assert_close(moe.aux_loss, expected)


def test_padding_does_not_count():
    moe = make_moe(load_balance_coef=1.0, top_k=1).train()
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[True, True, True, False, False, False]])
    y = moe(x, padding_mask_BT=mask)
    assert (y[0, 3:] == 0).all()
    assert moe.stats["tokens_per_expert"].sum().item() == pytest.approx(1.0)
    ref = make_moe(load_balance_coef=1.0, top_k=1).train()
    ref.load_state_dict(moe.state_dict())
    ref(x[:, :3])
    torch.testing.assert_close(moe.aux_loss, ref.aux_loss)


@pytest.mark.parametrize("options", [dict(top_k=2, capacity_factor=1.25),
                                     dict(num_noop_experts=1),
                                     dict(routing_mode="expert_choice", capacity_factor=1.0)])
def test_an_all_padding_batch_has_zero_statistics_not_nan(options):
    moe = make_moe(**options)
    for training in (True, False):
        moe.train(training)
        moe(torch.randn(2, 5, 16), padding_mask_BT=torch.zeros(2, 5, dtype=torch.bool))
        assert all(torch.as_tensor(value).isfinite().all() for value in moe.stats.values())
        for key in ("dropped_fraction", "router_entropy", "noop_fraction"):
            assert float(moe.stats.get(key, 0.0)) == 0.0, key
        assert moe.aux_loss.item() == 0


# --------------------------------------------------------------- gradients and NaN


def test_gradients_reach_the_router_and_experts():
    moe = make_moe(load_balance_coef=1e-2, z_loss_coef=1e-3).train()
    y = moe(torch.randn(2, 6, 16))
    (y.pow(2).sum() + moe.aux_loss).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.w1.grad.abs().sum() > 0


def test_empty_experts_never_make_nans():
    moe = make_moe(top_k=1, load_balance_coef=1e-2, z_loss_coef=1e-3).train()
    with torch.no_grad():  # the router sends every token to expert 0
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    x = torch.rand(2, 5, 16) + 0.5
    y = moe(x)
    (y.sum() + moe.aux_loss).backward()
    assert torch.isfinite(y).all()
    for p in moe.parameters():
        assert torch.isfinite(p.grad).all()
    assert moe.stats["tokens_per_expert"][0] == 1.0


# --------------------------------------------------------------- paths


def test_gathered_path_equals_sorted_path():
    moe = make_moe(top_k=2).eval()
    x = torch.randn(1, 3, 16)  # 6 slots: the gathered (decode) path
    with torch.no_grad():
        gathered = moe(x)
        probs = torch.softmax(moe.router(x.reshape(-1, 16)).float(), -1)
        choice = routing.token_choice(probs, 2)
        combined = moe.experts.forward_dispatched(x.reshape(-1, 16), choice.expert_ids_TK,
                                                  choice.weights_TK, choice.kept_TK)
    torch.testing.assert_close(gathered.reshape(-1, 16), combined, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_cpu_decode_products_equal_the_gathered_weights_product(activation):
    """On the CPU the gathered path reads each expert's rows in place (embedding_bag sums);
    forward and backward equal the products with the experts' weights gathered first."""
    from condcomp.conditional.experts import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(5, 16, 24, activation=activation)
    experts.init_weights(0.2, 0.2)
    x = torch.randn(6, 16, requires_grad=True)
    ids = torch.tensor([4, 0, 0, 3, 1, 4])
    out = experts.forward_gathered(x, ids)
    w1, w2, w3 = experts.w1[ids], experts.w2[ids], experts.w3
    gate = torch.bmm(x.unsqueeze(1), w1)
    up = torch.bmm(x.unsqueeze(1), w3[ids]) if w3 is not None else None
    ref = torch.bmm(experts._hidden(gate, up), w2).squeeze(1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *experts.parameters()], grad)
    want = torch.autograd.grad(ref, [x, *experts.parameters()], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # bf16 activations (autocast) against fp32 weights: cast back
        assert experts.forward_gathered(x.bfloat16(), ids).dtype == torch.bfloat16


def test_grouped_mm_reference_by_hand():
    x = torch.randn(7, 4)
    w = torch.randn(3, 4, 5)
    offsets = torch.tensor([2, 2, 6])  # expert 1 empty; row 6 belongs to no expert
    out = grouped_mm_reference(x, w, offsets)
    torch.testing.assert_close(out[:2], x[:2] @ w[0])
    torch.testing.assert_close(out[2:6], x[2:6] @ w[2])
    assert (out[6] == 0).all()
    torch.testing.assert_close(grouped_mm(x, w, offsets), out)  # the CPU takes the reference


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is newer")
def test_fast_path_on_cpu_runs_grouped_mm_and_equals_the_reference():
    # What `bench moe --count-bytes` compiles on the CPU: the CUDA kernel sequence, in bf16.
    from condcomp.kernels.grouped_gemm import fast_path_on_cpu

    torch.manual_seed(0)
    offsets = torch.cumsum(torch.tensor([5, 0, 11, 8]), 0)  # every row in a group
    x = torch.randn(24, 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    g = torch.randn(24, 8)
    with fast_path_on_cpu():
        fast = grouped_mm(x, w, offsets, all_rows=True)
    assert fast.dtype == torch.bfloat16  # the fast path, not the fp32 reference
    (fast.float() * g).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = grouped_mm_reference(x, w, offsets)
    (ref * g).sum().backward()
    torch.testing.assert_close(fast.float(), ref, atol=0.15, rtol=2e-2)
    torch.testing.assert_close(gx, x.grad, atol=0.15, rtol=2e-2)
    torch.testing.assert_close(gw, w.grad, atol=0.15, rtol=2e-2)
    assert grouped_mm(x, w, offsets).dtype == torch.float32  # outside: the reference again


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_fast_path_equals_reference_forward_and_backward():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm needs Hopper or newer")
    torch.manual_seed(0)
    counts = torch.tensor([37, 0, 128, 5, 64, 1, 0, 20])
    offsets = torch.cumsum(counts, 0).cuda()
    x = torch.randn(260, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 64, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(260, 96, device="cuda", dtype=torch.bfloat16)
    fast = grouped_mm_fast(x, w, offsets)
    (fast * g).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = grouped_mm_reference(x.float(), w.float(), offsets)
    (ref * g.float()).sum().backward()
    torch.testing.assert_close(fast.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gx.float(), x.grad.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw.float(), w.grad.float(), atol=5e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("options", [dict(top_k=2), dict(top_k=1, capacity_factor=1.0)])
def test_moe_layer_on_cuda_equals_the_cpu_reference(options):
    # Dropless, and with capacity (dropped slots ride in the last expert's group as zeros).
    torch.manual_seed(0)
    cpu = make_moe(d_model=64, d_expert=128, num_experts=8, **options).train()
    gpu = make_moe(d_model=64, d_expert=128, num_experts=8, **options).cuda().train()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 64, 64)
    y_cpu = cpu(x)
    y_cpu.square().sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_gpu = gpu(x.cuda())
    y_gpu.float().square().sum().backward()
    torch.testing.assert_close(y_gpu.float().cpu(), y_cpu, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(gpu.experts.w1.grad.cpu(), cpu.experts.w1.grad, atol=5e-2,
                               rtol=5e-2)


# --------------------------------------------------------------- in the model


@pytest.mark.parametrize("options", [
    dict(num_experts=4, top_k=1),
    dict(num_experts=4, top_k=2, normalize_topk=True, num_shared_experts=1),
    dict(granularity=4, expansion=2),
    dict(num_experts=4, routing="expert_choice", capacity_factor=2.0),
])
def test_cached_decoding_equals_full_forward(options):
    cfg = tiny_model_cfg(ffn=dict(kind="moe", layers="odd", options=options))
    assert_cached_decoding_matches(TransformerLM(cfg), torch.randint(0, 97, (2, 20)), prefill=7)


def test_fine_grained_active_flops_equal_the_dense_ffn():
    dense = TransformerLM(tiny_model_cfg(d_ff=64))
    fine = TransformerLM(tiny_model_cfg(d_ff=64, ffn=dict(
        kind="moe", options=dict(granularity=8, expansion=4))))
    moe = fine.layers[0].block.ffn
    assert (moe.num_experts, moe.top_k, moe.experts.d_expert) == (32, 8, 8)
    dense_ffn = dense.layers[0].block.ffn.flops_per_token()
    assert moe.experts_per_token * moe.experts.flops_per_expert_token() == dense_ffn
    router = 2 * 32 * 32
    assert fine.flops_per_token(16) == pytest.approx(dense.flops_per_token(16) + 2 * router)
    assert fine.num_params() > dense.num_params()
    # Active: router + 8 of 32 experts = the dense FFN's parameters + the router.
    assert fine.num_params(active_only=True) == dense.num_params() + 2 * 32 * 32


def test_aux_loss_free_bias_moves_toward_underloaded_experts():
    moe = make_moe(top_k=1, bias_update_rate=0.1).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    moe(torch.rand(2, 6, 16) + 0.5)  # all tokens to expert 0
    moe.after_optimizer_step()
    bias = moe.selection_bias
    assert bias[0] < 0 and (bias[1:] > 0).all()
    assert "selection_bias" in moe.state_dict()  # saved with checkpoints


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="top_k = 9 must be between 1 and num_experts = 8"):
        tiny_model_cfg(ffn=dict(kind="moe", options=dict(num_experts=8, top_k=9))).validate()
    with pytest.raises(ConfigError, match="expert choice needs capacity_factor"):
        tiny_model_cfg(ffn=dict(kind="moe", options=dict(routing="expert_choice"))).validate()
    with pytest.raises(ConfigError, match="granularity = 5 does not divide"):
        tiny_model_cfg(ffn=dict(kind="moe", options=dict(granularity=5, expansion=2))).validate()
    with pytest.raises(ConfigError, match="unknown key model.ffn.experts"):
        tiny_model_cfg(ffn=dict(kind="moe", options=dict(experts=8))).validate()
    assert MoEOptions().validate(tiny_model_cfg()) is None


def test_moe_model_trains_and_logs_routing_statistics(tmp_path):
    from condcomp.config import load_config
    from condcomp.runs import load_run, read_metrics
    from condcomp.train import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(("to be or not to be that is the question " * 40
                                           + f"doc {i}\n") * 3)
    cfg = load_config(None, [
        f'data.corpus="{corpus}"', f'data.cache_dir="{tmp_path / "cache"}"',
        f'out_dir="{tmp_path / "run"}"', "train.max_steps=12", "train.batch_size=4",
        "train.seq_len=32", "train.eval_every=12", "train.eval_tokens=256", "train.log_every=4",
        "train.warmup_steps=2", "train.progress=false", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=4", "model.d_ff=64", "model.max_seq_len=32", "model.ffn.kind=moe",
        "model.ffn.layers=[1]", "model.ffn.num_experts=4", "model.ffn.capacity_factor=1.0",
        "model.ffn.bias_update_rate=0.01"])
    result = train(cfg, log=lambda s: None)
    rows = [r for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    load = rows[-1]["layers.1.block.ffn.tokens_per_expert"]
    assert len(load) == 4 and sum(load) == pytest.approx(1.0)
    assert 0 <= rows[-1]["layers.1.block.ffn.dropped_fraction"] < 1
    assert rows[-1]["aux_loss"] > 0
    moe = load_run(result.run_dir).model.layers[1].block.ffn
    assert moe.selection_bias.abs().sum() > 0  # the aux-loss-free bias moved and was saved


def _sync_free_grouped_mm(x_MK, w_EKN, offsets_E, all_rows=False):
    """A stand-in for the CUDA grouped GEMM with no host sync (gathers each row's weights)."""
    rows = torch.arange(x_MK.shape[0])
    expert_M = torch.searchsorted(offsets_E, rows, right=True)
    valid_M1 = (expert_M < w_EKN.shape[0]).unsqueeze(1)
    out = torch.bmm(x_MK.unsqueeze(1), w_EKN[expert_M.clamp_max(w_EKN.shape[0] - 1)]).squeeze(1)
    return torch.where(valid_M1, out, 0.0)


@pytest.mark.parametrize("options", [
    dict(num_experts=4, top_k=2),
    dict(num_experts=4, top_k=1, capacity_factor=1.0, num_shared_experts=1),
    dict(num_experts=4, routing="expert_choice", capacity_factor=2.0),
    # The router options (DeepSeek-V3, Qwen2-MoE; per-sequence capacity, drops by
    # probability, the global-batch balance count).
    dict(num_experts=8, top_k=2, score="sigmoid", normalize_topk=True, route_scale=2.5,
         expert_groups=4, groups_per_token=2, bias_update_rate=1e-3, num_shared_experts=1,
         shared_gate="sigmoid", balance_scope="sequence"),
    dict(num_experts=4, top_k=2, capacity_factor=1.0, capacity_scope="sequence",
         drop_policy="probability", balance_scope="global_batch"),
])
def test_the_moe_hot_path_compiles_without_graph_breaks(options, monkeypatch):
    # On the CPU the reference grouped GEMM reads the offsets on the host (a graph break by
    # design); on CUDA torch._grouped_mm does not. Everything else must trace as one graph.
    import condcomp.conditional.experts as experts

    torch._dynamo.reset()
    monkeypatch.setattr(experts, "grouped_mm", _sync_free_grouped_mm)
    model = TransformerLM(tiny_model_cfg(ffn=dict(kind="moe", options=options))).train()
    x = torch.randint(0, 97, (2, 16))
    explanation = torch._dynamo.explain(model)(x, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_a_zero_capacity_factor_means_dropless_in_toml():
    cfg = tiny_model_cfg(ffn=dict(kind="moe", options=dict(capacity_factor=0)))
    cfg.validate()
    assert TransformerLM(cfg).layers[0].block.ffn.capacity_factor is None


@pytest.mark.parametrize("k", [1, 3])
def test_dispatch_and_combine_match_plain_indexing_forward_and_backward(k):
    from condcomp.kernels.permute import combine_rows, dispatch_rows

    T, D = 11, 5
    order = torch.randperm(T * k)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(T * k)
    x = torch.randn(T, D, requires_grad=True)
    g_out = torch.randn(T * k, D)

    def run_dispatch(dispatch):
        x.grad = None
        mid = dispatch(x)
        (mid * g_out).sum().backward()
        return mid.detach(), x.grad.clone()

    mid, gx = run_dispatch(lambda x: dispatch_rows(x, order, inverse, k))
    want_mid, want_gx = run_dispatch(lambda x: x[order // k])
    torch.testing.assert_close(mid, want_mid)
    torch.testing.assert_close(gx, want_gx)

    out_ND = torch.randn(T * k, D)
    weights_TK = torch.rand(T, k)
    g_y = torch.randn(T, D)

    def run_combine(combine):
        o, w = out_ND.clone().requires_grad_(True), weights_TK.clone().requires_grad_(True)
        y = combine(o, w)
        (y * g_y).sum().backward()
        return y.detach(), o.grad, w.grad

    got = run_combine(lambda o, w: combine_rows(o, w, order, inverse))
    want = run_combine(lambda o, w: (o[inverse].view(T, k, D) * w.unsqueeze(-1)).sum(1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
