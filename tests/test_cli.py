"""The command line: entry points, and one clear line (exit code 2) for every user error."""

import subprocess
import sys
from pathlib import Path

import pytest

from condcomp.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_python_dash_m_and_help():
    out = subprocess.run([sys.executable, "-m", "condcomp", "--help"], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    for command in ("train", "eval", "generate", "compare", "bench"):
        assert command in out


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "dense_tiny", "--set", "model.n_heads=3"],
     "model.n_heads = 3 does not divide model.d_model = 64"),
    (["train", "--config", "configs/nope.toml"], "config file configs/nope.toml does not exist"),
    (["train", "--config", "dense_tiny", "--set", "data.corpus=/no/such/path"],
     "/no/such/path"),
    (["train", "--config", "tests"], "config file tests is a directory, not a TOML file"),
    (["eval", "/no/such/run"], "is not a run directory"),
    (["generate", "/no/such/run", "--prompt", "hi"], "is not a run directory"),
])
def test_user_errors_are_one_clear_line(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(args + (["--set", f'out_dir="{tmp_path / "run"}"'] if args[0] == "train"
                        else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("condcomp: error: ") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\x00\x01\x02binary", "binary")])
def test_bad_data_files_stop_training_before_it_starts(content, message, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(content)
    code = main(["train", "--config", "dense_tiny", "--set", f'data.corpus="{bad}"',
                 "--set", f'out_dir="{tmp_path / "run"}"',
                 "--set", f'data.cache_dir="{tmp_path / "cache"}"'])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a run that stops before it starts leaves no folder


@pytest.mark.parametrize("args, message", [
    (["generate", "RUN", "--prompt", "hi", "--temperature", "nan"],
     "argument --temperature: nan is not a finite number; it must not be negative"),
    (["generate", "RUN", "--prompt", "hi", "--temperature", "-1"],
     "argument --temperature: -1.0 must not be negative"),
    (["generate", "RUN", "--prompt", "hi", "--temperature", "warm"],
     "argument --temperature: 'warm' is not a number"),
    (["generate", "RUN", "--prompt", "hi", "--top-p", "0"],
     "argument --top-p: 0.0 must be in (0, 1]"),
    (["generate", "RUN", "--prompt", "hi", "--top-p", "1.5"],
     "argument --top-p: 1.5 must be in (0, 1]"),
    (["generate", "RUN", "--prompt", "hi", "--top-p", "nan"],
     "argument --top-p: nan is not a finite number; it must be in (0, 1]"),
    (["generate", "RUN", "--prompt", "hi", "--top-k", "-1"],
     "argument --top-k: -1 must not be negative"),
    (["generate", "RUN", "--prompt", "hi", "--max-new-tokens", "-5"],
     "argument --max-new-tokens: -5 must be positive"),
    (["generate", "RUN", "--prompt", "hi", "--seed", str(2**64)],
     "argument --seed: 2**64 must be at least -2**63 and at most 2**64 - 1"),
    (["generate", "RUN", "--prompt", "hi", "--device", "quantum"],
     "argument --device: 'quantum' is not a device condcomp runs on; use 'auto', 'cpu', 'cuda' "
     "or 'cuda:N'"),
    (["eval", "RUN", "--max-tokens", "-1"], "argument --max-tokens: -1 must not be negative"),
    (["eval", "RUN", "--device", "cuda:x"], "argument --device: 'cuda:x' is not a device"),
    (["bench", "moe", "--device", "quantum"], "argument --device: 'quantum' is not a device"),
    (["bench", "--seed", "-1"], "argument --seed: -1 must be at least 0"),
])
def test_bad_flags_are_one_line_naming_flag_value_and_range(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.endswith(" --help"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_help_still_exits_zero(capsys):
    assert main(["generate", "--help"]) == 0
    assert "greedy" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("train.seed=18446744073709551616", "train.seed = 2**64 must be at least -2**63"),
    ("train.lr=nan", "train.lr = nan is not a finite number; it must be positive"),
    ('model.ffn.capacity_factor="abc"', "model.ffn.capacity_factor must be a number, got 'abc'"),
])
def test_bad_config_values_stop_train_in_one_line(override, message, capsys, monkeypatch,
                                                   tmp_path):
    monkeypatch.chdir(REPO)
    args = ["train", "--config", "switch", "--set", override,
            "--set", f'out_dir="{tmp_path / "run"}"']
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("condcomp: error: ") and message in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_tiny_temperature_samples_greedily():
    """Sampling tends to greedy as the temperature falls; below GREEDY_BELOW it is greedy,
    where logits / temperature would otherwise overflow into NaN probabilities."""
    import torch

    from condcomp.generate import Sampling, sample

    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-3]])
    for temperature in (1e-40, 1e-300, 5e-324):
        token = sample(logits, Sampling(temperature=temperature).validate(),
                       torch.Generator().manual_seed(0))
        assert token.item() == 1


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 274877906944 bytes."),
    MemoryError(),
])
def test_running_out_of_memory_is_one_line(error, capsys, monkeypatch):
    def train(cfg, **kwargs):
        raise error

    monkeypatch.setattr("condcomp.train.train", train)
    assert main(["train", "--config", "dense_tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("condcomp: error: out of memory") and err.count("\n") == 1
    assert "too large for this device" in err


def test_other_runtime_errors_are_not_taken_for_user_errors(monkeypatch):
    def train(cfg, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("condcomp.train.train", train)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--config", "dense_tiny"])
