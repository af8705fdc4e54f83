"""Built-in presets and suites: found by name wherever a config is named, listed and printed by
``condcomp presets``, and shipped in the wheel."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from condcomp.cli import main
from condcomp.compare import load_suite
from condcomp.config import load_config, read_toml
from condcomp.errors import ConfigError
from condcomp.presets import find_preset, find_suite, list_presets, list_suites

REPO = Path(__file__).resolve().parent.parent


def test_a_preset_is_found_by_name_with_or_without_its_suffix():
    assert find_preset("switch").name == "switch.toml"
    assert load_config("switch").model.ffn.kind == "moe"
    assert load_config("switch.toml").name == "switch"


def test_an_existing_path_wins_over_a_built_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "switch").write_text('name = "mine"\n')
    assert load_config("switch").name == "mine"
    (tmp_path / "mine.toml").write_text('name = "mine_too"\n')
    assert load_config(tmp_path / "mine.toml").name == "mine_too"
    (tmp_path / "dense_tiny").mkdir()  # a folder of that name is no config: the built-in wins
    assert load_config("dense_tiny").name == "dense_tiny"


def test_extends_a_file_beside_it_first_then_a_built_in(tmp_path):
    (tmp_path / "own.toml").write_text('extends = "switch"\nname = "own"\n[model]\nd_model = 64\n')
    cfg = load_config(tmp_path / "own.toml")
    assert (cfg.name, cfg.model.ffn.kind, cfg.model.d_model, cfg.model.n_layers) == \
        ("own", "moe", 64, 4)
    # A file beside the config shadows the built-in of the same name.
    (tmp_path / "switch").write_text('extends = "dense_tiny"\n')
    (tmp_path / "other.toml").write_text('extends = "switch"\nname = "other"\n')
    assert load_config(tmp_path / "other.toml").model.d_model == 64  # dense_tiny's width


def test_an_extends_cycle_is_refused(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="'extends' makes a cycle"):
        load_config(tmp_path / "a.toml")


@pytest.mark.parametrize("name, message", [
    ("swtich", "no built-in preset named 'swtich' and no such file; built-in presets: altup, "),
    ("configs/switch.toml", "config file configs/switch.toml does not exist; the built-in "
                            "presets are now named, not paths: use 'switch'; built-in presets: "),
    ("configs/nope.toml", "now named, not paths (e.g. --config switch)"),
    ("no/such/file.toml", "config file no/such/file.toml does not exist; built-in presets: "),
])
def test_an_unknown_preset_names_the_built_ins(name, message):
    with pytest.raises(ConfigError) as err:
        load_config(name)
    text = str(err.value)
    assert message in text and "top2 (condcomp presets describes them)" in text
    assert "\n" not in text


def test_an_unknown_extends_names_the_file_that_asks(tmp_path):
    (tmp_path / "own.toml").write_text('extends = "swich"\n')
    with pytest.raises(ConfigError, match=r"no built-in preset named 'swich' and no such file "
                                          r"\(relative to .*own.toml\)"):
        load_config(tmp_path / "own.toml")


def test_suites_are_found_by_name_and_their_presets_by_name(tmp_path):
    assert find_suite("demo").name == "demo.toml"
    for name, _ in list_suites():
        suite = load_suite(name)
        assert suite.models and suite.name == name
    # A user's suite names built-in presets too, and a file beside it wins over them.
    (tmp_path / "tiny.toml").write_text('extends = "dense_tiny"\nname = "tiny"\n')
    (tmp_path / "suite.toml").write_text(
        '[suite]\nbase = "dense_small"\nbudget_tokens = 1000\n'
        '[[models]]\nname = "dense"\n[[models]]\nname = "switch"\npreset = "switch"\n'
        '[[models]]\nname = "tiny"\npreset = "tiny.toml"\n')
    models = {m.name: m.config for m in load_suite(tmp_path / "suite.toml").models}
    assert models["dense"]["model"]["d_model"] == 128
    assert models["switch"]["model"]["ffn"]["kind"] == "moe"
    assert models["tiny"]["model"]["d_model"] == 64
    with pytest.raises(ConfigError, match="the built-in suites are now named, not paths: use "
                                          "'demo'; built-in suites: demo, "):
        load_suite("configs/suites/demo.toml")


def test_built_in_suites_name_their_presets():
    # Names, not paths: a path like "../switch.toml" would break if the presets moved again.
    for name, _ in list_suites():
        raw = read_toml(find_suite(name))
        named = [raw["suite"]["base"]] + [m["preset"] for m in raw["models"] if "preset" in m]
        assert all("/" not in n and not n.endswith(".toml") for n in named), name


def test_condcomp_presets_lists_every_preset_and_suite_with_a_description(capsys):
    assert main(["presets"]) == 0
    presets_part, suites_part = capsys.readouterr().out.split("suites:\n")
    assert presets_part.startswith("presets:\n")
    for part, entries in ((presets_part, list_presets()), (suites_part, list_suites())):
        rows = [line.split(maxsplit=1) for line in part.splitlines() if line.startswith("  ")]
        assert rows == [[name, description] for name, description in entries]
        for name, description in entries:
            # A one-line description: a whole sentence, not the start of a longer comment.
            assert description.endswith(".") and len(description) <= 100, name
    assert {n for n, _ in list_presets()} >= {"dense_tiny", "dense_small", "switch", "mot"}
    assert not {n for n, _ in list_presets()} & {n for n, _ in list_suites()}  # no ambiguity


def test_condcomp_presets_name_prints_the_toml_to_copy(capsys, tmp_path, monkeypatch):
    assert main(["presets", "switch"]) == 0
    text = capsys.readouterr().out
    assert text == find_preset("switch").read_text(encoding="utf-8")
    # Copied into a file of one's own, it loads (its extends names a built-in).
    monkeypatch.chdir(tmp_path)
    Path("my_switch.toml").write_text(text)
    assert load_config("my_switch.toml").model.ffn.kind == "moe"
    assert main(["presets", "demo"]) == 0
    assert "[[models]]" in capsys.readouterr().out
    assert main(["presets", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no built-in preset or suite named 'nope'" in err and len(err.splitlines()) == 1


def _wheel_site(tmp_path: Path) -> Path:
    """Build a wheel of the repository and install it into a folder of its own."""
    # Build from a copy: an in-tree build leaves build/ and *.egg-info in the repository.
    src = tmp_path / "src"
    shutil.copytree(REPO / "condcomp", src / "condcomp",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation: no network; the dev extra provides setuptools.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("condcomp-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, cwd=tmp_path)
    return site


@pytest.mark.slow
def test_an_installed_wheel_carries_the_presets(tmp_path):
    site = _wheel_site(tmp_path)
    work = tmp_path / "work"  # outside the repository: no configs or presets lie about
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def condcomp(*args: str) -> str:
        result = subprocess.run([sys.executable, *args], cwd=work, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    code = ("import condcomp; from condcomp.config import load_config; "
            "from condcomp.compare import load_suite; print(condcomp.__file__); "
            "print(load_config('switch').model.ffn.kind, len(load_suite('demo').models))")
    where, loaded = condcomp("-c", code).splitlines()
    assert Path(where).is_relative_to(site), where
    assert loaded == "moe 8"
    listing = condcomp("-m", "condcomp", "presets")
    for name, description in list_presets() + list_suites():
        assert f"  {name} " in listing and description in listing
    assert condcomp("-m", "condcomp", "presets", "dense_tiny").startswith("# ")
    corpus = work / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"to be or not to be, that is question {i}\n" * 40)
    out = condcomp("-m", "condcomp", "train", "--config", "dense_tiny",
                   "--set", "train.max_steps=1", "--set", f'data.corpus="{corpus}"',
                   "--set", 'out_dir="run"', "--set", "train.eval_tokens=512",
                   "--set", "train.batch_size=2", "--set", "train.seq_len=32",
                   "--set", "train.progress=false", "--set", 'data.cache_dir="cache"')
    assert "done: 1 steps in run" in out
