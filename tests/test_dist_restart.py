"""A rank killed mid-run under ``torchrun --max-restarts 1`` costs nothing but time.

torchrun restarts every worker when one dies; the restarted job resumes from its newest
complete checkpoint, and since a rank's slice of step ``s`` is a pure function of the seed, the
step and the layout, it sees every global batch exactly once: it ends with the weights and the
losses of a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO
from test_dist_train import final_weights, losses, overrides, quiet

from condcomp.checkpoint import list_checkpoints
from condcomp.config import load_config
from condcomp.runs import read_metrics
from condcomp.train import train

STEPS = 40


def worker_pid(rank: int, marker: str) -> int | None:
    """The pid of the first-attempt torchrun worker of ``rank`` whose command line names
    ``marker`` (the run folder)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (marker in cmdline and f"RANK={rank}" in environ
                and "TORCHELASTIC_RESTART_COUNT=0" in environ):
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_restarted_and_loses_nothing(corpus, tmp_path):
    sets = overrides(corpus, tmp_path, "run", "switch", steps=STEPS) + [
        "train.ckpt_every=4", "train.eval_every=20", "dist.ep=2"]
    # Without it a restarted gloo job fails to connect, or hangs (pytorch#135712).
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "--max-restarts", "1", "-m", "condcomp", "train", "--config", "switch", "--resume", "auto"]
    for item in sets:
        cmd += ["--set", item]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    run_dir = tmp_path / "run"
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run_dir):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
            time.sleep(0.05)
        pid = worker_pid(1, str(run_dir))
        assert pid is not None, "no worker of rank 1 found"
        os.kill(pid, signal.SIGKILL)
        output = job.communicate(timeout=240)[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output
    # It was killed before the end and came back from a checkpoint.
    assert "resumed" in output and f"at step {STEPS}" not in output.split("resumed")[1][:200]

    # The finished run logged each step once, and ends where an uninterrupted one does.
    steps = [row["step"] for row in read_metrics(run_dir) if row["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    reference = overrides(corpus, tmp_path, "single", "switch", steps=STEPS)
    train(load_config("switch", reference), log=quiet)
    assert losses(run_dir) == pytest.approx(losses(tmp_path / "single"), rel=1e-4, abs=1e-4)
    weights, want = final_weights(run_dir), final_weights(tmp_path / "single")
    for name, tensor in want.items():
        assert torch.allclose(weights[name], tensor, rtol=1e-4, atol=1e-5), name
