"""Activation memory: the bytes autograd saves for the backward of one micro-batch on a rank.

An analytic count, module by module, of the tensors each forward saves (read from the ops'
backward formulas, and held to a real forward's saved tensors in tests/test_plan.py). Per token
of the rank's micro-batch, with D = d_model, H / H_kv / d the heads, kv heads and head size,
F an FFN's hidden width, E the experts, k the slots a token takes, V the vocabulary, c the
bytes of the compute dtype (2 under bf16 autocast, else 4):

- embedding: the token ids (8 bytes).
- each RMSNorm: its input in fp32 (4D; a bf16 stream is upcast first) and 1/rms (4). CUDA's
  fused kernel saves no more; the CPU's rms_norm is composite and also saves the normalised
  input (4D).
- a norm's output, as the ops that read it save it: once (cD) when it is already in the compute
  dtype, else one c-byte copy per reader, since autocast casts each op's input on its own
  (3 readers for q, k, v; 2 for a gated MLP; the router; ...).
- attention, by a fused SDPA kernel (flash or memory-efficient: no T x T matrix): rotated q
  and k (c(H + H_kv)d), v (cH_kv d), the output (cHd) and the log-sum-exp (4H).
- dense MLP: gated 4cF (gate, act(gate), up, their product), gelu 2cF, relu cF.
- MoE, per token: the router's probabilities and the logits of the z-loss in fp32 (8E), their
  log-sum-exp (4), the chosen ids (8k), the capacity mask (k); per slot, k per token (the same
  on every rank under EP when routing is balanced, and whatever the capacity: dropped slots
  keep their zero-filled rows): the dispatched input (cD), the expert's hidden units (as the
  MLP's), its output (cD) for the combine, the slot's weight (4), the permutation (16) and
  the drop mask (1). Expert choice: E * floor(factor * T / E) slots, each also saving its
  weighted output (cD).
- loss: the final norm, the output head's input, the log-softmax output in fp32 (4V) and the
  targets (8).
- weight copies, per micro-batch: a matrix weight computed in another dtype than it is stored
  in (fp32 storage under bf16 autocast) is saved as its cast copy (c per element); gated
  experts' ``[w1 | w3]`` concatenation is a copy even without a cast. FSDP's all-gathered
  parameters are not counted: FSDP frees them after the forward and gathers them again.

Not saved but held through the backward: the logits (cV per token), which the forward returns.
With ``model.loss = "fused"`` there are no logits, and the loss saves the gradients of the
output head's input (c per element) and of its weight (its own size).

Assumptions: no activation checkpointing; dropout saves a mask per element (1 byte on CUDA,
the compute dtype's on the CPU) and attention dropout nothing (CUDA's fused kernels regenerate
it; on the CPU it runs the math kernel, which the estimate does not model); the peak inside the
loss and the backward's own transient tensors are not counted. Families other than the dense attention, the
full block, the plain stream, the MLP and the MoE have no model here: the estimate says which.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from condcomp.conditional.experts import GroupedExperts
from condcomp.conditional.moe import MoE
from condcomp.master_weights import matrix_weights
from condcomp.model import TransformerLM
from condcomp.model.attention import Attention, DenseQKV
from condcomp.model.mlp import MLP
from condcomp.model.residual import PlainStream
from condcomp.model.wrappers import FullBlock
from condcomp.plan.layout import Layout

FP32, INDEX, MASK = 4, 8, 1  # bytes: fp32 values, int64 indices, bool masks


@dataclass(frozen=True)
class Precision:
    """The dtypes a forward runs in, in bytes per element."""

    device_type: str  # whose kernels: "cuda" (fused RMSNorm) or "cpu"
    compute: int  # the autocast dtype (2: bf16), or 4 without autocast
    stream: int  # the residual stream: fp32, or bf16 when FSDP casts every parameter
    # Which weights the forward reads in bf16: "none", "matrix" (bf16 storage with fp32
    # masters) or "all" (FSDP's MixedPrecisionPolicy casts every parameter).
    bf16_weights: str

    def norm_output(self, readers: int) -> int:
        """Bytes per element that ``readers`` ops save of a norm's output."""
        if readers == 0:
            return 0
        return self.compute if self.stream == self.compute else self.compute * readers

    @property
    def dropout_mask(self) -> int:
        """Bytes per element of a dropout mask: CUDA's kernel keeps a bool, the CPU's
        multiplies by a mask in the input's dtype (the compute dtype wherever condcomp drops)."""
        return MASK if self.device_type == "cuda" else self.compute

    def weight_bytes(self, matrix: bool) -> int:
        """Bytes per element of a matrix weight as the forward reads it."""
        if self.bf16_weights == "all" or (self.bf16_weights == "matrix" and matrix):
            return 2
        return FP32


@dataclass
class ActivationEstimate:
    """Bytes one rank holds for the backward of one micro-batch of ``tokens`` tokens."""

    tokens: int
    embedding: int = 0
    norms: int = 0
    attention: int = 0
    ffn: int = 0
    loss: int = 0
    weight_copies: int = 0
    logits: int = 0  # returned by the forward and held until the backward ends
    unmodelled: str = ""  # the module the estimate has no model for; "" when complete

    @property
    def saved(self) -> int:
        """What autograd saves: everything but the logits."""
        return self.embedding + self.norms + self.attention + self.ffn + self.loss \
            + self.weight_copies

    @property
    def total(self) -> int:
        return self.saved + self.logits

    def as_dict(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(saved=self.saved, total=self.total)
        return out


class _Unmodelled(Exception):
    """A module whose saved tensors the estimate does not know."""


def estimate_activations(model: TransformerLM, precision: Precision, layout: Layout,
                         micro_batch: int, seq_len: int) -> ActivationEstimate:
    tokens = micro_batch * seq_len
    estimate = ActivationEstimate(tokens)
    try:
        _count(model, precision, layout, estimate, micro_batch)
    except _Unmodelled as exc:
        return ActivationEstimate(tokens, unmodelled=str(exc))
    return estimate


def _count(model: TransformerLM, p: Precision, layout: Layout, out: ActivationEstimate,
           sequences: int) -> None:
    cfg, T = model.cfg, out.tokens
    if not isinstance(model.stream, PlainStream):
        raise _Unmodelled(f"residual stream {type(model.stream).__name__}")
    if p.device_type == "cpu" and cfg.dropout > 0:
        raise _Unmodelled("attention dropout on the CPU (its math kernel saves T x T matrices)")
    norm = _norm_bytes(p, cfg.d_model)
    for layer in model.layers:
        if not isinstance(layer, FullBlock):
            raise _Unmodelled(f"block wrapper {type(layer).__name__}")
        block = layer.block
        out.norms += 2 * norm * T
        out.attention += _attention_bytes(block.attn, p) * T
        out.ffn += _ffn_bytes(block.ffn, p, T, sequences)
        if block.dropout is not None:  # the masks of the attention and FFN updates
            out.attention += p.dropout_mask * cfg.d_model * T
            out.ffn += p.dropout_mask * cfg.d_model * T
    out.embedding = INDEX * T
    out.norms += norm * T  # the final norm
    if p.bf16_weights == "all":  # each RMSNorm's bf16 gain, upcast for the fp32 kernel
        out.norms += FP32 * cfg.d_model * (2 * len(model.layers) + 1)
    vocab = model.lm_head.weight.shape[0]
    if cfg.loss == "fused":
        # The chunked head + cross-entropy (condcomp.kernels.linear_cross_entropy) keeps its
        # two gradients for the backward, the hidden states' and the head weight's, and no
        # logits.
        head = model.lm_head.weight
        out.loss = p.stream * cfg.d_model * T + head.numel() * head.element_size()
    else:
        out.loss = (p.norm_output(1) * cfg.d_model + FP32 * vocab + INDEX) * T
        out.logits = p.compute * vocab * T
    out.weight_copies = _weight_copy_bytes(model, p, layout)


def _norm_bytes(p: Precision, d_model: int) -> int:
    """Per token: the fp32 input and 1/rms; the CPU's composite kernel adds the normalised
    input. The output is counted with the ops that read it."""
    composite = FP32 * d_model if p.device_type == "cpu" else 0
    return FP32 * d_model + FP32 + composite


def _attention_bytes(attn: Attention, p: Precision) -> int:
    """Per token: the normed input as q, k, v read it, rotated q and k, v, output, LSE."""
    if not isinstance(attn.qkv, DenseQKV) or not isinstance(attn.wo, nn.Linear):
        raise _Unmodelled(f"attention projections {type(attn.qkv).__name__}")
    H, H_kv, d = attn.n_heads, attn.kv_heads, attn.head_dim
    d_model = attn.wo.weight.shape[0]
    return (p.norm_output(3) * d_model + p.compute * (H + H_kv) * d + p.compute * H_kv * d
            + p.compute * H * d + FP32 * H)


def _hidden_copies(activation: str) -> int:
    """Hidden-width tensors an FFN saves per token (or per slot)."""
    return {"swiglu": 4, "gelu": 2, "relu": 1}[activation]


def _ffn_bytes(ffn: nn.Module, p: Precision, tokens: int, sequences: int) -> int:
    if isinstance(ffn, MLP):
        readers = 2 if ffn.gated else 1
        per_token = p.norm_output(readers) * ffn.d_model \
            + p.compute * _hidden_copies(ffn.activation) * ffn.d_hidden
        return per_token * tokens
    if isinstance(ffn, MoE):
        return _moe_bytes(ffn, p, tokens, sequences)
    raise _Unmodelled(f"FFN {type(ffn).__name__}")


def _moe_bytes(moe: MoE, p: Precision, tokens: int, sequences: int) -> int:
    D, experts = moe.d_model, moe.experts
    choices = moe.num_experts + moe.num_noop_experts
    shared = moe.shared_experts
    jitter = moe.router_jitter > 0
    # The router reads the norm's output, unless jitter gives it a noisy copy of its own.
    readers = (0 if jitter else 1) + (0 if shared is None else 2 if shared.gated else 1)
    readers += 0 if moe.shared_gate is None else 1
    per_token = p.norm_output(readers) * D
    if moe.shared_gate is not None:  # the shared output and its gate, saved by the product
        per_token += p.compute * D + p.compute
    if moe.score == "sigmoid":  # the per-token sum that normalises the scores, and its clamp
        per_token += 2 * FP32
    if jitter:  # the noise, in the stream's dtype, and the router's noisy input
        per_token += p.stream * D + p.compute * D
    per_token += 2 * FP32 * choices + FP32  # probabilities, z-loss logits, their LSE
    if shared is not None:
        per_token += p.compute * _hidden_copies(shared.activation) * shared.d_hidden
    hidden = p.compute * _hidden_copies(experts.activation) * experts.d_expert
    if experts.dropout is not None:
        hidden += p.dropout_mask * experts.d_expert
    if moe.routing_mode == "expert_choice":
        slots = moe.num_experts * min(tokens, max(1, int(moe.capacity_factor * tokens
                                                         / moe.num_experts)))
        # x gathered per slot (as the expert's products read it), hidden units, the output
        # and its weight (saved by the weighting), the weighted output (index_add saves its
        # source), the token index, the weight before clamping.
        reads = 2 if experts.gated else 1
        per_slot = (p.norm_output(reads) * D + hidden + 2 * p.compute * D + p.compute + INDEX
                    + FP32)
        return per_token * tokens + per_slot * slots
    k = moe.top_k
    may_drop = moe.capacity_factor is not None or moe.num_noop_experts > 0
    per_token += INDEX * k + (MASK * k if may_drop else 0)
    if moe.normalize_topk:  # the division saves the chosen weights and their clamped sum,
        per_token += FP32 * k + 2 * FP32  # the clamp the sum
    # Dispatched input, hidden units, output for the combine, the slot's weight, the
    # permutation and its inverse, and the mask that zeroes dropped slots.
    per_slot = 2 * p.compute * D + hidden + FP32 + 2 * INDEX + (MASK if may_drop else 0)
    balance = FP32 * choices  # per layer: the expert fractions of the balance loss
    if moe.balance_scope == "sequence":  # each sequence's fractions, real tokens and count
        balance = FP32 * sequences * (choices + 1) + MASK * (tokens + sequences) + INDEX
    return per_token * tokens + per_slot * tokens * k + balance


def _weight_copy_bytes(model: TransformerLM, p: Precision, layout: Layout) -> int:
    """Cast copies of the matrix weights the forward saves, and the gated experts'
    ``[w1 | w3]`` concatenations, for the weights on this rank (its E / ep experts)."""
    stored_bf16 = {id(w) for w in matrix_weights(model)}
    # Expert choice runs its experts by batched products, without the concatenation.
    batched = {id(m.experts) for m in model.modules()
               if isinstance(m, MoE) and m.routing_mode == "expert_choice"}
    # The fused loss casts the output head inside its own function, which saves no copy.
    head = model.lm_head if model.cfg.loss == "fused" else None
    total = 0
    for module in model.modules():
        local = layout.ep if isinstance(module, GroupedExperts) else 1
        for w in _matmul_weights(module) if module is not head else ():
            if p.weight_bytes(id(w) in stored_bf16) != p.compute:
                total += p.compute * w.numel() // local
        if (isinstance(module, GroupedExperts) and module.gated and id(module) not in batched
                and p.weight_bytes(True) == p.compute):
            total += p.compute * (module.w1.numel() + module.w3.numel()) // local
    return total


def _matmul_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights ``module`` multiplies by itself (not its children's)."""
    if isinstance(module, nn.Linear):
        return [module.weight]  # a tied output head included: autocast casts it too
    names = getattr(module, "MATRIX_WEIGHTS", ())
    return [w for name in names if isinstance(w := getattr(module, name, None), nn.Parameter)]
