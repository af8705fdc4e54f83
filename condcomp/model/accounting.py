"""Counting the parameters a token touches."""

from __future__ import annotations

from torch import nn


def active_param_count(module: nn.Module) -> int:
    """Parameters of ``module`` that one token uses on average.

    A module that holds parameters a token does not always use (the unchosen experts of an
    MoE, the block a Mixture-of-Depths token skips) says so through ``active_params()``;
    everything else counts whole. Tied parameters count once.
    """
    seen: set[int] = set()

    def visit(m: nn.Module) -> int:
        if hasattr(m, "active_params") and m is not module:
            for p in m.parameters():
                seen.add(id(p))
            return m.active_params()
        total = 0
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total + sum(visit(child) for child in m.children())

    return visit(module)
