"""Families from other installed packages, found through the ``condcomp.families`` entry points:
the command line trains a model whose FFN slot is a plugin's family and rebuilds it from the
run's config.json to evaluate it; a plugin that fails to import is named in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO

PLUGIN = '''
"""A family from outside condcomp: the dense MLP with its hidden width scaled."""
from dataclasses import dataclass

from condcomp import registry
from condcomp.model.mlp import MLP


@dataclass
class WideMLPOptions:
    widen: int = 2

    def validate(self, model_cfg):
        if self.widen < 1:
            from condcomp.errors import ConfigError
            raise ConfigError(f"model.ffn.widen = {self.widen} must be at least 1")


def _build(options, cfg, layer_idx):
    return MLP(cfg.d_model, cfg.ffn_hidden * options.widen, cfg.activation)


registry.register(registry.Family("wide_mlp", "ffn", WideMLPOptions, _build, "a wider MLP"))
'''


def _install_plugin(site: Path, module: str, source: str) -> None:
    """What pip leaves for a package that declares a ``condcomp.families`` entry point."""
    (site / f"{module}.py").write_text(source)
    dist = site / f"{module}_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[condcomp.families]\n{module} = {module}\n")


def _condcomp(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    return subprocess.run([sys.executable, "-m", "condcomp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_plugin_family_trains_and_evaluates_from_the_command_line(tmp_path, corpus):
    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(site, "wide_mlp_family", PLUGIN)
    config = tmp_path / "wide.toml"
    config.write_text(textwrap.dedent(f"""
        extends = "dense_tiny"
        name = "wide"
        out_dir = "{tmp_path / 'run'}"
        [data]
        corpus = "{corpus}"
        cache_dir = "{tmp_path / 'cache'}"
        [train]
        max_steps = 2
        eval_every = 2
        eval_tokens = 512
        [model.ffn]
        kind = "wide_mlp"
        layers = "odd"
        widen = 3
    """))
    trained = _condcomp(["train", "--config", str(config)], site, tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = _condcomp(["eval", str(tmp_path / "run"), "--json"], site, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert math.isfinite(json.loads(evaluated.stdout)["val_loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["ffn"]["kind"] == "wide_mlp"


def test_a_broken_plugin_is_named_in_one_line(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(site, "broken_family", "raise ImportError('no module named torch_extra')\n")
    result = _condcomp(["train", "--config", "dense_tiny", "--set", "train.max_steps=1"],
                       site, tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert ("condcomp family plugin 'broken_family' (broken_family, from broken_family-pkg) "
            "failed to import: ImportError: no module named torch_extra") in result.stderr
