"""bf16 matrix weights with fp32 master weights (``train.param_dtype = "bfloat16"``): training
with them computes what bf16 autocast over fp32 weights computes, bit for bit, and the
checkpoints hold the fp32 masters."""

from pathlib import Path

import pytest
import torch
from helpers import tiny_model_cfg, tiny_overrides
from safetensors.torch import load_file

from condcomp.checkpoint import list_checkpoints
from condcomp.config import load_config
from condcomp.errors import ConfigError
from condcomp.master_weights import MasterWeights, matrix_weights
from condcomp.model import TransformerLM
from condcomp.runs import read_metrics
from condcomp.train import train

# One preset per kind of matrix weight: nn.Linear and a plain MLP (dense), stacked experts and
# a router (switch), Mixture of Tokens' controller, and a model whose AltUp coefficients and
# widened embedding must stay fp32.
PRESETS = ["dense_small", "switch", "mot", "altup"]


def _metrics(run_dir: Path) -> list[tuple[int, str, float]]:
    out = []
    for row in read_metrics(run_dir):
        if row["kind"] in ("train", "eval"):  # not a resume's config_change row
            key = "train_loss" if row["kind"] == "train" else "val_loss"
            out.append((row["step"], key, row[key]))
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_training_with_master_weights_equals_bf16_autocast(preset, corpus, tmp_path):
    runs = {}
    for param_dtype in ("float32", "bfloat16"):
        name = f"{preset}-{param_dtype}"
        cfg = load_config(preset, [
            *tiny_overrides(corpus, tmp_path, name, steps=6), "train.batch_size=8",
            "train.grad_accum=2", "train.ckpt_every=6", "train.eval_every=3",
            "train.dtype='bfloat16'", f"train.param_dtype='{param_dtype}'", "model.dropout=0.0"])
        train(cfg, log=lambda s: None)
        runs[param_dtype] = tmp_path / name
    ref, low = (_metrics(runs[k]) for k in ("float32", "bfloat16"))
    assert len(ref) == len(low) > 6
    for (step, key, a), (step_b, key_b, b) in zip(ref, low):
        assert (step, key) == (step_b, key_b)
        assert b == a, (step, key)  # the same arithmetic, so bit for bit
    # The checkpoint holds fp32 weights equal to the autocast run's.
    (ckpt_ref,), (ckpt_low,) = (list_checkpoints(runs[k]) for k in ("float32", "bfloat16"))
    weights_ref = load_file(str(ckpt_ref.path / "model.safetensors"))
    weights_low = load_file(str(ckpt_low.path / "model.safetensors"))
    assert weights_ref.keys() == weights_low.keys()
    for name, w in weights_ref.items():
        assert weights_low[name].dtype == w.dtype, name
        assert torch.equal(weights_low[name], w), name


def test_which_weights_are_stored_in_bf16():
    cfg = tiny_model_cfg()
    model = TransformerLM(cfg)
    chosen = {id(p) for p in matrix_weights(model)}
    names = {n for n, p in model.named_parameters() if id(p) in chosen}
    assert "layers.0.block.attn.qkv.wq.weight" in names and "layers.0.block.ffn.w2" in names
    assert "tok_emb.weight" not in names  # a lookup table (tied to the output head)
    assert not any("norm" in n for n in names)
    masters = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in matrix_weights(model))
    assert model.tok_emb.weight.dtype == torch.float32
    # The optimizer sees every parameter once, each matrix weight as its fp32 master.
    opt = masters.optimizer_params()
    assert len(opt) == len(list(model.parameters()))
    assert all(p.dtype == torch.float32 for p in opt)
    with masters.full_precision():
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.layers[0].block.attn.qkv.wq.weight.dtype == torch.bfloat16


def test_micro_batches_accumulate_into_the_fp32_master_gradient():
    torch.manual_seed(0)
    model = TransformerLM(tiny_model_cfg())
    masters = MasterWeights(model)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    grads = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens, tokens).loss.backward()
        grads.append(masters.masters[0].grad.clone())
        assert all(p.grad is None for p in matrix_weights(model))  # moved to the masters
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[1], 2 * grads[0])


def test_hook_bytes_are_a_bf16_read_and_an_fp32_write_per_weight():
    model = TransformerLM(tiny_model_cfg(ffn=dict(kind="moe", options=dict(num_experts=4))))
    n = sum(p.numel() for p in matrix_weights(model))
    assert MasterWeights(model).hook_bytes() == (2 + 4) * n


def test_param_dtype_bf16_without_bf16_compute_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.dtype"):
        load_config("dense_tiny",
                    [*tiny_overrides(corpus, tmp_path, "x"), "train.dtype='float32'",
                     "train.param_dtype='bfloat16'"])
    # On the CPU "auto" computes in fp32: refused when training starts, before any file.
    cfg = load_config("dense_tiny",
                      [*tiny_overrides(corpus, tmp_path, "y"), "train.device='cpu'",
                       "train.param_dtype='bfloat16'"])
    with pytest.raises(ConfigError, match="train.dtype = 'bfloat16'"):
        train(cfg, log=lambda s: None)
    assert not (tmp_path / "y").exists()
    with pytest.raises(ConfigError, match="param_dtype"):
        load_config("dense_tiny",
                    [*tiny_overrides(corpus, tmp_path, "z"), "train.param_dtype='float16'"])


def test_close_gives_the_model_its_fp32_weights_back():
    model = TransformerLM(tiny_model_cfg())
    masters = MasterWeights(model)
    with torch.no_grad():
        masters.masters[0].add_(1.0)  # an update the bf16 copy has not seen
    masters.close()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(matrix_weights(model)[0], masters.masters[0])
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 8))
    model(tokens, tokens).loss.backward()  # no hook left: the gradient stays on the model
    assert matrix_weights(model)[0].grad is not None and masters.masters[0].grad is None


def test_a_run_with_master_weights_resumes_bit_for_bit(corpus, tmp_path):
    def run(name: str, steps: int, resume: bool = False) -> Path:
        cfg = load_config("switch", [
            *tiny_overrides(corpus, tmp_path, name, steps=steps), "train.ckpt_every=3",
            "train.dtype='bfloat16'", "train.param_dtype='bfloat16'"])
        return train(cfg, resume=resume, log=lambda s: None).run_dir

    straight = run("straight", 6)
    run("split", 3)
    split = run("split", 6, resume=True)
    # The first part's run ends with an evaluation at step 3 that the straight run skips.
    def train_losses(run_dir: Path) -> list[tuple[int, str, float]]:
        return [m for m in _metrics(run_dir) if m[1] == "train_loss"]

    assert len(train_losses(split)) == 6
    assert train_losses(split) == train_losses(straight)
