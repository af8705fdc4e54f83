"""A checkpoint of either layout in the single-process forms.

- :func:`export_safetensors` (``condcomp export``): the weights as one safetensors file with
  the names of a single-process checkpoint's ``model.safetensors`` (tied weights once), for
  tools that read one file;
- :func:`unshard_checkpoint`: a sharded checkpoint (condcomp.distributed.checkpoint) as a
  single-process checkpoint folder, weights, optimizer state and all, so a run trained under
  ``torchrun`` can go on in one process.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from condcomp import checkpoint as ckpt_lib
from condcomp.checkpoint import Checkpoint
from condcomp.distributed.checkpoint import load_sharded, read_rank_rng
from condcomp.distributed.context import SINGLE
from condcomp.errors import CheckpointError, CondcompError, storage_error
from condcomp.model import TransformerLM
from condcomp.runs import load_weights, read_config
from condcomp.train import make_optimizer


def export_safetensors(run_dir: str | Path, checkpoint: str | Path | None,
                       out: str | Path) -> tuple[Path, Checkpoint]:
    """Write the weights of the run's checkpoint (the newest unless one is named) to
    ``out``, whole or not at all; return the file and the checkpoint."""
    out = _check_out(Path(out))
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    ckpt = ckpt_lib.resolve_checkpoint(run_dir, checkpoint, flag="--checkpoint")
    model = TransformerLM(cfg.model)
    load_weights(ckpt, model, run_dir, flag="--checkpoint")
    _save_model_atomically(model, out)
    return out, ckpt


def _check_out(out: Path) -> Path:
    if out.suffix != ".safetensors":
        raise CondcompError(f"--out {out}: name a .safetensors file, e.g. model.safetensors")
    if out.is_dir():
        raise CondcompError(f"--out {out} is a folder; name a .safetensors file in it")
    return out


def _save_model_atomically(model: torch.nn.Module, out: Path) -> None:
    # Renamed into place once complete, so a crash or a full disk never leaves a cut file
    # under the name a reader would take for the weights.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_model(model, str(tmp))
        ckpt_lib.give_default_mode(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(exc, f"cannot write {out}") from None


def unshard_checkpoint(run_dir: str | Path, ckpt: Checkpoint, into_run_dir: str | Path
                       ) -> Path:
    """Write the sharded ``ckpt`` of ``run_dir`` as a single-process checkpoint of the same
    step into ``into_run_dir`` (which may be ``run_dir`` itself: the sharded folder is then
    replaced, once the new one is complete). The optimizer state is numbered as the
    single-process loop's optimizer numbers it; the RNG state is rank 0's."""
    run_dir = Path(run_dir)
    if not ckpt_lib.is_sharded(ckpt):
        raise CheckpointError(f"checkpoint {ckpt.path} is a single-process checkpoint already")
    cfg = read_config(run_dir)
    model = TransformerLM(cfg.model)
    optimizer = make_optimizer(model.parameters(), cfg, torch.device("cpu"))
    state = load_sharded(ckpt, model, optimizer, SINGLE, run_dir, restore_rng=False)
    del state["rng_restored"]
    state.update(optimizer=optimizer.state_dict(), rng_cpu=read_rank_rng(ckpt, 0)["cpu"])
    into_run_dir = Path(into_run_dir)
    keep_all = len(ckpt_lib.list_checkpoints(into_run_dir)) + 1
    return ckpt_lib.save_checkpoint(into_run_dir, ckpt.step, model, state, keep_all)
