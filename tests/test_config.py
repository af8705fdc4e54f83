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


MOE, MOT, SPARSE_FF = 'model.ffn.kind="moe"', 'model.ffn.kind="mot"', 'model.ffn.kind="sparse_ff"'
ALTUP, MOD = 'model.residual.kind="altup"', 'model.wrapper.kind="mod"'


@pytest.mark.parametrize("overrides, message", [
    # A value of the wrong type, named with what the key takes.
    ([MOE, 'model.ffn.capacity_factor="abc"'],
     "model.ffn.capacity_factor must be a number, got 'abc'"),
    ([MOT, 'model.ffn.temperature_final="cold"'],
     "model.ffn.temperature_final must be a number, got 'cold'"),
    (["model.ffn.options=5"], "model.ffn.options must be a table, got 5"),
    (["model=5"], "model must be a table, got 5"),
    ([MOE, "model.ffn.capacity_factor=true"], "model.ffn.capacity_factor must be a number, got true"),
    (["model.ffn.layers=[true]"], "model.ffn.layers[0] must be an integer, got true"),
    (["model.ffn.layers=5"], "model.ffn.layers must be a string or a list of integers, got 5"),
    (["model.ffn.kind=5"], "model.ffn.kind must name a family, got 5"),
    (["model.d_model=64.5"], "model.d_model must be an integer, got 64.5"),
    (['train.lr="1e-3"'], "train.lr must be a number, got '1e-3'"),
    (["model.tie_embeddings=1"], "model.tie_embeddings must be true or false, got 1"),
    (["data.corpus=5"], "data.corpus must be a string, got 5"),
    # NaN and infinity, wherever a float is read.
    (["train.lr=nan"], "train.lr = nan is not a finite number; it must be positive"),
    (["train.lr=inf"], "train.lr = inf is not a finite number; it must be positive"),
    (["train.weight_decay=nan"], "train.weight_decay = nan is not a finite number"),
    (["model.init_std=nan"], "model.init_std = nan is not a finite number; it must be in (0, 1]"),
    (["model.rope_theta=nan"], "model.rope_theta = nan is not a finite number"),
    (["model.norm_eps=nan"], "model.norm_eps = nan is not a finite number"),
    ([MOE, "model.ffn.capacity_factor=nan"], "model.ffn.capacity_factor = nan is not a finite"),
    ([MOE, "model.ffn.router_init_scale=nan"], "model.ffn.router_init_scale = nan is not a"),
    ([MOE, "model.ffn.load_balance_coef=nan"], "model.ffn.load_balance_coef = nan is not a"),
    ([MOE, "model.ffn.z_loss_coef=-inf"], "model.ffn.z_loss_coef = -inf is not a finite"),
    ([ALTUP, "model.residual.clip=nan"], "model.residual.clip = nan is not a finite number"),
    ([MOD, "model.wrapper.aux_loss_coef=nan"], "model.wrapper.aux_loss_coef = nan is not a"),
    ([SPARSE_FF, "model.ffn.temperature=nan"], "model.ffn.temperature = nan is not a finite"),
    ([SPARSE_FF, "model.ffn.temperature=inf"], "model.ffn.temperature = inf is not a finite"),
    ([MOT, "model.ffn.temperature=inf"], "model.ffn.temperature = inf is not a finite number"),
    ([MOT, "model.ffn.temperature_final=nan"], "model.ffn.temperature_final = nan is not a"),
    # Values so large or small that the model would overflow.
    (["model.init_std=1e30"], "model.init_std = 1e+30 must be in (0, 1]"),
    ([MOT, "model.ffn.temperature_final=1e300"],
     "model.ffn.temperature_final = 1e+300 must be in [1e-06, 1000000]"),
    ([MOT, "model.ffn.temperature=1e-30"], "model.ffn.temperature = 1e-30 must be in"),
    ([ALTUP, "model.residual.clip=1e300"], "model.residual.clip = 1e+300 must be in (0, 1000000]"),
    ([MOE, "model.ffn.capacity_factor=1e300"], "model.ffn.capacity_factor = 1e+300 must be in"),
    ([MOE, "model.ffn.router_init_scale=1e30"], "model.ffn.router_init_scale = 1e+30 must be in"),
    (["model.norm_eps=1e-40"], "model.norm_eps = 1e-40 must be at least 1e-30"),
    (["model.rope_theta=0.5"], "model.rope_theta = 0.5 must be at least 1"),
    # Sizes and seeds.
    ([SPARSE_FF, "model.ffn.d_ff=-8"], "model.ffn.d_ff = -8 must be at least 0 and at most 2**20"),
    (["model.d_model=1e30"], "model.d_model = 1e+30 must be positive and at most 2**20"),
    (["model.n_layers=99999999999"], "model.n_layers = 99999999999 must be positive and at most"),
    ([MOE, "model.ffn.expansion=1024", "model.ffn.granularity=4096", "model.d_ff=4096"],
     "model.ffn.expansion * model.ffn.granularity = 4194304 experts is more than 1048576"),
    (["train.seed=18446744073709551616"],
     "train.seed = 2**64 must be at least -2**63 and at most 2**64 - 1"),
    (["train.seed=-9223372036854775809"], "train.seed = -9223372036854775809 must be at least"),
    (["train.max_tokens=1e30"], "train.max_tokens = 1e+30 must be at least 0 and at most"),
    (["train.device=quantum"], "train.device = 'quantum' is not a device condcomp runs on; use "
                               "'auto', 'cpu', 'cuda' or 'cuda:N'"),
])
def test_every_value_is_checked_for_its_type_and_range(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("dense_tiny", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["train.max_tokens=5e6"],  # a whole number written as a float, as the README shows
    ["train.seed=18446744073709551615"],  # the largest seed torch takes
    ["train.seed=-1"],
    ["train.lr=1e30"],  # unwise, not impossible: the run stops on non-finite steps, and says so
    [MOE, "model.ffn.capacity_factor=0"],  # 0 means dropless
])
def test_edge_values_that_work_are_accepted(overrides):
    load_config("dense_tiny", overrides)


def test_extends_must_name_a_config(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("extends = 5\n")
    with pytest.raises(ConfigError, match="extends must name a preset or a TOML file, got 5"):
        load_config(path)


def test_configs_built_in_python_are_checked_too():
    from condcomp.config import ModelConfig, TrainConfig

    with pytest.raises(ConfigError, match="model.d_model must be an integer, got '64'"):
        ModelConfig(d_model="64").validate()
    with pytest.raises(ConfigError, match="model.init_std = nan is not a finite number"):
        ModelConfig(init_std=float("nan")).validate()
    with pytest.raises(ConfigError, match="train.lr = inf is not a finite number"):
        TrainConfig(lr=float("inf")).validate()


def test_every_number_of_every_config_declares_its_range():
    """A new numeric key gets a range (condcomp.ranges.ranged), so the one check covers it."""
    import dataclasses
    import typing

    from condcomp import registry
    from condcomp.config import DataConfig, ModelConfig, TrainConfig
    from condcomp.ranges import range_of
    from condcomp.seams import SEAMS

    classes = [ModelConfig, DataConfig, TrainConfig]
    classes += [family.options for seam in SEAMS for family in registry.families(seam).values()]
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            numeric = {int, float} & {hints[f.name], *typing.get_args(hints[f.name])}
            if numeric:
                assert range_of(f) is not None, f"{cls.__name__}.{f.name} declares no range"
