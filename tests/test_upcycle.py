"""``condcomp upcycle``: a dense run (or HF Llama folder) as a conditional model's first
checkpoint.

A tiny dense run trained for 3 steps is upcycled into each family. Where the mapping claims
the dense function, the upcycled run's logits must equal the source's; where it does not, the
command must say why; the written run must be one that eval and ``train.init_from`` read.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_overrides

from condcomp.cli import main
from condcomp.runs import load_run, read_metrics
from condcomp.surgery.upcycle import upcycle

# The dense skeleton of the source run (tiny_overrides' model keys), and a cheap evaluation.
SKELETON = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "model.d_ff=64",
            "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4"]


def sets(*items: str) -> list[str]:
    return SKELETON + list(items)


@pytest.fixture(scope="module")
def dense(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    assert main(["train", "--config", "dense_tiny", *[a for item in
                 tiny_overrides(corpus, tmp, "dense", steps=3) for a in ("--set", item)]]) == 0
    return tmp / "dense"


def logits(run_dir, tokens_BT):
    with torch.no_grad():
        return load_run(run_dir).model(tokens_BT).logits


TOKENS = torch.randint(0, 257, (3, 40), generator=torch.Generator().manual_seed(5))

PRESERVING = {
    "moe top-2": ['model.ffn.kind="moe"', "model.ffn.num_experts=4", "model.ffn.top_k=2",
                  "model.ffn.normalize_topk=true"],
    "moe granular": ['model.ffn.kind="moe"', "model.ffn.num_experts=4", "model.ffn.top_k=2",
                     "model.ffn.d_expert=32", "model.ffn.normalize_topk=true",
                     'model.ffn.layers="odd"'],
    "moe fine-grained, sigmoid, route_scale": [
        'model.ffn.kind="moe"', "model.ffn.granularity=4", "model.ffn.expansion=2",
        "model.ffn.top_k=1", "model.ffn.normalize_topk=true", 'model.ffn.score="sigmoid"',
        "model.ffn.route_scale=2.5"],
    "moe shared, gated": ['model.ffn.kind="moe"', "model.ffn.num_experts=2",
                          "model.ffn.d_expert=32", "model.ffn.num_shared_experts=1",
                          'model.ffn.shared_gate="sigmoid"', "model.ffn.normalize_topk=true"],
    "moe shared as wide as the FFN": ['model.ffn.kind="moe"', "model.ffn.num_experts=2",
                                      "model.ffn.num_shared_experts=1",
                                      "model.ffn.normalize_topk=true"],
    "expert choice": ['model.ffn.kind="moe"', 'model.ffn.routing="expert_choice"',
                      "model.ffn.num_experts=4", "model.ffn.capacity_factor=2.0",
                      "model.ffn.normalize_topk=true"],
    "mot, groups of one": ['model.ffn.kind="mot"', "model.ffn.num_experts=4",
                           "model.ffn.group_size=1", "model.ffn.d_shared=16"],
    "altup plain": ['model.residual.kind="altup"', "model.residual.k=3"],
    "altup recycled": ['model.residual.kind="altup"', "model.residual.recycled=true"],
    "altup dynamic": ['model.residual.kind="altup"', 'model.residual.coefficients="dynamic"'],
    "altup gemma3n": ['model.residual.kind="altup"', 'model.residual.coefficients="gemma3n"',
                      'model.residual.selection="same"'],
    "moe + altup": ['model.ffn.kind="moe"', "model.ffn.num_experts=2", "model.ffn.top_k=2",
                    'model.residual.kind="altup"'],
}


@pytest.mark.parametrize("target", sorted(PRESERVING))
def test_function_preserving_targets_start_with_the_source_logits(dense, tmp_path, target):
    out = tmp_path / "out"
    result = upcycle(dense, "dense_tiny", out, sets(*PRESERVING[target]), eval_tokens=0)
    assert result.preserved, result.max_logit_difference
    assert not result.transplant.changes  # nothing said to change the function
    assert (target == "expert choice") == bool(result.transplant.training_changes)
    expected = logits(dense, TOKENS)
    assert expected.std() > 0.1  # not vacuous
    torch.testing.assert_close(logits(out, TOKENS), expected, atol=1e-5, rtol=1e-5)
    # Every dense tensor went into the target.
    assert not result.transplant.unused()


def test_moe_experts_are_the_dense_ffn_and_fresh_weights_are_named(dense, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["upcycle", str(dense), "--config", "dense_tiny", str(out), "--eval-tokens",
                 "0", *[a for item in sets(*PRESERVING["moe granular"]) for a in ("--set", item)]
                 ]) == 0
    report = capsys.readouterr().out
    source = load_run(dense).model.state_dict()
    target = load_run(out).model.state_dict()
    w1, w2 = source["layers.1.block.ffn.w1"], source["layers.1.block.ffn.w2"]
    experts_w1 = target["layers.1.block.ffn.experts.w1"]
    # Expert e holds chunk e mod 2 of the dense units; w2 doubled (two chunks, weights sum 1).
    for e in range(4):
        chunk = slice(32 * (e % 2), 32 * (e % 2 + 1))
        assert torch.equal(experts_w1[e], w1[:, chunk])
        torch.testing.assert_close(target["layers.1.block.ffn.experts.w2"][e], 2 * w2[chunk])
    router = target["layers.1.block.ffn.router.weight"]
    assert torch.equal(router[0], router[1]) and not torch.equal(router[0], router[2])
    assert torch.equal(target["layers.0.block.ffn.w1"], source["layers.0.block.ffn.w1"])
    assert "initialised fresh: layers.1.block.ffn.selection_bias" in report
    assert "set: layers.1.block.ffn.router.weight: the layer's own init" in report
    assert "source tensors not used: none" in report
    assert "function preserved: yes" in report
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["ffn"]["kind"] == "moe" and config["data"]["corpus"]
    assert (out / "model.toml").read_text().startswith("# The model upcycled from")
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0


def test_switch_is_not_function_preserving_and_says_why(dense, tmp_path):
    result = upcycle(dense, "dense_tiny", tmp_path / "out",
                     sets('model.ffn.kind="moe"', "model.ffn.num_experts=4",
                          "model.ffn.capacity_factor=1.25"), eval_tokens=0)
    assert not result.preserved
    (why,) = result.transplant.changes
    assert "do not sum to a constant" in why
    assert result.transplant.changes[why] == ["layers.0.block.ffn", "layers.1.block.ffn"]
    (dropping,) = result.transplant.training_changes
    assert "capacity_factor = 1.25" in dropping


def test_noise_changes_the_experts_but_not_the_router(dense, tmp_path):
    moe = sets(*PRESERVING["moe top-2"])
    exact = upcycle(dense, "dense_tiny", tmp_path / "exact", moe, eval_tokens=0)
    noisy = upcycle(dense, "dense_tiny", tmp_path / "noisy", moe, noise=0.1, eval_tokens=0)
    assert exact.preserved and not noisy.preserved
    a = load_run(tmp_path / "exact").model.state_dict()
    b = load_run(tmp_path / "noisy").model.state_dict()
    name = "layers.1.block.ffn.experts.w3"
    assert not torch.equal(a[name], b[name])
    assert not torch.equal(b[name][0], b[name][1])  # each expert its own noise
    rel = (a[name] - b[name]).std() / a[name].std()
    assert 0.05 < rel < 0.2
    assert torch.equal(a["layers.1.block.ffn.router.weight"],
                       b["layers.1.block.ffn.router.weight"])


def test_mod_reports_both_validation_losses(dense, tmp_path, capsys):
    assert main(["upcycle", str(dense), "--config", "mod", str(tmp_path / "out"),
                 "--eval-tokens", "256", *[a for item in sets() for a in ("--set", item)]]) == 0
    report = capsys.readouterr().out
    assert "layers.1.router.weight" in report and "function preserved: no" in report
    assert "layers.1: Mixture-of-Depths" in report
    line = next(line for line in report.splitlines() if "validation loss" in line)
    before, after = (float(part.split()[-1].rstrip(",")) for part in
                     line.split(": ")[1].split(" (")[0].split(", upcycled"))
    assert math.isfinite(before) and math.isfinite(after) and before != after
    assert main(["eval", str(tmp_path / "out"), "--max-tokens", "128"]) == 0


def test_sparse_ff_reuses_the_units_and_leaves_the_up_projection(dense, tmp_path):
    result = upcycle(dense, "sparse_ff", tmp_path / "out",
                     sets("model.activation='swiglu'", "model.ffn.block_size=8"), eval_tokens=0)
    assert not result.preserved
    assert result.transplant.unused() == ["layers.0.block.ffn.w3", "layers.1.block.ffn.w3"]
    assert "layers.0.block.ffn.controller_up" in result.transplant.fresh()


def test_training_continues_from_the_upcycled_weights(dense, corpus, tmp_path):
    out = tmp_path / "moe"
    upcycle(dense, "dense_tiny", out, sets(*PRESERVING["moe top-2"]), eval_tokens=0)
    new = tmp_path / "new"
    # A learning rate too small to move the weights: the new run must end where it started.
    assert main(["train", "--config", str(out / "model.toml"), "--set",
                 f'train.init_from="{out}"', "--set", f'out_dir="{new}"', "--set",
                 f'data.cache_dir="{tmp_path / "cache"}"', "--set", "train.max_steps=2",
                 "--set", "train.lr=1e-12", "--set", "train.eval_tokens=128", "--set",
                 "train.progress=false", "--set", "train.log_every=1"]) == 0
    losses = [row["train_loss"] for row in read_metrics(new) if "train_loss" in row]
    assert losses and all(math.isfinite(loss) for loss in losses)
    start, end = load_run(out).model.state_dict(), load_run(new).model.state_dict()
    for name, tensor in start.items():
        torch.testing.assert_close(end[name], tensor, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("override, key", [("model.d_model=64", "model.d_model"),
                                           ("model.n_layers=3", "model.n_layers"),
                                           ("model.vocab_size=300", "model.vocab_size")])
def test_another_skeleton_is_one_clear_error(dense, tmp_path, capsys, override, key):
    err = _cli_error(["upcycle", str(dense), "--config", "top2", str(tmp_path / "out"),
                      *[a for item in sets(override) for a in ("--set", item)]], capsys)
    assert f"{key} (source" in err and "dense skeleton" in err
    assert not (tmp_path / "out").exists()


def test_a_refused_family_is_one_clear_error(dense, tmp_path, capsys):
    err = _cli_error(["upcycle", str(dense), "--config", "sparse_qkv", str(tmp_path / "out"),
                      *[a for item in sets() for a in ("--set", item)]], capsys)
    assert "model.attention.kind = 'sparse_qkv' cannot be upcycled" in err


def _cli_error(args, capsys) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("condcomp: error: ") and len(err.splitlines()) == 1
    return err


def test_an_hf_llama_folder_upcycles_to_moe_with_its_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)).eval()
    hf.save_pretrained(tmp_path / "hf")
    target = tmp_path / "target.toml"
    target.write_text('[model]\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\n'
                      'd_ff = 48\nmax_seq_len = 64\nnorm_eps = 1e-6\ntie_embeddings = false\n'
                      '[model.ffn]\nkind = "moe"\nnum_experts = 4\ntop_k = 2\n'
                      'd_expert = 24\nnormalize_topk = true\n[train]\nseq_len = 32\n')
    result = upcycle(tmp_path / "hf", target, tmp_path / "out", eval_tokens=0)
    assert result.preserved
    tokens_BT = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens_BT).logits
    torch.testing.assert_close(logits(tmp_path / "out", tokens_BT), expected, atol=1e-4,
                               rtol=1e-4)
