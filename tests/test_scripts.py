"""Sections of the GPU checks (scripts/gpu_checks.sh) run end to end on the CPU at a tiny shape, so
that the scarce GPU time is never spent finding a broken script."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_section(tmp_path: Path, section: str, **env: str) -> subprocess.CompletedProcess:
    """One section of scripts/gpu_checks.sh on the CPU, its figures under tmp_path/out."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"),
               PY=sys.executable, DEVICE="cpu", **env)
    result = subprocess.run(["bash", "scripts/gpu_checks.sh", section], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def test_mod_decode_section_trains_both_models_and_decodes_them_side_by_side(tmp_path):
    shape = ("--set model.d_model=32 --set model.n_layers=4 --set model.n_heads=4 "
             "--set model.d_ff=64 --set model.max_seq_len=1024 "
             f'--set data.cache_dir="{tmp_path}/cache"')
    run_section(tmp_path, "mod-decode", MOD_STEPS="2", MOD_SHAPE=shape)
    report = (tmp_path / "out" / "mod_decode.txt").read_text()
    assert re.search(r"^dense_small: [\d.]+ ms/token, 1\.00x the first run$", report, re.M)
    # The MoD run decodes the same validation text; its two routed blocks are counted.
    assert re.search(r"^mod: [\d.]+ ms/token, [\d.]+x the first run, routed blocks entered "
                     r"per token [\d.]+ of 2$", report, re.M), report
    assert (tmp_path / "runs" / "mod" / "config.json").exists()
    # `condcomp bench runs` keeps the figures, and how busy the machine was, in its JSON.
    decoded = json.loads((tmp_path / "out" / "mod_decode.json").read_text())
    assert decoded["feed"] == "val" and decoded["tokens"] == 256
    assert decoded["runs"]["dense_small"]["speedup"] == 1.0
    assert decoded["runs"]["mod"]["routed_blocks"] == 2
    assert decoded["machine_load"]["verdict"] in {"busy", "idle", "unknown"}
    # And compiled (CUDA graphs on a GPU; on the CPU the MoD step breaks at its decisions).
    compiled = json.loads((tmp_path / "out" / "mod_decode_compiled.json").read_text())
    assert compiled["compile"] is True and compiled["runs"]["mod"]["routed_blocks"] == 2
    # The same decisions, but for a router score within inductor's rounding of the threshold.
    assert abs(compiled["runs"]["mod"]["routed_blocks_entered_per_token"]
               - decoded["runs"]["mod"]["routed_blocks_entered_per_token"]) < 0.05


def test_moe_step_section_times_four_switch_models_side_by_side(tmp_path):
    shape = ("--set model.d_model=32 --set model.n_layers=2 --set model.n_heads=4 "
             "--set model.d_ff=64 --set model.max_seq_len=64 --vocab-size 97 --batch-size 4 "
             "--seq-len 32")
    run_section(tmp_path, "moe-step", STEP_SHAPE=shape)
    models = json.loads((tmp_path / "out" / "moe_step.json").read_text())["models"]
    assert list(models) == ["switch8_float32", "switch128_float32", "switch8_bfloat16",
                            "switch128_bfloat16"]
    assert all(m["train"]["tokens_per_s"] > 0 for m in models.values())


def test_moe_bf16_section_times_both_weight_dtypes(tmp_path):
    run_section(tmp_path, "moe-bf16",
                MOE_SHAPE="--d-model 32 --d-ff 64 --tokens 128 --steps 1 --warmup 0")
    for dtype in ("float32", "bfloat16"):
        rows = json.loads((tmp_path / "out" / f"moe_scaling_{dtype}.json").read_text())["rows"]
        assert [r["E:k"] for r in rows] == ["-", "8:1", "16:1", "32:1", "64:1", "128:1", "64:8"]


def test_moe_profile_section_prints_a_table_per_expert_configuration(tmp_path):
    result = run_section(tmp_path, "moe-profile",
                         MOE_SHAPE="--d-model 32 --d-ff 64 --tokens 128 --steps 1 --warmup 1")
    assert "=== E=8 k=1" in result.stdout and "=== E=64 k=8" in result.stdout
    profiles = json.loads((tmp_path / "out" / "moe_profile.json").read_text())["profiles"]
    assert list(profiles) == ["E=8 k=1", "E=64 k=8"]
