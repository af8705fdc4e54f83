"""The run directory: what a training run leaves behind, and how to load it back.

::

    runs/<name>/
      config.json        the resolved config (every default filled in)
      tokenizer/         the tokenizer the run was trained with
      checkpoints/       step_XXXXXXXX/ (see condcomp.checkpoint)
      metrics.jsonl      one JSON row per log / eval step
      tb/                TensorBoard events
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from condcomp.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from condcomp.config import RunConfig, from_dict
from condcomp.data import Tokenizer, load_tokenizer
from condcomp.errors import CheckpointError
from condcomp.model import TransformerLM

CONFIG_FILE, METRICS_FILE, TOKENIZER_DIR, TB_DIR = "config.json", "metrics.jsonl", "tokenizer", "tb"


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: TransformerLM
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    state: dict[str, Any]


def save_config(cfg: RunConfig, run_dir: Path) -> None:
    (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def read_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); give the "
                              "folder that `condcomp train` wrote, e.g. runs/<name>")
    return from_dict(json.loads(path.read_text())).validate()


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None,
             device: torch.device | str = "cpu") -> LoadedRun:
    """The trained model of a run (newest checkpoint unless one is named), in eval mode."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    model = TransformerLM(cfg.model)
    state = load_checkpoint(ckpt, model, run_dir)
    model.to(device).eval()
    return LoadedRun(cfg, model, tokenizer, ckpt, state)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows
