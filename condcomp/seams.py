"""The four seams of a block, as a config names them: which family, on which layers.

Both the run config (:mod:`condcomp.config`) and the family registry
(:mod:`condcomp.registry`) need these; they live below both so that the registry never
imports the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from condcomp import tables
from condcomp.errors import ConfigError

LayerSelection = str | list[int]  # "all" | "even" | "odd" | "none" | [layer indices]

# The family each seam gets when the config names none: the plain dense transformer.
SEAM_DEFAULTS = {"ffn": "mlp", "attention": "dense", "wrapper": "full", "residual": "plain"}
SEAMS = tuple(SEAM_DEFAULTS)


@dataclass
class SeamConfig:
    """Which family fills one seam, on which layers, with which options.

    ``options`` holds the family's own keys; they are checked against the family's options
    dataclass when the config is validated (:func:`condcomp.registry.parse_options`).
    """

    kind: str
    layers: LayerSelection = "all"
    options: dict[str, Any] = field(default_factory=dict)

    def selects(self, layer_idx: int, n_layers: int) -> bool:
        return layer_idx in select_layers(self.layers, n_layers, "?")

    @classmethod
    def from_table(cls, raw: dict[str, Any], prefix: str) -> SeamConfig:
        """The seam's table (``model.ffn`` ...): ``kind`` and ``layers``, and the family's
        options either under ``options`` or in the table itself."""
        raw = dict(raw)
        kind = raw.pop("kind", SEAM_DEFAULTS.get(prefix.split(".")[-1], ""))
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"{prefix}.kind must name a family, got {kind!r}")
        layers = tables.coerce(LayerSelection, raw.pop("layers", "all"), f"{prefix}.layers")
        options = dict(tables.coerce(dict, raw.pop("options", {}), f"{prefix}.options"))
        options.update(raw)
        return cls(kind=kind, layers=layers, options=options)


def select_layers(selection: LayerSelection, n_layers: int, key: str) -> set[int]:
    """Resolve a layer selection ("all", "even", "odd", "none" or a list of indices)."""
    if isinstance(selection, str):
        named = {
            "all": set(range(n_layers)),
            "none": set(),
            "even": set(range(0, n_layers, 2)),
            "odd": set(range(1, n_layers, 2)),
        }
        if selection not in named:
            raise ConfigError(
                f"{key} = {selection!r} is not a layer selection; use one of "
                f"{sorted(named)} or a list of layer indices such as [1, 3]"
            )
        return named[selection]
    if isinstance(selection, (list, tuple)):
        bad = [i for i in selection
               if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
        if bad:
            raise ConfigError(
                f"{key} names layers {bad} that do not exist; the model has layers 0..{n_layers - 1}"
            )
        return set(selection)
    raise ConfigError(f"{key} must be a string or a list of layer indices, got {selection!r}")
