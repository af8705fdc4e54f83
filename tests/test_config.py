"""Configs: presets load, overrides apply, impossible values stop with a clear message."""

import pytest

from condcomp.config import apply_override, load_config
from condcomp.errors import ConfigError
from condcomp.presets import list_presets


@pytest.mark.parametrize("preset", [name for name, _ in list_presets()])
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    assert cfg.name


def test_overrides_are_typed_by_toml():
    cfg = load_config("dense_small",
                      ["train.lr=1e-3", "model.n_layers=2", "data.tokenizer=bpe",
                       "model.tie_embeddings=false"])
    assert cfg.train.lr == 1e-3 and cfg.model.n_layers == 2
    assert cfg.data.tokenizer == "bpe" and cfg.model.tie_embeddings is False


def test_override_into_a_seam_table():
    cfg = load_config(None, ["model.ffn.kind=mlp", "model.ffn.layers=[0]"])
    assert cfg.model.ffn.kind == "mlp" and cfg.model.ffn.layers == [0]


@pytest.mark.parametrize("override, message", [
    ("model.d_model=-8", "model.d_model = -8 must be positive"),
    ("model.n_heads=3", "model.n_heads = 3 does not divide model.d_model"),
    ("model.n_kv_heads=3", "model.n_kv_heads = 3 does not divide model.n_heads"),
    ("model.activation=tanh", "model.activation = 'tanh' is unknown"),
    ("model.ffn.kind=moo", "model.ffn.kind = 'moo' is not a known ffn family"),
    ("model.wrapper.kind=nope", "model.wrapper.kind = 'nope' is not a known wrapper family"),
    ("model.ffn.layers=sometimes", "model.ffn.layers = 'sometimes' is not a layer selection"),
    ("model.widht=3", "unknown key model.widht"),
    ("train.seq_len=4096", "train.seq_len = 4096 exceeds model.max_seq_len"),
    ("train.batch_size=0", "train.batch_size = 0 must be positive"),
    ("train.lr=-1", "train.lr = -1.0 must be positive"),
    ("train.dtype=fp8", "train.dtype = 'fp8' is unknown"),
    ("data.tokenizer=wordpiece", "data.tokenizer = 'wordpiece' is unknown"),
    ("data.val_fraction=0.9", "data.val_fraction = 0.9 must be in"),
    ("model.n_layers=two", "model.n_layers must be an integer"),
])
def test_impossible_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("dense_small", [override])
    assert message in str(err.value)


def test_malformed_inputs():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.toml")
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "train.lr")


def test_invalid_toml_is_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
