"""Mixture-of-Depths batch-1 decoding without a host sync: the compiled step is one graph and
decodes exactly what the eager step (which skips the block on a host-side decision) does."""

from __future__ import annotations

import pytest
import torch
from test_mod import mod_model

from condcomp.generate import decode_one_token, prefill

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

