"""``condcomp bench import-hf`` at a tiny shape, and the import path it measures: every weight
of an imported run is the HF folder's, bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_model

from condcomp.cli import main
from condcomp.errors import CheckpointError
from condcomp.hf.folders import import_hf
from condcomp.hf.weights import SafetensorsFolder
from condcomp.runs import load_run, read_config

transformers = pytest.importorskip("transformers")

from test_hf_moe import save_hf_model  # noqa: E402

TINY = ["--hf-set", "vocab_size=300", "--hf-set", "hidden_size=32", "--hf-set",
        "num_hidden_layers=2", "--hf-set", "num_attention_heads=4", "--hf-set",
        "num_key_value_heads=2", "--hf-set", "head_dim=8", "--hf-set", "num_experts=4",
        "--hf-set", "num_experts_per_tok=2", "--hf-set", "moe_intermediate_size=16",
        "--hf-set", "max_position_embeddings=64"]


def test_bench_import_hf_reports_finite_times_and_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "import-hf", *TINY, "--repeats", "1", "--decode-tokens", "4",
                 "--prompt-len", "4", "--decode-repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    imp = result["import"]
    assert imp["checkpoint_bytes"] > 0
    for side in ("condcomp", "hf"):
        s = imp["sides"][side]
        assert math.isfinite(s["seconds"]) and s["seconds"] > 0
        assert math.isfinite(s["peak_bytes"]) and s["peak_bytes"] >= 0
        assert s["runs"][0]["peak_rss"] >= s["runs"][0]["baseline_rss"] > 0
        assert math.isfinite(result["decode"]["sides"][side]["tokens_per_s"])
    assert math.isfinite(imp["time_ratio"]) and math.isfinite(imp["again_time_ratio"])
    assert all(r["again_seconds"] > 0 for side in imp["sides"].values() for r in side["runs"])
    assert result["decode"]["tokens_agree"] == 1.0  # the same weights decode alike
    assert result["command"].startswith("condcomp bench import-hf --arch qwen3_moe")
    table = capsys.readouterr().out
    assert "condcomp import-hf" in table and "HF from_pretrained" in table


@pytest.mark.parametrize("arch,layout", [("qwen3_moe", "whole"), ("mixtral", "shards"),
                                         ("olmoe", "fused"), ("llama", "whole")])
def test_imported_weights_are_the_folders_bit_for_bit(arch, layout, tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_model(arch, hf_dir, shard=layout == "shards", fused=layout == "fused")
    hf: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        hf.update(load_file(f))
    _, ckpt = import_hf(hf_dir, tmp_path / "run")
    ours = load_file(ckpt / "model.safetensors")
    cfg = read_config(tmp_path / "run").model
    D, L = cfg.d_model, cfg.n_layers
    if cfg.tie_embeddings:  # saved once, under one of its names
        ours.setdefault("tok_emb.weight", ours.get("lm_head.weight"))
    assert torch.equal(ours["tok_emb.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(ours["norm.weight"], hf["model.norm.weight"])
    if "lm_head.weight" in ours and not cfg.tie_embeddings:
        assert torch.equal(ours["lm_head.weight"], hf["lm_head.weight"])
    for i in range(L):
        b = f"layers.{i}.block."
        assert torch.equal(ours[b + "attn.qkv.wq.weight"],
                           hf[f"model.layers.{i}.self_attn.q_proj.weight"])
        assert torch.equal(ours[b + "attn.wo.weight"],
                           hf[f"model.layers.{i}.self_attn.o_proj.weight"])
        if arch == "llama":
            assert torch.equal(ours[b + "ffn.w1"], hf[f"model.layers.{i}.mlp.gate_proj.weight"].t())
            continue
        w1, w2 = ours[b + "ffn.experts.w1"], ours[b + "ffn.experts.w2"]
        ffn = "block_sparse_moe" if arch == "mixtral" else "mlp"
        if layout == "fused":
            gate_up = hf[f"model.layers.{i}.mlp.experts.gate_up_proj"]
            H = gate_up.shape[1] // 2
            assert torch.equal(w1, gate_up[:, :H].transpose(1, 2))
            assert torch.equal(ours[b + "ffn.experts.w3"], gate_up[:, H:].transpose(1, 2))
            assert torch.equal(w2, hf[f"model.layers.{i}.mlp.experts.down_proj"].transpose(1, 2))
            continue
        gate, down = ("w1", "w2") if arch == "mixtral" else ("gate_proj", "down_proj")
        for e in range(w1.shape[0]):
            expert = f"model.layers.{i}.{ffn}.experts.{e}."
            assert torch.equal(w1[e], hf[f"{expert}{gate}.weight"].t())
            assert torch.equal(w2[e], hf[f"{expert}{down}.weight"].t())
        assert torch.equal(ours[b + "ffn.router.weight"], hf[f"model.layers.{i}.{ffn}.gate.weight"])
    assert ours["tok_emb.weight"].shape[1] == D
    # The file the import streams is the one save_model writes for the model it describes.
    model = load_run(tmp_path / "run").model
    save_model(model, str(tmp_path / "saved.safetensors"))
    assert (ckpt / "model.safetensors").read_bytes() == \
        (tmp_path / "saved.safetensors").read_bytes()


def test_a_tensor_read_again_after_its_pages_are_released_is_unchanged(tmp_path):
    save_hf_model("mixtral", tmp_path)
    folder = SafetensorsFolder(tmp_path)
    try:
        name = "model.embed_tokens.weight"
        first = folder.get(name).clone()
        folder.release(name)
        assert torch.equal(folder.get(name), first)
        assert torch.equal(first, load_file(tmp_path / "model.safetensors")[name])
    finally:
        folder.close()


def test_a_truncated_file_is_a_checkpoint_error(tmp_path):
    save_hf_model("llama", tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    folder = SafetensorsFolder(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="do not hold"):
            for name in list(folder.names()):
                folder.get(name)
    finally:
        folder.close()
