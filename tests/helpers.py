"""Small builders shared by the tests."""

from __future__ import annotations

from condcomp.config import ModelConfig, SeamConfig


def tiny_model_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                max_seq_len=32)
    base.update(overrides)
    for seam in ("ffn", "attention", "wrapper", "residual"):
        if isinstance(base.get(seam), dict):
            base[seam] = SeamConfig(**base[seam])
    return ModelConfig(**base)


def assert_cached_decoding_matches(model, tokens_BT, prefill: int = 0, atol: float = 1e-5):
    """Prefill ``prefill`` tokens, decode the rest one at a time with the KV cache, and hold
    the logits equal to one full forward pass over the whole sequence."""
    import torch

    B, T = tokens_BT.shape
    model.eval()
    with torch.no_grad():
        full = model(tokens_BT).logits
        model.setup_cache(B, T + 8)
        steps = []
        if prefill:
            steps.append(model(tokens_BT[:, :prefill], input_pos=torch.arange(prefill, device=tokens_BT.device)).logits)
        steps += [model(tokens_BT[:, t:t + 1], input_pos=torch.tensor([t], device=tokens_BT.device)).logits
                  for t in range(prefill, T)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=atol, rtol=atol)
