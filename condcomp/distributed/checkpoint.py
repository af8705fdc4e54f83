"""Sharded checkpoints of a run launched by ``torchrun``, which load into any layout.

A sharded checkpoint lives where a single-process one does, ``checkpoints/step_XXXXXXXX/``
(so :func:`condcomp.checkpoint.list_checkpoints` and ``resolve_checkpoint`` find both), and holds

- ``dcp/``: the model's and the optimizer's state as ``torch.distributed.checkpoint`` (DCP)
  writes it: each rank's pieces in ``__<rank>_0.distcp`` and ``.metadata``, the index that
  names every tensor by its fully qualified name and global shape;
- ``state.pt``: the loop counters and the scheduler state (written by rank 0, plain tensors and
  numbers, loaded with ``weights_only=True``);
- ``rng/rank_00001.pt``: each rank's CPU (and CUDA) RNG state;
- ``manifest.json``: written last, by rank 0: ``"layout": "sharded"``, the world size, and every
  file's size and SHA-256 (each rank hashes a share of the files).

Every rank writes into one temporary folder, which rank 0 renames into place once the manifest
is in it, so a job killed mid-write leaves no folder that looks complete, and the next run's
``remove_leftovers`` deletes the temporary one.

The model state comes from ``get_state_dict``, which names every weight by its place in the
unwrapped model and gives its global shape, whether the rank holds a whole copy (DDP), a row
block (FSDP2's ``Shard(0)``) or some experts (a DTensor over the expert-parallel mesh). So a
checkpoint of N ranks loads into M ranks of another layout, or into one plain process without
a process group (``condcomp eval``, ``generate``, ``export``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from condcomp import checkpoint as ckpt_lib
from condcomp.checkpoint import MANIFEST_FILE, SHARDED, STATE_FILE, Checkpoint
from condcomp.distributed.context import SINGLE, DistContext
from condcomp.errors import CheckpointError, StorageError, storage_error

SHARDS_DIR, RNG_DIR = "dcp", "rng"
# Optimizer options that say how this process runs the update (fused needs CUDA), not what
# training has learned: a loaded optimizer keeps its own.
_IMPLEMENTATION_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank_{rank:05d}.pt"


# ------------------------------------------------------------------ saving


def save_sharded(run_dir: Path, step: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
                 ctx: DistContext, keep_last: int) -> Path:
    """Write the checkpoint of ``step`` from every rank; collective. ``state`` (the loop
    counters and the scheduler's state dict) is rank 0's. Then delete all but the newest
    ``keep_last`` checkpoints. A write that fails on any rank (a full disk) raises the same
    one-line :class:`StorageError` on every rank and leaves the earlier checkpoints as they
    were."""
    run_dir = Path(run_dir)
    final = ckpt_lib.step_folder(run_dir, step)
    _refuse_stand_ins(model, optimizer, "saved")  # on every rank alike, before any write

    def failed(exc: BaseException) -> StorageError | None:
        reason = _storage_failure(exc)
        return None if reason is None else storage_error(
            reason, f"cannot write checkpoint {final}", ckpt_lib.latest_good_hint(run_dir))

    tmp = _together(ctx, lambda: _start_folder(final) if ctx.is_main else None, failed)[0]
    try:
        _together(ctx, lambda: _write_shards(tmp / SHARDS_DIR, model, optimizer, ctx), failed)
        _together(ctx, lambda: _write_rank_files(tmp, state, ctx), failed)
        shares = _together(ctx, lambda: _hash_share(tmp, ctx), failed)
        files = {name: entry for share in shares for name, entry in share.items()}
        manifest = {"format": ckpt_lib.FORMAT_VERSION, "layout": SHARDED, "step": step,
                    "world_size": ctx.world_size, "torch": torch.__version__,
                    "files": dict(sorted(files.items()))}
        _together(ctx, lambda: _publish(tmp, final, manifest) if ctx.is_main else None, failed)
    except BaseException:
        if ctx.is_main:  # every rank has stopped writing: each failure above is collective
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ctx.is_main:
        ckpt_lib.prune_checkpoints(run_dir, keep_last)
    return final


def _start_folder(final: Path) -> Path:
    tmp = ckpt_lib.tmp_folder(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    for folder in (tmp, tmp / SHARDS_DIR, tmp / RNG_DIR):
        folder.mkdir()
    return tmp


def _write_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  ctx: DistContext) -> None:
    if optimizer is None:
        to_save = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        to_save = {"model": model_state, "optimizer": optimizer_state}
    with _quiet_single_process():
        dcp.save(to_save, checkpoint_id=str(path), **_no_dist(ctx))


def _write_rank_files(tmp: Path, state: dict[str, Any], ctx: DistContext) -> None:
    written = [tmp / rng_file(ctx.rank)]
    ckpt_lib.save_state_file(_rng_states(), written[0])
    if ctx.is_main:
        written.append(tmp / STATE_FILE)
        ckpt_lib.save_state_file(state, written[1])
    for path in written:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _hash_share(tmp: Path, ctx: DistContext) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every ``world_size``-th file of the checkpoint, from this rank's
    index on: the ranks split the hashing, which for a large model is most of the time."""
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    return {name: ckpt_lib.describe_file(tmp / name)
            for name in names[ctx.rank::ctx.world_size]}


def _publish(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    ckpt_lib.write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    ckpt_lib.move_into_place(tmp, final)
    ckpt_lib.fsync_dir(final.parent)


def _storage_failure(exc: BaseException) -> BaseException | None:
    """The OS error that made a write fail, wherever it hides: raised directly, as the
    context of torch's zip-writer error, or on some rank of a DCP write (DCP gathers every
    rank's exception); None for anything else (a bug, which keeps its traceback)."""
    if isinstance(exc, (OSError, SafetensorError)):
        return exc
    if isinstance(exc, CheckpointException):
        for wrapped in exc.failures.values():
            found = _storage_failure(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
            if found is not None:
                return found
        return None
    if isinstance(exc.__context__, OSError):
        return exc.__context__
    return None


# ------------------------------------------------------------------ loading


def load_sharded(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 ctx: DistContext, run_dir: Path | None = None, *,
                 optimizer_params: Iterable[nn.Parameter] | None = None,
                 restore_rng: bool = True, flag: str = "--resume") -> dict[str, Any]:
    """Verify ``ckpt``, load its weights (and optimizer state) into this rank's ``model`` and
    ``optimizer``, and return the training state it holds; collective under ``torchrun``.

    ``model`` may be wrapped in any layout (FSDP2, DDP, expert-parallel DTensors), or plain
    in one process (``ctx`` = :data:`SINGLE`), whatever layout wrote the checkpoint. The state
    has ``rng_restored``: True when this rank's RNG states were restored, which needs as many
    ranks as wrote the checkpoint; else the loop must seed each rank itself.

    One process whose optimizer holds stand-ins for the model's parameters (fp32 master
    weights, condcomp.master_weights) passes ``optimizer_params``: the optimizer's parameters
    in ``model.parameters()`` order (``MasterWeights.optimizer_params()``), by which each one
    is matched to its weight's name. Load it inside ``masters.full_precision()`` (the weights
    then land in the fp32 masters) and call ``masters.copy_to_model()`` after.
    """
    manifest = _verified_manifest(ckpt, ctx, run_dir, flag)
    metadata = dcp.FileSystemReader(str(ckpt.path / SHARDS_DIR)).read_metadata()
    if optimizer is not None and not _saved_keys(metadata, "optimizer"):
        raise CheckpointError(f"checkpoint {ckpt.path} holds the weights only, no optimizer "
                              "state to resume from; start a new run from its weights with "
                              "train.init_from")
    if ctx.distributed:
        if optimizer_params is not None:
            raise CheckpointError("optimizer state loads into stand-ins of the parameters "
                                  "(master weights) in one process only; under torchrun the "
                                  "optimizer must hold the model's own parameters")
        _load_distributed(ckpt, model, optimizer, metadata)
    else:
        _load_plain(ckpt, model, optimizer, metadata, optimizer_params)
    state = torch.load(ckpt.path / STATE_FILE, map_location="cpu", weights_only=True)
    state["rng_restored"] = restore_rng and _restore_rng(ckpt, manifest, ctx)
    return state


def load_sharded_weights(ckpt: Checkpoint, model: nn.Module, run_dir: Path | None = None,
                         flag: str = "--checkpoint") -> dict[str, Any]:
    """The weights of ``ckpt`` into the plain ``model`` in this process (to evaluate, sample
    or export them); returns the training state, leaves the RNG alone."""
    return load_sharded(ckpt, model, None, SINGLE, run_dir, restore_rng=False, flag=flag)


def read_rank_rng(ckpt: Checkpoint, rank: int) -> dict[str, torch.Tensor]:
    """The RNG states rank ``rank`` saved (``cpu``, and ``cuda`` where it had one)."""
    return torch.load(ckpt.path / rng_file(rank), map_location="cpu", weights_only=True)


def _verified_manifest(ckpt: Checkpoint, ctx: DistContext, run_dir: Path | None,
                       flag: str) -> dict[str, Any]:
    """Every file checked against the manifest, the ranks splitting the hashing; a failure
    on any rank raises the same :class:`CheckpointError` on all of them."""
    message = None
    try:
        ckpt_lib.verify_checkpoint(ckpt, run_dir, flag, share=(ctx.rank, ctx.world_size))
    except CheckpointError as exc:
        message = str(exc)
    first = next((m for m in _all_gather(ctx, message) if m), None)
    if first:
        raise CheckpointError(first)
    manifest = ckpt_lib.read_manifest(ckpt)
    if manifest.get("layout") != SHARDED:
        raise CheckpointError(f"checkpoint {ckpt.path} is a single-process checkpoint, not a "
                              "sharded one; resume it without torchrun, or start a run from "
                              "its weights with train.init_from")
    return manifest


def _load_distributed(ckpt: Checkpoint, model: nn.Module,
                      optimizer: torch.optim.Optimizer | None, metadata: Metadata) -> None:
    """DCP's own way: state dicts of this rank's layout, filled in place from whatever layout
    wrote the checkpoint, then handed back to the model and the optimizer."""
    _refuse_stand_ins(model, optimizer, "loaded")
    if optimizer is None:
        model_state = get_model_state_dict(model)
        _check_same_model(ckpt, metadata, model_state)
        dcp.load({"model": model_state}, checkpoint_id=str(ckpt.path / SHARDS_DIR))
        set_model_state_dict(model, model_state)
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    _check_same_model(ckpt, metadata, model_state)
    dcp.load({"model": model_state, "optimizer": optimizer_state},
             checkpoint_id=str(ckpt.path / SHARDS_DIR))
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict=optimizer_state)


def _load_plain(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                metadata: Metadata, optimizer_params: Iterable[nn.Parameter] | None) -> None:
    """One process, no process group: the full weights straight into the model's tensors
    (``state_dict()`` shares their storage), the optimizer state converted from names to the
    optimizer's own numbering."""
    model_state = model.state_dict()
    _check_same_model(ckpt, metadata, model_state)
    _load_local({"model": model_state}, ckpt)
    if optimizer is not None:
        names = _names_of_optimizer_params(model, optimizer, optimizer_params)
        saved = _read_saved_optimizer(ckpt, metadata)
        optimizer.load_state_dict(_numbered_optimizer_state(optimizer, names, saved))


def _check_same_model(ckpt: Checkpoint, metadata: Metadata, model_state: dict[str, Any]) -> None:
    # DTensor.shape is the global shape, so this compares like with like in every layout.
    saved = {key[len("model."):]: tuple(md.size) for key, md in _saved_keys(metadata, "model")}
    expected = {name: tuple(value.shape) for name, value in model_state.items()
                if isinstance(value, torch.Tensor)}
    ckpt_lib.check_same_shapes(ckpt, saved, expected)


def _saved_keys(metadata: Metadata, top: str) -> list[tuple[str, Any]]:
    """The tensors saved under ``top`` ("model" or "optimizer"), by flattened key."""
    return [(key, md) for key, md in metadata.state_dict_metadata.items()
            if key.startswith(f"{top}.") and isinstance(md, TensorStorageMetadata)]


def _refuse_stand_ins(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                      done: str) -> None:
    """DCP names optimizer state by the model parameter it belongs to, so an optimizer over
    other tensors (fp32 master copies) cannot be saved or loaded its way."""
    if optimizer is None:
        return
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
        raise CheckpointError(
            f"the optimizer holds tensors that are not the model's parameters (master "
            f"weights?); its state can be {done} sharded only when it updates the model's own "
            "parameters (use the data-parallel layout's mixed precision instead)")


def _names_of_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer,
                               optimizer_params: Iterable[nn.Parameter] | None
                               ) -> dict[int, str]:
    """Each optimizer parameter's weight name: its own, or with ``optimizer_params`` (in
    ``model.parameters()`` order) the name of the weight it stands in for."""
    named = list(model.named_parameters())
    params = [p for _, p in named] if optimizer_params is None else list(optimizer_params)
    if len(params) != len(named):
        raise CheckpointError(f"optimizer_params has {len(params)} parameters, the model "
                              f"{len(named)}; give them in model.parameters() order")
    names = {id(p): name for (name, _), p in zip(named, params)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError(
                    "the optimizer holds a tensor that is not the model's parameter (master "
                    "weights?); pass optimizer_params, its parameters in model.parameters() "
                    "order (MasterWeights.optimizer_params())")
    return names


def _read_saved_optimizer(ckpt: Checkpoint, metadata: Metadata) -> dict[str, Any]:
    """The saved optimizer state as ``get_state_dict`` gave it, whole, in this process:
    ``{"state": {name: {"exp_avg": ...}}, "param_groups": [{"params": [name, ...], ...}]}``."""
    flat: dict[str, Any] = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("optimizer."):
            flat[key] = (torch.empty(md.size, dtype=md.properties.dtype)
                         if isinstance(md, TensorStorageMetadata) else None)
    _load_local(flat, ckpt)
    # DCP saved nested dicts under flattened keys; planner_data maps each key to its path.
    nested: dict[Any, Any] = {}
    for key, value in flat.items():
        *parents, leaf = metadata.planner_data[key]
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    saved = nested["optimizer"]
    groups = saved.get("param_groups", {})
    return {"state": saved.get("state", {}), "param_groups": [groups[i] for i in sorted(groups)]}


def _numbered_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str],
                              saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (keyed by weight name) as ``optimizer.load_state_dict`` wants it: parameters
    numbered in the order of this optimizer's groups, each group's saved options."""
    group_of = {name: group for group in saved["param_groups"] for name in group["params"]}
    state: dict[int, Any] = {}
    groups = []
    index = 0
    for group in optimizer.param_groups:
        numbers = []
        options = {key: value for key, value in group.items() if key != "params"}
        for p in group["params"]:
            name = names[id(p)]
            if name in saved["state"]:
                state[index] = saved["state"][name]
            numbers.append(index)
            index += 1
        first = group_of.get(names[id(group["params"][0])], {}) if group["params"] else {}
        options.update({key: value for key, value in first.items()
                        if key != "params" and key not in _IMPLEMENTATION_OPTIONS})
        groups.append({**options, "params": numbers})
    return {"state": state, "param_groups": groups}


def _restore_rng(ckpt: Checkpoint, manifest: dict[str, Any], ctx: DistContext) -> bool:
    path = ckpt.path / rng_file(ctx.rank)
    if manifest.get("world_size") != ctx.world_size or not path.is_file():
        return False
    states = read_rank_rng(ckpt, ctx.rank)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    return True


def _load_local(state_dict: dict[str, Any], ckpt: Checkpoint) -> None:
    """``dcp.load`` in this process alone, even where a process group runs."""
    with _quiet_single_process():
        dcp.load(state_dict, checkpoint_id=str(ckpt.path / SHARDS_DIR), **_no_dist(SINGLE))


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # One process is what is meant where DCP runs without a process group; it warns that it
    # assumes so.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _no_dist(ctx: DistContext) -> dict[str, bool]:
    """DCP's argument to work in this process alone, given only where a process group runs
    that ``ctx`` does not use (DCP assumes one process where none runs)."""
    local = not ctx.distributed and dist.is_available() and dist.is_initialized()
    return {"no_dist": True} if local else {}


# ------------------------------------------------------------------ the ranks agree


def _all_gather(ctx: DistContext, obj: Any) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _together(ctx: DistContext, work: Callable[[], Any],
              failed: Callable[[BaseException], StorageError | None]) -> list[Any]:
    """``work()`` on this rank, then every rank's result in rank order; collective.

    If it failed on any rank, every rank raises: the storage error ``failed`` makes of it (a
    full disk: one line), or where that is None (a bug) the original on its rank, with its
    traceback, and a line naming that rank on the others. A rank that raised alone would leave
    the others waiting in the next collective until the timeout."""
    result, error, message = None, None, None
    try:
        result = work()
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        error = exc
        known = failed(exc)
        message = None if known is None else str(known)
    outcomes = _all_gather(ctx, (result, error is not None, message))
    if error is not None and message is None:
        raise error
    for rank, (_, rank_failed, rank_message) in enumerate(outcomes):
        if rank_message is not None:
            raise StorageError(rank_message)
        if rank_failed:
            raise RuntimeError(f"rank {rank} failed while writing a checkpoint; see its "
                               "traceback")
    return [outcome[0] for outcome in outcomes]
