"""The dense transformer: norms, RoPE, attention with a KV cache, blocks, the LM."""

from condcomp.model.transformer import LMOutput, TransformerLM

__all__ = ["LMOutput", "TransformerLM"]
