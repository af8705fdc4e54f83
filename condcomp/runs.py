"""The run directory: what a training run leaves behind, and how to load it back.

::

    runs/<name>/
      config.json        the resolved config (every default filled in)
      tokenizer/         the tokenizer the run was trained with
      checkpoints/       step_XXXXXXXX/ (see condcomp.checkpoint; sharded ones, written under
                         torchrun, see condcomp.distributed.checkpoint)
      metrics.jsonl      one JSON row per log / eval step
      tb/                TensorBoard events
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch

from condcomp import checkpoint as ckpt_lib
from condcomp.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from condcomp.config import RunConfig, from_dict
from condcomp.data import Tokenizer, load_tokenizer
from condcomp.errors import CheckpointError, ConfigError, storage_error
from condcomp.model import TransformerLM

CONFIG_FILE, METRICS_FILE, TOKENIZER_DIR, TB_DIR = "config.json", "metrics.jsonl", "tokenizer", "tb"


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: TransformerLM
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    state: dict[str, Any]


def check_name(name: object, what: str) -> str:
    """``name`` if it is one folder name, which cannot lead out of the folder it is made in
    (no ``/``, not ``..``, ``.`` or empty); else a :class:`ConfigError` naming ``what``."""
    text = name if isinstance(name, str) else ""
    if (not text or text in (".", "..") or PurePath(text).name != text or "\\" in text
            or "\0" in text):
        raise ConfigError(f"{what} = {name!r} is not a folder name; a name is one folder of "
                          "the output folder (no '/' or '\\', not empty, '.' or '..')")
    return text


def run_dir_of(cfg: RunConfig) -> Path:
    """The run folder: ``out_dir`` as the user typed it, else ``runs/<name>`` for a name that
    cannot make it ``runs/`` itself or a folder outside it."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    check_name(cfg.name, "name")
    return cfg.run_dir


def save_config(cfg: RunConfig, run_dir: Path) -> None:
    """Write config.json whole or not at all: a crash mid-write leaves the previous one."""
    write_atomically(run_dir / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")


def read_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); give the "
                              "folder that `condcomp train` wrote, e.g. runs/<name>")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise storage_error(exc, f"cannot read {path}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is damaged ({exc}); it is the run's record of its "
                              "config: restore it from a copy, or train the run again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is damaged (it holds a {type(raw).__name__}, not the "
                              "config table); restore it from a copy, or train the run again")
    try:
        return from_dict(raw).validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None,
             device: torch.device | str = "cpu") -> LoadedRun:
    """The trained model of a run (newest checkpoint unless one is named), in eval mode."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    ckpt = resolve_checkpoint(run_dir, checkpoint, flag="--checkpoint")
    model = TransformerLM(cfg.model)
    state = load_weights(ckpt, model, run_dir, flag="--checkpoint")
    model.to(device).eval()
    return LoadedRun(cfg, model, tokenizer, ckpt, state)


def load_weights(ckpt: Checkpoint, model: TransformerLM, run_dir: Path | None = None,
                 flag: str = "--resume", map_location: str | torch.device = "cpu"
                 ) -> dict[str, Any]:
    """The weights of ``ckpt`` into the plain ``model`` in this process, whichever layout
    wrote it (one process, or several under torchrun); returns the training state it holds.
    ``map_location`` is where a single-process checkpoint's tensors are read to; a sharded one
    is read into the model's tensors wherever they are."""
    if not ckpt_lib.is_sharded(ckpt):
        return load_checkpoint(ckpt, model, run_dir, map_location, flag)
    # Imported here: torch.distributed.checkpoint costs half a second at start-up, which
    # single-process runs need not pay.
    from condcomp.distributed.checkpoint import load_sharded_weights

    return load_sharded_weights(ckpt, model, run_dir, flag)


def warn(message: str) -> None:
    print(f"condcomp: warning: {message}", file=sys.stderr)


def parse_metrics(path: Path, warn: Callable[[str], object] = warn) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A line that is not a JSON row (the last one cut by a crash
    or a full disk) is left out with a warning instead of making the run unreadable."""
    rows, bad = [], []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise storage_error(exc, f"cannot read {path}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad.append(lineno)
    if bad:
        where = f"line {bad[0]}" if len(bad) == 1 else f"lines {', '.join(map(str, bad[:5]))}"
        warn(f"{path}: left out {where}, not a complete metrics row (cut short by a crash or "
             "a full disk?)")
    return rows


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return parse_metrics(Path(run_dir) / METRICS_FILE)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename, so readers and crashes see the old file or
    the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(exc, f"cannot write {path}") from None


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what interrupted writes left in a run folder: unfinished checkpoints and the
    temporary files of :func:`write_atomically`. Only for the holder of the run's lock."""
    found = ckpt_lib.remove_leftovers(run_dir)
    for path in sorted(Path(run_dir).glob(".*.tmp-*")):
        if path.is_file():
            path.unlink(missing_ok=True)
            found.append(path)
    return found
