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
    assert not (tmp_path / "run" / "checkpoints").exists()
