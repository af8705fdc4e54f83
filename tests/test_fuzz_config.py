"""Random configs: each ends in one clear ConfigError or in a model whose forward is finite.

A seeded generator (not hypothesis: no extra dependency, and each case prints as the
``--set`` lines that reproduce it on the command line) starts from a built-in preset shrunk
to a tiny shape, then sets one to three keys, drawn from the real dataclasses (the model, data
and train sections, every seam's ``kind``, ``layers`` and every registered family's options)
plus a few unknown ones, to values of every type: integers small, negative and beyond 64 bits,
floats with NaN, infinities, 1e30 and -1e-30, strings, booleans, lists and tables. The case
passes when loading the config, building the model and a forward pass in training and in
evaluation mode either raise a one-line ConfigError or give finite logits and losses; any
other exception, or NaN from an accepted config, fails it.

``CONDCOMP_FUZZ_CASES=5000 pytest tests/test_fuzz_config.py`` runs a longer search.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import typing
from typing import Any

import pytest
import torch

from condcomp import registry
from condcomp.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config, read_toml
from condcomp.errors import ConfigError
from condcomp.model import TransformerLM
from condcomp.presets import find_preset, list_presets
from condcomp.ranges import Range, range_of
from condcomp.seams import SEAMS

CASES = int(os.environ.get("CONDCOMP_FUZZ_CASES", "1500"))
SEED = 20240519

# Every preset at a shape where a forward pass takes milliseconds.
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=0",
        "model.d_ff=64", "model.max_seq_len=32", "model.vocab_size=61", "train.seq_len=16",
        "train.batch_size=4"]
# A preset's own widths of a family's parts, shrunk with the model, and its experts (switch_c's
# 2048 would make every case a loop over 2048 experts).
TINY_OPTIONS = {"d_expert": 16, "d_shared": 16, "d_ff": 64, "block_size": 8, "d_lowrank": 8,
                "predictor_hidden": 8, "num_experts": 8}
UNKNOWN_KEYS = ["model.widht", "train.lrr", "data.corpse", "nonsense", "model.ffn.nope",
                "model.wrapper.capacity_facter", "model.residual.kk", "model.ffn.options.nope"]

# Each number is small or outside every range: a size inside its range but beyond this
# machine's memory (d_model = 500000) is the machine's limit, not the validator's, and trying
# one would only exhaust the machine.
INTS = [-(2**70), -(2**64), -(2**63) - 1, -8, -1, 0, 1, 2, 3, 4, 7, 8, 16,
        2**31, 2**53 + 1, 2**63, 2**64, 10**30, 10**400]
SMALL_INTS = [0, 1, 1, 2, 2, 3, 4, 4, 8, 8, 16]
PLAUSIBLE_FLOATS = [0.0, 1e-3, 0.01, 0.1, 0.25, 0.5, 0.9, 1.0, 2.0, 10.0]
FLOATS = [math.nan, math.inf, -math.inf, 1e30, -1e30, 1e300, 1e-300, 1e-40, 1e-30, -1e-30,
          0.0, -0.0, 1e-6, 0.01, 0.125, 0.5, 0.9999, 1.0, 1.5, 2.0, 7.0, -3.0, 100.0]
STRINGS = ["", "abc", "all", "odd", "even", "none", "moe", "mlp", "mot", "sparse_ff",
           "sparse_qkv", "mod", "altup", "full", "plain", "dense", "token_choice",
           "expert_choice", "continuous", "predictor", "sigmoid", "dynamic", "gemma3n", "same",
           "nan", "1e3", "cpu", "cuda:7", "quantum", "bpe", "float32", "bfloat16", "relu", "gelu"]
LISTS = [[], [0], [1], [0, 1], [1, 3], [True], ["a"], [0.5], [-1], [[0]], [2**64]]
TABLES = [{}, {"a": 1}, {"kind": "moe"}, {"num_experts": 4}, {"layers": "odd"}]


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def builtin_families(seam: str) -> dict[str, registry.Family]:
    """condcomp's own families, not those other tests register (one that computes NaN on
    purpose, to test the train loop)."""
    return {name: family for name, family in registry.families(seam).items()
            if family.build.__module__ in registry.BUILTIN_FAMILY_MODULES}


def key_types() -> dict[str, Any]:
    """Every key a run config can hold, with its type (Any where several families differ)."""
    keys: dict[str, Any] = {name: tp for name, tp in _fields(RunConfig).items()
                            if name not in ("model", "data", "train")}
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        for name, tp in _fields(cls).items():
            if name not in SEAMS:
                keys[f"{section}.{name}"] = tp
    for seam in SEAMS:
        keys[f"model.{seam}.kind"] = str
        keys[f"model.{seam}.layers"] = Any
        keys[f"model.{seam}.options"] = dict
        for family in builtin_families(seam).values():
            for name, tp in _fields(family.options).items():
                keys.setdefault(f"model.{seam}.{name}", tp)
    return keys


def family_keys(kinds: dict[str, str]) -> list[str]:
    """The option keys of the families a config uses."""
    return [f"model.{seam}.{name}" for seam, kind in kinds.items()
            for name in _fields(registry.get(seam, kind).options)]


def toml(value: Any) -> str:
    """``value`` as TOML, as a user would type it after ``--set key=``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def value_for(rng: random.Random, tp: Any) -> Any:
    """Mostly a value of the key's own type, often a plausible one, so that many cases get
    past the type checks to the ranges and the model; else a value of any type."""
    if rng.random() < 0.75:
        if tp is int or tp == (int | None):
            return rng.choice(SMALL_INTS if rng.random() < 0.6 else INTS)
        if tp is float or tp == (float | None):
            return rng.choice(PLAUSIBLE_FLOATS if rng.random() < 0.5 else FLOATS)
        if tp is str:
            return rng.choice(STRINGS)
        if tp is bool:
            return rng.choice([True, False])
    pool = rng.choice([INTS, FLOATS, STRINGS, [True, False], LISTS, TABLES])
    return rng.choice(pool)


@functools.cache
def tiny(preset: str) -> tuple[str, ...]:
    """The overrides that shrink ``preset``: the model's shape, and the widths its families
    set."""
    model = read_toml(find_preset(preset)).get("model", {})
    own = [f"model.{seam}.{name}={value}" for seam in SEAMS
           for name, value in TINY_OPTIONS.items() if name in model.get(seam, {})]
    return (*TINY, *own)


def preset_kinds(preset: str) -> dict[str, str]:
    cfg = load_config(preset, list(tiny(preset)))
    return {seam: getattr(cfg.model, seam).kind for seam in SEAMS}


def make_case(rng: random.Random, presets: list[str], keys: dict[str, Any]
              ) -> tuple[str, list[str]]:
    preset = rng.choice(presets)
    kinds = preset_kinds(preset)
    sets: list[str] = []
    if rng.random() < 0.3:  # another family at a seam, to reach its options
        seam = rng.choice(SEAMS)
        kinds[seam] = rng.choice(sorted(builtin_families(seam)))
        sets.append(f"model.{seam}.kind={toml(kinds[seam])}")
    for _ in range(rng.choice([1, 1, 2, 3])):
        roll = rng.random()
        if roll < 0.55:
            key = rng.choice(family_keys(kinds) or sorted(keys))
        elif roll < 0.93:
            key = rng.choice(sorted(keys))
        else:
            key = rng.choice(UNKNOWN_KEYS)
        sets.append(f"{key}={toml(value_for(rng, keys.get(key, Any)))}")
    return preset, sets


def run_case(preset: str, sets: list[str]) -> str:
    """"error" (a clean ConfigError) or "ok" (a finite model); raises on anything else."""
    try:
        cfg = load_config(preset, [*tiny(preset), *sets])
        model = TransformerLM(cfg.model)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"
        return "error"
    vocab, T = cfg.model.vocab_size, min(8, cfg.model.max_seq_len)
    tokens = torch.randint(0, vocab, (4, T + 1), generator=torch.Generator().manual_seed(0))
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            out = model(tokens[:, :-1], tokens[:, 1:])
        assert torch.isfinite(out.logits).all(), f"non-finite logits (training={training})"
        assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss), \
            f"non-finite loss (training={training})"
    return "ok"


@pytest.fixture(scope="module")
def presets() -> list[str]:
    return [name for name, _ in list_presets()]


def edge_values(allowed: Range, integer: bool) -> list[float]:
    """The extremes ``allowed`` holds: its closed bounds, the numbers just inside its open
    ones, and a huge number where it has no upper bound. Integers stop at 64: a larger size is
    a question of memory, not of arithmetic."""
    values: list[float] = []
    if allowed.ge is not None:
        values.append(allowed.ge)
    if allowed.gt is not None:
        values.append(allowed.gt + 1 if integer else math.nextafter(allowed.gt, math.inf))
    if allowed.le is not None:
        values.append(allowed.le)
    elif allowed.lt is not None:
        values.append(allowed.lt - 1 if integer else math.nextafter(allowed.lt, -math.inf))
    else:
        values.append(64 if integer else 1e300)
    return [v for v in values if not integer or abs(v) <= 64]


def edge_cases(preset: str) -> list[str]:
    """One ``--set`` per edge value of every model key and of the preset's families' options."""
    sections = [("model", ModelConfig)]
    sections += [(f"model.{seam}", registry.get(seam, kind).options)
                 for seam, kind in preset_kinds(preset).items()]
    cases = []
    for prefix, cls in sections:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            allowed = range_of(f)
            if allowed is not None:
                integer = int in (hints[f.name], *typing.get_args(hints[f.name]))
                cases += [f"{prefix}.{f.name}={toml(v)}" for v in edge_values(allowed, integer)]
    return cases


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second thread only adds hand-offs (and waits, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_preset_at_the_tiny_shape_runs(presets):
    """The fuzzer's starting points are valid, so its mutations test what they change."""
    for preset in presets:
        assert run_case(preset, []) == "ok", preset


def test_every_range_holds_only_values_the_model_computes_with(presets):
    """The edges of each declared range, in every preset: a range that lets through a value
    on which the model overflows (an init_std of 1e30, a clip beyond float32) fails here."""
    for preset in presets:
        for item in edge_cases(preset):
            try:
                run_case(preset, [item])
            except Exception as exc:  # noqa: BLE001 - the report names the case to reproduce
                raise AssertionError(f"condcomp train --config {preset} --set '{item}' -> "
                                     f"{type(exc).__name__}: {exc}") from exc


def test_random_configs_end_in_a_clear_error_or_a_finite_model(presets):
    rng = random.Random(SEED)
    keys = key_types()
    outcomes = {"ok": 0, "error": 0}
    for i in range(CASES):
        preset, sets = make_case(rng, presets, keys)
        try:
            outcomes[run_case(preset, sets)] += 1
        except Exception as exc:  # noqa: BLE001 - the report names the case to reproduce
            command = " ".join(f"--set '{s}'" for s in sets)
            raise AssertionError(
                f"case {i}: condcomp train --config {preset} {command} -> "
                f"{type(exc).__name__}: {exc}") from exc
    # Both outcomes are common, so the cases reach past validation into the model too.
    assert outcomes["ok"] > CASES // 10 and outcomes["error"] > CASES // 4, outcomes
