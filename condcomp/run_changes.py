"""What ``--resume`` may change in a run's config, and what it may not.

A resumed run keeps its weights, optimizer state and data order, and its ``config.json`` and
``metrics.jsonl`` must go on saying what was trained. :func:`check_resume` compares the config a
resume was started with against the run's saved one, key by key (family options with their
defaults filled in, so spelling a default out is no change):

- keys in :data:`HARMLESS` change how long the run goes on, how often it logs, evaluates and
  saves, and where it runs, not the model, the data or the arithmetic of a step: they are
  accepted;
- any other change (the model, the data, the tokenizer, the batch, the seed, the optimizer, the
  precision) would train something the record does not describe: it is refused, naming each key
  with its old and new value, unless the user accepts it by name (``--allow-change KEY``).

Accepted or harmless, every change is recorded: config.json is rewritten with the new values
and metrics.jsonl gets a ``config_change`` row at the step where it took effect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import Any

from condcomp import registry
from condcomp.config import RunConfig
from condcomp.errors import CondcompError, ConfigError

HARMLESS = frozenset({
    "name", "out_dir",  # where the run is: resuming a moved folder
    "data.cache_dir",  # where token shards are cached; the cache is keyed by content
    # How long the run goes on: extending a run is what --resume is for. The cosine schedule
    # is then laid over the new length from the resumed step on.
    "train.max_steps", "train.max_tokens",
    "train.eval_every", "train.eval_tokens", "train.ckpt_every", "train.keep_last",
    "train.log_every", "train.progress", "train.max_nonfinite",
    # Where and how a step runs, not what it computes (with train.dtype = "auto" the precision
    # follows the device: the change row records it).
    "train.device", "train.compile",
    "train.init_from",  # read only when a run starts
    # How the run spreads over processes: a sharded checkpoint reshards to any layout. What
    # the layout does change (routing groups are per rank) is recorded in a layout row.
    "dist.data_parallel", "dist.ep", "dist.backend", "dist.timeout_s",
    # When router warnings fire: they read the statistics, never change them.
    "health.dead_expert_steps", "health.collapse_share", "health.min_router_entropy",
    "health.collapse_logged_steps",
})
_ABSENT = "(none)"


class ConfigChangedError(ConfigError):
    """A resume was started with a config that changes what the run trains."""

    def __init__(self, run_dir: Path, changes: dict[str, tuple[Any, Any]], fix: str) -> None:
        self.run_dir, self.changes = run_dir, changes
        super().__init__(f"{run_dir} was trained with other values of keys that change what is "
                         f"trained: {describe(changes)}; {fix}")


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """Every key of ``cfg`` as ``section.key`` -> value, family options by their table keys
    (``model.ffn.num_experts``) with the family's defaults filled in."""
    raw = cfg.to_dict()
    for seam, seam_cfg in cfg.model.seams().items():
        options = seam_cfg.options
        try:
            options = dataclasses.asdict(registry.parse_options(seam, seam_cfg))
        except CondcompError:  # a family that is not installed now: compare what was written
            pass
        table = raw["model"][seam]
        del table["options"]
        table.update(options)
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(raw, "")
    return flat


def config_changes(saved: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ, each with (saved value, new value), in the config's order
    (a seam's ``kind`` before its options)."""
    old, now = flatten(saved), flatten(new)
    keys = list(old) + [key for key in now if key not in old]
    return {key: (old.get(key, _ABSENT), now.get(key, _ABSENT)) for key in keys
            if old.get(key, _ABSENT) != now.get(key, _ABSENT)}


def check_resume(run_dir: Path, saved: RunConfig, new: RunConfig,
                 allowed: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
    """The changes from ``saved`` to ``new``, once each is harmless or ``allowed`` (a key, or a
    section such as ``data`` or ``model.ffn``); else a :class:`ConfigChangedError`."""
    known = flatten(saved).keys() | flatten(new).keys()
    for key in allowed:
        if not any(_covers(key, k) for k in known):
            raise ConfigError(f"--allow-change {key}: no such config key; name one such as "
                              "train.batch_size, or a section such as data")
    changes = config_changes(saved, new)
    refused = {key: change for key, change in changes.items()
               if key not in HARMLESS and not any(_covers(a, key) for a in allowed)}
    if refused:
        raise ConfigChangedError(
            run_dir, refused,
            "resume with the run's values, train a new run into another out_dir, or accept the "
            f"change with --allow-change {','.join(refused)} (it is recorded in the run)")
    return changes


def describe(changes: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    items = [f"{key} {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _covers(allowed: str, key: str) -> bool:
    return key == allowed or key.startswith(allowed + ".")


def _show(value: Any) -> str:
    text = value if value is _ABSENT else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
