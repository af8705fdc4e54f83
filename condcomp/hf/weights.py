"""The on-disk tensor names of the HF architectures (condcomp.hf.architectures), matched to
condcomp's weight names, and a reader of ``save_pretrained`` safetensors folders.

The names are those ``save_pretrained`` writes, which for the MoE models are one set of
matrices per expert (transformers 5 fuses them in memory and splits them again on save)::

    model.layers.{i}.{ffn}.gate.weight                    [E, D]  router.weight
    model.layers.{i}.{ffn}.experts.{e}.{gate}.weight      [H, D]  experts.w1[e] = its transpose
    model.layers.{i}.{ffn}.experts.{e}.{up}.weight        [H, D]  experts.w3[e] = its transpose
    model.layers.{i}.{ffn}.experts.{e}.{down}.weight      [D, H]  experts.w2[e] = its transpose

(``{ffn}`` is ``block_sparse_moe`` for Mixtral, ``mlp`` otherwise; ``{gate}, {up}, {down}``
are ``w1, w3, w2`` for Mixtral, ``gate_proj, up_proj, down_proj`` otherwise.) Our experts
are stacked ``x @ w`` matrices (docs/design.md, the layer contract), hence the transposes.

``save_pretrained(save_original_format=False)`` (transformers 5) writes the fused in-memory
layout instead, which import reads too (:func:`fused_expert_pairs`)::

    model.layers.{i}.mlp.gate.weight                 [E, D]       router.weight
    model.layers.{i}.mlp.experts.gate_up_proj        [E, 2H, D]   [w1^T; w3^T], gate first
    model.layers.{i}.mlp.experts.down_proj           [E, D, H]    w2^T

Export writes the per-expert names, which every transformers version loads.

Qwen2-MoE adds, on its MoE layers, the shared expert and its gate, and, with ``qkv_bias``,
the biases of the q, k, v projections on every layer::

    model.layers.{i}.mlp.shared_expert.gate_proj.weight   [S, D]  shared_experts.w1^T
    model.layers.{i}.mlp.shared_expert.up_proj.weight     [S, D]  shared_experts.w3^T
    model.layers.{i}.mlp.shared_expert.down_proj.weight   [D, S]  shared_experts.w2^T
    model.layers.{i}.mlp.shared_expert_gate.weight        [1, D]  shared_gate.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.bias                  attn.qkv.{wq,wk,wv}.bias
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from condcomp.config import ModelConfig
from condcomp.errors import CheckpointError
from condcomp.hf.architectures import Architecture, moe_layers_of
from condcomp.safetensors_stream import SAFETENSORS_DTYPES, StreamedSafetensors, state_specs

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


@dataclass(frozen=True)
class WeightPair:
    """condcomp's ``ours`` (row ``expert`` of it, for stacked experts) is HF's ``hf``,
    transposed when ``transpose``."""

    ours: str
    hf: str
    transpose: bool = False  # swap the last two dimensions
    expert: int | None = None
    rows: tuple[int, int] | None = None  # of the HF tensor's dim 1 (a fused gate_up_proj)


_ATTENTION = [("attn_norm.weight", "input_layernorm.weight"),
              ("attn.qkv.wq.weight", "self_attn.q_proj.weight"),
              ("attn.qkv.wk.weight", "self_attn.k_proj.weight"),
              ("attn.qkv.wv.weight", "self_attn.v_proj.weight"),
              ("attn.wo.weight", "self_attn.o_proj.weight"),
              ("ffn_norm.weight", "post_attention_layernorm.weight")]
_QK_NORMS = [("attn.qkv.q_norm.weight", "self_attn.q_norm.weight"),
             ("attn.qkv.k_norm.weight", "self_attn.k_norm.weight")]
_QKV_BIASES = [("attn.qkv.wq.bias", "self_attn.q_proj.bias"),
               ("attn.qkv.wk.bias", "self_attn.k_proj.bias"),
               ("attn.qkv.wv.bias", "self_attn.v_proj.bias")]


def _has_qkv_bias(cfg: ModelConfig) -> bool:
    from condcomp import registry

    return cfg.attention.kind == "dense" and bool(
        registry.parse_options("attention", cfg.attention).qkv_bias)


def weight_pairs(arch: Architecture, cfg: ModelConfig, num_experts: int = 0
                 ) -> list[WeightPair]:
    """Every weight of the condcomp model of ``cfg`` with its HF name (the tied head once:
    as the embedding). A layer outside the MoE's layers has the dense MLP, under the names of
    Llama's (and Qwen3-MoE's dense layers')."""
    pairs = [WeightPair("tok_emb.weight", "model.embed_tokens.weight")]
    gate, up, down = arch.expert_weights
    moe_layers = moe_layers_of(cfg)
    qkv_bias = _has_qkv_bias(cfg)
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.block.", f"model.layers.{i}."
        layer = list(_ATTENTION) + (list(_QK_NORMS) if arch.qk_norm != "none" else []) \
            + (list(_QKV_BIASES) if qkv_bias else [])
        pairs += [WeightPair(ours + a, hf + b) for a, b in layer]
        ffn = f"{hf}{arch.ffn_module}."
        if i not in moe_layers:
            mlp = f"{hf}mlp."
            pairs += [WeightPair(f"{ours}ffn.w1", f"{mlp}gate_proj.weight", True),
                      WeightPair(f"{ours}ffn.w3", f"{mlp}up_proj.weight", True),
                      WeightPair(f"{ours}ffn.w2", f"{mlp}down_proj.weight", True)]
            continue
        pairs.append(WeightPair(f"{ours}ffn.router.weight", f"{ffn}gate.weight"))
        if arch.shared_expert:
            shared = f"{ffn}shared_expert."
            pairs += [WeightPair(f"{ours}ffn.shared_experts.w1", f"{shared}gate_proj.weight",
                                 True),
                      WeightPair(f"{ours}ffn.shared_experts.w3", f"{shared}up_proj.weight",
                                 True),
                      WeightPair(f"{ours}ffn.shared_experts.w2", f"{shared}down_proj.weight",
                                 True),
                      WeightPair(f"{ours}ffn.shared_gate.weight",
                                 f"{ffn}shared_expert_gate.weight")]
        for e in range(num_experts):
            expert = f"{ffn}experts.{e}."
            pairs += [WeightPair(f"{ours}ffn.experts.w1", f"{expert}{gate}.weight", True, e),
                      WeightPair(f"{ours}ffn.experts.w3", f"{expert}{up}.weight", True, e),
                      WeightPair(f"{ours}ffn.experts.w2", f"{expert}{down}.weight", True, e)]
    pairs.append(WeightPair("norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        pairs.append(WeightPair("lm_head.weight", "lm_head.weight"))
    return pairs


def fused_expert_pairs(pairs: list[WeightPair], cfg: ModelConfig, d_expert: int,
                       folder: SafetensorsFolder) -> list[WeightPair]:
    """``pairs`` with each MoE layer's per-expert names replaced by the fused layout's, for
    the layers whose fused tensors ``folder`` holds."""
    out = []
    for pair in pairs:
        layer = pair.ours.split(".")[1] if pair.ours.startswith("layers.") else None
        fused = f"model.layers.{layer}.mlp.experts."
        if layer is None or f"{fused}gate_up_proj" not in folder:
            out.append(pair)
        elif pair.ours.endswith("ffn.router.weight"):
            out.append(WeightPair(pair.ours, f"model.layers.{layer}.mlp.gate.weight"))
        elif pair.expert == 0:  # one pair for all the experts of each stacked tensor
            H = d_expert
            name = pair.ours.rsplit(".", 1)[1]
            out.append({"w1": WeightPair(pair.ours, f"{fused}gate_up_proj", True, rows=(0, H)),
                        "w3": WeightPair(pair.ours, f"{fused}gate_up_proj", True,
                                         rows=(H, 2 * H)),
                        "w2": WeightPair(pair.ours, f"{fused}down_proj", True)}[name])
        elif pair.expert is None:
            out.append(pair)
    return out


def ours_of(pair: WeightPair, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor of condcomp's ``state`` that ``pair`` names (a view: one expert's matrix)."""
    tensor = state[pair.ours]
    return tensor if pair.expert is None else tensor[pair.expert]


# Bytes on each side of a tensor that reading it may have mapped too: a page fault maps its
# neighbours (Linux's fault-around: 64 KiB); 1 MiB leaves a margin.
_AROUND = 1 << 20


class _MappedFile:
    """One safetensors file, memory-mapped: each tensor is a view of the mapping (no copy),
    and :meth:`release` drops a tensor's pages from this process's resident memory once it has
    been copied (they are read from the file again should it be touched again), so converting
    a model holds the model and about one tensor of the file at a time. The mapping is private
    (copy on write) so that torch can view it; the views are read, never written (a page
    written to would be lost by :meth:`release`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"cannot read {path}: its header is not a safetensors one")
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + n, header

    def keys(self) -> list[str]:
        return list(self.entries)

    def _span(self, name: str) -> tuple[torch.dtype, list[int], int, int]:
        try:
            entry = self.entries[name]
            dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]]
            begin, end = (self.start + int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot read {name!r} of {self.path}: bad header entry "
                                  f"({exc!r})") from None
        if end - begin != math.prod(shape) * dtype.itemsize or end > len(self.map):
            raise CheckpointError(f"cannot read {name!r} of {self.path}: its bytes do not hold "
                                  f"a {entry['dtype']} tensor of shape {shape}")
        return dtype, shape, begin, end

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._span(name)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=begin).view(shape)

    def release(self, name: str) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self._span(name)
        first = max(0, begin - _AROUND)
        first -= first % mmap.PAGESIZE
        end = min(len(self.map), end + _AROUND)
        if end > first:
            self.map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a view is still alive (an error mid-read): freed with it
            pass


class SafetensorsFolder:
    """The tensors of a ``save_pretrained`` folder, memory-mapped: ``model.safetensors`` or
    the shards ``model.safetensors.index.json`` lists. A tensor is a view of the mapping,
    read when asked for; :meth:`release` gives its pages back once it has been copied."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handles: dict[Path, _MappedFile] = {}
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is unreadable ({exc})") from None
            self.file_of = {name: folder / file for name, file in weight_map.items()}
        elif (folder / SINGLE_FILE).is_file():
            self.file_of = {name: folder / SINGLE_FILE
                            for name in self._open(folder / SINGLE_FILE).keys()}
        else:
            raise CheckpointError(
                f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}; save the model with "
                "save_pretrained (safetensors, the default) and import that folder")

    def _open(self, path: Path) -> _MappedFile:
        if path not in self._handles:
            self._handles[path] = _MappedFile(path)
        return self._handles[path]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> Iterator[str]:
        return iter(self.file_of)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"{self.folder} has no tensor {name!r}, which its config.json "
                                  "implies; the folder is incomplete or of another model")
        tensor = self._open(self.file_of[name]).tensor(name)
        return tensor if rows is None else tensor[:, rows[0]:rows[1]]

    def release(self, name: str) -> None:
        """Drop the pages of ``name`` from resident memory (its data stays in the file)."""
        self._open(self.file_of[name]).release(name)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _converted(folder: SafetensorsFolder, pair: WeightPair, target: torch.Tensor
               ) -> torch.Tensor:
    """``pair``'s HF tensor as condcomp's ``target`` holds it: a view of the file's mapping
    (transposed where the pair says), not read until used."""
    source = folder.get(pair.hf, pair.rows)
    value = source.transpose(-1, -2) if pair.transpose else source
    if value.shape != target.shape:
        raise CheckpointError(f"{pair.hf} has shape {tuple(source.shape)}, but the model "
                              f"its config.json describes needs {tuple(target.shape)} "
                              f"({'transposed ' if pair.transpose else ''}for {pair.ours})")
    return value


def check_convertible(folder: SafetensorsFolder, pairs: list[WeightPair],
                      state: dict[str, torch.Tensor]) -> None:
    """Every pair's HF tensor exists with the shape condcomp needs, and the folder holds no
    tensor the conversion would drop. Reads only the files' headers."""
    for pair in pairs:
        _converted(folder, pair, ours_of(pair, state))
    used = {pair.hf for pair in pairs}
    # A tied head may be saved besides the embedding, and older Llama checkpoints hold RoPE's
    # inv_freq (derived from the config); anything else left over is a weight the conversion
    # would silently drop.
    left = sorted(n for n in folder.names() if n not in used and n != "lm_head.weight"
                  and not n.endswith("rotary_emb.inv_freq"))
    if left:
        raise CheckpointError(f"{folder.folder} holds tensors condcomp has no place for: "
                              f"{left[:3]}{' ...' if len(left) > 3 else ''}")


class ConvertedWeights:
    """The weights file of an imported checkpoint, converted from the HF folder as it is
    written (a ``WeightsWriter`` for :func:`condcomp.checkpoint.save_checkpoint`): each HF
    tensor is copied (transposed, into its expert's row) from the file's mapping straight into
    the writer's staging buffer, and its pages are given back; the model's parameters are
    never filled. The file holds what ``save_model`` would write for a model holding these
    weights and ``state``'s other tensors (its buffers)."""

    def __init__(self, folder: SafetensorsFolder, pairs: list[WeightPair],
                 state: dict[str, torch.Tensor]) -> None:
        check_convertible(folder, pairs, state)
        self.folder, self.state = folder, state
        self.pairs_of: dict[str, list[WeightPair]] = {}
        for pair in sorted(pairs, key=lambda p: -1 if p.expert is None else p.expert):
            self.pairs_of.setdefault(pair.ours, []).append(pair)

    @torch.no_grad()
    def write(self, path: Path) -> dict[str, object]:
        specs, metadata = state_specs(self.state)
        pairs_of = dict(self.pairs_of)
        for alias, kept in metadata.items():  # a tied head is written under one of its names
            if alias in pairs_of:
                pairs_of[kept] = pairs_of[alias]
        with StreamedSafetensors(path, specs, metadata) as out:
            for spec in out.specs:
                if spec.name not in pairs_of:  # a buffer: the model's own value
                    out.append(self.state[spec.name])
                    continue
                for pair in pairs_of[spec.name]:
                    out.append(_converted(self.folder, pair, ours_of(pair, self.state)))
                    self.folder.release(pair.hf)
            return out.close()


def hf_tensors(pairs: list[WeightPair], state: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """condcomp's ``state`` under the HF names. Only the transposed matrices are copies;
    the rest are the model's tensors themselves (no two share storage: the tied head is left
    out)."""
    out = {}
    for pair in pairs:
        value = ours_of(pair, state)
        out[pair.hf] = (value.t() if pair.transpose else value).contiguous()
    return out
