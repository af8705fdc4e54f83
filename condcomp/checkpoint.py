"""Checkpoints: atomic, verified, and complete enough to resume a run bit for bit.

A checkpoint is a directory ``checkpoints/step_00000010/`` holding

- ``model.safetensors``: the weights (tied weights stored once, by ``safetensors.torch.save_model``);
- ``state.pt``: optimizer, scheduler, RNG states and the loop counters (plain tensors and
  numbers, loaded with ``weights_only=True``);
- ``manifest.json``: written last, with each file's size and SHA-256.

It is written under a temporary name (``.tmp-...``) and renamed into place, so a process killed
mid-write (SIGKILL included) never leaves a half checkpoint that looks complete; the next run
into the folder deletes such leftovers (:func:`remove_leftovers`). Loading checks the manifest:
a truncated or corrupt checkpoint is refused with a message naming the previous one, and a
checkpoint of another model with one naming the weights whose shapes differ.

A run launched by ``torchrun`` writes *sharded* checkpoints into the same folders
(:mod:`condcomp.distributed.checkpoint`; its manifest says ``"layout": "sharded"``). Listing,
resolving and verifying treat both alike; :func:`load_checkpoint` reads the single-process
layout only, and ``condcomp.runs.load_weights`` reads the weights of either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from condcomp.errors import CheckpointError, storage_error

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "manifest.json"
SHARDED = "sharded"  # the manifest's "layout" of a sharded checkpoint; absent: single-process
# What a sharded manifest must list: the loop counters and DCP's index of the shards.
SHARDED_REQUIRED = (STATE_FILE, "dcp/.metadata")
_PREFIX = "step_"
TMP_PREFIX = ".tmp-"  # a checkpoint being written, renamed to step_XXXXXXXX when complete


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


def step_folder(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives once complete."""
    return checkpoint_dir(run_dir) / f"{_PREFIX}{step:08d}"


def tmp_folder(final: Path) -> Path:
    """A folder to write the checkpoint ``final`` into before renaming it into place; its name
    marks it as a leftover for :func:`remove_leftovers` should the writer die."""
    return final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}")


class WeightsWriter(Protocol):
    """Writes a checkpoint's weights file some other way than from a model in memory (an
    import converts them from another file as it writes)."""

    def write(self, path: Path) -> dict[str, Any]:
        """Write the file, fsynced, and return :func:`describe_file`'s entry for it."""
        ...


def _write_weights(weights: nn.Module | WeightsWriter, path: Path) -> dict[str, Any]:
    if not isinstance(weights, nn.Module):
        return weights.write(path)
    save_model(weights, str(path))
    give_default_mode(path)
    _fsync(path)
    return describe_file(path)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module | WeightsWriter,
                    state: dict[str, Any], keep_last: int) -> Path:
    """Write a checkpoint atomically, then delete all but the newest ``keep_last``. The
    weights are ``model``'s, or what a :class:`WeightsWriter` writes.

    A write that fails (a full disk, say) leaves the earlier checkpoints as they were and raises
    a :class:`StorageError` naming the latest good one; any other failure leaves them too."""
    root = checkpoint_dir(run_dir)
    final = step_folder(run_dir, step)
    tmp = tmp_folder(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {MODEL_FILE: _write_weights(model, tmp / MODEL_FILE)}
        save_state_file(state, tmp / STATE_FILE)
        _fsync(tmp / STATE_FILE)
        files[STATE_FILE] = describe_file(tmp / STATE_FILE)
        manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
        write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        move_into_place(tmp, final)
        fsync_dir(root)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(exc, f"cannot write checkpoint {final}",
                            latest_good_hint(run_dir)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep_last)
    return final


def latest_good_hint(run_dir: Path) -> str:
    """What is left to resume from after a failed checkpoint write, for its message."""
    good = list_checkpoints(run_dir)
    return (f"the latest good checkpoint is {good[-1].path}, which --resume continues from "
            "once the disk has room" if good else "no checkpoint of this run was written yet")


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)


def give_default_mode(path: Path) -> None:
    """The permissions a file made with ``open`` gets (``0o666`` less the umask). safetensors
    creates its files readable by their owner only, where the run's other files (``state.pt``,
    the manifest) are readable as the umask says: others sharing a run folder on a cluster could
    read everything but its weights."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_state_file(state: dict[str, Any], path: Path) -> None:
    # Through a Python file, so that a failed write (a full disk) surfaces as the OSError that
    # says why; torch raises a RuntimeError about its zip writer while handling it.
    with open(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as exc:
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``. The same step saved again (a resumed run) replaces it, and
    the old copy is deleted only once the new one is in place."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary folders of checkpoint writes that were interrupted (a process
    killed mid-write leaves one, as large as a checkpoint). Only for the holder of the run's
    lock (condcomp.run_lock): another process's live write would go too."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = sorted(path for path in root.iterdir() if path.name.startswith(TMP_PREFIX))
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def resolve_checkpoint(run_dir: Path, path: str | Path | None = None,
                       flag: str = "--resume") -> Checkpoint:
    """The checkpoint at ``path``, or the newest one of the run. ``flag`` is the option that
    names a checkpoint where the message suggests another one."""
    if path is not None:
        path = Path(path)
        if not (path / MANIFEST_FILE).is_file():
            raise CheckpointError(
                f"{path} is not a complete checkpoint (no {MANIFEST_FILE}); name a directory "
                f"such as {checkpoint_dir(run_dir) / (_PREFIX + '00000100')}"
            )
        try:
            step = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))["step"]
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"its step is {step!r}, not a step number")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _corrupt(Checkpoint(path, _step_in_name(path)), run_dir,
                     f"its manifest is unreadable ({exc})", flag)
        return Checkpoint(path, step)
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}; train the run first")
    return found[-1]


def read_manifest(ckpt: Checkpoint) -> dict[str, Any]:
    """The checkpoint's manifest; OSError or ValueError if unreadable."""
    manifest = json.loads((ckpt.path / MANIFEST_FILE).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"it holds a {type(manifest).__name__}, not a table")
    return manifest


def is_sharded(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` was written by several processes (condcomp.distributed.checkpoint).
    An unreadable manifest counts as single-process, whose loading reports it."""
    try:
        return read_manifest(ckpt).get("layout") == SHARDED
    except (OSError, ValueError):
        return False


def _listed_files(manifest: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Each file the manifest vouches for: its path in the checkpoint, size and SHA-256."""
    if manifest.get("layout") == SHARDED:
        names = list(manifest["files"])
        for name in names:
            # Paths inside the checkpoint only: a manifest must not send the check elsewhere.
            if not isinstance(name, str) or PurePosixPath(name).is_absolute() or \
                    ".." in PurePosixPath(name).parts:
                raise ValueError(f"it lists {name!r}, which is not a path inside the checkpoint")
        for name in SHARDED_REQUIRED:
            if name not in names:
                raise ValueError(f"it does not list {name}")
    else:
        names = [MODEL_FILE, STATE_FILE]
    return {name: (int(manifest["files"][name]["bytes"]), str(manifest["files"][name]["sha256"]))
            for name in names}


def verify_checkpoint(ckpt: Checkpoint, run_dir: Path | None = None,
                      flag: str = "--resume", share: tuple[int, int] = (0, 1)) -> None:
    """Check every file against the manifest; raise a :class:`CheckpointError` naming the
    previous checkpoint, which stays usable, if anything is missing, truncated or altered.

    ``share = (i, n)`` checks every n-th file from the i-th only (in name order), so that n
    processes can split the hashing of a large sharded checkpoint between them."""
    try:
        files = _listed_files(read_manifest(ckpt))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        _corrupt(ckpt, run_dir, f"its manifest is unreadable ({exc})", flag)
    index, count = share
    for name in sorted(files)[index::count]:
        n_bytes, sha256 = files[name]
        path = ckpt.path / name
        if not path.is_file():
            _corrupt(ckpt, run_dir, f"{name} is missing", flag)
        size = path.stat().st_size
        if size != n_bytes:
            _corrupt(ckpt, run_dir, f"{name} has {size} bytes, expected {n_bytes} (truncated?)",
                     flag)
        if _sha256(path) != sha256:
            _corrupt(ckpt, run_dir, f"{name} does not match its SHA-256 (corrupted?)", flag)


def load_checkpoint(ckpt: Checkpoint, model: nn.Module, run_dir: Path | None = None,
                    map_location: str | torch.device = "cpu", flag: str = "--resume"
                    ) -> dict[str, Any]:
    """Verify, load the weights into ``model`` and return the training state."""
    if is_sharded(ckpt):
        n = read_manifest(ckpt).get("world_size", "several")
        raise CheckpointError(
            f"checkpoint {ckpt.path} is sharded (written by {n} processes under torchrun); "
            "resume it under torchrun, or read its weights with condcomp eval, generate or export")
    verify_checkpoint(ckpt, run_dir, flag)
    try:
        check_same_model(ckpt, model)
        missing, unexpected = load_model(model, str(ckpt.path / MODEL_FILE), strict=False,
                                         device=str(map_location))
    except (SafetensorError, RuntimeError, OSError) as exc:
        _corrupt(ckpt, run_dir, f"its weights do not load ({exc})", flag)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"it lacks {_some(sorted(missing))}")
        if unexpected:
            parts.append(f"it holds {_some(sorted(unexpected))}, which this model has not")
        raise another_model(ckpt, " and ".join(parts))
    return torch.load(ckpt.path / STATE_FILE, map_location=map_location, weights_only=True)


def check_same_model(ckpt: Checkpoint, model: nn.Module) -> None:
    """Refuse, in one line, a checkpoint whose weights have other shapes than ``model``'s:
    a checkpoint of another model, which loading would report as a page of size mismatches."""
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    differ = []
    with safe_open(str(ckpt.path / MODEL_FILE), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            shape = list(f.get_slice(name).get_shape())
            if name in expected and shape != expected[name]:
                differ.append(f"{name}: checkpoint {shape}, model {expected[name]}")
    if differ:
        more = f"; and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise another_model(ckpt, "; ".join(differ[:3]) + more)


def check_same_shapes(ckpt: Checkpoint, saved: dict[str, tuple[int, ...]],
                      expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse, in one line, weights named or shaped otherwise than the model's: ``saved`` and
    ``expected`` map each weight's name to its (global) shape."""
    differ = [f"{name}: checkpoint {list(saved[name])}, model {list(shape)}"
              for name, shape in expected.items() if name in saved and saved[name] != shape]
    if differ:
        more = f"; and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise another_model(ckpt, "; ".join(differ[:3]) + more)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    parts = []
    if missing:
        parts.append(f"it lacks {_some(missing)}")
    if unexpected:
        parts.append(f"it holds {_some(unexpected)}, which this model has not")
    if parts:
        raise another_model(ckpt, " and ".join(parts))


def another_model(ckpt: Checkpoint, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {ckpt.path} is of another model (it is not corrupt): {what}; use it with "
        "the config of the run that wrote it (its config.json), or a checkpoint of this model")


def _some(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"


def _step_in_name(path: Path) -> int:
    try:
        return int(path.name[len(_PREFIX):])
    except ValueError:
        return -1


def _corrupt(ckpt: Checkpoint, run_dir: Path | None, why: str, flag: str = "--resume"
             ) -> NoReturn:
    hint = "delete it and train again"
    if run_dir is not None:
        older = [c for c in list_checkpoints(run_dir) if c.step < ckpt.step]
        if older:
            hint = f"use the previous one with {flag} {older[-1].path}"
    raise CheckpointError(f"checkpoint {ckpt.path} is corrupt: {why}; {hint}")


def describe_file(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
