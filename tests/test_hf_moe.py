"""``condcomp import-hf`` / ``export-hf`` with HF Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE (and
Llama).

Tiny random HF models, saved with ``save_pretrained`` (whole and in small shards), are
imported into run folders: their logits must equal HF's to float32 rounding and greedy
decoding must pick the same tokens, which checks the expert stacking, the router settings
(Mixtral's renormalised top-k, ``norm_topk_prob``), Qwen2-MoE's gated shared expert and the
attention options (Q/K norm per head or per projection, OLMoE's clamp, Qwen2-MoE's Q/K/V
biases). Exported folders load with ``from_pretrained``, and
a folder imported and exported again holds the same tensors bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from condcomp.checkpoint import resolve_checkpoint
from condcomp.cli import main
from condcomp.config import ModelConfig, SeamConfig, load_config
from condcomp.errors import ConfigError
from condcomp.generate import Sampling, generate
from condcomp.runs import load_run

transformers = pytest.importorskip("transformers")

from condcomp.hf.architectures import architecture_for  # noqa: E402

VOCAB = 300  # above the byte tokenizer's 257 ids
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2, rms_norm_eps=1e-6,
             max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)


def hf_config(name: str, **overrides):
    """A tiny config of ``arch``; the OLMoE clamp is small enough to bite, and Qwen3-MoE's
    heads are twice hidden_size / num_attention_heads wide, as in the released models."""
    arch, _, variant = name.partition("+")
    kw = dict(SHAPE, **overrides)
    if variant == "dense-layer":  # Qwen2/3-MoE's dense layers: an MLP, not the MoE, in layer 1
        kw.update(num_hidden_layers=3, mlp_only_layers=[1])
    if arch == "mixtral":
        return transformers.MixtralConfig(**{"intermediate_size": 48, "num_local_experts": 4,
                                             "num_experts_per_tok": 2, **kw})
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**{
            "intermediate_size": 64, "moe_intermediate_size": 48, "num_experts": 4,
            "num_experts_per_tok": 2, "head_dim": 16, "norm_topk_prob": True,
            "tie_word_embeddings": True, **kw})
    if arch == "qwen2_moe":  # without norm_topk_prob, as the released Qwen1.5-MoE
        return transformers.Qwen2MoeConfig(**{
            "intermediate_size": 64, "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 40, "num_experts": 4, "num_experts_per_tok": 2,
            "norm_topk_prob": False, "router_aux_loss_coef": 0.01, **kw})
    if arch == "olmoe":
        return transformers.OlmoeConfig(**{"intermediate_size": 48, "num_experts": 4,
                                           "num_experts_per_tok": 2, "clip_qkv": 0.5, **kw})
    return transformers.LlamaConfig(**{"intermediate_size": 48, **kw})


def save_hf_model(arch: str, folder: Path, shard: bool = False, fused: bool = False,
                  **overrides):
    """A random HF model of ``arch`` saved in ``folder``, with random norm gains so that a
    swapped or missing norm shows, and random biases (HF starts them at zero); ``fused``: in transformers 5's in-memory layout (all the
    experts of a layer in one tensor) instead of the per-expert names."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(folder, **({"max_shard_size": "20KB"} if shard else {}),
                          **({"save_original_format": False} if fused else {}))
    return model


ARCHS = ["mixtral", "qwen3_moe", "qwen3_moe+dense-layer", "qwen2_moe",
         "qwen2_moe+dense-layer", "olmoe", "llama"]
CLASSES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
           "qwen3_moe+dense-layer": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
           "qwen2_moe+dense-layer": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
           "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module", params=ARCHS)
def imported(request, tmp_path_factory):
    """(architecture, HF model, HF folder, run folder), imported through the CLI."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    hf = save_hf_model(arch, root / "hf")
    assert main(["import-hf", str(root / "hf"), str(root / "run")]) == 0
    return arch, hf, root / "hf", root / "run"


def test_imported_logits_and_greedy_tokens_equal_hf(imported):
    arch, hf, _, run_dir = imported
    run = load_run(run_dir)
    tokens_BT = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = run.model(tokens_BT).logits, hf(tokens_BT).logits
    assert theirs.abs().max() > 1.0  # not vacuous
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    prompt = [5, 17, 200, 3, 99, 42]
    greedy = generate(run.model, prompt, max_new_tokens=8, sampling=Sampling(temperature=0))
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                      max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert greedy == out[0, 6:].tolist()


def test_export_loads_with_from_pretrained_and_round_trips_bit_for_bit(imported, tmp_path):
    arch, hf, hf_dir, run_dir = imported
    assert main(["export-hf", str(run_dir), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [CLASSES[arch]]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == CLASSES[arch]
    tokens_BT = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens_BT).logits, hf(tokens_BT).logits, atol=1e-4,
                                   rtol=1e-4)
    original = load_file(hf_dir / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    if hf.config.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    # ...and the same model in memory, so nothing outside the weights file differs.
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"])
def test_sharded_and_fused_folders_import_the_same_weights(arch, tmp_path):
    save_hf_model(arch, tmp_path / "whole")
    save_hf_model(arch, tmp_path / "sharded", shard=True)
    save_hf_model(arch, tmp_path / "fused", fused=True)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any("gate_up_proj" in name for name in load_file(tmp_path / "fused" /
                                                            "model.safetensors"))
    for name in ("whole", "sharded", "fused"):
        assert main(["import-hf", str(tmp_path / name), str(tmp_path / f"run-{name}")]) == 0
    whole = load_run(tmp_path / "run-whole").model.state_dict()
    for other in ("sharded", "fused"):
        state = load_run(tmp_path / f"run-{other}").model.state_dict()
        for name, tensor in whole.items():
            assert torch.equal(tensor, state[name]), (other, name)


def test_imported_run_is_a_run_folder_for_eval_and_train_init_from(tmp_path, corpus, capsys,
                                                                    monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_hf_model("qwen3_moe", tmp_path / "hf")
    run_dir = tmp_path / "run"
    assert main(["import-hf", str(tmp_path / "hf"), str(run_dir), "--set",
                 f'data.corpus="{corpus}"', "--set", "train.seq_len=32",
                 "--set", "train.batch_size=2"]) == 0
    from_toml = load_config(run_dir / "model.toml")
    assert from_toml.model == load_run(run_dir).cfg.model
    assert from_toml.model.attention.options == {"qk_norm": "head"}
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--max-tokens", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 0
    assert main(["train", "--config", str(run_dir / "model.toml"), "--set",
                 f'train.init_from="{run_dir}"', "--set", f'out_dir="{tmp_path / "new"}"',
                 "--set", f'data.corpus="{corpus}"', "--set", "train.max_steps=1",
                 "--set", "train.seq_len=32", "--set", "train.batch_size=2",
                 "--set", "train.eval_tokens=64", "--set", "train.progress=false"]) == 0


def _cli_error(args, capsys) -> str:
    capsys.readouterr()  # what saving the HF model printed
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("condcomp: error: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1
    return err


def test_an_unsupported_architecture_is_one_clear_error(tmp_path, capsys):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    err = _cli_error(["import-hf", str(tmp_path / "gpt2"), str(tmp_path / "run")], capsys)
    assert "model_type = 'gpt2' (GPT2LMHeadModel) is not supported" in err
    assert "mixtral, qwen3_moe, qwen2_moe, olmoe" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch, overrides, message", [
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
    ("mixtral", {"sliding_window": 16}, "sliding_window = 16 is not supported"),
    ("olmoe", {"attention_bias": True}, "attention_bias = True is not supported"),
    ("qwen3_moe", {"use_sliding_window": True}, "use_sliding_window = True is not supported"),
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window = True is not supported"),
    ("qwen2_moe", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                       "original_max_position_embeddings": 32}},
     "rope_parameters.rope_type = 'yarn'"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0},
     "shared_expert_intermediate_size = 0 is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type = 'linear'"),
])
def test_an_unsupported_config_field_is_one_clear_error(arch, overrides, message, tmp_path,
                                                        capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(hf_config(arch, **overrides).to_json_string())
    err = _cli_error(["import-hf", str(folder), str(tmp_path / "run")], capsys)
    assert message in err


def test_a_config_without_a_field_it_needs_is_one_clear_error(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    raw = json.loads(hf_config("olmoe").to_json_string())
    del raw["num_experts_per_tok"]
    (folder / "config.json").write_text(json.dumps(raw))
    err = _cli_error(["import-hf", str(folder), str(tmp_path / "run")], capsys)
    assert "config.json has no 'num_experts_per_tok'" in err


def test_a_tokenizer_condcomp_cannot_use_is_refused_unless_byte_is_asked_for(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    save_hf_model("mixtral", tmp_path / "hf")
    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(
        str(tmp_path / "hf" / "tokenizer.json"))
    err = _cli_error(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")], capsys)
    assert "--tokenizer byte" in err
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run"), "--tokenizer",
                 "byte"]) == 0
    assert load_run(tmp_path / "run").tokenizer.kind == "byte"


def test_a_condcomp_bpe_tokenizer_travels_both_ways(tmp_path):
    from condcomp.data.tokenizers import BPETokenizer

    save_hf_model("olmoe", tmp_path / "hf")
    bpe = BPETokenizer.train(["the quick brown fox jumps over the lazy dog"] * 20, 280)
    bpe.save(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")
    assert run.tokenizer.kind == "bpe" and run.tokenizer.fingerprint() == bpe.fingerprint()
    assert run.cfg.data.tokenizer == "bpe"
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "the lazy fox"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == \
        bpe.eos_id


def moe_config(attention: dict | None = None, layers="all", **ffn) -> ModelConfig:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                      ffn=SeamConfig("moe", layers=layers,
                                     options={"num_experts": 4, "top_k": 2, **ffn}),
                      attention=SeamConfig("dense", options=attention or {}))
    cfg.validate()
    return cfg


def test_qwen3_moe_dense_layers_are_the_layers_outside_the_moe():
    from condcomp.hf.architectures import model_config_from_hf_dict

    raw = json.loads(hf_config("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2)
                     .to_json_string())
    assert model_config_from_hf_dict(raw)[1].ffn.layers == [1, 3]
    raw.update(decoder_sparse_step=1, mlp_only_layers=[0, 2])
    _, cfg = model_config_from_hf_dict(raw)
    assert cfg.ffn.layers == [1, 3] and cfg.d_ff == raw["intermediate_size"]


def test_qwen2_moe_config_reads_its_shared_expert_and_qkv_bias():
    from condcomp.hf.architectures import hf_config_dict, model_config_from_hf_dict

    raw = json.loads(hf_config("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2)
                     .to_json_string())
    arch, cfg = model_config_from_hf_dict(raw)
    assert cfg.ffn.layers == [1, 3] and cfg.d_ff == 64
    assert cfg.attention.options == {"qkv_bias": True}
    options = cfg.ffn.options
    assert (options["num_shared_experts"], options["d_shared"], options["shared_gate"],
            options["d_expert"], options["normalize_topk"], options["load_balance_coef"]) == \
        (1, 40, "sigmoid", 48, False, 0.01)
    back = hf_config_dict(cfg, arch, None)
    assert (back["qkv_bias"], back["shared_expert_intermediate_size"], back["mlp_only_layers"],
            back["moe_intermediate_size"]) == (True, 40, [0, 2], 48)
    # transformers 4 has no qkv_bias field: its Qwen2-MoE always has the biases.
    del raw["qkv_bias"]
    assert model_config_from_hf_dict(raw)[1].attention.options == {"qkv_bias": True}
    raw["qkv_bias"] = False
    _, cfg = model_config_from_hf_dict(raw)
    assert cfg.attention.options == {}
    assert hf_config_dict(cfg, arch, None)["qkv_bias"] is False
    raw["layer_types"] = ["full_attention", "sliding_attention"] * 2
    with pytest.raises(ConfigError, match="layer_types = 'sliding_attention' is not supp"):
        model_config_from_hf_dict(raw)


def test_export_picks_the_architecture_the_run_needs():
    assert architecture_for(moe_config(normalize_topk=True)).model_type == "mixtral"
    assert architecture_for(moe_config({"qk_norm": "head"})).model_type == "qwen3_moe"
    assert architecture_for(moe_config({"qk_norm": "head"}, layers=[1])
                            ).model_type == "qwen3_moe"
    assert architecture_for(moe_config({"qk_norm": "projection", "clip_qkv": 8.0})
                            ).model_type == "olmoe"
    assert architecture_for(ModelConfig(vocab_size=VOCAB)).model_type == "llama"
    gated = dict(num_shared_experts=1, d_shared=24, shared_gate="sigmoid")
    assert architecture_for(moe_config(**gated)).model_type == "qwen2_moe"
    assert architecture_for(moe_config({"qkv_bias": True}, layers=[1], **gated)
                            ).model_type == "qwen2_moe"
    from condcomp.hf.architectures import QWEN2_MOE, hf_config_dict

    two = moe_config(**dict(gated, num_shared_experts=2))  # one shared MLP, twice as wide
    assert hf_config_dict(two, QWEN2_MOE, None)["shared_expert_intermediate_size"] == 48


@pytest.mark.parametrize("cfg, message", [
    (lambda: moe_config(normalize_topk=True, num_shared_experts=1), "num_shared_experts"),
    (lambda: moe_config(), "normalize_topk = false without a Q/K norm"),
    (lambda: moe_config({"clip_qkv": 1.0}, normalize_topk=True), "clip_qkv"),
    (lambda: moe_config({"qk_norm": "head", "clip_qkv": 1.0}), "clip_qkv"),
    (lambda: moe_config(normalize_topk=True, layers="even"), "only Qwen3-MoE, which"),
    (lambda: moe_config({"qkv_bias": True}, normalize_topk=True),
     "qkv_bias without a shared expert"),
    (lambda: moe_config({"qk_norm": "head"}, num_shared_experts=1, shared_gate="sigmoid"),
     "num_shared_experts with model.attention.qk_norm"),
    (lambda: ModelConfig(vocab_size=VOCAB, attention=SeamConfig("dense", options={
        "qkv_bias": True})), "HF Llama has no Q/K norm, Q/K/V clamp or Q/K/V biases"),
    (lambda: moe_config(normalize_topk=True, score="sigmoid"), "score = 'sigmoid'"),
    (lambda: moe_config(normalize_topk=True, route_scale=2.5), "route_scale = 2.5"),
    (lambda: moe_config(normalize_topk=True, expert_groups=2, groups_per_token=1),
     "group-limited routing"),
    (lambda: ModelConfig(vocab_size=VOCAB, attention=SeamConfig("dense", options={
        "qk_norm": "head"})), "HF Llama has no Q/K norm"),
])
def test_export_refuses_what_no_hf_architecture_holds(cfg, message):
    with pytest.raises(ConfigError, match=message):
        architecture_for(cfg())


@pytest.mark.parametrize("imported", ["mixtral"], indirect=True)
def test_a_run_that_routes_with_a_selection_bias_is_not_exported(imported, tmp_path, capsys):
    """A bias loaded into the layer routes even at bias_update_rate = 0; Mixtral, Qwen3-MoE
    and OLMoE have none, so the export stops, and leaves no folder behind."""
    _, _, _, run_dir = imported
    biased = tmp_path / "biased"
    shutil.copytree(run_dir, biased)
    ckpt = resolve_checkpoint(biased)
    state = load_file(ckpt.path / "model.safetensors")
    name = next(key for key in state if key.endswith("selection_bias"))
    state[name][0] = 1.0
    save_file(state, ckpt.path / "model.safetensors")
    # A hand-edited checkpoint: its manifest's hashes are rewritten to match.
    manifest = json.loads((ckpt.path / "manifest.json").read_text())
    for file, entry in manifest["files"].items():
        data = (ckpt.path / file).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt.path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export-hf", str(biased), str(tmp_path / "out")]) == 2
    assert "routes with a selection bias" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unknown_qk_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention.qk_norm = 'rows' is unknown"):
        moe_config({"qk_norm": "rows"})


def test_attention_options_at_their_defaults_export_as_plain_attention():
    cfg = ModelConfig(vocab_size=VOCAB, attention=SeamConfig("dense", options={
        "qkv_bias": False, "qk_norm": "none", "clip_qkv": 0.0}))
    assert architecture_for(cfg).model_type == "llama"
    assert architecture_for(moe_config({"qkv_bias": False}, normalize_topk=True)
                            ).model_type == "mixtral"
