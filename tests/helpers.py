"""Small builders shared by the tests."""

from __future__ import annotations

from pathlib import Path

from condcomp.config import ModelConfig, SeamConfig

REPO = Path(__file__).resolve().parent.parent


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


def tiny_overrides(corpus: Path, tmp: Path, name: str, steps: int = 20) -> list[str]:
    return [
        f'data.corpus="{corpus}"', f'data.cache_dir="{tmp / "cache"}"', f'name="{name}"',
        f'out_dir="{tmp / name}"', f"train.max_steps={steps}", "train.batch_size=4",
        "train.seq_len=32", "train.eval_every=10", "train.eval_tokens=512", "train.ckpt_every=5",
        "train.log_every=1", "train.warmup_steps=3", "train.keep_last=10", "train.progress=false",
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
        "model.max_seq_len=64", "model.dropout=0.1",  # dropout: the RNG state must resume too
        # A constant rate after warm-up, so runs that differ only in max_steps share a schedule
        # (the cosine's length depends on max_steps).
        "train.min_lr_ratio=1.0",
    ]
