"""Tests of ``condcomp bench`` (condcomp.bench): a tiny model on the CPU, a few steps.

These check that the command runs and reports every figure, not how fast anything is:
benchmarks are commands that print figures, not timed tests (docs/design.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_model_cfg

from condcomp.bench import add_parser
from condcomp.bench.hf import format_table, run
from condcomp.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "condcomp" / "presets"

# A tiny GQA model; every shape through the options, as a user would give them.
TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
        "--set", "model.n_kv_heads=2", "--set", "model.d_ff=64", "--set", "model.max_seq_len=64",
        "--vocab-size", "97", "--batch-size", "2", "--seq-len", "32", "--steps", "2",
        "--warmup", "1", "--decode-tokens", "6", "--prompt-len", "4", "--decode-repeats", "2",
        "--device", "cpu"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    args = parse([*TINY, "--json", str(out), *extra])
    assert args.func is run
    assert run(args) == 0
    return json.loads(out.read_text())


def test_bench_against_hf(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")
    result = run_bench(tmp_path, "--peer", "hf")
    models = result["models"]
    assert set(models) == {"ours", "hf"}
    for m in models.values():
        assert m["train"]["tokens_per_s"] > 0 and m["train"]["tflops"] > 0
        assert m["train"]["mfu"] is None  # the CPU has no known peak
        assert len(m["train"]["step_s"]) == 2
        assert m["decode"]["tokens_per_s"] > 0 and m["decode"]["steady_tokens_per_s"] > 0
        assert len(m["decode"]["tokens_per_s_runs"]) == 2
    # Same shape, same weights: same size, same loss, same greedy tokens.
    assert models["ours"]["params"] == models["hf"]["params"]
    assert result["checks"]["first_step_loss"]["match"]
    assert result["checks"]["decode_tokens_agree"] == 1.0
    assert result["ratios"]["train_tokens_per_s"] > 0
    assert result["ratios"]["decode_tokens_per_s"] > 0
    assert result["device"]["type"] == "cpu" and result["device"]["name"]
    assert result["dtype"] == "float32"
    assert result["config"]["model"]["vocab_size"] == 97
    assert result["command"].startswith("condcomp bench ")
    assert result["machine_load"]["verdict"] in {"busy", "idle", "unknown"}
    assert "--seq-len 32" in result["command"]
    printed = capsys.readouterr().out
    assert "ours / HF" in printed and "decode tok/s" in printed


def test_bench_alone(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "--peer", "none", "--what", "decode")
    assert set(result["models"]) == {"ours"}
    assert result["models"]["ours"]["decode"]["tokens_per_s"] > 0
    assert "train" not in result["models"]["ours"]
    assert result["ratios"] == {}
    assert "ours / HF" not in format_table(result)


@pytest.mark.parametrize("extra, match", [
    (["--what", "train,sing"], "--what"),
    (["--decode-tokens", "100"], "max_seq_len"),
    (["--seq-len", "128"], "max_seq_len"),
])
def test_bad_options_say_what_to_fix(tmp_path: Path, extra: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run(parse([*TINY, "--peer", "none", *extra]))


def test_non_llama_model_needs_peer_none(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="--peer none"):
        run(parse([*TINY, "--peer", "hf", "--set", "model.activation=gelu"]))


def test_bench_moe_runs_and_compares_with_hf(tmp_path, capsys):
    from condcomp.cli import main

    out = tmp_path / "moe.json"
    assert main(["bench", "moe", "--d-model", "32", "--d-ff", "64", "--tokens", "256",
                 "--experts", "4:1,8:2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    layers = {(r["layer"], r["E:k"]) for r in result["rows"]}
    assert ("dense SwiGLU FFN", "-") in layers
    assert ("condcomp MoE", "4:1") in layers and ("condcomp MoE", "8:2") in layers
    assert ("HF Mixtral [eager]", "8:2") in layers
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert "| condcomp MoE | 8:2 |" in capsys.readouterr().out
    assert 0 <= result["machine_load"]["other_cpu_share"] <= 1


def test_bench_trains_with_bf16_weights_and_fp32_masters(tmp_path):
    """``--set train.param_dtype='bfloat16'`` times the step ``condcomp train`` would take (bf16
    weights, fp32 masters, the copy-back); the first loss is autocast's, and a CPU run that
    computes in fp32 is refused."""
    common = ["--peer", "none", "--what", "train", "--dtype", "bfloat16"]
    plain = run_bench(tmp_path, *common)
    low = run_bench(tmp_path, *common, "--set", "train.param_dtype='bfloat16'")
    assert low["config"]["train"]["param_dtype"] == "bfloat16"
    assert low["models"]["ours"]["train"]["first_loss"] == \
        plain["models"]["ours"]["train"]["first_loss"]
    with pytest.raises(ConfigError, match="add --dtype bfloat16"):
        run(parse([*TINY, "--peer", "none", "--set", "train.param_dtype='bfloat16'"]))


def test_bench_moe_with_bf16_weights_times_bf16_weights(tmp_path, monkeypatch):
    """``--param-dtype bfloat16``: every layer timed (dense, ours, HF's) stores its matrix
    weights in bf16, as a run with ``train.param_dtype = 'bfloat16'`` does."""
    from condcomp.bench import moe as bench_moe
    from condcomp.cli import main

    seen = []
    timer = bench_moe.time_fwd_bwd

    def spy(layer, *args, **kwargs):
        seen.append({p.dtype for p in layer.parameters() if p.dim() >= 2})
        return timer(layer, *args, **kwargs)

    monkeypatch.setattr(bench_moe, "time_fwd_bwd", spy)
    out = tmp_path / "moe.json"
    assert main(["bench", "moe", "--d-model", "32", "--d-ff", "64", "--tokens", "128",
                 "--experts", "4:1", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--dtype", "bfloat16", "--param-dtype", "bfloat16", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["param_dtype"] == "torch.bfloat16"
    assert len(seen) >= 2 and all(dtypes == {torch.bfloat16} for dtypes in seen)


def test_count_compiled_bytes_counts_what_the_kernels_read_and_write():
    from condcomp.bench.compiled_bytes import count_compiled_bytes

    x = torch.randn(1000)
    with count_compiled_bytes() as count:
        torch.compile(lambda t: t * 2)(x)  # one kernel: reads 4000 bytes, writes 4000
    assert (count.bytes, count.kernels) == (8000, 1)
    with pytest.raises(ConfigError, match="no compiled bytes"), count_compiled_bytes():
        pass  # nothing compiled


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is newer")
def test_bench_moe_counts_compiled_bytes_on_the_cpu(tmp_path):
    """``--count-bytes`` compiles each layer once, on the grouped-GEMM fast path, and sets its
    memory traffic against the dense FFN's: an MoE moves more bytes than the dense layer of
    equal FLOPs (the permuted copy, the router, the combine)."""
    from condcomp.cli import main

    out = tmp_path / "moe.json"
    assert main(["bench", "moe", "--d-model", "32", "--d-ff", "64", "--tokens", "256",
                 "--experts", "4:1", "--device", "cpu", "--dtype", "bfloat16", "--count-bytes",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["measure"] == "bytes" and result["compile"]
    dense, moe = result["rows"]
    assert dense["fraction_of_dense"] == 1.0 and 0 < moe["fraction_of_dense"] < 1
    assert moe["bytes"] == pytest.approx(moe["bytes_per_token"] * 256)
    assert moe["bytes"] > dense["bytes"] > 256 * 32 * 2  # at least the input, read once


@pytest.mark.parametrize("argv, message", [
    (["moe", "--param-dtype", "bfloat16"], "add --dtype bfloat16"),
    (["moe", "--experts", "8-1"], "write E:k pairs"),
    (["moe", "--tokens", "-5"], "argument --tokens: -5 must be positive"),
    (["moe", "--steps", "0"], "argument --steps: 0 must be positive"),
    (["decode", "--shapes", "abc"], "--shapes 'abc': give a comma list of d_model values"),
    (["decode", "--shapes", "0"], "--shapes '0': give a comma list of d_model values"),
    (["decode", "--tokens", "0"], "argument --tokens: 0 must be positive"),
    (["decode", "--context", "0"], "argument --context: 0 must be positive"),
    (["decode", "--stack", "0"], "argument --stack: 0 must be positive"),
    (["decode", "--block-size", "1"], "argument --block-size: 1 must be at least 2"),
    (["runs", "r", "--repeats", "0"], "argument --repeats: 0 must be positive"),
    (["runs", "r", "--tokens", "-1"], "argument --tokens: -1 must be at least 0"),
    (["models", "--configs", "a,b", "--seed", "-1"], "argument --seed: -1 must be at least 0"),
    (["--decode-tokens", "1"], "argument --decode-tokens: 1 must be at least 2"),
    (["--warmup", "-1"], "argument --warmup: -1 must not be negative"),
])
def test_bench_subcommands_reject_bad_arguments(argv, message, capsys):
    from condcomp.cli import main

    assert main(["bench", *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_decode_table(tmp_path, capsys):
    from condcomp.cli import main

    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--shapes", "64", "--whole-model", "off", "--tokens", "3",
                 "--context", "8", "--block-size", "8", "--d-lowrank", "8", "--stack", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "sparse_ff", "sparse_qkv", "sparse_ff+qkv"]
    assert rows[0]["speedup"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
    assert all(r["layers"] == 2 for r in rows)  # each step ran a stack of two blocks
    # Sparse FF reads its controller (64 x 8, 8 x 256, bias 256) and, of each of the 32
    # blocks, one row of W1 and W2 and one b1 entry (+ b2), instead of the dense 2 x 64 x 256.
    dense, sparse_ff = rows[0]["params_read"], rows[1]["params_read"]
    assert sparse_ff == dense - 2 * 64 * 256 + (8 * (64 + 256) + 256) + (2 * 32 * 64 + 32 + 64)
    assert rows[1]["weight_bound"] == pytest.approx(dense / sparse_ff)
    # Sparse QKV (one 64-wide head): the multiplicative layer (gate 64, proj 64 x 64, bias 64),
    # two 3 x 3 convolutions (64 x 64 channels, bias 64) and the multiplicative output layer,
    # instead of four dense 64 x 64 projections.
    mult = 64 + 64 * 64 + 64
    assert rows[2]["params_read"] == dense - 4 * 64 * 64 + 2 * mult + 2 * (9 * 64 * 64 + 64)
    assert "| block | 64 | sparse_ff+qkv |" in capsys.readouterr().out
    assert "machine_load" in json.loads(out.read_text())


def test_bench_models_sets_families_against_the_first(tmp_path, capsys):
    from condcomp.cli import main

    out = tmp_path / "models.json"
    configs = ",".join(str(CONFIGS / f"{n}.toml") for n in ("dense_small", "mod", "altup"))
    assert main(["bench", "models", "--configs", configs, "--set", "model.d_model=32",
                 "--set", "model.n_layers=2", "--vocab-size", "64", "--batch-size", "2",
                 "--seq-len", "16", "--steps", "1", "--warmup", "0", "--decode-tokens", "4",
                 "--prompt-len", "4", "--decode-repeats", "1", "--train-routers", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    models = result["models"]
    assert list(models) == ["dense_small", "mod", "altup"] and result["baseline"] == "dense_small"
    base = models["dense_small"]
    assert base["train_speedup"] == 1.0 and base["decode_speedup"] == 1.0
    # MoD's analytic FLOPs are lower; its decode reports the share its routed blocks took.
    assert models["mod"]["flops_ratio"] < 1.0
    assert 0.0 <= models["mod"]["decode"]["routed_share"] <= 1.0
    assert "routed_share" not in models["altup"]["decode"]
    assert all(m["train"]["step_s_median"] > 0 for m in models.values())
    assert "| mod " in capsys.readouterr().out
    assert "machine_load" in result


def test_bench_models_flags_a_decode_routing_share_far_from_the_trained_capacity():
    from condcomp.bench.models import routing_unlike_training
    from condcomp.model import TransformerLM

    mod = TransformerLM(tiny_model_cfg(n_layers=4, wrapper=dict(
        kind="mod", layers="odd", options=dict(capacity=0.125))))
    assert routing_unlike_training(mod, 0.10) is None  # what a trained router routes
    for share in (0.0, 0.05, 0.53):  # what untrained routers have routed
        assert "trained capacity of 12.5%" in routing_unlike_training(mod, share)
    assert routing_unlike_training(TransformerLM(tiny_model_cfg()), 0.0) is None  # no MoD


def test_bench_models_counts_the_compiled_step_bytes(tmp_path, capsys):
    """``--count-bytes``: AltUp's K = 2 residual stream moves more bytes per token than the
    width-d model at equal FLOPs, and the table says so against the baseline."""
    from condcomp.cli import main

    out = tmp_path / "models.json"
    assert main(["bench", "models", "--configs", "dense_small,altup",
                 "--what", "train", "--count-bytes", "--dtype", "bfloat16",
                 "--set", "model.d_model=32", "--set", "model.n_layers=1", "--vocab-size", "64",
                 "--batch-size", "2", "--seq-len", "16", "--json", str(out)]) == 0
    models = json.loads(out.read_text())["models"]
    assert models["dense_small"]["train_bytes_ratio"] == 1.0
    assert models["altup"]["train_bytes_ratio"] > 1.0
    assert "train" not in models["altup"]  # counted, not timed
    assert "train bytes/token" in capsys.readouterr().out
    assert main(["bench", "models", "--configs", "dense_small,altup",
                 "--what", "decode", "--count-bytes"]) == 2
    assert "keep train in --what" in capsys.readouterr().err


def test_bench_models_needs_a_baseline_and_one_more(capsys):
    from condcomp.cli import main

    assert main(["bench", "models", "--configs", str(CONFIGS / "mod.toml")]) != 0
    assert "at least two presets" in capsys.readouterr().err


def test_bench_moe_profiles_each_expert_configuration(tmp_path, capsys):
    """``--profile``: after each E:k MoE layer is timed, torch.profiler's table of its passes
    (on the CPU, its operators by their own CPU time), printed and kept in the JSON."""
    from condcomp.cli import main

    out = tmp_path / "moe.json"
    assert main(["bench", "moe", "--d-model", "32", "--d-ff", "64", "--tokens", "128",
                 "--experts", "4:1,8:2", "--steps", "1", "--warmup", "1", "--device", "cpu",
                 "--peer", "none", "--profile", "--json", str(out)]) == 0
    profiles = json.loads(out.read_text())["profiles"]
    assert list(profiles) == ["E=4 k=1", "E=8 k=2"]
    assert all("Self CPU" in table and "aten::" in table for table in profiles.values())
    printed = capsys.readouterr().out
    assert "=== E=4 k=1" in printed and "| condcomp MoE | 8:2 |" in printed
    assert main(["bench", "moe", "--profile", "--count-bytes", "--device", "cpu"]) == 2
    assert "drop one of them" in capsys.readouterr().err


def test_a_busy_machine_is_warned_of_under_the_table_and_recorded(tmp_path, capsys,
                                                                  monkeypatch):
    """Every bench command measures other processes' use of the CPUs while it runs; when they
    were busy, a warning follows the table and the JSON says so."""
    from condcomp.cli import main
    from condcomp.machine_load import LoadMeter, MachineLoad

    monkeypatch.setattr(LoadMeter, "lap", lambda self: MachineLoad(0.61, 2, 5.0, "proc_stat"))
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--shapes", "64", "--whole-model", "off", "--tokens", "2",
                 "--context", "4", "--block-size", "8", "--d-lowrank", "8", "--stack", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    warning = ("warning: other processes used 61% of the 2 CPUs while this ran; the times "
               "above are not reliable, rerun on an idle machine")
    assert printed.index("| block | 64 | sparse_ff+qkv |") < printed.index(warning)
    load = json.loads(out.read_text())["machine_load"]
    assert (load["other_cpu_share"], load["verdict"]) == (0.61, "busy")
