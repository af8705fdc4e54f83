"""The chunked linear + cross-entropy held equal to F.cross_entropy on the whole logits."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model_cfg
from torch import nn

from condcomp.config import RunConfig
from condcomp.errors import ConfigError
from condcomp.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
    rows_per_chunk,
)
from condcomp.model import TransformerLM
from condcomp.surgery.distill import load_distiller


def _inputs(N, V, D, ignored_every=0, dtype=torch.float32):
    h_ND = torch.randn(N, D, dtype=dtype, requires_grad=True)
    weight_VD = (torch.randn(V, D, dtype=dtype) * 0.5).requires_grad_()
    targets_N = torch.randint(0, V, (N,))
    if ignored_every:
        targets_N[::ignored_every] = -100
    return h_ND, weight_VD, targets_N


def _loss_and_grads(loss_fn, h_ND, weight_VD, targets_N, **kwargs):
    loss = loss_fn(h_ND, weight_VD, targets_N, **kwargs)
    grad_h, grad_w = torch.autograd.grad(loss, (h_ND, weight_VD))
    return loss, grad_h, grad_w


@pytest.mark.parametrize(("N", "V", "D", "chunk_rows", "ignored_every"), [
    (37, 101, 16, 8, 3),   # N not a multiple of the chunk, V prime, some rows ignored
    (1, 7, 4, 3, 0),       # one row, a chunk larger than N
    (24, 53, 8, 6, 0),     # N a multiple of the chunk
    (13, 29, 5, 1, 2),     # one row a chunk
])
def test_equals_cross_entropy_on_the_whole_logits_in_fp32(N, V, D, chunk_rows, ignored_every):
    inputs = _inputs(N, V, D, ignored_every)
    want = _loss_and_grads(linear_cross_entropy_reference, *inputs)
    got = _loss_and_grads(linear_cross_entropy, *inputs, chunk_rows=chunk_rows)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("N", [5, 1])
def test_all_rows_ignored_give_nan_and_zero_gradients_as_the_plain_path(N):
    h_ND, weight_VD, _ = _inputs(N, 11, 4)
    targets_N = torch.full((N,), -100)
    want = _loss_and_grads(linear_cross_entropy_reference, h_ND, weight_VD, targets_N)
    got = _loss_and_grads(linear_cross_entropy, h_ND, weight_VD, targets_N, chunk_rows=2)
    assert torch.isnan(want[0]) and torch.isnan(got[0])
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g, w) and not g.any()


def test_a_weight_tied_to_the_embedding_gets_both_gradients():
    def step(loss_fn, **kwargs):
        torch.manual_seed(1)
        emb = nn.Embedding(31, 8)
        tokens_N = torch.randint(0, 31, (19,))
        h_ND = torch.tanh(emb(tokens_N))
        loss = loss_fn(h_ND, emb.weight, torch.roll(tokens_N, 1), **kwargs)
        (loss / 4).backward()  # as gradient accumulation scales it: the backward scales too
        return emb.weight.grad

    want, got = step(linear_cross_entropy_reference), step(linear_cross_entropy, chunk_rows=4)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_stays_close_and_keeps_the_input_dtypes():
    inputs = _inputs(40, 67, 16, ignored_every=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(linear_cross_entropy_reference, *inputs)
        got = _loss_and_grads(linear_cross_entropy, *inputs, chunk_rows=7)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == got[2].dtype == torch.float32  # the fp32 inputs' gradients
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=1e-2)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=5e-2)


def _saved_bytes(loss_fn, *args, **kwargs) -> int:
    """Bytes of every tensor autograd keeps for the backward of ``loss_fn(*args)``."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(*args, **kwargs)
    return sum(saved)


def test_saved_tensors_stay_below_the_whole_logits():
    N, V, D = 256, 1000, 32
    inputs = _inputs(N, V, D)
    logits_bytes = N * V * 4
    # The plain path keeps (at least) the fp32 logits' log-softmax: the check can fail.
    assert _saved_bytes(linear_cross_entropy_reference, *inputs) >= logits_bytes
    fused = _saved_bytes(linear_cross_entropy, *inputs, chunk_rows=32)
    assert fused <= (N * D + V * D) * 4 < logits_bytes  # grad_h and grad_W only


def test_no_gradient_work_or_saved_tensors_without_grad():
    inputs = _inputs(9, 13, 4)
    with torch.no_grad():
        got = linear_cross_entropy(*inputs, chunk_rows=4)
        want = linear_cross_entropy_reference(*inputs)
    torch.testing.assert_close(got, want)
    assert got.grad_fn is None


def test_chunk_rows_follow_the_memory_budget():
    assert rows_per_chunk(50304, budget_bytes=256 * 2**20) == 256 * 2**20 // (4 * 50304)
    assert rows_per_chunk(10**9, budget_bytes=1024) == 1  # never zero rows


def test_compiles_without_a_graph_break():
    inputs = _inputs(21, 37, 8, ignored_every=4)
    compiled = torch.compile(linear_cross_entropy, fullgraph=True, backend="aot_eager")
    want = _loss_and_grads(linear_cross_entropy, *inputs, chunk_rows=5)
    got = _loss_and_grads(compiled, *inputs, chunk_rows=5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_a_model_training_step_with_the_fused_loss_equals_the_plain_one(tie_embeddings):
    plain = TransformerLM(tiny_model_cfg(tie_embeddings=tie_embeddings))
    fused = TransformerLM(tiny_model_cfg(tie_embeddings=tie_embeddings, loss="fused"))
    fused.load_state_dict(plain.state_dict())
    tokens_BT = torch.randint(0, 97, (3, 16))
    targets_BT = torch.roll(tokens_BT, -1, dims=1)
    targets_BT[:, -1] = -100
    outputs = []
    for model in (plain, fused):
        out = model(tokens_BT, targets_BT)
        out.total_loss.backward()
        outputs.append(out)
    assert outputs[1].logits is None  # the fused loss never forms them
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, atol=1e-6, rtol=1e-6)
    for (name, p_plain), p_fused in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_plain.grad, atol=1e-6, rtol=1e-5, msg=name)
    # Without targets the fused model gives the logits, as the plain one does.
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens_BT).logits, plain(tokens_BT).logits)


def test_loss_key_errors():
    with pytest.raises(ConfigError, match=r"model.loss = 'liger' is unknown.*plain.*fused"):
        tiny_model_cfg(loss="liger").validate()
    cfg = RunConfig()
    cfg.model.loss, cfg.distill.teacher = "fused", "some_run"
    with pytest.raises(ConfigError, match="distillation reads the student's logits"):
        load_distiller(cfg, torch.device("cpu"))
