"""Router health while training: a warning when a Mixture-of-Experts router fails.

A failing router rarely stops a run; the loss only stalls later. The MoE layer logs, with
its other statistics, what shows the failure early (``condcomp.conditional.moe``): MaxVio
(Wang et al. 2024, arXiv 2408.15664, eq. 4), the busiest expert's share of the tokens and the
routing entropy; it also counts, on the device, each expert's steps without a token
(``MoE.idle_steps``). At every logged step the train loop hands the logged row to
:class:`RouterHealth`, which warns, once per layer and condition until the layer recovers,
when:

- ``load_collapse``: the busiest expert takes over ``health.collapse_share`` of the tokens
  for ``health.collapse_logged_steps`` logged steps in a row;
- ``entropy_collapse``: the routing entropy stays under ``health.min_router_entropy`` nats
  for as many logged steps;
- ``dead_experts``: some expert got no token in the last ``health.dead_expert_steps`` steps.

Under ``torchrun`` each rank counts its own idle steps on the device; :meth:`rank_stats` turns
them into dead flags before the ranks' statistics are averaged, so an expert counts as dead
when no rank routed a token to it (its averaged flag is 1). Every rank then decides alike from
the same averaged row, and only rank 0 writes: no collective runs in any branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from condcomp.config import HealthConfig

DEAD_FLAGS_SUFFIX = ".dead_flags"  # per expert, 1 where dead (the ranks' mean: dead on all)
DEAD_SUFFIX = ".dead_experts"  # the count, logged
VIOLATION_SUFFIX = ".max_load_violation"
TOP_SHARE_SUFFIX = ".top_expert_share"
ENTROPY_SUFFIX = ".router_entropy"

HINTS = {
    "load_collapse": "raise model.ffn.load_balance_coef (Switch uses 1e-2), or balance without "
                     "a loss term with model.ffn.bias_update_rate = 1e-3 (DeepSeek-V3); if it "
                     "followed a loss spike, lower train.lr",
    "entropy_collapse": "add or raise model.ffn.z_loss_coef (ST-MoE uses 1e-3) to keep the "
                        "router's logits small, add model.ffn.router_jitter, or lower train.lr",
    "dead_experts": "raise model.ffn.load_balance_coef or set model.ffn.bias_update_rate "
                    "(e.g. 1e-3) so idle experts win tokens back; a smaller "
                    "model.ffn.router_init_scale starts routing nearer uniform",
}


@dataclass
class _Streak:
    """One condition of one layer: logged steps in a row it held, and whether it warned."""

    steps: int = 0
    warned: bool = False


class RouterHealth:
    """Watches the logged rows of one run (every rank keeps its own, identical, copy)."""

    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        self._streaks: dict[tuple[str, str], _Streak] = {}

    def rank_stats(self, stats: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """This rank's layer statistics and, for each layer of ``model`` that counts its
        experts' idle steps (an MoE), their dead flags (an elementwise compare on the device),
        ready to be averaged over the ranks. ``model`` is the one whose ``stats`` these are,
        so the keys match."""
        out = dict(stats)
        for name, module in model.named_modules():
            if hasattr(module, "idle_steps"):
                out[name + DEAD_FLAGS_SUFFIX] = dead_flags(module.idle_steps(),
                                                           self.cfg.dead_expert_steps)
        return out

    def review(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Put each layer's count of dead experts into ``row`` (in place of its flags) and
        return the ``router_warning`` rows that start at this step."""
        dead_of: dict[str, tuple[int, int]] = {}
        for key in [key for key in row if key.endswith(DEAD_FLAGS_SUFFIX)]:
            flags = row.pop(key)
            dead = sum(1 for flag in flags if flag >= 1.0 - 1e-6)
            layer = key[: -len(DEAD_FLAGS_SUFFIX)]
            row[layer + DEAD_SUFFIX] = dead
            dead_of[layer] = (dead, len(flags))
        warnings = []
        for layer in sorted(key[: -len(VIOLATION_SUFFIX)] for key in row
                            if key.endswith(VIOLATION_SUFFIX)):
            for what, message, needed in self._conditions(layer, row, dead_of.get(layer)):
                if self._starts(layer, what, message is not None, needed):
                    warnings.append({"kind": "router_warning", "step": row["step"],
                                     "layer": layer, "what": what, "message": message,
                                     "hint": HINTS[what]})
        return warnings

    def _conditions(self, layer: str, row: dict[str, Any], dead: tuple[int, int] | None
                    ) -> list[tuple[str, str | None, int]]:
        """(condition, what is wrong or None when it does not hold, logged steps in a row it
        must hold to warn) for one MoE layer's row."""
        cfg, m = self.cfg, self.cfg.collapse_logged_steps
        share = row.get(layer + TOP_SHARE_SUFFIX, 0.0)
        violation = row[layer + VIOLATION_SUFFIX]
        # The share every expert would get balanced (k / E, or the expert-choice capacity):
        # where it reaches the threshold, a busy expert is no collapse.
        balanced_share = share / (1.0 + violation)
        load = (f"the busiest expert took {share:.0%} of the tokens (MaxVio {violation:.2f}) "
                f"for {m} logged steps in a row, over health.collapse_share = "
                f"{cfg.collapse_share}"
                if share > cfg.collapse_share > balanced_share else None)
        entropy = row.get(layer + ENTROPY_SUFFIX)
        low = (f"routing entropy {entropy:.3f} nats for {m} logged steps in a row, under "
               f"health.min_router_entropy = {cfg.min_router_entropy}"
               if entropy is not None and entropy < cfg.min_router_entropy else None)
        idle = (f"{dead[0]} of {dead[1]} experts got no token in the last "
                f"{cfg.dead_expert_steps} steps (health.dead_expert_steps)"
                if dead is not None and dead[0] > 0 else None)
        # Dead experts are counted over a window of steps already: they warn at once.
        return [("load_collapse", load, m), ("entropy_collapse", low, m),
                ("dead_experts", idle, 1)]

    def _starts(self, layer: str, what: str, holds: bool, needed: int) -> bool:
        """Whether a warning starts now: the condition held ``needed`` logged steps in a row
        and has not warned since it last recovered."""
        streak = self._streaks.setdefault((layer, what), _Streak())
        if not holds:
            streak.steps, streak.warned = 0, False
            return False
        streak.steps += 1
        if streak.steps < needed or streak.warned:
            return False
        streak.warned = True
        return True


def describe(warning: dict[str, Any]) -> str:
    """A ``router_warning`` row as the one line the progress bar prints."""
    return (f"step {warning['step']}: router warning, {warning['layer']} "
            f"{warning['what']}: {warning['message']}; {warning['hint']}")


def dead_flags(idle_steps_E: torch.Tensor, window: int) -> torch.Tensor:
    """1 for each expert that got no token in the last ``window`` steps, else 0."""
    return (idle_steps_E >= window).float()
