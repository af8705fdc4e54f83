"""`condcomp compare` with models that start from other models of the suite: continued,
upcycled and distilled ones, the report's starts, FLOPs and teacher's gain kept, and the
suite file's errors for them."""

import json
import math
from pathlib import Path

import pytest
import torch
from test_compare import write_suite

from condcomp.checkpoint import list_checkpoints
from condcomp.cli import main
from condcomp.compare import load_suite
from condcomp.errors import ConfigError
from condcomp.report import TRAIN_FLOPS_MULTIPLIER
from condcomp.runs import load_run, read_config, read_metrics
from condcomp.suite_starts import teacher_gain_kept

# Top-2 over copies of the dense FFN, renormalised: the upcycled MoE starts as the dense
# model it comes from, logit for logit.
TOP2 = 'ffn = { kind = "moe", layers = "odd", num_experts = 4, top_k = 2, normalize_topk = true }'
MODELS = f"""
[[models]]
name = "dense"

[[models]]
name = "moe"
config = {{ model = {{ {TOP2} }} }}

[[models]]
name = "dense-half"
budget_tokens = 1024

[[models]]
name = "dense-continued"
budget_tokens = 1024
init = "continue"
init_from = "dense-half"

[[models]]
name = "moe-upcycled"
budget_tokens = 1024
init = "upcycle"
init_from = "dense-half"
config = {{ model = {{ {TOP2} }} }}

[[models]]
name = "dense-distilled"
teacher = "moe"
gain_baseline = "dense"
config = {{ distill = {{ init_from_teacher = "shared", alpha = 0.5 }} }}
"""


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("surgery")
    suite = write_suite(tmp, MODELS, budget=2048)
    out = tmp / "out"
    assert main(["compare", str(suite), "--out", str(out)]) == 0
    return suite, out


def _summary(out) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads((out / "summary.json").read_text())["runs"]}


def test_every_start_trains_and_the_report_names_it(suite_out):
    _, out = suite_out
    assert read_config(out / "dense-continued").train.init_from == str(out / "dense-half")
    assert read_config(out / "moe-upcycled").train.init_from == str(
        out / "moe-upcycled" / "upcycled")
    assert read_config(out / "dense-distilled").distill.teacher == str(out / "moe")
    for name, tokens in (("dense-half", 1024), ("dense-continued", 1024),
                         ("moe-upcycled", 1024), ("dense-distilled", 2048)):
        assert read_metrics(out / name)[-1]["tokens"] == tokens
    trains = [row for row in read_metrics(out / "dense-distilled") if row["kind"] == "train"]
    assert trains and all("distill_kl" in row for row in trains)
    report = (out / "report.md").read_text()
    assert "| start |" in report and "| training FLOPs |" in report
    for name, start in (("dense", "scratch"), ("dense-continued", "continued from dense-half"),
                        ("moe-upcycled", "upcycled from dense-half")):
        assert f"| {name} | " in report and f"| {start} |" in report
    assert "distilled from moe" in report


def test_the_upcycled_model_starts_as_its_source_ended(suite_out):
    _, out = suite_out
    source, upcycled = (load_run(path) for path in (out / "dense-half",
                                                    out / "moe-upcycled" / "upcycled"))
    assert upcycled.cfg.model.ffn.kind == "moe" and source.cfg.model.ffn.kind == "mlp"
    tokens_BT = torch.randint(0, source.cfg.model.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(upcycled.model(tokens_BT).logits,
                                   source.model(tokens_BT).logits, atol=1e-4, rtol=1e-4)
    # ...and trained on from there: its first evaluation is near the source's last, far
    # below where a model from scratch starts.
    first_eval = [row for row in read_metrics(out / "moe-upcycled") if "val_loss" in row][0]
    source_eval = [row for row in read_metrics(out / "dense-half") if "val_loss" in row]
    assert first_eval["val_loss"] < source_eval[0]["val_loss"] - 0.1


def test_started_models_count_their_start_flops_and_tokens(suite_out):
    _, out = suite_out
    rows = _summary(out)

    def own_flops(name: str) -> float:
        return TRAIN_FLOPS_MULTIPLIER * rows[name]["flops_per_token"] * 1024

    for name in ("dense-continued", "moe-upcycled"):
        assert rows[name]["start_tokens"] == 1024
        assert rows[name]["start_train_flops"] == pytest.approx(own_flops("dense-half"))
    # dense-continued: 1024 + 1024 tokens of the dense model, as dense's 2048.
    total = own_flops("dense-half") + own_flops("dense-continued")
    dense_total = TRAIN_FLOPS_MULTIPLIER * rows["dense"]["flops_per_token"] * 2048
    assert total == pytest.approx(dense_total)
    # The table shows the two equal: read the training FLOPs cells off report.md.
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[6]
             for line in (out / "report.md").read_text().splitlines()
             if line.startswith("| dense")}
    assert cells["dense-continued"] == cells["dense"] != cells["dense-half"]
    # The distilled student pays for its teacher's forward on each of its tokens.
    teacher_fpt = rows["dense-distilled"]["teacher_flops_per_token"]
    assert teacher_fpt == pytest.approx(rows["moe"]["flops_per_token"])


def test_the_gain_kept_is_the_hand_computation(suite_out):
    _, out = suite_out
    rows = _summary(out)
    base, student, teacher = (rows[name]["final_val_loss"]
                              for name in ("dense", "dense-distilled", "moe"))
    kept = rows["dense-distilled"]["teacher_gain_kept"]
    if base > teacher:
        assert kept == pytest.approx((base - student) / (base - teacher))
        assert f"keeps {kept:.0%} of its teacher's gain" in (out / "report.md").read_text()
    else:
        assert kept is None  # NaN in JSON: the teacher gained nothing to keep
    assert teacher_gain_kept(3.0, 2.7, 2.0) == pytest.approx(0.3)
    assert math.isnan(teacher_gain_kept(2.0, 2.5, 2.5))


def test_rerunning_trains_and_upcycles_nothing_again(suite_out):
    suite, out = suite_out
    rows = {name: len(read_metrics(out / name)) for name in ("dense-half", "moe-upcycled")}
    upcycled = list_checkpoints(out / "moe-upcycled" / "upcycled")
    mtime = upcycled[-1].path.stat().st_mtime_ns
    assert main(["compare", str(suite), "--out", str(out)]) == 0
    assert {name: len(read_metrics(out / name)) for name in rows} == rows
    assert list_checkpoints(out / "moe-upcycled" / "upcycled")[-1].path.stat().st_mtime_ns \
        == mtime


@pytest.mark.parametrize("models, message", [
    ('[[models]]\nname = "a"\ninit = "continue"\ninit_from = "b"\n[[models]]\nname = "b"\n',
     "models[0].init_from = 'b' is listed after 'a'; models train in the file's order, so "
     "name one listed above 'a': []"),
    ('[[models]]\nname = "a"\n[[models]]\nname = "b"\nteacher = "c"\n',
     "models[1].teacher = 'c' is no model of the suite; models train in the file's order, so "
     "name one listed above 'b': ['a']"),
    ('[[models]]\nname = "a"\ninit = "upcycle"\ninit_from = "a"\n',
     "models[0].init_from = 'a' is the model itself"),
    ('[[models]]\nname = "a"\n[[models]]\nname = "b"\ninit_from = "a"\n',
     "models[1].init_from = 'a' names a model to start from, but models[1].init is 'scratch'"),
    ('[[models]]\nname = "a"\n[[models]]\nname = "b"\ninit = "continue"\n',
     "models[1].init = 'continue' starts from another model's weights; name it with "
     "models[1].init_from"),
    ('[[models]]\nname = "a"\ninit = "copy"\n',
     "models[0].init = 'copy' is unknown; use one of ['scratch', 'continue', 'upcycle']"),
    ('[[models]]\nname = "a"\n[[models]]\nname = "b"\ngain_baseline = "a"\n',
     "models[1].gain_baseline = 'a' measures what a distilled model kept"),
    ('[[models]]\nname = "a"\n[[models]]\nname = "b"\nbudget_tokens = 0\n',
     "models[1].budget_tokens = 0 must be positive"),
    ('[[models]]\nname = "a"\nconfig = { model = { wrapper = { kind = "mod" } } }\n'
     '[[models]]\nname = "b"\ninit = "upcycle"\ninit_from = "a"\n',
     "model 'b': model 'a' is not a dense model"),
    ('[[models]]\nname = "a"\n[[models]]\nname = "b"\ninit = "upcycle"\ninit_from = "a"\n'
     'config = { model = { d_ff = 96 } }\n',
     "model 'b': the target config does not have the source's dense skeleton: model.d_ff "
     "(source 192, target 96); upcycling keeps every dense weight"),
    ('[[models]]\nname = "a"\n[[models]]\nname = "b"\ninit = "continue"\ninit_from = "a"\n'
     'config = { model = { d_ff = 96 } }\n',
     "model 'b': init = 'continue' loads the weights of 'a', which do not fit this model: "
     "layers.0.block.ffn.w1 ([64, 192] in 'a', [64, 96] here), "),
    ('[[models]]\nname = "a"\n[[models]]\nname = "b"\ninit = "continue"\ninit_from = "a"\n'
     'teacher = "a"\nconfig = { distill = { init_from_teacher = "shared" } }\n',
     "model 'b': train.init_from and distill.init_from_teacher = 'shared' both set the first "
     "weights"),
])
def test_start_errors_are_clear(tmp_path, models, message):
    suite = write_suite(tmp_path, models)
    with pytest.raises(ConfigError) as err:
        load_suite(suite)
    assert message in str(err.value) and str(suite) in str(err.value)
    assert "\n" not in str(err.value)


def test_a_model_budget_replaces_the_suite_budget(tmp_path):
    suite = write_suite(tmp_path, '[[models]]\nname = "a"\nbudget_tokens = 512\n'
                        '[[models]]\nname = "b"\n')
    budgets = {m.name: m.config["train"]["max_tokens"] for m in load_suite(suite).models}
    assert budgets == {"a": 512, "b": 4096}


def test_the_surgery_suite_is_valid():
    suite = load_suite("surgery")
    models = {m.name: m for m in suite.models}
    assert list(models) == ["dense", "switch", "dense-1m", "dense-continued", "switch-upcycled",
                            "dense-distilled", "fine-grained", "fine-grained-upcycled",
                            "dense-distilled-fg", "dense-from-switch"]
    tokens = {name: m.config["train"]["max_tokens"] for name, m in models.items()}
    assert tokens == {"dense": 2_000_000, "switch": 2_000_000, "dense-1m": 1_000_000,
                      "dense-continued": 1_000_000, "switch-upcycled": 1_000_000,
                      "dense-distilled": 2_000_000, "fine-grained": 2_000_000,
                      "fine-grained-upcycled": 1_000_000, "dense-distilled-fg": 2_000_000,
                      "dense-from-switch": 2_000_000}
    # Granular upcycling starts as the dense model only with the top-k renormalised.
    for name in ("fine-grained", "fine-grained-upcycled"):
        assert models[name].run_config(Path("out")).model.ffn.options["normalize_topk"]
    assert (models["switch-upcycled"].start.init, models["switch-upcycled"].start.init_from) == (
        "upcycle", "dense-1m")
    assert (models["dense-continued"].start.init, models["dense-continued"].start.init_from) == (
        "continue", "dense-1m")
    distilled = models["dense-distilled"]
    assert (distilled.start.teacher, distilled.start.gain_baseline) == ("switch", "dense")
    distill = distilled.run_config(Path("out")).distill
    assert (distill.alpha, distill.temperature, distill.init_from_teacher) == (0.75, 1.0, "shared")
    assert distill.teacher == str(Path("out") / "switch")
