"""Weight conversion between condcomp and HF transformers: the dense transformer and
``LlamaForCausalLM``, and the MoE layer and Mixtral's ``MixtralSparseMoeBlock``
(:func:`to_hf_mixtral_block`).

A dense condcomp model (SwiGLU MLP, dense Q/K/V, every token in every block, a width-D
residual stream) is exactly the LLaMA architecture (Touvron et al. 2023): pre-norm RMSNorm
blocks, rotary embeddings in the "rotate half" layout, grouped-query attention, a SwiGLU
FFN and an optionally tied output head. So the weights move across with renames and, for
the FFN, transposes:

=========================================  ==========================================
condcomp                                   HF Llama
=========================================  ==========================================
``tok_emb.weight`` [V, D]                  ``model.embed_tokens.weight``
``layers.{i}.block.attn_norm.weight``      ``model.layers.{i}.input_layernorm.weight``
``layers.{i}.block.attn.qkv.wq.weight``    ``model.layers.{i}.self_attn.q_proj.weight``
``layers.{i}.block.attn.qkv.wk/wv.weight`` ``model.layers.{i}.self_attn.k_proj/v_proj.weight``
``layers.{i}.block.attn.wo.weight``        ``model.layers.{i}.self_attn.o_proj.weight``
``layers.{i}.block.ffn_norm.weight``       ``model.layers.{i}.post_attention_layernorm.weight``
``layers.{i}.block.ffn.w1`` [D, H] (gate)  ``model.layers.{i}.mlp.gate_proj.weight`` [H, D]
``layers.{i}.block.ffn.w3`` [D, H] (up)    ``model.layers.{i}.mlp.up_proj.weight`` [H, D]
``layers.{i}.block.ffn.w2`` [H, D] (down)  ``model.layers.{i}.mlp.down_proj.weight`` [D, H]
``norm.weight``                            ``model.norm.weight``
``lm_head.weight`` [V, D]                  ``lm_head.weight``
=========================================  ==========================================

The Q/K projections need no permutation: both sides rotate the pairs ``(x_i, x_{i+d/2})``
(HF's ``convert_llama_weights_to_hf.py`` permutes Meta's interleaved checkpoints *into* this
layout). Our MLP keeps its weights as ``x @ w`` matrices (docs/design.md, the layer contract) while
``nn.Linear`` stores ``[out, in]``, hence the transposes.

``transformers`` is an optional dependency (``pip install 'condcomp[bench]'``), imported only
when a function here is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from condcomp.config import SEAM_DEFAULTS, ModelConfig
from condcomp.errors import CondcompError, ConfigError

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

    from condcomp.conditional.moe import MoE
    from condcomp.model import TransformerLM

__all__ = ["MissingDependencyError", "from_hf_llama", "hf_experts_implementations",
           "hf_llama_config", "require_transformers", "to_hf_llama", "to_hf_mixtral_block"]


class MissingDependencyError(CondcompError, ImportError):
    """An optional dependency (here HF ``transformers``) is not installed."""


def require_transformers() -> Any:
    """Import ``transformers`` or raise one clear message saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(
            "HF transformers is not installed; it is needed for the HF Llama peer and weight "
            "conversion. Install it with: pip install 'condcomp[bench]'"
        ) from None
    return transformers


# ----------------------------------------------------------------------------- checks


def check_llama_compatible(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` unless ``cfg`` describes a model HF Llama can represent.

    Llama has one FFN (SwiGLU), dense attention projections, every token in every block and
    a width-D residual stream; every conditional family changes one of those seams.
    """
    if cfg.activation != "swiglu":
        raise ConfigError(
            f"model.activation = {cfg.activation!r}: HF Llama has no equivalent (its MLP is "
            "SwiGLU); use activation = 'swiglu' to convert or compare with HF Llama"
        )
    for seam_name, seam in cfg.seams().items():
        default = SEAM_DEFAULTS[seam_name]
        if seam.kind != default and seam.layers != "none":
            raise ConfigError(
                f"model.{seam_name}.kind = {seam.kind!r}: HF Llama has no equivalent of this "
                f"conditional family; only dense models ({seam_name} = {default!r}) convert"
            )
    if cfg.attention.kind == "dense" and _has_attention_options(cfg):
        raise ConfigError(f"model.attention options {cfg.attention.options}: HF Llama has no "
                          "Q/K norm, Q/K/V clamp or Q/K/V biases; only plain dense attention "
                          "converts (the MoE architectures of condcomp import-hf / export-hf "
                          "have them)")
    d_ff = cfg.ffn.options.get("d_ff", 0) if cfg.ffn.kind == "mlp" else 0
    if d_ff and d_ff != cfg.ffn_hidden:
        raise ConfigError(
            f"model.ffn.d_ff = {d_ff} differs from the model's FFN width {cfg.ffn_hidden} on "
            "some layers: HF Llama has one intermediate_size for every layer; set model.d_ff "
            "instead"
        )


def _has_attention_options(cfg: ModelConfig) -> bool:
    """Whether the dense attention of ``cfg`` sets any option away from its default (an
    option written out at its default, such as ``qkv_bias = false``, is plain attention)."""
    from condcomp import registry

    options = registry.parse_options("attention", cfg.attention)
    return options.qk_norm != "none" or bool(options.clip_qkv) or bool(options.qkv_bias)


def _check_modules(model: TransformerLM) -> None:
    """The same check on the built modules, so that a hand-assembled model cannot slip by."""
    from condcomp.model.attention import DenseQKV
    from condcomp.model.mlp import MLP
    from condcomp.model.residual import PlainStream
    from condcomp.model.wrappers import FullBlock

    if not isinstance(model.stream, PlainStream):
        raise ConfigError(f"the residual stream is {type(model.stream).__name__}: HF Llama has "
                          "no equivalent; only the plain width-D stream converts")
    widths = set()
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, FullBlock):
            raise ConfigError(f"layer {i} is wrapped by {type(layer).__name__}: HF Llama has no "
                              "equivalent; only the dense wrapper ('full') converts")
        block = layer.block
        if not isinstance(block.attn.qkv, DenseQKV) or block.attn.qkv.qk_norm != "none" \
                or block.attn.qkv.clip_qkv or block.attn.qkv.qkv_bias:
            raise ConfigError(f"layer {i} uses {type(block.attn.qkv).__name__} projections: HF "
                              "Llama has no equivalent; only dense attention converts")
        if not isinstance(block.ffn, MLP) or block.ffn.activation != "swiglu":
            raise ConfigError(f"layer {i} has FFN {block.ffn!r}: HF Llama has no equivalent; "
                              "only the dense SwiGLU MLP converts")
        widths.add(block.ffn.d_hidden)
    if len(widths) > 1:
        raise ConfigError(f"the FFN widths differ across layers ({sorted(widths)}): HF Llama has "
                          "one intermediate_size")


# ----------------------------------------------------------------------------- config


def hf_llama_config(model_cfg: ModelConfig, **overrides: Any) -> LlamaConfig:
    """A ``LlamaConfig`` of the same shape as ``model_cfg`` (for an untrained HF peer).

    ``overrides`` go to ``LlamaConfig`` as is (e.g. ``attn_implementation="eager"``).
    Dropout is not carried over: Llama has only attention-probability dropout, we drop the
    block outputs; the two agree in eval mode, and benchmarks run with dropout 0.
    """
    transformers = require_transformers()
    check_llama_compatible(model_cfg)
    if model_cfg.vocab_size <= 0:
        raise ConfigError("model.vocab_size is not set; HF Llama needs an explicit vocabulary "
                          "size (set model.vocab_size)")
    kwargs: dict[str, Any] = dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.d_model,
        intermediate_size=model_cfg.ffn_hidden,
        num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=model_cfg.n_heads,
        num_key_value_heads=model_cfg.kv_heads,
        head_dim=model_cfg.head_dim,
        hidden_act="silu",  # SwiGLU = silu(x @ gate) * (x @ up)
        max_position_embeddings=model_cfg.max_seq_len,
        # Accepted by transformers 4.x as is and moved into rope_parameters by 5.x.
        rope_theta=model_cfg.rope_theta,
        rms_norm_eps=model_cfg.norm_eps,
        tie_word_embeddings=model_cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=model_cfg.init_std,
        # Our tokenizers have no BOS/EOS convention HF could know about; leaving Llama's
        # defaults (1, 2) would make HF generate stop at token 2.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def _rope_theta(hf_config: Any) -> float:
    """RoPE base of an HF config: ``rope_parameters`` in transformers 5, ``rope_theta`` in 4."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConfigError(f"the HF model uses RoPE scaling {rope_type!r}: condcomp has no "
                          "equivalent (only plain RoPE, rope_type 'default')")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def model_config_from_hf(hf_config: Any) -> ModelConfig:
    """The condcomp ``ModelConfig`` of an HF ``LlamaConfig`` (dense SwiGLU)."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    problems = []
    if hf_config.hidden_act != "silu":
        problems.append(f"hidden_act = {hf_config.hidden_act!r} (we support 'silu' = SwiGLU)")
    if head_dim % 2:
        problems.append(f"head_dim = {head_dim} is odd (RoPE needs an even head dimension)")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        problems.append("biases in attention or MLP (ours are bias-free)")
    if problems:
        raise ConfigError("this HF Llama model has no condcomp equivalent: " + "; ".join(problems))
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=hf_config.num_key_value_heads or heads,
        d_head=0 if head_dim * heads == hf_config.hidden_size else head_dim,
        d_ff=hf_config.intermediate_size,
        activation="swiglu",
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=_rope_theta(hf_config),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )


# ----------------------------------------------------------------------------- weights

# (ours, HF, transform ours -> HF); per-layer names take the layer index. The transforms are
# their own inverses, so the same table serves both directions.
_Transform = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t()


_LAYER_KEYS: list[tuple[str, str, _Transform]] = [
    ("block.attn_norm.weight", "input_layernorm.weight", _same),
    ("block.attn.qkv.wq.weight", "self_attn.q_proj.weight", _same),
    ("block.attn.qkv.wk.weight", "self_attn.k_proj.weight", _same),
    ("block.attn.qkv.wv.weight", "self_attn.v_proj.weight", _same),
    ("block.attn.wo.weight", "self_attn.o_proj.weight", _same),
    ("block.ffn_norm.weight", "post_attention_layernorm.weight", _same),
    ("block.ffn.w1", "mlp.gate_proj.weight", _transpose),  # [D, H] -> [H, D]
    ("block.ffn.w3", "mlp.up_proj.weight", _transpose),
    ("block.ffn.w2", "mlp.down_proj.weight", _transpose),  # [H, D] -> [D, H]
]


def _key_map(n_layers: int) -> list[tuple[str, str, _Transform]]:
    keys = [("tok_emb.weight", "model.embed_tokens.weight", _same)]
    for i in range(n_layers):
        keys += [(f"layers.{i}.{ours}", f"model.layers.{i}.{hf}", fn) for ours, hf, fn in _LAYER_KEYS]
    keys += [("norm.weight", "model.norm.weight", _same), ("lm_head.weight", "lm_head.weight", _same)]
    return keys


@torch.no_grad()
def _copy_state(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor],
                pairs: list[tuple[str, str, _Transform]]) -> None:
    """Copy ``src[a]`` (transformed) into ``dst[b]`` for every pair; every destination key must
    be written, so a layout we do not know about fails loudly instead of staying random."""
    written = set()
    for a, b, fn in pairs:
        if b not in dst:
            raise ConfigError(f"cannot convert weights: the target model has no {b!r}")
        value = fn(src[a])
        if value.shape != dst[b].shape:
            raise ConfigError(f"cannot convert weights: {a} has shape {tuple(value.shape)} but "
                              f"{b} expects {tuple(dst[b].shape)}")
        dst[b].copy_(value)  # state_dict tensors share storage with the parameters
        written.add(b)
    missing = sorted(set(dst) - written)
    if missing:
        raise ConfigError(f"cannot convert weights: nothing maps to {missing[:4]}")


def to_hf_llama(model: TransformerLM, **config_overrides: Any) -> LlamaForCausalLM:
    """An HF ``LlamaForCausalLM`` with the same shape and weights as ``model``.

    The copy is independent (training one does not change the other), on the same device and
    in the same dtype. Raises :class:`ConfigError` for a model with a conditional family or a
    non-SwiGLU FFN: HF Llama has no equivalent. ``config_overrides`` go to the LlamaConfig
    (e.g. ``attn_implementation="eager"``).
    """
    transformers = require_transformers()
    check_llama_compatible(model.cfg)
    _check_modules(model)
    hf_cfg = hf_llama_config(model.cfg, **config_overrides)
    ref = model.tok_emb.weight
    hf_model = transformers.LlamaForCausalLM(hf_cfg).to(device=ref.device, dtype=ref.dtype)
    _copy_state(model.state_dict(), hf_model.state_dict(), _key_map(model.cfg.n_layers))
    hf_model.train(model.training)
    return hf_model


def from_hf_llama(hf_model: LlamaForCausalLM) -> TransformerLM:
    """A condcomp ``TransformerLM`` with the shape and weights of an HF ``LlamaForCausalLM``
    (e.g. a pretrained checkpoint from ``LlamaForCausalLM.from_pretrained``)."""
    from condcomp.model import TransformerLM

    cfg = model_config_from_hf(hf_model.config)
    ref = hf_model.get_input_embeddings().weight
    model = TransformerLM(cfg).to(device=ref.device, dtype=ref.dtype)
    pairs = [(hf, ours, fn) for ours, hf, fn in _key_map(cfg.n_layers)]
    dst = model.state_dict()
    if cfg.tie_embeddings:  # the tied head is the embedding: one tensor, written once
        pairs = [p for p in pairs if p[1] != "lm_head.weight"]
        dst.pop("lm_head.weight", None)
    _copy_state(hf_model.state_dict(), dst, pairs)
    model.train(hf_model.training)
    return model


# ----------------------------------------------------------------------------- Mixtral MoE


def router_problems(score: str, route_scale: float, expert_groups: int) -> list[str]:
    """The router options of condcomp's MoE that Mixtral, Qwen3-MoE and OLMoE do not have
    (their routers are softmax top-k over all experts, unscaled)."""
    problems = []
    if score != "softmax":
        problems.append(f"score = {score!r} (HF's softmax routers)")
    if route_scale != 1.0:
        problems.append(f"route_scale = {route_scale}")
    if expert_groups > 1:
        problems.append("group-limited routing (expert_groups)")
    return problems


def to_hf_mixtral_block(moe: MoE, experts_implementation: str = "eager") -> Any:
    """An HF ``MixtralSparseMoeBlock`` with the weights of ``moe`` (the peer of
    ``condcomp bench moe`` and of the equivalence test).

    Mixtral routes by token choice over a bias-free router, renormalises the top-k weights and
    runs SwiGLU experts, so only an MoE with those choices, dropless and without shared
    experts, has an HF twin. Weights: ``gate.weight`` = ``router.weight``;
    ``experts.gate_up_proj[e]`` = ``[w1[e]^T; w3[e]^T]`` (``[2H, D]``, gate first);
    ``experts.down_proj[e]`` = ``w2[e]^T``.
    """
    transformers = require_transformers()
    problems = []
    if moe.routing_mode != "token_choice":
        problems.append("expert-choice routing")
    if not moe.normalize_topk:
        problems.append("normalize_topk = false (Mixtral renormalises over the top k)")
    if moe.capacity_factor is not None:
        problems.append("a capacity factor (Mixtral is dropless)")
    if moe.shared_experts is not None:
        problems.append("shared experts")
    if moe.experts.activation != "swiglu":
        problems.append(f"{moe.experts.activation} experts")
    if moe.bias_update_rate > 0 or bool(moe.selection_bias.any()):
        problems.append("a selection bias")
    problems += router_problems(moe.score, moe.route_scale, moe.expert_groups)
    if problems:
        raise ConfigError("HF Mixtral has no equivalent of this MoE: " + ", ".join(problems))
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = transformers.MixtralConfig(
        hidden_size=moe.d_model, intermediate_size=moe.experts.d_expert,
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        hidden_act="silu", router_jitter_noise=0.0)
    hf_cfg._experts_implementation = experts_implementation
    ref = moe.router.weight
    block = MixtralSparseMoeBlock(hf_cfg).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        gate_up = torch.cat((moe.experts.w1, moe.experts.w3), dim=2).transpose(1, 2)
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(moe.experts.w2.transpose(1, 2))
    block.train(moe.training)
    return block


def hf_experts_implementations() -> list[str]:
    """The expert kernels this transformers version offers for Mixtral ("eager" first)."""
    require_transformers()
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]
