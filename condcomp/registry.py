"""The family registry: which module fills each of the four seams of a block.

docs/design.md names four seams where conditional computation plugs into a transformer:

- ``ffn``: the FFN slot, ``x[B,T,D] -> y[B,T,D]`` (dense MLP, MoE, Mixture of Tokens, Sparse FF);
- ``attention``: the attention projections (dense or Sparse QKV);
- ``wrapper``: the block wrapper that decides which tokens enter a block (all, or MoD);
- ``residual``: the residual stream between blocks (width D, or AltUp's K x D).

A family is one file that calls :func:`register` once. Adding a family never touches the
block, the model or the train loop: they look the family up here by the config's ``kind``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from condcomp import tables
from condcomp.errors import ConfigError
from condcomp.seams import SEAM_DEFAULTS, SEAMS, SeamConfig, select_layers

if TYPE_CHECKING:
    from torch import nn

    from condcomp.config import ModelConfig

# Modules that register the built-in families; imported on first lookup, by name, so that
# importing the registry stays cheap and the registry depends on no family (the families
# import the registry to register themselves).
BUILTIN_FAMILY_MODULES = (
    "condcomp.model.mlp",
    "condcomp.model.attention",
    "condcomp.model.wrappers",
    "condcomp.model.residual",
    "condcomp.conditional.moe",
    "condcomp.conditional.mod",
    "condcomp.conditional.sparse_ff",
    "condcomp.conditional.sparse_qkv",
    "condcomp.conditional.altup",
    "condcomp.conditional.mot",
)


@dataclass(frozen=True)
class Family:
    """One way to fill a seam.

    ``options`` is a dataclass of the family's own config keys (with defaults); it may define
    ``validate(model_cfg)`` raising :class:`ConfigError`. ``build(options, model_cfg, layer_idx)``
    returns the module (``layer_idx`` is ``None`` for the model-wide residual seam).
    """

    name: str
    seam: str
    options: type
    build: Callable[..., nn.Module]
    summary: str = ""


@dataclass
class NoOptions:
    """For families that take no options."""


_FAMILIES: dict[str, dict[str, Family]] = {seam: {} for seam in SEAMS}
_loaded = False


def register(family: Family) -> Family:
    if family.seam not in SEAMS:
        raise ValueError(f"unknown seam {family.seam!r}; seams are {SEAMS}")
    existing = _FAMILIES[family.seam].get(family.name)
    if existing is not None and existing is not family:
        raise ValueError(f"family {family.name!r} is registered twice for seam {family.seam!r}")
    _FAMILIES[family.seam][family.name] = family
    return family


# Families from other installed packages: a package declares, in its pyproject.toml,
#   [project.entry-points."condcomp.families"]
#   my_family = "my_package.my_family"      # a module that calls register() on import
# and every condcomp entry point (train, eval, generate, compare, Python) finds the family,
# including when it rebuilds a model from a run's config.json.
PLUGIN_GROUP = "condcomp.families"


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_FAMILY_MODULES:
            importlib.import_module(module)
        _load_plugins()


def _load_plugins() -> None:
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        package = entry.dist.name if entry.dist is not None else "an installed package"
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must say which one it is, and not hide
            raise ConfigError(
                f"the condcomp family plugin {entry.name!r} ({entry.value}, from {package}) "
                f"failed to import: {type(exc).__name__}: {exc}; fix or uninstall {package}"
            ) from exc


def families(seam: str) -> dict[str, Family]:
    _load_builtins()
    return dict(_FAMILIES[seam])


def get(seam: str, name: str) -> Family:
    _load_builtins()
    try:
        return _FAMILIES[seam][name]
    except KeyError:
        known = sorted(_FAMILIES[seam])
        raise ConfigError(
            f"model.{seam}.kind = {name!r} is not a known {seam} family; known: {known}"
        ) from None


def parse_options(seam: str, seam_cfg: SeamConfig) -> Any:
    """The seam's options as the family's options dataclass (unknown keys are errors)."""
    family = get(seam, seam_cfg.kind)
    return tables.build(family.options, seam_cfg.options, f"model.{seam}")


def validate_seam(seam: str, seam_cfg: SeamConfig, model_cfg: ModelConfig) -> None:
    if seam == "residual" and seam_cfg.layers != "all":
        raise ConfigError("model.residual.layers: the residual stream spans the whole model; "
                          "remove the key")
    select_layers(seam_cfg.layers, model_cfg.n_layers, f"model.{seam}.layers")
    options = parse_options(seam, seam_cfg)
    validate = getattr(options, "validate", None)
    if validate is not None:
        validate(model_cfg)


def build(seam: str, model_cfg: ModelConfig, layer_idx: int | None) -> nn.Module:
    """Build the module for ``seam`` at ``layer_idx``: the configured family on the layers it
    selects, and the seam's default (dense) family elsewhere."""
    seam_cfg: SeamConfig = getattr(model_cfg, seam)
    if layer_idx is not None and not seam_cfg.selects(layer_idx, model_cfg.n_layers):
        seam_cfg = SeamConfig(kind=SEAM_DEFAULTS[seam])
    family = get(seam, seam_cfg.kind)
    return family.build(parse_options(seam, seam_cfg), model_cfg, layer_idx)


def describe(model_cfg: ModelConfig) -> str:
    """A short human description of which families fill which seams (for reports)."""
    parts = []
    for seam in SEAMS:
        seam_cfg = getattr(model_cfg, seam)
        if seam_cfg.kind != SEAM_DEFAULTS[seam]:
            where = "" if seam_cfg.layers == "all" else f" on {seam_cfg.layers} layers"
            parts.append(f"{seam_cfg.kind}{where}")
    return ", ".join(parts) or "dense"
