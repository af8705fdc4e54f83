"""Expert parallelism (condcomp.distributed.expert_parallel): an MoE layer and a whole model on
2 gloo ranks with EP degree 2 against the same weights in one process.

The single-process reference runs each rank's batch separately (capacity and expert choice
route per rank: the routing group is the rank's micro-batch). The distributed loss is the sum
of the ranks' losses, so each rank's router, shared-expert and input gradients equal the
reference's gradient of that rank's loss, and each rank's expert shard equals the matching
rows of the reference's gradient of the summed loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model_cfg
from ranks import run_ranks

from condcomp.conditional.moe import MoE
from condcomp.distributed.context import DistContext, context_for_group
from condcomp.distributed.expert_parallel import (
    expert_major_order,
    shard_experts,
    split_sizes,
)
from condcomp.distributed.options import DistConfig
from condcomp.errors import ConfigError
from condcomp.model import TransformerLM

WORLD = 2
# fp32; relative to the largest entry of the reference: the ranks sum in another order.
FWD_TOL, GRAD_TOL = 1e-6, 1e-5

# (name, MoE options, train mode, tokens per sequence, padding: "" none, "some" a few
# tokens of each rank, "rank 1" every token of rank 1, which then sends no row at all).
# E = 4 experts: rank 0 holds experts 0 and 1, rank 1 experts 2 and 3.
LAYER_CASES = [
    ("top-1 dropless", dict(top_k=1), True, 12, ""),
    ("top-2 dropless", dict(top_k=2, normalize_topk=True), True, 12, ""),
    ("top-2 capacity", dict(top_k=2, capacity_factor=0.75), True, 12, "some"),
    ("no token left behind", dict(top_k=1, capacity_factor=0.5, no_token_left_behind=True),
     True, 12, ""),
    ("expert choice", dict(routing_mode="expert_choice", capacity_factor=2.0), True, 12, ""),
    ("shared experts", dict(top_k=2, num_shared_experts=1, d_shared=8), True, 12, ""),
    ("no-op experts", dict(top_k=2, num_noop_experts=2, capacity_factor=1.5), True, 12, "some"),
    ("nothing to send from one rank", dict(top_k=2, capacity_factor=1.0), True, 12, "rank 1"),
    # Every slot picks experts 0 and 1 (the selection bias below): rank 1 gets no rows.
    ("zero rows to one rank", dict(top_k=2, bias_update_rate=0.1), True, 12, ""),
    # The router options route per rank, before the dispatch, as the rest of routing does.
    ("DeepSeek-V3 router, gated shared expert",
     dict(top_k=2, score="sigmoid", normalize_topk=True, route_scale=2.5, expert_groups=2,
          groups_per_token=1, num_shared_experts=1, d_shared=8, shared_gate="sigmoid",
          balance_scope="sequence"), True, 12, "some"),
    ("capacity per sequence, dropped by probability",
     dict(top_k=2, capacity_factor=0.75, capacity_scope="sequence", drop_policy="probability"),
     True, 12, "some"),
    # Few enough slots that one process would gather the experts' weights (decode path).
    ("eval, decode-sized", dict(top_k=2), False, 3, ""),
    ("eval, expert choice", dict(routing_mode="expert_choice", capacity_factor=2.0), False, 12,
     ""),
]


def _ep_context() -> DistContext:
    return context_for_group(DistConfig(ep=WORLD), "cpu")


def _assert_close(actual, expected, tol: float, what: str) -> None:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale + 1e-12, f"{what}: max error {err:.3g} at scale {scale:.3g}"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _expert_rows(rank: int, num_experts: int) -> slice:
    per_rank = num_experts // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _check_grads(case: str, ep_module, per_rank_ref: list[dict[str, torch.Tensor]], rank: int,
                 num_experts: int) -> None:
    """Each parameter's gradient on this rank against the reference (see the module doc)."""
    for name, param in ep_module.named_parameters():
        if hasattr(param, "to_local"):  # an expert shard: every rank's tokens reach it
            expected = sum(ref[name] for ref in per_rank_ref)[
                _expert_rows(rank, num_experts)]
        else:
            expected = per_rank_ref[rank][name]
        assert param.grad is not None, f"{case}: no gradient for {name}"
        _assert_close(_local(param.grad), expected, GRAD_TOL, f"{case}, grad of {name}")


# ----------------------------------------------------------------------------- the layer


def _layer_inputs(T: int, padding: str):
    g = torch.Generator().manual_seed(1)
    x_RBTD = torch.randn(WORLD, 2, T, 16, generator=g)
    probe_RBTD = torch.randn(WORLD, 2, T, 16, generator=g)  # loss = (y * probe).sum()
    mask_RBT = None
    if padding:
        mask_RBT = torch.ones(WORLD, 2, T, dtype=torch.bool)
        mask_RBT[0, 1, -3:] = False
        mask_RBT[1, 0, -5:] = False
        if padding == "rank 1":
            mask_RBT[1] = False
    return x_RBTD, probe_RBTD, mask_RBT


def _run_layer(layer: MoE, x_BTD, probe_BTD, mask_BT):
    x_BTD = x_BTD.clone().requires_grad_()
    y_BTD = layer(x_BTD, mask_BT)
    loss = (y_BTD * probe_BTD).sum() + layer.aux_loss
    if layer.training:
        loss.backward()
    return y_BTD.detach(), x_BTD.grad


def _layer_case(rank: int, ctx, case) -> None:
    name, options, train, T, padding = case
    torch.manual_seed(0)  # the same init on every rank, as a model built with one seed
    # Weights that make O(1) outputs and a peaked router, so that the tolerances bite.
    layer = MoE(16, 24, 4, router_init_scale=4.0, **options).train(train)
    layer.init_weights(0.3, 0.3)
    if options.get("bias_update_rate"):
        layer.selection_bias.copy_(torch.tensor([2.0, 1.5, 0.0, 0.0]))  # probabilities <= 1
    ref = copy.deepcopy(layer)
    assert shard_experts(layer, ctx) == 1
    assert layer.experts.w1.shape == (4, 16, 24) and _local(layer.experts.w1).shape[0] == 2
    x_RBTD, probe_RBTD, mask_RBT = _layer_inputs(T, padding)
    masks = [None if mask_RBT is None else mask_RBT[r] for r in range(WORLD)]
    y, x_grad = _run_layer(layer, x_RBTD[rank], probe_RBTD[rank], masks[rank])

    ref_grads = []
    for r in range(WORLD):
        ref.zero_grad(set_to_none=True)
        ref_y, ref_x_grad = _run_layer(ref, x_RBTD[r], probe_RBTD[r], masks[r])
        ref_grads.append(_grads(ref))
        if r == rank:
            _assert_close(y, ref_y, FWD_TOL, f"{name}, output")
            if train:
                _assert_close(x_grad, ref_x_grad, GRAD_TOL, f"{name}, grad of the input")
            for key, value in layer.stats.items():  # per rank, each a tensor or a float
                assert isinstance(value, torch.Tensor | float), f"{name}: stat {key}"
                _assert_close(value, ref.stats[key], FWD_TOL, f"{name}, stat {key}")
    if options.get("bias_update_rate"):
        assert layer.stats["tokens_per_expert"][2:].sum() == 0, name
    if train:
        _check_grads(name, layer, ref_grads, rank, 4)


def _layer_worker(rank: int, world_size: int, cases) -> None:
    ctx = _ep_context()
    for case in cases:
        _layer_case(rank, ctx, case)


def test_moe_layer_with_ep_equals_one_process_forward_and_backward():
    run_ranks(_layer_worker, WORLD, LAYER_CASES)


# ----------------------------------------------------------------------------- the model


MODEL_FFN = dict(kind="moe", options=dict(num_experts=4, top_k=2, capacity_factor=1.0,
                                          num_shared_experts=1, bias_update_rate=0.05,
                                          router_init_scale=4.0))


def _model_step(model: TransformerLM, tokens_BT, targets_BT) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(tokens_BT, targets_BT)
    out.total_loss.backward()
    return out.total_loss.detach()


def _model_worker(rank: int, world_size: int) -> None:
    ctx = _ep_context()
    torch.manual_seed(0)
    model = TransformerLM(tiny_model_cfg(ffn=MODEL_FFN, init_std=0.2))  # O(1) activations
    ref = copy.deepcopy(model)
    assert shard_experts(model, ctx) == 2
    # Global names and shapes do not change: checkpoints reshard by them.
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == {
        n: tuple(p.shape) for n, p in ref.named_parameters()}
    g = torch.Generator().manual_seed(2)
    tokens_RBT = torch.randint(0, 97, (WORLD, 2, 16), generator=g)
    targets_RBT = torch.randint(0, 97, (WORLD, 2, 16), generator=g)
    for step in range(2):  # the second step routes with the biases the first one moved
        loss = _model_step(model, tokens_RBT[rank], targets_RBT[rank])
        ref_grads, ref_losses = [], []
        for r in range(WORLD):
            ref_losses.append(_model_step(ref, tokens_RBT[r], targets_RBT[r]))
            ref_grads.append(_grads(ref))
        _assert_close(loss, ref_losses[rank], FWD_TOL, f"model step {step}, loss")
        _check_grads(f"model step {step}", model, ref_grads, rank, 4)
        model.after_optimizer_step()  # sums the loads of both ranks
        ref.after_optimizer_step()  # saw both ranks' batches
        for i in range(2):
            bias = model.layers[i].block.ffn.selection_bias
            assert torch.equal(bias, ref.layers[i].block.ffn.selection_bias), (step, i, bias)
            assert step > 0 or bias.abs().sum() > 0  # the first update moves it
    model.eval()
    ref.eval()
    with torch.no_grad():
        logits = model(tokens_RBT[rank]).logits
        _assert_close(logits, ref(tokens_RBT[rank]).logits, FWD_TOL, "model, eval logits")


def test_model_with_ep_equals_one_process_and_biases_move_alike():
    run_ranks(_model_worker, WORLD)


# ----------------------------------------------------------------------------- one process


def test_rank_major_rows_become_expert_major_and_back():
    """The split and permutation math of the exchange, with the all-to-all simulated."""
    R, L = 2, 3
    E = R * L
    counts_SE = torch.tensor([[2, 0, 1, 3, 0, 1],   # what rank s sends to each global expert
                              [0, 4, 1, 0, 2, 0]])
    # Rank s's rows, sorted by expert: each row is labelled (source rank, expert, index).
    sent = [[(s, e, i) for e in range(E) for i in range(int(counts_SE[s, e]))]
            for s in range(R)]
    for r in range(R):
        counts_RL = counts_SE[:, r * L:(r + 1) * L]  # what exchange_counts returns on rank r
        sends, receives = split_sizes(counts_SE[r], counts_RL)
        assert sends == [[3, 4], [5, 2]][r] and receives == [[3, 5], [4, 2]][r]
        arrived = [row for s in range(R) for row in sent[s] if r * L <= row[1] < (r + 1) * L]
        order_M, inverse_M, offsets_L = expert_major_order(counts_RL)
        by_expert = [arrived[i] for i in order_M.tolist()]
        # Each expert's rows contiguous, in arrival (rank) order: a stable sort by expert.
        assert by_expert == sorted(arrived, key=lambda row: row[1])
        ends = [sum(1 for row in arrived if row[1] <= r * L + j) for j in range(L)]
        assert offsets_L.tolist() == ends
        assert [by_expert[i] for i in inverse_M.tolist()] == arrived


def test_expert_major_order_with_nothing_arrived():
    order_M, inverse_M, offsets_L = expert_major_order(torch.zeros(2, 2, dtype=torch.long))
    assert order_M.numel() == inverse_M.numel() == 0 and offsets_L.tolist() == [0, 0]


def test_shard_experts_refuses_a_dense_model_and_leaves_ep_1_alone():
    dense = TransformerLM(tiny_model_cfg())
    with pytest.raises(ConfigError) as err:
        shard_experts(dense, DistContext(ep=2))
    assert "\n" not in str(err.value) and "dist.ep = 2" in str(err.value)
    moe = TransformerLM(tiny_model_cfg(ffn=MODEL_FFN))
    before = {n: p for n, p in moe.named_parameters()}
    assert shard_experts(moe, DistContext()) == 0
    assert all(p is before[n] for n, p in moe.named_parameters())
    assert moe.layers[0].block.ffn.experts.ep_group is None
    with pytest.raises(ConfigError, match="not a multiple of dist.ep = 3"):
        shard_experts(moe, DistContext(ep=3))
