"""Checkpoints: atomic, verified, and complete enough to resume a run bit for bit.

A checkpoint is a directory ``checkpoints/step_00000010/`` holding

- ``model.safetensors``: the weights (tied weights stored once, by ``safetensors.torch.save_model``);
- ``state.pt``: optimizer, scheduler, RNG states and the loop counters (plain tensors and
  numbers, loaded with ``weights_only=True``);
- ``manifest.json``: written last, with each file's size and SHA-256.

It is written under a temporary name and renamed into place, so a process killed mid-write
(SIGKILL included) never leaves a half checkpoint that looks complete. Loading checks the
manifest: a truncated or corrupt checkpoint is refused with a message naming the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from condcomp.errors import CheckpointError

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "manifest.json"
_PREFIX = "step_"


@dataclass
class Checkpoint:
    path: Path
    step: int


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Completed checkpoints of a run (those with a manifest), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(_PREFIX) and (path / MANIFEST_FILE).is_file():
            try:
                found.append(Checkpoint(path, int(path.name[len(_PREFIX):])))
            except ValueError:
                continue
    return sorted(found, key=lambda c: c.step)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write a checkpoint atomically, then delete all but the newest ``keep_last``."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(state, tmp / STATE_FILE)
    for name in (MODEL_FILE, STATE_FILE):
        _fsync(tmp / name)
    manifest = {"format": FORMAT_VERSION, "step": step,
                "files": {name: _describe(tmp / name) for name in (MODEL_FILE, STATE_FILE)}}
    _write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    if final.exists():  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def resolve_checkpoint(run_dir: Path, path: str | Path | None = None) -> Checkpoint:
    """The checkpoint at ``path``, or the newest one of the run."""
    if path is not None:
        path = Path(path)
        if not (path / MANIFEST_FILE).is_file():
            raise CheckpointError(
                f"{path} is not a complete checkpoint (no {MANIFEST_FILE}); name a directory "
                f"such as {checkpoint_dir(run_dir) / (_PREFIX + '00000100')}"
            )
        step = json.loads((path / MANIFEST_FILE).read_text()).get("step", -1)
        return Checkpoint(path, int(step))
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}; train the run first")
    return found[-1]


def verify_checkpoint(ckpt: Checkpoint, run_dir: Path | None = None) -> None:
    """Check every file against the manifest; raise a :class:`CheckpointError` naming the
    previous checkpoint, which stays usable, if anything is missing, truncated or altered."""
    try:
        manifest = json.loads((ckpt.path / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        _corrupt(ckpt, run_dir, f"its manifest is unreadable ({exc})")
    for name, expected in files.items():
        path = ckpt.path / name
        if not path.is_file():
            _corrupt(ckpt, run_dir, f"{name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            _corrupt(ckpt, run_dir, f"{name} has {size} bytes, expected {expected['bytes']} "
                                    "(truncated?)")
        if _sha256(path) != expected["sha256"]:
            _corrupt(ckpt, run_dir, f"{name} does not match its SHA-256 (corrupted?)")


def load_checkpoint(ckpt: Checkpoint, model: nn.Module, run_dir: Path | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, load the weights into ``model`` and return the training state."""
    verify_checkpoint(ckpt, run_dir)
    try:
        missing, unexpected = load_model(model, str(ckpt.path / MODEL_FILE), strict=False,
                                         device=str(map_location))
    except (SafetensorError, RuntimeError, OSError) as exc:
        _corrupt(ckpt, run_dir, f"its weights do not load ({exc})")
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit this model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}); was the model config changed since it was "
            "written?"
        )
    return torch.load(ckpt.path / STATE_FILE, map_location=map_location, weights_only=True)


def _corrupt(ckpt: Checkpoint, run_dir: Path | None, why: str) -> None:
    hint = "delete it and train again"
    if run_dir is not None:
        older = [c for c in list_checkpoints(run_dir) if c.step < ckpt.step]
        if older:
            hint = f"resume from the previous one with --resume {older[-1].path}"
    raise CheckpointError(f"checkpoint {ckpt.path} is corrupt: {why}; {hint}")


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
