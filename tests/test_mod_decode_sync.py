"""Mixture-of-Depths batch-1 decoding without a host sync (the compiled step on CUDA): one graph
that decodes exactly what the eager step (which skips the block on a host-side decision) does.
Run here on the CPU by counting the CPU among ``MixtureOfDepths.DEVICE_DECISION``."""

from __future__ import annotations

import pytest
import torch
from test_mod import mod_model

from condcomp.conditional.mod import MixtureOfDepths
from condcomp.generate import compile_decode_step, decode_one_token, prefill


@pytest.fixture(autouse=True)
def decide_on_the_cpu_device(monkeypatch):
    monkeypatch.setattr(MixtureOfDepths, "DEVICE_DECISION", ("cuda", "cpu"))


PROMPTS = ([5, 17, 3], [40, 2, 2, 88, 61, 7, 19], [64])
NEW_TOKENS = 12


def _greedy(model, prompt, decode_step):
    """Greedy tokens, each step's logits, and every layer's KV-cache fill after decoding."""
    model.setup_cache(1, len(prompt) + NEW_TOKENS)
    logits_1V = prefill(model, torch.tensor([prompt]))
    tokens, logits = [], []
    for t in range(NEW_TOKENS):
        token_11 = logits_1V.argmax(dim=-1, keepdim=True)
        tokens.append(int(token_11))
        logits_1V = decode_step(model, token_11, torch.tensor([len(prompt) + t]))
        logits.append(logits_1V.clone())
    filled = [layer.block.attn.kv_cache.filled_BL.clone() for layer in model.layers[1::2]]
    return tokens, torch.cat(logits), filled


def _decode_everything(model, decode_step):
    with torch.no_grad():
        return [_greedy(model, prompt, decode_step) for prompt in PROMPTS]


def _assert_same_decoding(got, want):
    for (tokens, logits, filled), (want_tokens, want_logits, want_filled) in zip(got, want):
        assert tokens == want_tokens
        assert torch.equal(logits, want_logits)
        for routed, want_routed in zip(filled, want_filled):
            assert torch.equal(routed, want_routed)  # the same tokens wrote the same K/V


@pytest.mark.parametrize("decode_router", ["aux_loss", "predictor"])
def test_the_selected_decode_equals_the_host_decision_eagerly(decode_router, monkeypatch):
    model = mod_model(decode_router)
    want = _decode_everything(model, decode_one_token)
    # Both decisions were decoded: some decoded tokens skipped a routed block, some entered it.
    entered_L = torch.cat([filled[0, len(prompt):len(prompt) + NEW_TOKENS]
                           for prompt, (_, _, routed) in zip(PROMPTS, want) for filled in routed])
    assert 0 < int(entered_L.sum()) < entered_L.numel()
    # The path torch.compile traces, run eagerly: the same floats, bit for bit.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _assert_same_decoding(_decode_everything(model, decode_one_token), want)


@pytest.mark.parametrize("decode_router", ["aux_loss", "predictor"])
def test_the_compiled_decode_step_is_one_graph_and_decodes_the_same(decode_router):
    torch._dynamo.reset()
    model = mod_model(decode_router)
    want = _decode_everything(model, decode_one_token)
    # fullgraph=True raises at the first graph break (a host sync such as bool(tensor)).
    step = torch.compile(decode_one_token, fullgraph=True, backend="aot_eager")
    _assert_same_decoding(_decode_everything(model, step), want)


def test_dynamo_finds_no_graph_break_in_the_decode_step():
    torch._dynamo.reset()
    model = mod_model()
    model.setup_cache(1, 8)
    with torch.no_grad():
        explained = torch._dynamo.explain(decode_one_token)(model, torch.tensor([[3]]),
                                                            torch.tensor([0]))
    assert explained.graph_break_count == 0 and explained.graph_count == 1



def test_off_cuda_by_default_the_compiled_step_decides_on_the_host(monkeypatch):
    """The CPU keeps the host decision, whose skipped blocks cost nothing."""
    monkeypatch.setattr(MixtureOfDepths, "DEVICE_DECISION", ("cuda",))
    model = mod_model()
    assert all(m.decides_on_host("cpu") for m in model.modules()
               if isinstance(m, MixtureOfDepths))
    assert not any(m.decides_on_host("cuda") for m in model.modules()
                   if isinstance(m, MixtureOfDepths))
    torch._dynamo.reset()
    with torch.no_grad():
        model.setup_cache(1, 8)
        explained = torch._dynamo.explain(decode_one_token)(model, torch.tensor([[3]]),
                                                            torch.tensor([0]))
    assert explained.graph_break_count > 0
    step = compile_decode_step(model)  # not fullgraph: compiling it must not fail
    want = _decode_everything(model, decode_one_token)
    for (tokens, logits, filled), (want_tokens, want_logits, want_filled) in zip(
            _decode_everything(model, step), want):
        assert tokens == want_tokens  # inductor's floats, not bit for bit
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(filled, want_filled))
