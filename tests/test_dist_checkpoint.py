"""Sharded checkpoints (condcomp.distributed.checkpoint): written by two gloo ranks under FSDP2,
read back in one plain process (master weights included), on two DDP ranks, by
``condcomp eval`` / ``generate`` / ``export``; a manifest written last, a truncated shard and a
full disk on one rank, each refused in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_model_cfg
from ranks import run_ranks
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from test_run_folders import one_line_error, train_args

from condcomp import checkpoint as ckpt_lib
from condcomp.checkpoint import Checkpoint, list_checkpoints, resolve_checkpoint
from condcomp.cli import main
from condcomp.distributed.checkpoint import load_sharded, rng_file, save_sharded
from condcomp.distributed.context import SINGLE, context_for_group
from condcomp.distributed.options import DistConfig
from condcomp.errors import CheckpointError, StorageError
from condcomp.export import unshard_checkpoint
from condcomp.master_weights import MasterWeights
from condcomp.model import TransformerLM
from condcomp.runs import load_run, read_config, remove_leftovers
from condcomp.train import make_optimizer

CPU = torch.device("cpu")


# ------------------------------------------------------------------ workers (forked ranks)


def _fully_shard(model: TransformerLM, world_size: int) -> TransformerLM:
    """FSDP2 per block, then at the root, as the data-parallel layout does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_and_save(rank: int, world_size: int, run_dir: str, start: str) -> dict:
    """Two FSDP2 steps from the weights of ``start``, a sharded checkpoint after each (steps 6
    and 7); what the ranks held at each, in full (rank 0) and each rank's RNG state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    cfg = read_config(Path(run_dir))
    ctx = context_for_group(DistConfig(data_parallel="fsdp"), "cpu")
    model = TransformerLM(cfg.model)
    ckpt_lib.load_checkpoint(Checkpoint(Path(start), 5), model)  # the same start on each rank
    sharded = _fully_shard(model, world_size)
    optimizer = make_optimizer(sharded.parameters(), cfg, CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    torch.manual_seed(100 + rank)  # each rank its own batches and dropout
    held = {}
    for step in (6, 7):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
        sharded(tokens, tokens).total_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        state = {"scheduler": scheduler.state_dict(), "step": step, "elapsed_s": float(step),
                 "nonfinite": 0, "tokens": step * 64}
        rng = torch.get_rng_state()
        save_sharded(Path(run_dir), step, sharded, optimizer, state, ctx, keep_last=2)
        full_model, full_optimizer = get_state_dict(
            sharded, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        held[step] = {"rng": rng, "model": full_model, "optimizer": full_optimizer}
    return held


def _load_as_ddp(rank: int, world_size: int, run_dir: str, truncated_run: str) -> dict:
    """Every rank a whole plain model in DDP: the newest checkpoint of ``run_dir`` loaded, and
    the line each rank raises for the one of ``truncated_run``."""
    from torch.nn.parallel import DistributedDataParallel

    cfg = read_config(Path(run_dir))
    ctx = context_for_group(DistConfig(data_parallel="ddp"), "cpu")
    model = TransformerLM(cfg.model)
    ddp = DistributedDataParallel(model)
    optimizer = make_optimizer(ddp.parameters(), cfg, CPU)
    state = load_sharded(resolve_checkpoint(Path(run_dir)), ddp, optimizer, ctx, Path(run_dir))
    names = {id(p): name for name, p in model.named_parameters()}
    exp_avg = {names[id(p)]: s["exp_avg"] for p, s in optimizer.state.items()}
    try:
        load_sharded(resolve_checkpoint(Path(truncated_run)), ddp, None, ctx,
                     Path(truncated_run))
        refused = None
    except CheckpointError as exc:
        refused = str(exc)
    return {"model": model.state_dict(), "exp_avg": exp_avg, "state": state,
            "rng": torch.get_rng_state(), "refused": refused}


def _with_experts_sharded(cfg, ctx, seed: int) -> TransformerLM:
    """A plain model but for one weight, a DTensor ``Shard(0)`` over the expert-parallel mesh,
    as expert parallelism holds the stacked experts (global name and shape unchanged)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(seed)
    model = TransformerLM(cfg.model)
    ffn = model.layers[0].block.ffn
    ffn.w1 = torch.nn.Parameter(distribute_tensor(ffn.w1.detach(), ctx.ep_mesh, [Shard(0)]))
    return model


def _save_and_reload_expert_shards(rank: int, world_size: int, run_dir: str) -> dict:
    """Save a model with an expert-parallel weight from 2 ranks, load it into another seed's
    model of the same layout; the weight in full, and whether this rank's piece came back."""
    cfg = read_config(Path(run_dir))
    ctx = context_for_group(DistConfig(data_parallel="ddp", ep=2), "cpu")
    model = _with_experts_sharded(cfg, ctx, seed=0)
    optimizer = make_optimizer(model.parameters(), cfg, CPU)
    save_sharded(Path(run_dir), 1, model, optimizer, {"step": 1}, ctx, keep_last=1)
    other = _with_experts_sharded(cfg, ctx, seed=1)
    load_sharded(resolve_checkpoint(Path(run_dir)), other, None, ctx)
    mine, theirs = model.layers[0].block.ffn.w1, other.layers[0].block.ffn.w1
    return {"w1": mine.full_tensor().detach(),
            "same_piece": torch.equal(mine.to_local(), theirs.to_local())}


def _save_until_the_disk_is_full(rank: int, world_size: int, run_dir: str) -> dict:
    """Plain DDP-style ranks save steps 1 to 3 (keep_last 2); then rank 1's disk is full
    while DCP writes step 4, and while it writes its RNG state of step 5."""
    cfg = read_config(Path(run_dir))
    ctx = context_for_group(DistConfig(data_parallel="ddp"), "cpu")
    model = TransformerLM(cfg.model)
    optimizer = make_optimizer(model.parameters(), cfg, CPU)
    for step in (1, 2, 3):
        save_sharded(Path(run_dir), step, model, optimizer, {"step": step}, ctx, keep_last=2)
    kept = [c.step for c in list_checkpoints(Path(run_dir))]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    errors = []
    # Step 4: inside DCP's write of the shards; step 5: the rank's RNG file.
    for step, target, name in ((4, os, "fsync"), (5, ckpt_lib, "save_state_file")):
        real = getattr(target, name)
        if rank == 1:
            setattr(target, name, full)
        try:
            save_sharded(Path(run_dir), step, model, optimizer, {"step": step}, ctx, keep_last=2)
            errors.append(None)
        except StorageError as exc:
            errors.append(str(exc))
        finally:
            setattr(target, name, real)
    leftovers = [p.name for p in (Path(run_dir) / "checkpoints").iterdir()
                 if p.name.startswith(".tmp-")]
    return {"kept": kept, "errors": errors, "leftovers": leftovers,
            "after": [c.step for c in list_checkpoints(Path(run_dir))]}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def sharded_run(corpus, tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """A run folder (trained 5 steps by ``condcomp train``) whose only checkpoints are the
    sharded ones of two FSDP2 ranks at steps 6 and 7; its single-process checkpoint of step 5,
    moved out; and what each rank held at each save."""
    tmp = tmp_path_factory.mktemp("sharded")
    run_dir = tmp / "run"
    assert main(train_args(corpus, run_dir, steps=5)) == 0
    single = tmp / "single"
    shutil.move(run_dir / "checkpoints", single)
    held = run_ranks(_train_and_save, 2, str(run_dir), str(single / "step_00000005"))
    return run_dir, single / "step_00000005", held


@pytest.fixture
def run_copy(sharded_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(sharded_run[0], run_dir)
    return run_dir


def truncate_shard(run_dir: Path, step: int = 7) -> Path:
    shard = ckpt_lib.step_folder(run_dir, step) / "dcp" / "__1_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return shard


def assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def exp_avg_by_name(model: torch.nn.Module, optimizer, params=None) -> dict:
    params = list(model.parameters()) if params is None else params
    names = {id(p): name for (name, _), p in zip(model.named_parameters(), params)}
    return {names[id(p)]: s["exp_avg"] for p, s in optimizer.state.items()}


# ------------------------------------------------------------------ loading


def test_the_checkpoint_of_two_fsdp_ranks_loads_in_one_plain_process(sharded_run):
    run_dir, _, held = sharded_run
    ckpt = resolve_checkpoint(run_dir)
    assert ckpt.step == 7 and ckpt_lib.is_sharded(ckpt)
    assert [c.step for c in list_checkpoints(run_dir)] == [6, 7]
    cfg = read_config(run_dir)
    model = TransformerLM(cfg.model)
    optimizer = make_optimizer(model.parameters(), cfg, CPU)
    state = load_sharded(ckpt, model, optimizer, SINGLE, run_dir)
    full = held[0][7]
    assert_same_tensors(model.state_dict(), full["model"])
    want = {name: s["exp_avg"] for name, s in full["optimizer"]["state"].items()}
    assert_same_tensors(exp_avg_by_name(model, optimizer), want)
    assert optimizer.param_groups[0]["lr"] == full["optimizer"]["param_groups"][0]["lr"] != \
        cfg.train.lr
    assert state["step"] == 7 and state["tokens"] == 7 * 64 and "scheduler" in state
    assert state["rng_restored"] is False  # 2 ranks wrote it, 1 reads it


def test_optimizer_state_loads_into_master_weights_by_name(sharded_run):
    run_dir, _, held = sharded_run
    cfg = read_config(run_dir)
    model = TransformerLM(cfg.model)
    masters = MasterWeights(model, torch.bfloat16)
    params = masters.optimizer_params()
    optimizer = make_optimizer(params, cfg, CPU)
    ckpt = resolve_checkpoint(run_dir)
    with pytest.raises(CheckpointError, match="pass optimizer_params"):
        load_sharded(ckpt, model, optimizer, SINGLE, run_dir)
    with masters.full_precision():
        load_sharded(ckpt, model, optimizer, SINGLE, run_dir, optimizer_params=params)
    masters.copy_to_model()
    full = held[0][7]
    for (name, weight), master in zip(model.named_parameters(), params):
        assert torch.equal(master, full["model"][name]), name
        assert torch.equal(weight, master.to(weight.dtype)), name
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    want = {name: s["exp_avg"] for name, s in full["optimizer"]["state"].items()}
    assert_same_tensors(exp_avg_by_name(model, optimizer, params), want)


def test_it_loads_on_two_ddp_ranks_and_a_truncated_shard_stops_both(sharded_run, run_copy):
    run_dir, _, held = sharded_run
    truncate_shard(run_copy)
    ranks = run_ranks(_load_as_ddp, 2, str(run_dir), str(run_copy))
    for rank, got in enumerate(ranks):
        assert_same_tensors(got["model"], held[0][7]["model"])
        want = {name: s["exp_avg"] for name, s in held[0][7]["optimizer"]["state"].items()}
        assert_same_tensors(got["exp_avg"], want)
        # As many ranks as wrote it: each has its own RNG state back.
        assert got["state"]["rng_restored"] is True
        assert torch.equal(got["rng"], held[rank][7]["rng"])
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    # Rank 1 alone hashes the cut shard; both stop, with the same line.
    assert ranks[0]["refused"] == ranks[1]["refused"]
    assert "is corrupt: dcp/__1_0.distcp has" in ranks[0]["refused"]
    assert "step_00000006" in ranks[0]["refused"]


def test_expert_parallel_dtensor_weights_reshard(sharded_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(sharded_run[0] / "config.json", run_dir)
    ranks = run_ranks(_save_and_reload_expert_shards, 2, str(run_dir))
    assert ranks[0]["same_piece"] and ranks[1]["same_piece"]
    model = TransformerLM(read_config(run_dir).model)
    load_sharded(resolve_checkpoint(run_dir), model, None, SINGLE, run_dir)
    assert torch.equal(model.layers[0].block.ffn.w1, ranks[0]["w1"])


def test_one_process_writes_a_sharded_checkpoint_and_gets_its_rng_back(tmp_path):
    model = TransformerLM(tiny_model_cfg())
    optimizer = torch.optim.AdamW(model.parameters())
    rng = torch.get_rng_state()
    path = save_sharded(tmp_path, 3, model, optimizer, {"step": 3}, SINGLE, keep_last=1)
    assert json.loads((path / "manifest.json").read_text())["world_size"] == 1
    torch.manual_seed(123)
    fresh = TransformerLM(tiny_model_cfg())
    state = load_sharded(resolve_checkpoint(tmp_path), fresh, None, SINGLE, tmp_path)
    assert state == {"step": 3, "rng_restored": True}
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_tensors(fresh.state_dict(), model.state_dict())
    save_sharded(tmp_path, 4, model, None, {"step": 4}, SINGLE, keep_last=1)
    with pytest.raises(CheckpointError, match="holds the weights only, no optimizer state"):
        load_sharded(resolve_checkpoint(tmp_path), fresh, optimizer, SINGLE, tmp_path)
    assert [c.step for c in list_checkpoints(tmp_path)] == [4]  # keep_last


def test_a_checkpoint_of_another_model_says_so(sharded_run):
    run_dir = sharded_run[0]
    cfg = read_config(run_dir)
    other = TransformerLM(tiny_model_cfg(vocab_size=cfg.model.vocab_size, d_model=64))
    with pytest.raises(CheckpointError, match=r"is of another model .*checkpoint \[32, 32\], "
                       r"model \[64, 64\]"):
        load_sharded(resolve_checkpoint(run_dir), other, None, SINGLE, run_dir)


def test_a_single_process_resumes_a_sharded_checkpoint(corpus, run_copy, capsys):
    assert main(train_args(corpus, run_copy, "--resume", steps=9)) == 0
    assert "resumed" in capsys.readouterr().out
    # It goes on from step 7 in the single-file format.
    ckpt = resolve_checkpoint(run_copy)
    assert ckpt.step == 9 and not ckpt_lib.is_sharded(ckpt)


# ------------------------------------------------------------------ on disk


def test_the_manifest_is_written_last_and_a_folder_without_one_is_not_listed(run_copy):
    ckpt = resolve_checkpoint(run_copy)
    manifest = json.loads((ckpt.path / "manifest.json").read_text())
    assert manifest["layout"] == "sharded" and manifest["world_size"] == 2
    files = sorted(p.relative_to(ckpt.path).as_posix() for p in ckpt.path.rglob("*")
                   if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == files
    assert {"state.pt", "dcp/.metadata", rng_file(0), rng_file(1)} <= set(files)
    last = max(p.stat().st_mtime_ns for p in ckpt.path.rglob("*") if p.is_file())
    assert (ckpt.path / "manifest.json").stat().st_mtime_ns == last
    # A write cut before its manifest: never listed, and removed by the next run.
    half = ckpt_lib.step_folder(run_copy, 8)
    shutil.copytree(ckpt.path, half)
    (half / "manifest.json").unlink()
    leftover = run_copy / "checkpoints" / ".tmp-step_00000009-4242"
    shutil.copytree(half, leftover)
    assert [c.step for c in list_checkpoints(run_copy)] == [6, 7]
    assert resolve_checkpoint(run_copy).step == 7
    assert remove_leftovers(run_copy) == [leftover] and not leftover.exists()


def test_a_truncated_shard_is_one_line_naming_the_previous_checkpoint(run_copy, capsys):
    shard = truncate_shard(run_copy)
    newest = ckpt_lib.step_folder(run_copy, 7)
    err = one_line_error(capsys, main(["eval", str(run_copy), "--checkpoint", str(newest)]))
    assert f"checkpoint {newest} is corrupt: dcp/__1_0.distcp has {shard.stat().st_size} " \
        "bytes" in err
    assert f"use the previous one with --checkpoint {ckpt_lib.step_folder(run_copy, 6)}" in err
    model = TransformerLM(read_config(run_copy).model)
    with pytest.raises(CheckpointError, match="truncated.*--resume .*step_00000006"):
        load_sharded(Checkpoint(newest, 7), model, None, SINGLE, run_copy)


def test_a_full_disk_on_one_rank_fails_every_rank_in_one_line(tmp_path, sharded_run):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(sharded_run[0] / "config.json", run_dir)
    ranks = run_ranks(_save_until_the_disk_is_full, 2, str(run_dir))
    assert ranks[0]["errors"] == ranks[1]["errors"]
    got = ranks[0]
    assert got["kept"] == [2, 3] and got["after"] == [2, 3] and got["leftovers"] == []
    for step, message in zip((4, 5), got["errors"]):
        assert message is not None and "\n" not in message
        assert f"cannot write checkpoint {ckpt_lib.step_folder(run_dir, step)}: No space left " \
            "on device (the disk is full); the latest good checkpoint is " in message
        assert message.endswith("step_00000003, which --resume continues from once the disk "
                                "has room")


# ------------------------------------------------------------------ the command line


def test_a_new_run_starts_from_the_weights_of_a_sharded_checkpoint(sharded_run, corpus,
                                                                   tmp_path, capsys):
    run_dir, _, held = sharded_run
    args = train_args(corpus, tmp_path / "new", "--set", f'train.init_from="{run_dir}"',
                      "--set", "train.lr=1e-12", steps=1)  # one step that moves nothing
    assert main(args) == 0
    assert f"initialised the weights from {ckpt_lib.step_folder(run_dir, 7)}" in \
        capsys.readouterr().out
    trained = load_run(tmp_path / "new").model.state_dict()
    for name, value in held[0][7]["model"].items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-9)


def test_eval_and_generate_read_a_sharded_run_in_one_process(sharded_run, capsys):
    run_dir, _, held = sharded_run
    assert main(["eval", str(run_dir), "--json", "--max-tokens", "256"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 7 and summary["checkpoint"].endswith("step_00000007")
    assert 0 < summary["val_loss"] < 10
    assert_same_tensors(load_run(run_dir).model.state_dict(), held[0][7]["model"])
    assert main(["generate", str(run_dir), "--prompt", "the", "--max-new-tokens", "4",
                 "--seed", "1"]) == 0


def test_export_writes_the_single_process_tensor_names(sharded_run, tmp_path, capsys):
    run_dir, single, _ = sharded_run
    cfg = read_config(run_dir)
    out = tmp_path / "sharded.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "step_00000007 (step 7)" in capsys.readouterr().out
    reference = tmp_path / "reference.safetensors"
    save_model(TransformerLM(cfg.model), str(reference))
    with safe_open(str(out), "pt") as f, safe_open(str(reference), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert "lm_head.weight" not in f.keys() or "tok_emb.weight" not in f.keys()
    fresh = TransformerLM(cfg.model).eval()
    load_model(fresh, str(out))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, load_run(run_dir).model(tokens).logits)
    # A single-process checkpoint exports to the weights of its own model.safetensors.
    out_single = tmp_path / "single.safetensors"
    assert main(["export", str(run_dir), "--checkpoint", str(single), "--out",
                 str(out_single)]) == 0
    with safe_open(str(out_single), "pt") as f, \
            safe_open(str(single / "model.safetensors"), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())  # noqa: SIM118
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("args, says", [
    (["--out", "{tmp}/model.pt"], "name a .safetensors file"),
    (["--out", "{tmp}"], "name a .safetensors file"),
    (["--out", "{tmp}/missing/model.safetensors"], "cannot write"),
    (["--checkpoint", "{tmp}", "--out", "{tmp}/m.safetensors"], "is not a complete checkpoint"),
])
def test_export_of_bad_input_is_one_line(sharded_run, tmp_path, capsys, args, says):
    args = [a.format(tmp=tmp_path) for a in args]
    err = one_line_error(capsys, main(["export", str(sharded_run[0]), *args]))
    assert says in err


def test_export_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, main(["export", str(tmp_path), "--out",
                                       str(tmp_path / "m.safetensors")]))
    assert "is not a run directory" in err


def test_a_sharded_checkpoint_unshards_into_a_single_process_one(sharded_run, tmp_path):
    run_dir, _, held = sharded_run
    into = tmp_path / "single"
    into.mkdir()
    path = unshard_checkpoint(run_dir, resolve_checkpoint(run_dir), into)
    assert path == ckpt_lib.step_folder(into, 7)
    cfg = read_config(run_dir)
    model = TransformerLM(cfg.model)
    state = ckpt_lib.load_checkpoint(Checkpoint(path, 7), model)
    assert_same_tensors(model.state_dict(), held[0][7]["model"])
    optimizer = make_optimizer(model.parameters(), cfg, CPU)
    optimizer.load_state_dict(state["optimizer"])
    want = {name: s["exp_avg"] for name, s in held[0][7]["optimizer"]["state"].items()}
    assert_same_tensors(exp_avg_by_name(model, optimizer), want)
    assert state["step"] == 7 and torch.equal(state["rng_cpu"], held[0][7]["rng"])
    assert set(state) >= {"scheduler", "elapsed_s", "nonfinite", "tokens"}

