"""Mixture-of-Depths batch-1 decoding without a host sync (the compiled step on CUDA): one graph
that decodes exactly what the eager step (which skips the block on a host-side decision) does,
skipping the block's work inside ``torch.cond``. Run here on the CPU by counting the CPU among
``MixtureOfDepths.DEVICE_DECISION``."""

from __future__ import annotations

import pytest
import torch
from test_mod import mod_model
from torch.profiler import ProfilerActivity

from condcomp.conditional.mod import MixtureOfDepths
from condcomp.conditional.moe import MoE
from condcomp.config import load_config
from condcomp.generate import compile_decode_step, decode_one_token, prefill


@pytest.fixture(autouse=True)
def decide_on_the_cpu_device(monkeypatch):
    monkeypatch.setattr(MixtureOfDepths, "DEVICE_DECISION", ("cuda", "cpu"))


PROMPTS = ([5, 17, 3], [40, 2, 2, 88, 61, 7, 19], [64])
NEW_TOKENS = 12
# One cache length for every prompt (as generate() keeps its cache): a compiled step whose
# cache changed shape would compile again.
CACHE_LEN = max(map(len, PROMPTS)) + NEW_TOKENS


def _greedy(model, prompt, decode_step):
    """Greedy tokens, each step's logits, and the routed blocks' KV caches after decoding."""
    model.setup_cache(1, CACHE_LEN)
    logits_1V = prefill(model, torch.tensor([prompt]))
    tokens, logits = [], []
    for t in range(NEW_TOKENS):
        token_11 = logits_1V.argmax(dim=-1, keepdim=True)
        tokens.append(int(token_11))
        logits_1V = decode_step(model, token_11, torch.tensor([len(prompt) + t]))
        logits.append(logits_1V.clone())
    caches = [layer.block.attn.kv_cache for layer in model.layers[1::2]]
    # The routed blocks' caches as attention reads them: which slots are filled, and their K/V
    # (an unfilled slot is never read, whatever it holds).
    filled = [(c.filled_BL.clone(), c.k_BHLd[:, :, c.filled_BL[0]].clone(),
               c.v_BHLd[:, :, c.filled_BL[0]].clone()) for c in caches]
    return tokens, torch.cat(logits), filled


def _decode_everything(model, decode_step):
    with torch.no_grad():
        return [_greedy(model, prompt, decode_step) for prompt in PROMPTS]


def _assert_same_decoding(got, want, atol=0.0):
    """The same tokens, logits (bit for bit at ``atol = 0``) and routed KV caches."""
    for (tokens, logits, filled), (want_tokens, want_logits, want_filled) in zip(got, want):
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=atol, rtol=atol)
        for routed, want_routed in zip(filled, want_filled):
            assert torch.equal(routed[0], want_routed[0])  # the same tokens wrote K/V
            for kv, want_kv in zip(routed[1:], want_routed[1:]):
                torch.testing.assert_close(kv, want_kv, atol=atol, rtol=atol)


def _entered(decoded):
    """Which decoded tokens entered each routed block."""
    return torch.cat([filled[0][0, len(prompt):len(prompt) + NEW_TOKENS]
                      for prompt, (_, _, routed) in zip(PROMPTS, decoded) for filled in routed])


DENSE_OPTIONS = [{}, {"qk_norm": "head", "qkv_bias": True},
                 {"qk_norm": "projection", "clip_qkv": 0.5}]


@pytest.mark.parametrize(("decode_router", "attention"),
                         [("aux_loss", DENSE_OPTIONS[0]), ("predictor", DENSE_OPTIONS[0]),
                          ("aux_loss", DENSE_OPTIONS[1]), ("aux_loss", DENSE_OPTIONS[2])],
                         ids=["aux_loss", "predictor", "head_norm_bias", "projection_norm_clip"])
def test_the_device_decided_decode_equals_the_host_decision_eagerly(decode_router, attention,
                                                                    monkeypatch):
    """Also with the dense attention's norms, biases and clamp: the queries are projected and
    rotated apart from the keys (in the chosen branch) and give the same floats."""
    model = mod_model(decode_router, attention=dict(kind="dense", options=attention))
    want = _decode_everything(model, decode_one_token)
    # Both decisions were decoded: some decoded tokens skipped a routed block, some entered it.
    entered_L = _entered(want)
    assert 0 < int(entered_L.sum()) < entered_L.numel()
    # The path torch.compile traces (torch.cond runs eagerly too): the same floats, bit for bit.
    monkeypatch.setattr(MixtureOfDepths, "_decides_on_device", lambda self, device_type: True)
    assert all(layer._skippable_on_device() for layer in model.layers[1::2])
    _assert_same_decoding(_decode_everything(model, decode_one_token), want)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("decode_router", ["aux_loss", "predictor"])
def test_the_compiled_decode_step_is_one_graph_and_decodes_the_same(decode_router, backend):
    torch._dynamo.reset()
    model = mod_model(decode_router)
    want = _decode_everything(model, decode_one_token)
    # fullgraph=True raises at the first graph break (a host sync such as bool(tensor)).
    step = torch.compile(decode_one_token, fullgraph=True, backend=backend)
    # aot_eager runs the traced ops as they are; inductor fuses them (its own float rounding).
    _assert_same_decoding(_decode_everything(model, step), want,
                          atol=0.0 if backend == "aot_eager" else 1e-6)


def test_mod_around_moe_keeps_the_select_path_in_one_graph():
    """Staged MoDE (the preset ``mode_staged``'s MoE FFN seam): an MoE rewrites its ``aux_loss``
    and ``stats`` on every forward, a side effect torch.cond refuses inside a branch, so its
    blocks run and are selected; the step is still one graph that decodes the same."""
    torch._dynamo.reset()
    model = mod_model(ffn=load_config("mode_staged").model.ffn)
    assert isinstance(model.layers[1].block.ffn, MoE)
    assert not any(layer._skippable_on_device() for layer in model.layers[1::2])
    want = _decode_everything(model, decode_one_token)
    step = torch.compile(decode_one_token, fullgraph=True, backend="aot_eager")
    _assert_same_decoding(_decode_everything(model, step), want)


def test_a_skipped_block_does_no_work(monkeypatch):
    """Eager, torch.cond runs only the branch taken: a token that skips a routed block runs none
    of its FFN (the only SiLU of this model: one per dense block, one per block entered)."""
    monkeypatch.setattr(MixtureOfDepths, "_decides_on_device", lambda self, device_type: True)
    model = mod_model()
    model.setup_cache(1, 16)
    dense_blocks, routed = 2, model.layers[1::2]
    prompt, tokens = torch.tensor([[5, 17, 3]]), [40, 2, 88, 61, 7, 19]
    entered = []
    # Eager torch.cond traces both branches once (with fake tensors, which the profiler would
    # count too): decode once before counting.
    for counting in (False, True):
        with torch.no_grad():
            prefill(model, prompt)
            for pos, token in enumerate(tokens, start=prompt.shape[1]):
                with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
                    decode_one_token(model, torch.tensor([[token]]), torch.tensor([pos]))
                if counting:
                    silus = sum(e.count for e in prof.key_averages() if e.key == "aten::silu")
                    entered.append(sum(int(layer.routed_BT) for layer in routed))
                    assert silus == dense_blocks + entered[-1]
    assert min(entered) < len(routed) and max(entered) > 0  # skipped and entered blocks seen


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
    _assert_same_decoding(_decode_everything(model, step), want, atol=1e-5)  # inductor's floats
