"""`condcomp compare`: a tiny suite end to end, and the suite file's error messages."""

import json
from pathlib import Path

import pytest

from condcomp.cli import main
from condcomp.compare import load_suite
from condcomp.errors import ConfigError
from condcomp.runs import read_metrics

REPO = Path(__file__).resolve().parent.parent


def write_suite(tmp_path: Path, models: str, budget: int = 4096) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(5):
        (corpus / f"d{i}.txt").write_text(("all the world's a stage and all the men and women "
                                           f"merely players {i}\n") * 30)
    suite = tmp_path / "suite.toml"
    suite.write_text(f"""
[suite]
name = "tiny"
base = "dense_tiny"
budget_tokens = {budget}
decode_tokens = 8

[common]
data = {{ corpus = "{corpus}", cache_dir = "{tmp_path / 'cache'}" }}
train = {{ batch_size = 4, seq_len = 32, warmup_steps = 2, eval_every = 16, eval_tokens = 256, log_every = 4, progress = false }}
model = {{ max_seq_len = 64 }}
{models}
""")
    return suite


MODELS = """
[[models]]
name = "dense"

[[models]]
name = "switch"
config = { model = { ffn = { kind = "moe", layers = "odd", num_experts = 4, top_k = 1 } } }

[[models]]
name = "mod"
config = { model = { wrapper = { kind = "mod", layers = "odd", capacity = 0.25 } } }
"""


def test_a_tiny_suite_writes_the_report(tmp_path, capsys):
    suite = write_suite(tmp_path, MODELS)
    out = tmp_path / "out"
    assert main(["compare", str(suite), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| dense | dense |" in report and "| switch | moe on odd layers |" in report
    for png in ("val_loss_vs_tokens.png", "val_loss_vs_flops.png", "val_loss_vs_time.png",
                "expert_load_switch.png", "token_depth_mod.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    # Equal budget: both trained the same number of tokens (4096 / (4 * 32) = 32 steps).
    assert "## Blocks per token" in report
    for name in ("dense", "switch", "mod"):
        assert read_metrics(out / name)[-1]["tokens"] == 4096
    # Each throughput carries other processes' share of the CPUs while it was measured.
    for row in json.loads((out / "summary.json").read_text())["runs"]:
        assert 0 <= row["train_other_cpu_share"] <= 1 and 0 <= row["decode_other_cpu_share"] <= 1
    assert all("other_cpu_share" in r for r in read_metrics(out / "dense") if r["kind"] == "train")
    # Running the suite again re-uses the finished runs instead of training them again.
    rows_before = len(read_metrics(out / "dense"))
    assert main(["compare", str(suite), "--out", str(out)]) == 0
    assert len(read_metrics(out / "dense")) == rows_before


def test_the_demo_suite_is_valid():
    suite = load_suite("demo")
    assert {m.name for m in suite.models} >= {"dense", "switch-8e", "mod-12.5%", "sparse-ff",
                                          "sparse-ff+qkv", "altup", "altup-recycled", "mot"}


@pytest.mark.parametrize("models, budget, message", [
    ("", 4096, "the suite has no [[models]]"),
    (MODELS + '\n[[models]]\nname = "dense"\n', 4096, "two models are named 'dense'"),
    (MODELS, 0, "suite.budget_tokens = 0 must be positive"),
    (MODELS, '"lots"', "suite.budget_tokens must be an integer, got 'lots'"),
    (MODELS, "true", "suite.budget_tokens must be an integer, got true"),
    (MODELS, "nan", "suite.budget_tokens must be an integer, got nan"),
    (MODELS + 'decode_tokens = 8\n', 4096,
     "unknown key models[2].decode_tokens; valid keys in [models[2]]: ['budget_tokens', "
     "'config', 'gain_baseline', 'init', 'init_from', 'name', 'preset', 'teacher']; put config "
     "keys under config"),
    ('[[models]]\nname = 5\n', 4096, "models[0].name must be a string, got 5"),
    ('[[models]]\nname = "x"\nconfig = 5\n', 4096, "models[0].config must be a table, got 5"),
    ('[[models]]\nname = "x"\nconfig = { train = { lr = nan } }\n', 4096,
     "train.lr = nan is not a finite number"),
    ('[bench]\n[[models]]\nname = "x"\n', 4096, "unknown key bench"),
    ('[[models]]\nname = "x"\nd_model = 3\n', 4096, "put config keys under config"),
    ('[[models]]\nname = "x"\nconfig = { model = { n_heads = 5 } }\n', 4096,
     "model.n_heads = 5 does not divide"),
])
def test_suite_errors_are_clear(tmp_path, models, budget, message):
    with pytest.raises(ConfigError) as err:
        load_suite(write_suite(tmp_path, models, budget))
    assert message in str(err.value)


@pytest.mark.parametrize("text, message", [
    ('models = "abc"\n[suite]\nbudget_tokens = 64\n', "models must be a list of tables, got 'abc'"),
    ('models = [1, 2]\n[suite]\nbudget_tokens = 64\n', "models[0] must be a table, got 1"),
    ('suite = 5\n', "suite must be a table, got 5"),
    ('[suite]\nbudget_tokens = 64\ndecode_tokens = "abc"\n',
     "suite.decode_tokens must be an integer, got 'abc'"),
    ('[suite]\nbudget_tokens = 64\ndecode_tokens = -1\n', "suite.decode_tokens = -1 must be positive"),
    ('[suite]\nbudget_tokens = 64\nbase = 5\n', "suite.base must be a string, got 5"),
    ('[suite]\nbudget_tokens = 64\nbudget = 3\n', "unknown key suite.budget"),
    ('[suite]\nname = "x"\n[[models]]\nname = "a"\n', "suite.budget_tokens is missing"),
])
def test_suite_tables_are_typed(tmp_path, text, message):
    suite = tmp_path / "suite.toml"
    suite.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_suite(suite)
    assert message in str(err.value) and str(suite) in str(err.value)
    assert "\n" not in str(err.value)
