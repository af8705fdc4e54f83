"""``condcomp analyze``: the report of what a run's routing learned, its statistics against hand
counts, the recorded decisions against the layers' own, and its errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_model_cfg, tiny_overrides

from condcomp.analyze import stats
from condcomp.analyze.altup_replay import CoefficientSums, replay_states
from condcomp.analyze.collect import record_routing
from condcomp.checkpoint import is_sharded, resolve_checkpoint
from condcomp.cli import main
from condcomp.config import load_config
from condcomp.model import TransformerLM
from condcomp.train import train

# Each family's run: its config and the figures its report draws.
RUNS = {
    "moe": (["model.ffn.kind='moe'", "model.ffn.num_experts=4", "model.ffn.top_k=2"],
            ["expert_load_over_training.png", "expert_load_by_layer.png",
             "expert_coactivation.png"]),
    "mod": (["model.wrapper.kind='mod'", "model.wrapper.layers='odd'",
             "model.wrapper.capacity=0.5"], ["mod_routed_by_position.png"]),
    "altup": (["model.residual.kind='altup'", "model.residual.coefficients='dynamic'"],
              ["altup_predict.png", "altup_correct.png"]),
    "sparse_ff": (["model.ffn.kind='sparse_ff'", "model.ffn.block_size=8",
                   "model.ffn.d_lowrank=8"], ["sparse_ff_unit_usage.png"]),
    "dense": ([], []),
}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """A tiny run of each family, trained for three steps (three rows of expert load)."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (sets, _) in RUNS.items():
        cfg = load_config(None, [*tiny_overrides(corpus, tmp, name, steps=3), "train.ckpt_every=3",
                                 "train.eval_every=3", "model.dropout=0.0", *sets])
        out[name] = train(cfg, log=lambda _m: None).run_dir
    return out


def _numbers(value: object) -> list[float]:
    """Every number in a JSON value."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def _analyze(run_dir: Path, out: Path, capsys, *extra: str) -> dict:
    assert main(["analyze", str(run_dir), "--out", str(out), "--tokens", "1024",
                 "--device", "cpu", *extra]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    for name in ("report.md", "report.html", "analysis.json"):
        assert (out / name).stat().st_size > 0, name
    # JSON has no NaN; a bare NaN or Infinity token would fail here.
    analysis = json.loads((out / "analysis.json").read_text(), parse_constant=pytest.fail)
    assert all(math.isfinite(x) for x in _numbers(analysis))
    return analysis


@pytest.mark.parametrize("family", ["moe", "mod", "altup", "sparse_ff"])
def test_each_family_gets_its_section_figures_and_finite_numbers(family, runs, tmp_path,
                                                                 capsys):
    analysis = _analyze(runs[family], tmp_path / "out", capsys)
    assert list(analysis["sections"]) == [family]
    assert analysis["tokens"] == 1024 and analysis["window"] == 32
    md = (tmp_path / "out" / "report.md").read_text()
    html = (tmp_path / "out" / "report.html").read_text()
    for figure in RUNS[family][1]:
        png = (tmp_path / "out" / figure).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 3000, figure
        assert f"]({figure})" in md and f'src="{figure}"' in html
    assert "no routing to analyse" not in md
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(RUNS[family][1])


def test_the_moe_numbers_hold_together(runs, tmp_path, capsys):
    moe = _analyze(runs["moe"], tmp_path / "out", capsys)["sections"]["moe"]
    for name, layer in moe["layers"].items():
        assert layer["top_k"] == 2 and layer["tokens"] == 1024
        assert sum(layer["load"]) == pytest.approx(1.0)
        matrix = torch.tensor(moe["coactivation"][name])
        used = torch.tensor(layer["load"]) > 0
        assert torch.allclose(matrix[used].sum(1), torch.full((int(used.sum()),), 2.0,
                                                              dtype=matrix.dtype))
        for expert in moe["token_preferences"][name]:
            for pref in expert:
                assert pref["seen"] >= 8 and pref["share"] == pref["routed"] / pref["seen"]
    assert [len(h["steps"]) for h in moe["over_training"].values()] == [3, 3]
    (pair,) = moe["consistency"]
    assert pair["tokens"] == 1024 and 0 <= pair["normalised_mutual_information"] <= 1
    assert pair["successor_share"] >= pair["independent_share"] - 1e-12


def test_a_dense_run_gets_a_short_report(runs, tmp_path, capsys):
    analysis = _analyze(runs["dense"], tmp_path / "out", capsys)
    assert analysis["sections"] == {} and analysis["tokens"] == 0
    assert "no routing to analyse" in (tmp_path / "out" / "report.md").read_text()
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_run_without_metrics_skips_the_history_with_a_note(runs, tmp_path, capsys):
    """As an imported HF model: a checkpoint and a config, no metrics.jsonl."""
    run = tmp_path / "imported"
    shutil.copytree(runs["moe"], run)
    (run / "metrics.jsonl").unlink()
    analysis = _analyze(run, run / "analysis", capsys)
    assert analysis["sections"]["moe"]["over_training"] is None
    assert "the run has no `metrics.jsonl`" in (run / "analysis" / "report.md").read_text()
    assert not (run / "analysis" / "expert_load_over_training.png").exists()


def test_a_sharded_checkpoint_is_analysed(corpus, tmp_path, capsys):
    """A run trained on two gloo ranks with its experts split over them (torchrun's layout)."""
    from test_dist_train import overrides, train_on_ranks

    sets = [*overrides(corpus, tmp_path, "sharded", "switch", steps=3), "train.ckpt_every=3",
            "dist.ep=2"]
    train_on_ranks(2, "switch", sets)
    assert is_sharded(resolve_checkpoint(tmp_path / "sharded"))
    moe = _analyze(tmp_path / "sharded", tmp_path / "out", capsys)["sections"]["moe"]
    assert list(moe["layers"]) == ["layers.0.block.ffn", "layers.1.block.ffn"]
    assert all(sum(layer["load"]) == pytest.approx(1.0) for layer in moe["layers"].values())


def test_bad_runs_are_one_clear_line(runs, tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and err.count("\n") == 1
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer"):
        src = runs["moe"] / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, bare / name)
    assert main(["analyze", str(bare)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "train the run first" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- hand counts


def test_coactivation_against_a_hand_count():
    # Five tokens, top-2 of four experts.
    ids_NK = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 2], [0, 1]])
    # Expert 0 has tokens 0, 1, 2, 4: expert 1 shares 0, 2, 4; expert 2 shares 1.
    # Expert 1 has tokens 0, 2, 4, all with expert 0. Expert 2 has 1 (with 0) and 3 (with 3).
    # Expert 3 has token 3, with expert 2.
    expected = torch.tensor([[1, 3 / 4, 1 / 4, 0],
                             [1, 1, 0, 0],
                             [1 / 2, 0, 1, 1 / 2],
                             [0, 0, 1, 1]], dtype=torch.float64)
    matrix = stats.coactivation(ids_NK, 4)
    torch.testing.assert_close(matrix, expected)
    torch.testing.assert_close(matrix.sum(1), torch.full((4,), 2.0, dtype=torch.float64))
    assert stats.coactivation(torch.tensor([[0, 1]]), 3)[2].sum() == 0  # an unused expert
    torch.testing.assert_close(stats.choice_load(ids_NK, 4),
                               torch.tensor([4, 3, 2, 1], dtype=torch.float64) / 10)


def test_token_preferences_against_a_hand_count():
    tokens_N = torch.tensor([5, 5, 5, 7, 7, 9, 5])
    ids_NK = torch.tensor([[0], [0], [1], [1], [1], [0], [0]])
    prefs = stats.token_preferences(tokens_N, ids_NK, 3, min_count=2, top=5)
    # Token 5: 4 occurrences, 3 to expert 0 and 1 to expert 1; token 7: 2, both to expert 1;
    # token 9 is seen once, below the minimum.
    assert prefs[0] == [stats.TokenShare(5, 3 / 4, 3, 4)]
    assert prefs[1] == [stats.TokenShare(7, 1.0, 2, 2), stats.TokenShare(5, 1 / 4, 1, 4)]
    assert prefs[2] == []
    assert stats.token_preferences(tokens_N, ids_NK, 3, min_count=1, top=1)[0] == [
        stats.TokenShare(9, 1.0, 1, 1)]
    # The least routed end of a ranking lists shares of 0 too.
    tokens_U, counts_U, hits_U1 = stats.hits_by_token(tokens_N, (ids_NK == 0).long())
    least = stats.ranked_by_share(tokens_U, counts_U, hits_U1[:, 0], 2, 5, most=False)
    assert [(s.token, s.share) for s in least] == [(7, 0.0), (5, 3 / 4)]


def test_agreement_positions_and_unit_usage_against_hand_counts():
    first, second = torch.tensor([0, 0, 1, 1]), torch.tensor([2, 2, 3, 2])
    agree = stats.agreement(first, second, 2, 4)
    # Expert 0 is always followed by 2; expert 1 by 3 once and 2 once.
    assert agree.successor_share == 3 / 4 and agree.independent_share == 3 / 4
    mi = (0.5 * math.log2(0.5 / (0.5 * 0.75)) + 0.25 * math.log2(0.25 / (0.5 * 0.25))
          + 0.25 * math.log2(0.25 / (0.5 * 0.75)))
    assert agree.mutual_information_bits == pytest.approx(mi)
    h_b = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert agree.normalised_mutual_information == pytest.approx(mi / h_b)
    assert stats.agreement(first, first, 2, 2).normalised_mutual_information == pytest.approx(1)

    shares = stats.share_by_position(torch.tensor([1, 0, 1, 1, 0]), torch.tensor([0, 1, 0, 1, 2]),
                                     4)
    torch.testing.assert_close(shares, torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64))

    usage_KS = stats.unit_usage(torch.tensor([[0, 1], [0, 1], [1, 1]]), 2)
    torch.testing.assert_close(usage_KS, torch.tensor([[2 / 3, 1 / 3], [0, 1]],
                                                      dtype=torch.float64))
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    torch.testing.assert_close(stats.evenness(usage_KS),
                               torch.tensor([h / math.log(2), 0.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- recording


@pytest.mark.parametrize("ffn", [
    {"num_experts": 4, "top_k": 2},
    {"num_experts": 4, "routing": "expert_choice", "capacity_factor": 2.0},
    {"num_experts": 4, "top_k": 1, "num_noop_experts": 2},
    {"num_experts": 4, "top_k": 2, "score": "sigmoid", "expert_groups": 2, "groups_per_token": 1},
])
def test_recorded_experts_are_the_layers_own_choices(ffn):
    """The choices recomputed from the router's logits load the experts exactly as the layer
    counted its own slots in the same forward."""
    model = TransformerLM(tiny_model_cfg(ffn=dict(kind="moe", options=ffn)))
    with torch.no_grad():  # a bias that changes the choice, as aux-loss-free balancing leaves
        model.layers[1].block.ffn.selection_bias.normal_(std=0.05)
    tokens_BT = torch.randint(0, 97, (3, 16))
    recorded = record_routing(model, [tokens_BT], torch.device("cpu"))
    for i in range(2):
        layer, choices = model.layers[i].block.ffn, recorded.experts[f"layers.{i}.block.ffn"]
        real = choices.expert_ids_NK[choices.expert_ids_NK < layer.num_experts]
        load_E = stats.choice_load(real, layer.num_experts).float()
        torch.testing.assert_close(load_E, layer.stats["tokens_per_expert"])
        assert torch.equal(choices.token_idx_N, torch.arange(48))


def test_layers_inside_mixture_of_depths_blocks_map_back_to_their_tokens():
    cfg = tiny_model_cfg(ffn=dict(kind="moe", options={"num_experts": 4, "top_k": 2}),
                         wrapper=dict(kind="mod", layers="odd", options={"capacity": 0.5}))
    model = TransformerLM(cfg)
    with torch.no_grad():  # route about half of the tokens
        model.layers[1].router.weight.normal_(std=1.0)
    batches = [torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (3, 16))]
    recorded = record_routing(model, batches, torch.device("cpu"))
    routed_T = recorded.depths["layers.1"]
    assert routed_T.shape == (80,) and 0 < int(routed_T.sum()) < 80
    inner = recorded.experts["layers.1.block.ffn"]
    assert torch.equal(inner.token_idx_N, routed_T.nonzero().squeeze(1))
    assert inner.expert_ids_NK.shape == (int(routed_T.sum()), 2)
    assert torch.equal(recorded.experts["layers.0.block.ffn"].token_idx_N, torch.arange(80))


@pytest.mark.parametrize("coefficients", ["static", "dynamic", "gemma3n"])
def test_the_altup_replay_gives_the_models_own_logits(coefficients):
    cfg = tiny_model_cfg(residual=dict(kind="altup", options={"k": 2,
                                                              "coefficients": coefficients}))
    model = TransformerLM(cfg).eval()
    stream = model.stream
    with torch.no_grad():  # coefficients away from their initial values
        for p in stream.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens_BT = torch.randint(0, 97, (2, 12))
    outputs = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out))
               for layer in model.layers]
    with torch.no_grad():
        logits = model(tokens_BT).logits
        for handle in handles:
            handle.remove()
        *_, final = replay_states(stream, model.tok_emb(tokens_BT), tokens_BT, outputs)
        replayed = model.lm_head(model.norm(stream.collapse(final)))
    torch.testing.assert_close(replayed, logits)

    sums = record_routing(model, [tokens_BT], torch.device("cpu")).altup
    predict, correct = sums.means()
    predict_spread, correct_spread = sums.spreads()
    assert sums.tokens == 24 and predict.shape == (2, 2, 2) and correct.shape == (2, 2)
    if coefficients == "static":
        torch.testing.assert_close(predict, stream.predict.detach().double())
        torch.testing.assert_close(correct, stream.correct.detach().double())
        assert float(predict_spread.max()) < 1e-6 and float(correct_spread.max()) < 1e-6
    else:  # token-dependent: they spread over the tokens
        assert float(predict_spread.max()) > 0 and float(correct_spread.max()) > 0
    assert isinstance(sums, CoefficientSums)
