"""Training end to end on a tiny corpus: resume exactness (also after SIGKILL), checkpoint
faults, non-finite steps, and the eval / generate commands on the trained run."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_overrides

from condcomp import registry
from condcomp.checkpoint import list_checkpoints
from condcomp.cli import main
from condcomp.config import load_config
from condcomp.errors import CheckpointError, CondcompError, TrainingError
from condcomp.runs import load_run, read_metrics
from condcomp.train import train


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    cfg = load_config("dense_tiny", tiny_overrides(corpus, tmp, "straight"))
    result = train(cfg, log=lambda s: None)
    return result, tmp


def test_training_lowers_the_loss_and_writes_the_run(straight_run):
    result, _ = straight_run
    rows = losses(result.run_dir)
    assert [s for s, _ in rows] == list(range(1, 21))
    assert rows[-1][1] < rows[0][1] - 0.5
    assert (result.run_dir / "config.json").is_file()
    assert (result.run_dir / "tokenizer").is_dir()
    assert list((result.run_dir / "tb").iterdir())
    evals = [r for r in read_metrics(result.run_dir) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(r["val_bpb"] > 0 for r in evals)
    assert [c.step for c in list_checkpoints(result.run_dir)] == [5, 10, 15, 20]


def test_resume_gives_the_same_losses_bit_for_bit(straight_run, corpus, tmp_path):
    straight, _ = straight_run
    cfg = load_config("dense_tiny",
                      tiny_overrides(corpus, tmp_path, "split", steps=10))
    train(cfg, log=lambda s: None)
    cfg = load_config("dense_tiny", tiny_overrides(corpus, tmp_path, "split"))
    train(cfg, resume=True, log=lambda s: None)
    assert losses(tmp_path / "split") == losses(straight.run_dir)


def test_resume_auto_starts_a_new_run_then_continues_it(straight_run, corpus, tmp_path):
    """``--resume auto``, the launch line of a job torchrun may restart: a run folder without
    a checkpoint starts, one with checkpoints continues from the newest."""
    straight, _ = straight_run
    assert main(["train", "--config", "dense_tiny", "--resume", "auto",
                 *[f"--set={item}" for item in tiny_overrides(corpus, tmp_path, "auto",
                                                             steps=10)]]) == 0
    assert [c.step for c in list_checkpoints(tmp_path / "auto")] == [5, 10]
    cfg = load_config("dense_tiny", tiny_overrides(corpus, tmp_path, "auto"))
    train(cfg, resume="auto", log=lambda s: None)
    assert losses(tmp_path / "auto") == losses(straight.run_dir)


def test_resume_after_sigkill_is_exact(straight_run, corpus, tmp_path):
    straight, _ = straight_run
    args = [sys.executable, "-m", "condcomp", "train", "--config",
            "dense_tiny"]
    overrides = tiny_overrides(corpus, tmp_path, "killed", steps=2000)
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    run_dir = tmp_path / "killed"
    deadline = time.time() + 120
    while not any(c.step >= 10 for c in list_checkpoints(run_dir)):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Resume the killed run from its step-10 checkpoint with the straight run's 20 steps.
    cfg = load_config("dense_tiny", tiny_overrides(corpus, tmp_path, "killed"))
    ten = next(c for c in list_checkpoints(run_dir) if c.step == 10)
    train(cfg, resume=ten.path, log=lambda s: None)
    assert losses(run_dir) == losses(straight.run_dir)


def test_corrupt_checkpoint_is_refused_and_the_previous_one_still_loads(straight_run, tmp_path):
    import shutil

    straight, _ = straight_run
    run_dir = tmp_path / "copy"
    shutil.copytree(straight.run_dir, run_dir)
    newest = list_checkpoints(run_dir)[-1]
    weights = newest.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.*--checkpoint .*step_00000015"):
        load_run(run_dir)
    previous = list_checkpoints(run_dir)[-2]
    assert load_run(run_dir, checkpoint=previous.path).checkpoint.step == 15


def test_refuses_to_overwrite_a_run_without_resume(straight_run, corpus):
    straight, tmp = straight_run
    cfg = load_config("dense_tiny", tiny_overrides(corpus, tmp, "straight"))
    with pytest.raises(CondcompError, match="pass --resume"):
        train(cfg, log=lambda s: None)


# --------------------------------------------------------------- non-finite steps


class _NaNFFN(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(d))
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)
        self.stats = {}

    def forward(self, x):
        return x * self.w * float("nan")

    def flops_per_token(self):
        return 0.0


@dataclass
class _NoOptions:
    pass


registry.register(registry.Family("test_nan", "ffn", _NoOptions,
                                  lambda o, cfg, i: _NaNFFN(cfg.d_model)))


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(corpus, tmp_path):
    cfg = load_config("dense_tiny",
                      tiny_overrides(corpus, tmp_path, "nan") + ["model.ffn.kind=test_nan",
                                                                 "train.max_nonfinite=3"])
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        train(cfg, log=lambda s: None)
    rows = [r for r in read_metrics(tmp_path / "nan") if r["kind"] == "train"]
    assert [r["skipped_nonfinite"] for r in rows] == [1, 2, 3]
    (ckpt,) = list_checkpoints(tmp_path / "nan")
    assert ckpt.step == 3
    run = load_run(tmp_path / "nan")
    # No update was applied: the FFN weights are still their initial ones.
    assert torch.equal(run.model.layers[0].block.ffn.w, torch.ones(32))


# --------------------------------------------------------------- eval and generate


def test_eval_command(straight_run, capsys, tmp_path, monkeypatch):
    straight, tmp = straight_run
    monkeypatch.chdir(tmp)  # the data cache path in the config is absolute; cwd must not matter
    assert main(["eval", str(straight.run_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 20 and out["val_tokens"] > 0
    assert out["val_bpb"] == pytest.approx(out["val_loss"] / 0.6931471805599453, rel=0.2)


def test_generate_command_streams_text(straight_run, capsys):
    straight, _ = straight_run
    assert main(["generate", str(straight.run_dir), "--prompt", "the quick",
                 "--max-new-tokens", "20", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the quick") and len(text) > len("the quick")


def test_generate_refuses_a_prompt_longer_than_the_context(straight_run, capsys):
    straight, _ = straight_run
    assert main(["generate", str(straight.run_dir), "--prompt", "x" * 100]) == 2
    err = capsys.readouterr().err
    assert "context is 64 tokens" in err and "Traceback" not in err


def test_a_checkpoints_weights_are_as_readable_as_its_other_files(straight_run):
    """safetensors makes its files owner-only; the run's weights follow the umask as its other
    files do, so the people a run folder is shared with can load it."""
    result, _ = straight_run
    ckpt = list_checkpoints(result.run_dir)[-1]
    mode = (ckpt.path / "model.safetensors").stat().st_mode & 0o777
    assert mode == (ckpt.path / "state.pt").stat().st_mode & 0o777
