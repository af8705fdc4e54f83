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
