"""The public layers: drop-in modules whose names and weight layouts are API (docs/design.md).

Every FFN-slot layer maps ``x[B, T, D]`` to ``[B, T, D]`` and, after each forward, leaves its
auxiliary loss in ``layer.aux_loss`` (a scalar tensor) and its statistics in ``layer.stats``.
"""

from condcomp.conditional.altup import AltUp
from condcomp.conditional.mod import MixtureOfDepths
from condcomp.conditional.moe import MoE
from condcomp.conditional.mot import MixtureOfTokens
from condcomp.conditional.sparse_ff import SparseFF
from condcomp.conditional.sparse_qkv import MultiplicativeDense, SparseQKV
from condcomp.model.mlp import MLP

__all__ = ["MLP", "AltUp", "MixtureOfDepths", "MixtureOfTokens", "MoE", "MultiplicativeDense",
           "SparseFF", "SparseQKV"]
