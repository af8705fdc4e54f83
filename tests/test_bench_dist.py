"""``condcomp bench dist`` and ``condcomp bench moe --ep-path`` on tiny shapes.

They check what the commands report, not how fast anything is: a finite tokens/s, an
all-to-all share of nothing without expert parallelism and of something with it (2 gloo ranks
started as ``torchrun`` would, through the environment), and an EP path whose output is the
plain path's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import run_ranks

from condcomp.bench import add_parser
from condcomp.bench.moe import ep_path_copy, one_rank_mesh
from condcomp.conditional.moe import MoE
from condcomp.machine_load import MachineLoad

REPO = Path(__file__).resolve().parents[1]

# The Switch preset (MoE on layer 1 of 2, 8 experts, capacity 1.25) at a tiny width.
TINY_SETS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
             "model.max_seq_len=64", "model.vocab_size=97", "train.batch_size=4",
             "train.seq_len=32"]
TINY_SWITCH = ["--config", "switch", *(arg for kv in TINY_SETS for arg in ("--set", kv)),
               "--steps", "2", "--warmup", "1", "--profile-steps", "2"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine two OpenMP threads wait on each other whenever
    another process holds a core (a tiny step then takes seconds); these tests time nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


def bench_dist(json_path: Path, *extra: str) -> dict:
    assert run_command(["dist", *TINY_SWITCH, "--json", str(json_path), *extra]) == 0
    return json.loads(json_path.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench_dist") / "one.json"
    bench_dist(path)
    return path


def test_one_process_reports_tokens_per_s_and_no_all_to_all(one_process):
    result = json.loads(one_process.read_text())
    (layout,) = result["layouts"]
    assert layout["layout"] == "1 process" and layout["world_size"] == 1
    assert math.isfinite(layout["tokens_per_s"]) and layout["tokens_per_s"] > 0
    assert layout["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / layout["step_s"])
    assert result["tokens_per_step"] == 4 * 32
    assert layout["all_to_all_share"] == 0.0  # profiled, and no exchange in the step
    assert layout["fsdp_share"] is None
    assert layout["tokens_per_s_vs_baseline"] == 1.0
    assert result["machine_load"]["verdict"] in {"busy", "idle", "unknown"}


def _bench_rank(rank: int, world: int, json_path: str, against: str) -> dict | None:
    """A worker: ``bench dist`` as torchrun would start it, EP over both ranks."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    run_command(["dist", *TINY_SWITCH, "--set", "dist.ep=2", "--json", json_path,
                 "--against", against])
    return json.loads(Path(json_path).read_text()) if rank == 0 else None


def test_two_expert_parallel_ranks_report_a_share_of_all_to_all(one_process, tmp_path):
    result, other = run_ranks(_bench_rank, 2, str(tmp_path / "ep2.json"), str(one_process))
    assert other is None  # rank 0 alone reports
    (layout,) = result["layouts"]
    assert (layout["world_size"], layout["ep"], layout["data_parallel"]) == (2, 2, "fsdp")
    assert layout["micro_batch_per_rank"] == 2
    assert math.isfinite(layout["tokens_per_s"]) and layout["tokens_per_s"] > 0
    assert 0 < layout["all_to_all_share"] < 1
    assert 0 < layout["fsdp_share"] < 1
    assert all(r["all_to_all_share"] > 0 for r in layout["per_rank"])
    # Against the one-process run of the same preset and batch.
    base = json.loads(one_process.read_text())["layouts"][0]
    assert layout["tokens_per_s_vs_baseline"] == pytest.approx(
        layout["tokens_per_s"] / base["tokens_per_s"])
    assert result["command"].startswith("torchrun --nproc-per-node 2 -m condcomp ")


def ep_and_plain_outputs(**options) -> tuple[torch.Tensor, torch.Tensor]:
    def make() -> MoE:
        return MoE(16, 32, 8, **options).train()

    x = torch.randn(2, 24, 16)
    plain = make()
    with one_rank_mesh(torch.device("cpu")) as mesh:
        ep = ep_path_copy(plain, make(), mesh)
        assert ep.experts.ep_group is not None  # sharded: the EP path, not the plain one
        return ep(x), plain(x)


def test_the_ep_path_of_one_rank_computes_the_plain_path_bit_for_bit_when_dropless():
    # What `bench moe` times: dropless, so both paths run the same rows through each expert.
    ep, plain = ep_and_plain_outputs(top_k=2, normalize_topk=True)
    assert torch.equal(ep, plain)


def test_with_capacity_the_ep_path_differs_by_rounding_only():
    # The plain path feeds dropped slots to the last expert as zero rows (its grouped GEMM
    # needs every row in a group); the EP path never sends them, so that expert's matmul has
    # fewer rows and may round its kept rows differently.
    ep, plain = ep_and_plain_outputs(top_k=1, capacity_factor=1.0)
    assert (plain == 0).all(dim=-1).any()  # some slots were dropped
    torch.testing.assert_close(ep, plain, rtol=1e-6, atol=1e-9)


def test_bench_moe_ep_path_reports_the_ratio_and_equal_outputs(tmp_path):
    path = tmp_path / "moe.json"
    assert run_command(["moe", "--ep-path", "--peer", "none", "--d-model", "32", "--d-ff", "64",
                        "--tokens", "128", "--steps", "2", "--warmup", "1", "--experts",
                        "8:1,8:2", "--device", "cpu", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["layer"], r["E:k"]) for r in rows] == [
        ("dense SwiGLU FFN", "-"), ("condcomp MoE", "8:1"), ("condcomp MoE [EP path, 1 rank]", "8:1"),
        ("condcomp MoE", "8:2"), ("condcomp MoE [EP path, 1 rank]", "8:2")]
    for row in rows[2::2]:
        assert row["ep_over_plain"] > 0
        assert row["max_abs_diff_forward"] == 0.0


def test_the_gpu_check_sections_run_end_to_end_on_the_cpu(tmp_path):
    """scripts/gpu_checks.sh ep-path fsdp-1gpu at a tiny shape, so that the GPU's time is not
    spent finding a broken script (as tests/test_scripts.py does for the other sections)."""
    shape = " ".join(f"--set {kv}" for kv in TINY_SETS) + " --steps 1 --warmup 0"
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable, DEVICE="cpu",
               OMP_NUM_THREADS="1", MOE_SHAPE="--d-model 32 --d-ff 64 --tokens 128 --steps 1 "
               "--warmup 0", DIST_CONFIG="switch", DIST_SHAPE=shape)
    done = subprocess.run(["bash", "scripts/gpu_checks.sh", "ep-path", "fsdp-1gpu"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ep_rows = json.loads((tmp_path / "moe_ep_path.json").read_text())["rows"]
    assert [r["E:k"] for r in ep_rows if "ep_over_plain" in r] == ["8:1", "64:8"]
    layouts = json.loads((tmp_path / "fsdp_one_gpu.json").read_text())["layouts"]
    assert [r["layout"] for r in layouts] == ["1 process", "1 rank, fsdp, ep 1"]
    assert layouts[1]["tokens_per_s_vs_baseline"] > 0


def test_the_machine_load_leaves_out_the_jobs_other_ranks():
    # 2 CPUs for 10 s: other processes used 12 CPU seconds, 8 of them the job's other rank.
    load = MachineLoad(0.6, cpus=2, wall_s=10.0, method="proc_stat").excluding(8.0)
    assert load.other_cpu_share == pytest.approx(0.2) and load.verdict == "idle"
    assert MachineLoad(None, 2, 10.0, "unknown").excluding(8.0).other_cpu_share is None
