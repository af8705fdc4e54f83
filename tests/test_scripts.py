"""The GPU checks' trained-router decode section, run end to end on the CPU at a tiny shape, so
that the scarce GPU time is never spent finding a broken script."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mod_decode_section_trains_both_models_and_decodes_them_side_by_side(tmp_path):
    shape = ("--set model.d_model=32 --set model.n_layers=4 --set model.n_heads=4 "
             "--set model.d_ff=64 --set model.max_seq_len=1024 "
             f'--set data.cache_dir="{tmp_path}/cache"')
    env = dict(os.environ, OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"),
               PY=sys.executable, MOD_STEPS="2", DECODE_DEVICE="cpu", MOD_SHAPE=shape)
    result = subprocess.run(["bash", "scripts/gpu_checks.sh", "mod-decode"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "out" / "mod_decode.txt").read_text()
    assert re.search(r"^dense_small: [\d.]+ ms/token, 1\.00x the first run$", report, re.M)
    # The MoD run decodes the same validation text; its two routed blocks are counted.
    assert re.search(r"^mod: [\d.]+ ms/token, [\d.]+x the first run, routed blocks entered "
                     r"per token [\d.]+ of 2$", report, re.M), report
    assert (tmp_path / "runs" / "mod" / "config.json").exists()
