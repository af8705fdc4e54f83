"""Training on several gloo processes: the losses and weights of one process, whatever the layout.

The workers are forked processes with a gloo group (tests/ranks.py) that call ``train`` as a
``torchrun`` worker would: ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment.
Dropout is off, so every layout computes the same function of the same global batches: with
``grad_accum`` a multiple of the world size each rank's micro-batches are the single
process's, routing groups (Switch's capacity) included.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import tiny_overrides
from ranks import run_ranks
from test_fuzz_config import preset_kinds, tiny

from condcomp.checkpoint import is_sharded, resolve_checkpoint
from condcomp.config import load_config
from condcomp.errors import CondcompError
from condcomp.model import TransformerLM
from condcomp.presets import list_presets
from condcomp.runs import load_weights, read_config, read_metrics
from condcomp.train import train

STEPS = 6
MODELS = {
    "dense": ("dense_tiny", []),
    # Switch with capacity (tokens dropped per micro-batch) on both layers, the aux losses on.
    "switch": ("switch", ["model.ffn.layers='all'"]),
}


def overrides(corpus, tmp, name: str, model: str, steps: int = STEPS) -> list[str]:
    return [*tiny_overrides(corpus, tmp, name, steps=steps), *MODELS[model][1],
            "model.dropout=0.0", "train.grad_accum=2", "train.ckpt_every=3",
            "train.eval_every=3"]


def quiet(_message: str) -> None:
    pass


def _train_rank(rank: int, world: int, preset: str, sets: list[str], resume: bool = False
                ) -> str:
    """A worker: ``train`` as torchrun would start it; returns the error line, if any."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        train(load_config(preset, sets), resume=resume, log=quiet)
        return ""
    except CondcompError as exc:
        return str(exc)


def train_on_ranks(world: int, model: str, sets: list[str], resume: bool = False) -> None:
    errors = run_ranks(_train_rank, world, MODELS[model][0], sets, resume)
    assert errors == [""] * world, errors


def losses(run_dir) -> list[float]:
    return [row["train_loss"] for row in read_metrics(run_dir) if row["kind"] == "train"]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    model = TransformerLM(read_config(run_dir).model)
    load_weights(resolve_checkpoint(run_dir), model, run_dir)
    return model.state_dict()


def assert_same_run(run_dir, reference, tol: float = 2e-5) -> None:
    got, want = losses(run_dir), losses(reference)
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=tol, abs=tol)
    weights, ref = final_weights(run_dir), final_weights(reference)
    for name, tensor in ref.items():
        assert torch.allclose(weights[name], tensor, rtol=tol, atol=tol), name


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """Each model trained in one process: the reference."""
    tmp = tmp_path_factory.mktemp("single")
    runs = {}
    for model, (preset, _) in MODELS.items():
        train(load_config(preset, overrides(corpus, tmp, model, model)), log=quiet)
        runs[model] = tmp / model
    return runs


@pytest.mark.parametrize("model,layout", [
    ("dense", ["dist.data_parallel='fsdp'"]),
    ("dense", ["dist.data_parallel='ddp'"]),
    ("switch", ["dist.data_parallel='fsdp'"]),
    ("switch", ["dist.data_parallel='ddp'"]),
    ("switch", ["dist.data_parallel='fsdp'", "dist.ep=2"]),
    ("switch", ["dist.data_parallel='ddp'", "dist.ep=2"]),
])
def test_two_ranks_train_what_one_process_trains(single, corpus, tmp_path, model, layout):
    train_on_ranks(2, model, overrides(corpus, tmp_path, "run", model) + layout)
    run_dir = tmp_path / "run"
    assert_same_run(run_dir, single[model])
    assert is_sharded(resolve_checkpoint(run_dir))
    rows = read_metrics(run_dir)
    (layout_row,) = [row for row in rows if row["kind"] == "layout"]
    assert layout_row["world_size"] == 2 and layout_row["micro_batch_per_rank"] == 4
    if model == "switch":
        # Routing statistics are averaged over the ranks: the single process's.
        key = "layers.1.block.ffn.tokens_per_expert"
        want = [row for row in read_metrics(single[model]) if row["kind"] == "train"][-1][key]
        got = [row for row in rows if row["kind"] == "train"][-1][key]
        assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_four_ranks_with_two_expert_groups_train_what_one_process_trains(corpus, tmp_path, mode):
    """EP 2 x 2 data-parallel groups: the experts of a group are sharded (FSDP) or replicated
    (DDP) over the other dimension, whose gradients need the rescaling of
    condcomp.distributed.data_parallel."""
    sets = ["train.grad_accum=4"]  # 4 micro-batches of 4 sequences, one per rank
    reference = overrides(corpus, tmp_path, "single", "switch") + sets
    train(load_config("switch", reference), log=quiet)
    train_on_ranks(4, "switch", overrides(corpus, tmp_path, "run", "switch") + sets
                   + [f"dist.data_parallel='{mode}'", "dist.ep=2"])
    assert_same_run(tmp_path / "run", tmp_path / "single")


def test_fsdp_mixed_precision_trains_what_master_weights_train(corpus, tmp_path):
    """bf16 weights in compute, fp32 weights in the optimizer: FSDP2's mixed-precision policy
    on 2 ranks against condcomp's master weights in one process (the same roundings; the
    gradients are summed in another order, so not bit for bit)."""
    sets = ["train.dtype='bfloat16'", "train.param_dtype='bfloat16'"]
    train(load_config("switch", overrides(corpus, tmp_path, "single", "switch") + sets),
          log=quiet)
    train_on_ranks(2, "switch", overrides(corpus, tmp_path, "run", "switch") + sets)
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "single"), rel=1e-3)
    # Adam moves a weight by about the learning rate whatever its gradient's size, so a bf16
    # gradient near zero that rounds the other way moves one element by lr: compare whole
    # tensors, not elements.
    weights, ref = final_weights(tmp_path / "run"), final_weights(tmp_path / "single")
    for name, tensor in ref.items():
        assert (weights[name] - tensor).norm() <= 5e-2 * tensor.norm(), name


def _weight_dtypes_in_forward(rank: int, world: int) -> dict[str, str]:
    from helpers import tiny_model_cfg

    from condcomp.distributed.context import context_for_group
    from condcomp.distributed.data_parallel import wrap_model
    from condcomp.distributed.options import DistConfig

    torch.manual_seed(0)
    model = TransformerLM(tiny_model_cfg(ffn={"kind": "moe", "options": {"num_experts": 4}}))
    wrap_model(model, context_for_group(DistConfig(), "cpu"), torch.bfloat16)
    # Gathered, every unit registers its weights as its forward sees them.
    for module in model.modules():
        if hasattr(module, "unshard") and hasattr(module, "reshard"):
            module.unshard()
    wanted = ("tok_emb.weight", "layers.0.block.attn_norm.weight", "layers.0.block.attn.qkv.wq.weight",
              "layers.0.block.ffn.router.weight", "layers.0.block.ffn.experts.w1",
              "layers.0.block.ffn.experts.w2", "layers.0.block.ffn.experts.w3")
    return {name: str(p.dtype) for name, p in model.named_parameters() if name in wanted}


def test_fsdp_gathers_in_bf16_what_master_weights_store_in_bf16():
    """The weights one process stores in bf16 under train.param_dtype = "bfloat16"
    (condcomp.master_weights: the matrices) are gathered in bf16; norm gains and the
    embedding table stay fp32."""
    seen = run_ranks(_weight_dtypes_in_forward, 2)[0]
    assert seen == {"tok_emb.weight": "torch.float32",
                    "layers.0.block.attn_norm.weight": "torch.float32",
                    "layers.0.block.attn.qkv.wq.weight": "torch.bfloat16",
                    "layers.0.block.ffn.router.weight": "torch.bfloat16",
                    "layers.0.block.ffn.experts.w1": "torch.bfloat16",
                    "layers.0.block.ffn.experts.w2": "torch.bfloat16",
                    "layers.0.block.ffn.experts.w3": "torch.bfloat16"}


def test_a_checkpoint_of_two_expert_parallel_ranks_goes_on_anywhere(single, corpus, tmp_path):
    """Saved by 2 ranks with EP 2 at step 3; resumed in one process, and on 2 ranks with DDP
    and EP 1: both finish the run of the single process."""
    first = overrides(corpus, tmp_path, "ep2", "switch", steps=3) + ["dist.ep=2"]
    train_on_ranks(2, "switch", first)
    for name, world, layout in (("one", 1, []),
                                ("ddp", 2, ["dist.data_parallel='ddp'", "dist.ep=1"])):
        shutil.copytree(tmp_path / "ep2", tmp_path / name)
        sets = overrides(corpus, tmp_path, name, "switch") + layout
        if world == 1:
            train(load_config("switch", sets), resume=True, log=quiet)
        else:
            train_on_ranks(world, "switch", sets, resume=True)
        assert_same_run(tmp_path / name, single["switch"])
        assert is_sharded(resolve_checkpoint(tmp_path / name)) == (world > 1)


@pytest.mark.parametrize("sets,message", [
    (["dist.ep=4", "model.ffn.num_experts=8"],
     "dist.ep = 4 does not divide the 2 processes of the job"),
    (["train.batch_size=3", "train.grad_accum=1"],
     "3 * 1 = 3 sequences per step do not split evenly over 2 ranks"),
    (["train.dtype='bfloat16'", "train.param_dtype='bfloat16'", "dist.data_parallel='ddp'"],
     "train.param_dtype = 'bfloat16' with dist.data_parallel = 'ddp' is not supported"),
])
def test_impossible_layouts_stop_every_rank_with_one_line(corpus, tmp_path, sets, message):
    errors = run_ranks(_train_rank, 2, "switch",
                       overrides(corpus, tmp_path, "bad", "switch") + sets)
    assert all(message in error and "\n" not in error for error in errors), errors
    assert not (tmp_path / "bad" / "checkpoints").exists()


def list_preset_names() -> list[str]:
    return [name for name, _ in list_presets()]


def _moe(preset: str) -> bool:
    return preset_kinds(preset)["ffn"] == "moe"


def test_every_preset_trains_on_two_ranks_as_in_one_process(corpus, tmp_path):
    """Every built-in preset at the tiny shape, 2 steps: FSDP2 on 2 ranks, and the MoE
    presets expert-parallel too, give the single process's losses. Mixture of Tokens mixes
    within a micro-batch and Mixture-of-Depths routes within a sequence, so with the single
    process's micro-batches on each rank they compute what it computes. (The two HF-size
    presets, Switch-C included, shrink to the tiny shape with it.)"""
    for preset in list_preset_names():
        sets = [*tiny(preset), *overrides(corpus, tmp_path, preset, "dense", steps=2),
                "model.vocab_size=0", "train.param_dtype='float32'", "train.eval_every=2"]
        train(load_config(preset, sets), log=quiet)
        layout = ["dist.ep=2"] if _moe(preset) else []
        ranks = [*sets, f"out_dir='{tmp_path / preset}-ranks'", *layout]
        errors = run_ranks(_train_rank, 2, preset, ranks)
        assert errors == ["", ""], (preset, errors)
        got, want = losses(f"{tmp_path / preset}-ranks"), losses(tmp_path / preset)
        # Sparse FF samples Gumbel noise in training, from each rank's own RNG stream: the
        # same model on the same data, with other noise.
        tol = 2e-3 if preset_kinds(preset)["ffn"] == "sparse_ff" else 2e-5
        assert len(want) == 2 and got == pytest.approx(want, rel=tol, abs=tol), preset
