"""Router health: MaxVio, dead experts, dropped share by position, MoD capacity and decode
agreement, and the warnings the train loop writes when a router collapses."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides
from ranks import run_ranks

from condcomp.conditional import routing
from condcomp.conditional.mod import MixtureOfDepths, decode_agreement, share_over_capacity
from condcomp.conditional.moe import MoE
from condcomp.config import HealthConfig, load_config
from condcomp.model.rope import RotaryEmbedding
from condcomp.router_health import HINTS, RouterHealth, describe
from condcomp.runs import METRICS_FILE


def _forced_moe(num_experts=4, favourite=0, **kwargs) -> MoE:
    """An MoE whose every token picks ``favourite``: the selection bias (added to the
    probabilities, which are in [0, 1]) outweighs any router score."""
    moe = MoE(8, 16, num_experts, **kwargs)
    _force(moe, favourite)
    return moe


def _force(moe: MoE, favourite: int) -> None:
    moe.selection_bias.zero_()
    moe.selection_bias[favourite] = 10.0


# ----------------------------------------------------------------------------- MaxVio


def test_max_load_violation_is_the_largest_load_over_the_mean_minus_one():
    # mean 2, max 6: 6 / 2 - 1
    assert routing.max_load_violation(torch.tensor([6.0, 2.0, 0.0, 0.0])).item() == 2.0
    assert routing.max_load_violation(torch.tensor([3, 3, 3])).item() == 0.0
    assert routing.max_load_violation(torch.zeros(4)).item() == 0.0  # no slot: not NaN


def test_moe_logs_maxvio_and_top_share_of_its_choices_before_capacity():
    moe = _forced_moe(capacity_factor=1.0).train()
    x = torch.randn(2, 8, 8)
    moe(x)
    # All 16 tokens chose expert 0 (loads 16, 0, 0, 0: MaxVio 16 / 4 - 1), though capacity
    # let it process only 4 of them.
    assert moe.stats["max_load_violation"].item() == pytest.approx(3.0)
    assert moe.stats["top_expert_share"].item() == pytest.approx(1.0)
    assert moe.stats["tokens_per_expert"][0].item() == 1.0

    moe = MoE(8, 16, 4, top_k=2).train()
    moe(x)
    ids = routing.token_choice(routing.router_probs(moe.router(x.view(16, 8))), 2).expert_ids_TK
    load = torch.bincount(ids.reshape(-1), minlength=4).float()
    assert moe.stats["max_load_violation"].item() == pytest.approx(
        (load.max() / load.mean() - 1).item())
    assert moe.stats["top_expert_share"].item() == pytest.approx(load.max().item() / 16)


# ----------------------------------------------------------------------------- dead experts


def test_idle_steps_count_every_step_and_every_micro_batch():
    moe = _forced_moe().train()
    x = torch.randn(1, 4, 8)
    for _ in range(3):  # three steps on expert 0 alone
        moe(x)
        moe.after_optimizer_step()
    assert moe.idle_steps().tolist() == [0.0, 3.0, 3.0, 3.0]
    _force(moe, 2)
    moe(x)  # the next step's first micro-batch goes to expert 2 ...
    _force(moe, 0)
    moe(x)  # ... its last to expert 0: both count for the step
    moe.after_optimizer_step()
    assert moe.idle_steps().tolist() == [0.0, 4.0, 0.0, 4.0]
    moe.eval()(x)  # evaluation counts nothing
    moe.after_optimizer_step()
    assert moe.idle_steps().tolist() == [1.0, 5.0, 1.0, 5.0]

    # dead_expert_steps = 5: experts 1 and 3, flagged on the device, counted in the row
    model = torch.nn.ModuleDict({"ffn": moe})
    health = RouterHealth(HealthConfig(dead_expert_steps=5))
    stats = health.rank_stats({"ffn.z_loss": 0.5}, model)
    row = {"step": 5, **{k: v if isinstance(v, float) else v.tolist() for k, v in stats.items()}}
    health.review(row)
    assert row == {"step": 5, "ffn.z_loss": 0.5, "ffn.dead_experts": 2}


def test_an_expert_is_dead_only_when_every_rank_left_it_idle():
    """Under torchrun each rank flags its own idle experts and the flags are averaged before
    the count: an expert one rank still routes to is alive."""
    health = RouterHealth(HealthConfig(dead_expert_steps=3))
    ranks = []
    for idle in ([5.0, 0.0, 9.0], [5.0, 8.0, 3.0]):  # expert 1: a mean of 4, but alive
        moe = MoE(8, 16, 3)
        moe._idle_steps.copy_(torch.tensor(idle))
        ranks.append(health.rank_stats({}, torch.nn.ModuleDict({"l": moe}))["l.dead_flags"])
    row = {"step": 10, "l.max_load_violation": 0.5, "l.top_expert_share": 0.3,
           "l.dead_flags": torch.stack(ranks).mean(0).tolist()}
    warnings = health.review(row)
    assert row["l.dead_experts"] == 2
    assert [w["what"] for w in warnings] == ["dead_experts"]
    assert warnings[0]["message"].startswith("2 of 3 experts got no token in the last 3 steps")


# ----------------------------------------------------------------------------- dropped share


def test_share_by_position_groups_positions_into_quarters():
    # seq_len 6: positions 0..5 fall in quarters 0, 0, 1, 2, 2, 3; two sequences
    hits = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1])
    slots = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    expected = [1 / 4, 1 / 2, 3 / 4, 2 / 2]  # hits / slots per quarter, both sequences
    assert routing.share_by_position(hits, slots, 6).tolist() == pytest.approx(expected)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_dropped_share_by_position_shows_the_overflowing_end_of_the_sequence(scope):
    # Every token picks expert 0 of 2; capacity 1.0 * T / 2 keeps the first half of each
    # sequence (position order, GShard) and drops the second half.
    moe = _forced_moe(num_experts=2, capacity_factor=1.0, capacity_scope=scope).train()
    batch = 1 if scope == "batch" else 3
    moe(torch.randn(batch, 8, 8))
    assert moe.stats["dropped_by_position"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert moe.stats["dropped_fraction"].item() == pytest.approx(0.5)
    moe.eval()(torch.randn(1, 8, 8))  # evaluation is dropless: nothing to show
    assert "dropped_by_position" not in moe.stats
    dropless = MoE(8, 16, 2).train()
    dropless(torch.randn(1, 8, 8))
    assert "dropped_by_position" not in dropless.stats


def test_expert_choice_logs_the_unchosen_share_by_position():
    moe = MoE(8, 16, 4, routing_mode="expert_choice", capacity_factor=1.0).train()
    moe(torch.randn(2, 8, 8))
    by_position = moe.stats["dropped_by_position"]
    assert ((by_position >= 0) & (by_position <= 1)).all()
    assert by_position.mean().item() == pytest.approx(moe.stats["dropped_fraction"].item())


# ----------------------------------------------------------------------------- MoD


class FixedScores(torch.nn.Module):
    """Stands in for a router (or predictor): returns the given scores whatever its input."""

    def __init__(self, scores_BT):
        super().__init__()
        self.scores_BT = scores_BT

    def forward(self, x_BTD):
        return self.scores_BT.unsqueeze(-1)


class Identity(torch.nn.Module):
    def forward(self, x_BKD, positions):
        return torch.zeros_like(x_BKD)


@pytest.mark.parametrize("decode_router", ["aux_loss", "predictor"])
def test_mod_capacity_use_and_decode_agreement_on_fixed_scores(decode_router):
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0], [0.5, 1.0, 3.0, -2.0]])
    # capacity 0.5 of 4 tokens: top 2 per sequence, tokens {0, 2} and {1, 2}
    chosen = torch.tensor([[True, False, True, False], [False, True, True, False]])
    decision = scores > 0  # causal rule: sigmoid(r) > 0.5; 5 of 8 enter, 7 of 8 agree
    assert share_over_capacity(chosen, 0.5).item() == 1.0
    assert share_over_capacity(decision, 0.5).item() == pytest.approx(5 / 8 / 0.5)
    assert decode_agreement(decision, chosen).item() == pytest.approx(7 / 8)

    mod = MixtureOfDepths(Identity(), d_model=8, capacity=0.5, decode_router=decode_router)
    mod.router = FixedScores(scores)
    if decode_router == "predictor":  # the predictor decides; give it the scores' signs
        mod.predictor = FixedScores(scores)
    positions = RotaryEmbedding(4, 32).positions(4)
    mod.train()(torch.randn(2, 4, 8), positions)
    assert mod.stats["routed_over_capacity"].item() == 1.0
    assert mod.stats["decode_over_capacity"].item() == pytest.approx(1.25)
    assert mod.stats["predictor_accuracy"].item() == pytest.approx(7 / 8)
    for key in ("routed_fraction", "predictor_accuracy"):
        assert 0 <= mod.stats[key].item() <= 1
    mod.eval()(torch.randn(2, 4, 8), positions)  # decoding routes as the decode rule says
    assert mod.stats["routed_fraction"].item() == pytest.approx(5 / 8)


# ----------------------------------------------------------------------------- warnings


def _row(step, share=0.3, violation=0.2, entropy=1.0):
    return {"step": step, "l.max_load_violation": violation, "l.top_expert_share": share,
            "l.router_entropy": entropy}


def test_a_collapse_warns_once_after_m_logged_steps_and_again_only_after_recovering():
    health = RouterHealth(HealthConfig(collapse_logged_steps=3, min_router_entropy=0.1))
    collapsed = dict(share=0.9, violation=2.6, entropy=0.01)
    fired = {step: [w["what"] for w in health.review(_row(step, **kw))]
             for step, kw in [(1, collapsed), (2, collapsed), (3, collapsed), (4, collapsed),
                              (5, {}), (6, collapsed), (7, collapsed), (8, collapsed)]}
    assert fired == {1: [], 2: [], 3: ["load_collapse", "entropy_collapse"], 4: [], 5: [],
                     6: [], 7: [], 8: ["load_collapse", "entropy_collapse"]}


def test_a_busy_expert_is_no_collapse_where_balanced_routing_reaches_the_threshold():
    # top 2 of 3 experts: balanced, each expert serves 2/3 of the tokens (MaxVio 0)
    health = RouterHealth(HealthConfig(collapse_logged_steps=1))
    assert health.review(_row(1, share=2 / 3, violation=0.0)) == []
    assert health.review(_row(2, share=0.9, violation=0.35)) == []  # 0.9 = 2/3 * 1.35
    # top 1 of 4: balanced is 1/4, so 0.9 (MaxVio 2.6) is a collapse
    assert [w["what"] for w in health.review(_row(3, share=0.9, violation=2.6))] == \
        ["load_collapse"]


def _train(corpus, tmp_path, name, *sets):
    from condcomp.train import train

    overrides = [*tiny_overrides(corpus, tmp_path, name, steps=4), "train.eval_every=100",
                 "train.ckpt_every=100", "model.ffn.kind='moe'", "model.ffn.layers=[1]",
                 "model.ffn.num_experts=4", "model.dropout=0.0", *sets]
    result = train(load_config(None, overrides), log=lambda _m: None)
    rows = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    return rows


def test_training_warns_when_the_router_collapses_onto_one_expert(corpus, tmp_path, monkeypatch,
                                                                   capsys):
    init_weights = MoE.init_weights

    def forced_init(self, std, residual_std):
        init_weights(self, std, residual_std)
        _force(self, 0)

    monkeypatch.setattr(MoE, "init_weights", forced_init)
    rows = _train(corpus, tmp_path, "collapsed", "health.collapse_logged_steps=2",
                  "health.dead_expert_steps=3")
    warnings = [row for row in rows if row["kind"] == "router_warning"]
    assert [(w["step"], w["layer"], w["what"]) for w in warnings] == [
        (2, "layers.1.block.ffn", "load_collapse"), (3, "layers.1.block.ffn", "dead_experts")]
    assert warnings[0]["hint"] == HINTS["load_collapse"]
    assert "100% of the tokens" in warnings[0]["message"]
    assert "3 of 4 experts" in warnings[1]["message"]
    trains = [row for row in rows if row["kind"] == "train"]
    assert [row["layers.1.block.ffn.dead_experts"] for row in trains] == [0, 0, 3, 3]
    assert trains[-1]["layers.1.block.ffn.max_load_violation"] == pytest.approx(3.0)
    assert describe(warnings[0]) in capsys.readouterr().out


def test_training_stays_silent_on_a_balanced_router(corpus, tmp_path):
    rows = _train(corpus, tmp_path, "balanced", "health.collapse_logged_steps=1",
                  "health.dead_expert_steps=2", "model.ffn.capacity_factor=1.25")
    assert not [row for row in rows if row["kind"] == "router_warning"]
    trains = [row for row in rows if row["kind"] == "train"]
    last = trains[-1]
    assert all(row["layers.1.block.ffn.dead_experts"] == 0 for row in trains)
    assert 0 <= last["layers.1.block.ffn.max_load_violation"] < 1
    assert len(last["layers.1.block.ffn.dropped_by_position"]) == 4
    assert "layers.1.block.ffn.dead_flags" not in last


def _train_rank(rank, world, sets):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from condcomp.train import train

    train(load_config(None, sets), log=lambda _m: None)


def test_under_two_ranks_rank_0_warns_once_from_the_averaged_statistics(corpus, tmp_path,
                                                                         monkeypatch):
    """Rank 0 routes every token to expert 0, rank 1 to expert 1: experts 2 and 3 are dead,
    0 and 1 are not (each is idle on one rank only)."""
    forward = MoE.forward

    def forced_forward(self, x_BTD, padding_mask_BT=None):
        _force(self, torch.distributed.get_rank())
        return forward(self, x_BTD, padding_mask_BT)

    monkeypatch.setattr(MoE, "forward", forced_forward)  # the forked ranks inherit it
    sets = [*tiny_overrides(corpus, tmp_path, "ranks", steps=3), "train.eval_every=100",
            "train.ckpt_every=100", "model.ffn.kind='moe'", "model.ffn.layers=[1]",
            "model.ffn.num_experts=4", "model.dropout=0.0", "health.dead_expert_steps=2",
            "health.collapse_logged_steps=2"]
    run_ranks(_train_rank, 2, sets)
    rows = [json.loads(line) for line in (tmp_path / "ranks" / METRICS_FILE).read_text()
            .splitlines()]
    trains = [row for row in rows if row["kind"] == "train"]
    assert [row["layers.1.block.ffn.dead_experts"] for row in trains] == [0, 2, 2]
    warnings = [(row["step"], row["what"]) for row in rows if row["kind"] == "router_warning"]
    assert warnings == [(2, "load_collapse"), (2, "dead_experts")]


def test_health_keys_are_checked_like_every_other_key():
    from condcomp.errors import ConfigError

    assert load_config(None, ["health.collapse_share=0.8"]).health.collapse_share == 0.8
    with pytest.raises(ConfigError, match="health.collapse_share"):
        load_config(None, ["health.collapse_share=1.5"])
    with pytest.raises(ConfigError, match="unknown key health.patience"):
        load_config(None, ["health.patience=3"])
    # They decide only when to warn: a resume may change them.
    from condcomp.run_changes import check_resume

    changes = check_resume(Path("run"), load_config(None),
                           load_config(None, ["health.dead_expert_steps=7"]))
    assert changes == {"health.dead_expert_steps": (100, 7)}
