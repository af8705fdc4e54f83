"""Expert parallelism (placeholder until it lands)."""

from __future__ import annotations

from condcomp.errors import ConfigError


def shard_experts(model, ctx) -> int:
    if ctx.ep > 1:
        raise ConfigError("expert parallelism is not built yet")
    return 0
