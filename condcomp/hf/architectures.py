"""The HF causal-LM architectures a condcomp model is read from and written as, and the
translation of their ``config.json`` to a :class:`ModelConfig` and back.

All five are pre-norm RMSNorm transformers with rotate-half RoPE, grouped-query attention and
SwiGLU FFNs, which is condcomp's dense model; they differ in the FFN slot and in attention:

===============  ======================  =================================  ==================
HF model_type    FFN slot                attention                          router (softmax)
===============  ======================  =================================  ==================
``llama``        dense SwiGLU MLP        plain                              -
``mixtral``      MoE, every layer        plain                              top-k renormalised
``qwen3_moe``    MoE, but dense in       RMSNorm on each Q/K head           ``norm_topk_prob``
                 ``mlp_only_layers``
``qwen2_moe``    MoE with a gated        biases on q, k, v (``qkv_bias``)   ``norm_topk_prob``
                 shared expert, dense
                 in ``mlp_only_layers``
``olmoe``        MoE, every layer        RMSNorm on the Q/K projections,    ``norm_topk_prob``
                                         optional ``clip_qkv``
===============  ======================  =================================  ==================

Qwen2-MoE's shared expert (``shared_expert``, width ``shared_expert_intermediate_size``) is
the MoE layer's ``shared_experts`` MLP (``num_shared_experts = 1``, ``d_shared``), and its
``shared_expert_gate`` the layer's ``shared_gate = "sigmoid"``.

The config is read as the JSON dict ``save_pretrained`` writes (no ``transformers`` needed).
Every field that changes what the model computes and that condcomp cannot represent raises a
:class:`ConfigError` naming the field (:func:`model_config_from_hf_dict`); fields that only
matter to HF (``use_cache``, token ids, ``output_router_logits``, ...) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from condcomp.config import SEAM_DEFAULTS, ModelConfig, SeamConfig
from condcomp.errors import ConfigError
from condcomp.hf.llama import check_llama_compatible, router_problems
from condcomp.seams import LayerSelection, select_layers


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's "model_type"
    class_name: str  # config.json's "architectures" entry, the AutoModelForCausalLM class
    moe: bool
    qk_norm: str  # the attention's qk_norm option ("none", "head", "projection")
    ffn_module: str  # the on-disk name of a layer's MoE module ("mlp", "block_sparse_moe")
    expert_weights: tuple[str, str, str]  # on-disk names of one expert's (gate, up, down)
    num_experts_field: str = ""
    expert_width_field: str = ""
    shared_expert: bool = False  # Qwen2-MoE's gated shared expert beside the routed ones
    dense_layers: bool = False  # MoE, but a dense MLP in mlp_only_layers (decoder_sparse_step)


LLAMA = Architecture("llama", "LlamaForCausalLM", False, "none", "mlp",
                     ("gate_proj", "up_proj", "down_proj"))
MIXTRAL = Architecture("mixtral", "MixtralForCausalLM", True, "none", "block_sparse_moe",
                       ("w1", "w3", "w2"), "num_local_experts", "intermediate_size")
QWEN3_MOE = Architecture("qwen3_moe", "Qwen3MoeForCausalLM", True, "head", "mlp",
                         ("gate_proj", "up_proj", "down_proj"), "num_experts",
                         "moe_intermediate_size", dense_layers=True)
QWEN2_MOE = Architecture("qwen2_moe", "Qwen2MoeForCausalLM", True, "none", "mlp",
                         ("gate_proj", "up_proj", "down_proj"), "num_experts",
                         "moe_intermediate_size", shared_expert=True, dense_layers=True)
OLMOE = Architecture("olmoe", "OlmoeForCausalLM", True, "projection", "mlp",
                     ("gate_proj", "up_proj", "down_proj"), "num_experts", "intermediate_size")
ARCHITECTURES = {a.model_type: a for a in (LLAMA, MIXTRAL, QWEN3_MOE, QWEN2_MOE, OLMOE)}
HF_NAMES = "Llama, Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE"  # for messages


def architecture_of(raw: dict[str, Any]) -> Architecture:
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        names = raw.get("architectures") or []
        shown = f"{model_type!r}" + (f" ({', '.join(map(str, names))})" if names else "")
        raise ConfigError(f"config.json: model_type = {shown} is not supported; condcomp "
                          f"imports {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


# ----------------------------------------------------------------------------- HF -> condcomp


def _rope_theta(raw: dict[str, Any]) -> float:
    """RoPE base: ``rope_parameters`` in transformers 5, ``rope_theta`` in 4."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        field = "rope_parameters.rope_type" if params.get("rope_type") else "rope_scaling"
        raise ConfigError(f"config.json: {field} = {rope_type!r}: condcomp has plain RoPE only "
                          "(rope_type 'default')")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def _refuse(field: str, value: Any, supported: str) -> ConfigError:
    return ConfigError(f"config.json: {field} = {value!r} is not supported; condcomp "
                       f"supports {supported}")


def _check_common(raw: dict[str, Any], arch: Architecture) -> None:
    """The fields every architecture shares that condcomp can hold only one way."""
    if raw.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", raw["hidden_act"], "'silu' (SwiGLU FFNs)")
    heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
    if not raw.get("head_dim") and hidden % heads:
        raise _refuse("num_attention_heads", heads, "a head count that divides hidden_size "
                      "when head_dim is not given")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field):
            raise _refuse(field, raw[field], "false (bias-free projections)")
    if arch.model_type in ("qwen3_moe", "qwen2_moe"):  # sliding_window counts only with this
        if raw.get("use_sliding_window"):
            raise _refuse("use_sliding_window", True, "false (full causal attention)")
    elif raw.get("sliding_window") is not None:
        raise _refuse("sliding_window", raw["sliding_window"], "null (full causal attention)")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        other = next(t for t in layer_types if t != "full_attention")
        raise _refuse("layer_types", other, "'full_attention' on every layer")
    if raw.get("router_jitter_noise"):
        raise _refuse("router_jitter_noise", raw["router_jitter_noise"],
                      "0 (Mixtral's jitter scales the experts' input too, condcomp's "
                      "model.ffn.router_jitter the router's only)")


def _num_experts(raw: dict[str, Any], arch: Architecture) -> int:
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts, 4.x as num_experts.
    for field in (arch.num_experts_field, "num_local_experts", "num_experts"):
        if raw.get(field):
            return int(raw[field])
    raise ConfigError(f"config.json: {arch.num_experts_field} is missing; an {arch.model_type} "
                      "model needs its expert count")


def _moe_layers(raw: dict[str, Any], arch: Architecture, n_layers: int) -> LayerSelection:
    """The layers whose FFN is the MoE: every one, except Qwen3-MoE's and Qwen2-MoE's dense
    layers (those in ``mlp_only_layers``, and with ``decoder_sparse_step = s`` all but every
    s-th)."""
    if not arch.dense_layers:
        return "all"
    step = raw.get("decoder_sparse_step") or 1
    if not isinstance(step, int) or step < 1:
        raise _refuse("decoder_sparse_step", step, "a positive integer")
    dense = raw.get("mlp_only_layers") or []
    layers = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    return "all" if len(layers) == n_layers else layers


def _shared_expert(raw: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-MoE's shared expert as the MoE options: one shared MLP, sigmoid-gated."""
    width = raw["shared_expert_intermediate_size"]
    if not isinstance(width, int) or width < 1:
        raise _refuse("shared_expert_intermediate_size", width, "a positive integer")
    return dict(num_shared_experts=1, d_shared=width, shared_gate="sigmoid")


def model_config_from_hf_dict(raw: dict[str, Any]) -> tuple[Architecture, ModelConfig]:
    """The architecture and condcomp :class:`ModelConfig` of an HF ``config.json`` dict."""
    try:
        return _model_config(raw)
    except KeyError as exc:
        raise ConfigError(f"config.json has no {exc.args[0]!r}, which a "
                          f"{raw.get('model_type')} model needs") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config.json has a value of the wrong type ({exc})") from None


def _model_config(raw: dict[str, Any]) -> tuple[Architecture, ModelConfig]:
    arch = architecture_of(raw)
    _check_common(raw, arch)
    heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
    head_dim = int(raw.get("head_dim") or hidden // heads)
    attention_options: dict[str, Any] = {}
    if arch.qk_norm != "none":
        attention_options["qk_norm"] = arch.qk_norm
    if raw.get("clip_qkv"):
        attention_options["clip_qkv"] = float(raw["clip_qkv"])
    # Qwen2-MoE: transformers 4 has no qkv_bias field and always gives q, k, v biases.
    if arch is QWEN2_MOE and raw.get("qkv_bias", True):
        attention_options["qkv_bias"] = True
    ffn = SeamConfig(kind=SEAM_DEFAULTS["ffn"])
    if arch.moe:
        n_layers = int(raw["num_hidden_layers"])
        ffn = SeamConfig(kind="moe", layers=_moe_layers(raw, arch, n_layers), options=dict(
            num_experts=_num_experts(raw, arch),
            top_k=int(raw["num_experts_per_tok"]),
            d_expert=int(raw[arch.expert_width_field]),
            # Mixtral always renormalises the top k; the others say so in norm_topk_prob.
            normalize_topk=(arch is MIXTRAL) or bool(raw.get("norm_topk_prob", False)),
            load_balance_coef=float(raw.get("router_aux_loss_coef", 0.0)),
            # HF's MoE models train without a router z-loss.
            z_loss_coef=0.0,
            **(_shared_expert(raw) if arch.shared_expert else {}),
        ))
    cfg = ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        d_model=int(raw["hidden_size"]),
        n_layers=int(raw["num_hidden_layers"]),
        n_heads=int(heads),
        n_kv_heads=int(raw.get("num_key_value_heads") or heads),
        # 0 (d_model / n_heads) where that is the head width, so the config reads as usual.
        d_head=0 if head_dim * heads == hidden else head_dim,
        d_ff=int(raw["intermediate_size"]),  # Qwen2/3-MoE: the width of their dense layers
        activation="swiglu",
        max_seq_len=int(raw.get("max_position_embeddings", 2048)),
        rope_theta=_rope_theta(raw),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        init_std=float(raw.get("initializer_range", 0.02)),
        ffn=ffn,
        attention=SeamConfig(kind="dense", options=attention_options),
    )
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"config.json describes a model condcomp cannot build: {exc}") from None
    return arch, cfg


# ----------------------------------------------------------------------------- condcomp -> HF


def _refuse_export(what: str) -> ConfigError:
    return ConfigError(f"{what}: no HF architecture ({HF_NAMES}) has an equivalent")


def architecture_for(cfg: ModelConfig) -> Architecture:
    """The HF architecture that holds ``cfg``: Llama for a dense model, Mixtral for an MoE
    one, Qwen2-MoE when it has a sigmoid-gated shared expert (optional Q/K/V biases, no Q/K
    norm), Qwen3-MoE (Q/K norm per head) or OLMoE (Q/K norm over the projections, optional
    clamp) when its attention has their norms. Otherwise, without a Q/K norm the top-k
    weights must be renormalised, as Mixtral always does."""

    for name in ("wrapper", "residual"):
        seam = getattr(cfg, name)
        if seam.kind != SEAM_DEFAULTS[name] and seam.layers != "none":
            raise _refuse_export(f"model.{name}.kind = {seam.kind!r}")
    if cfg.attention.kind != "dense":
        raise _refuse_export(f"model.attention.kind = {cfg.attention.kind!r}")
    moe_layers = moe_layers_of(cfg)
    attention = _attention_options(cfg)
    if cfg.ffn.kind == SEAM_DEFAULTS["ffn"] or (not moe_layers and attention.qk_norm == "none"):
        check_llama_compatible(cfg)  # refuses Q/K norms and clamps too
        return LLAMA
    if cfg.ffn.kind != "moe":
        raise _refuse_export(f"model.ffn.kind = {cfg.ffn.kind!r}")
    if cfg.activation != "swiglu":
        raise _refuse_export(f"model.activation = {cfg.activation!r} (HF's MoE experts are SwiGLU)")
    options = _moe_options(cfg)
    problems = []
    if options.routing != "token_choice":
        problems.append("routing = 'expert_choice'")
    if options.capacity_factor is not None:
        problems.append("a capacity_factor (HF's MoE models are dropless)")
    if options.num_shared_experts and options.shared_gate != "sigmoid":
        problems.append("num_shared_experts without shared_gate = 'sigmoid' (Qwen2-MoE, the "
                        "one with a shared expert, gates it)")
    if options.num_noop_experts:
        problems.append("num_noop_experts")
    if options.bias_update_rate:
        problems.append("bias_update_rate (an aux-loss-free selection bias)")
    problems += router_problems(options.score, options.route_scale, options.expert_groups)
    if problems:
        raise _refuse_export("model.ffn with " + ", ".join(problems))
    if options.num_shared_experts:
        if attention.qk_norm != "none" or attention.clip_qkv:
            raise _refuse_export("model.ffn.num_shared_experts with model.attention.qk_norm or "
                                 "clip_qkv (Qwen2-MoE, the HF MoE model with a shared expert, "
                                 "has neither)")
        return QWEN2_MOE  # dense layers (mlp_only_layers) and Q/K/V biases or not
    if attention.qkv_bias:
        raise _refuse_export("model.attention.qkv_bias without a shared expert (only Qwen2-MoE "
                             "has Q/K/V biases, and it has a shared expert with shared_gate = "
                             "'sigmoid')")
    if attention.clip_qkv and attention.qk_norm != "projection":
        raise _refuse_export("model.attention.clip_qkv without qk_norm = 'projection' (only "
                             "OLMoE clamps, and it norms the whole Q/K projections)")
    if attention.qk_norm == "head":
        return QWEN3_MOE  # the one with dense layers between MoE layers (mlp_only_layers)
    if len(moe_layers) != cfg.n_layers:
        raise _refuse_export(f"model.ffn.layers = {cfg.ffn.layers!r} without qk_norm = 'head' "
                             "or a shared expert (of the HF MoE models only Qwen3-MoE, which "
                             "norms each Q/K head, and Qwen2-MoE have dense layers)")
    if attention.qk_norm == "projection":
        return OLMOE
    if not options.normalize_topk:
        raise _refuse_export("model.ffn.normalize_topk = false without a Q/K norm (Mixtral "
                             "always renormalises the top-k weights; Qwen3-MoE and OLMoE, "
                             "which need not, norm queries and keys)")
    return MIXTRAL


def moe_layers_of(cfg: ModelConfig) -> set[int]:
    """The layers of ``cfg`` whose FFN is the MoE (none for a dense model)."""
    if cfg.ffn.kind == SEAM_DEFAULTS["ffn"]:
        return set()
    return select_layers(cfg.ffn.layers, cfg.n_layers, "model.ffn.layers")


def _moe_options(cfg: ModelConfig) -> Any:
    from condcomp import registry

    return registry.parse_options("ffn", cfg.ffn).resolved(cfg)


def _attention_options(cfg: ModelConfig) -> Any:
    from condcomp import registry

    return registry.parse_options("attention", cfg.attention)


def hf_config_dict(cfg: ModelConfig, arch: Architecture, eos_id: int | None) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` as ``arch`` (from :func:`architecture_for`)."""
    raw: dict[str, Any] = {
        "architectures": [arch.class_name],
        "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,  # transformers 5 moves it into rope_parameters
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": eos_id,  # HF generate then stops where condcomp generate does
        "pad_token_id": None,
        "dtype": "float32",
    }
    if arch is LLAMA:
        raw["mlp_bias"] = False
        return raw
    moe = _moe_options(cfg)
    raw.update(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_coef,
               output_router_logits=False)
    raw[arch.expert_width_field] = moe.d_expert or cfg.ffn_hidden
    if arch is MIXTRAL:
        raw.update(num_local_experts=moe.num_experts, sliding_window=None,
                   router_jitter_noise=0.0)
    else:
        raw.update(num_experts=moe.num_experts, norm_topk_prob=moe.normalize_topk)
    if arch.dense_layers:
        dense = sorted(set(range(cfg.n_layers)) - moe_layers_of(cfg))
        raw.update(decoder_sparse_step=1, mlp_only_layers=dense, use_sliding_window=False,
                   sliding_window=None)
    if arch is QWEN3_MOE:
        raw["num_local_experts"] = moe.num_experts
    if arch is QWEN2_MOE:
        raw.update(qkv_bias=_attention_options(cfg).qkv_bias,
                   shared_expert_intermediate_size=(moe.d_shared or moe.d_expert
                                                    or cfg.ffn_hidden) * moe.num_shared_experts,
                   max_window_layers=cfg.n_layers)
    if arch is OLMOE:
        raw["clip_qkv"] = _attention_options(cfg).clip_qkv or None
    return raw
