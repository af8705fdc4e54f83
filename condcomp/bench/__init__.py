"""``condcomp bench``: the benchmark commands, one module each.

- :mod:`~condcomp.bench.hf`: ``condcomp bench``, our model against HF Llama;
- :mod:`~condcomp.bench.models`: ``condcomp bench models``, presets against the first;
- :mod:`~condcomp.bench.moe`: ``condcomp bench moe``, the MoE layer against the dense FFN;
- :mod:`~condcomp.bench.decode`: ``condcomp bench decode``, the Sparse FF / QKV decode table;
- :mod:`~condcomp.bench.runs`: ``condcomp bench runs``, trained runs' decode side by side;
- :mod:`~condcomp.bench.dist`: ``condcomp bench dist``, training steps in torchrun's layout
  (tokens/s, the share of all-to-all);
- :mod:`~condcomp.bench.import_hf`: ``condcomp bench import-hf``, ``condcomp import-hf``
  against HF ``from_pretrained`` (time, peak memory) and the imported model's decode.

They share :mod:`~condcomp.bench.common` (timing in turns, the environment, the machine's load,
the table and JSON) and, for whole models, :mod:`~condcomp.bench.lm_timing`.
"""

from __future__ import annotations

import argparse
from typing import Any

from condcomp.bench import decode, dist, hf, import_hf, models, moe, runs

TARGETS = {"moe": moe, "decode": decode, "models": models, "runs": runs, "dist": dist,
           "import-hf": import_hf}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` and its targets (``bench moe``, ...) on an argparse subparsers object;
    each parser's ``func`` runs it."""
    p = hf.add_parser(subparsers)
    targets = p.add_subparsers(dest="target", metavar="{" + ",".join(TARGETS) + "}")
    for module in TARGETS.values():
        module.add_parser(targets)
    return p
