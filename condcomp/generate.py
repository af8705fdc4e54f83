"""Generation: prefill, then one-token decode steps over a static KV cache (gpt-fast style).

``prefill`` runs the whole prompt once and fills the cache; ``decode_one_token`` runs a single
position. Both keep fixed shapes, so the decode step can be compiled once and reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from condcomp.errors import GenerationError
from condcomp.model import TransformerLM
from condcomp.ranges import range_of, ranged

# Below this temperature sampling is greedy: greedy is the limit as the temperature falls,
# and near zero logits / temperature would overflow float32 into NaN probabilities.
GREEDY_BELOW = 1e-4

if TYPE_CHECKING:
    from condcomp.data import Tokenizer


@dataclass
class Sampling:
    temperature: float = ranged(0.8, ge=0.0)  # 0 (or below GREEDY_BELOW): greedy
    top_k: int = ranged(0, ge=0)  # 0: off
    top_p: float = ranged(1.0, gt=0.0, le=1.0)  # 1: off

    def validate(self) -> Sampling:
        for f in fields(self):
            problem = range_of(f).problem(getattr(self, f.name))
            if problem is not None:
                raise GenerationError(f"--{f.name.replace('_', '-')} {problem}")
        return self


def sample(logits_BV: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Next token ids ``[B, 1]`` from the last-position logits."""
    if sampling.temperature < GREEDY_BELOW:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits = logits_BV.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose
        # probability mass reaches top_p; the most likely token always stays.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def prefill(model: TransformerLM, tokens_BT: torch.Tensor) -> torch.Tensor:
    """Run the prompt through the model, filling the KV cache; last-position logits ``[B, V]``."""
    input_pos = torch.arange(tokens_BT.shape[1], device=tokens_BT.device)
    return model(tokens_BT, input_pos=input_pos).logits[:, -1]


@torch.no_grad()
def decode_one_token(model: TransformerLM, token_B1: torch.Tensor, input_pos: torch.Tensor
                     ) -> torch.Tensor:
    """One decode step at position ``input_pos`` (shape ``[1]``); logits ``[B, V]``."""
    return model(token_B1, input_pos=input_pos).logits[:, -1]


def compile_decode_step(model: TransformerLM, mode: str | None = None) -> Callable:
    """:func:`decode_one_token` compiled for ``model``: one graph (gpt-fast), unless one of its
    layers decides on the host whether a token runs it (Mixture-of-Depths off CUDA:
    ``MixtureOfDepths.DEVICE_DECISION``); then the step compiles into the pieces between
    those decisions. On CUDA a Mixture-of-Depths block decides on the device (``torch.cond``), so
    dynamo traces one graph; inductor (torch 2.13) runs each cond as a host-side branch on its
    predicate, with ``mode="reduce-overhead"``'s CUDA graphs recorded for the pieces between."""
    device = next(model.parameters()).device.type
    one_graph = not any(m.decides_on_host(device) for m in model.modules()
                        if hasattr(m, "decides_on_host"))
    return torch.compile(decode_one_token, mode=mode, fullgraph=one_graph)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids. A command line that is not UTF-8 reaches Python with each byte
    it cannot decode as a lone surrogate (PEP 383): the byte tokenizer encodes those bytes as
    they were; a BPE tokenizer encodes text, and refuses them."""
    try:
        if tokenizer.kind == "byte" or not _has_surrogates(prompt):
            return tokenizer.encode(prompt)
    except UnicodeEncodeError:
        pass
    index = next(i for i, ch in enumerate(prompt) if "\ud800" <= ch <= "\udfff")
    raw = ord(prompt[index])
    what = (f"byte 0x{raw - 0xDC00:02x} (not UTF-8)" if 0xDC80 <= raw <= 0xDCFF
            else f"U+{raw:04X} (a lone surrogate)")
    raise GenerationError(f"the prompt holds {what} at character {index}; this run's "
                          f"{tokenizer.kind} tokenizer encodes text, so give the prompt as UTF-8 "
                          "text")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_fits(prompt_len: int, max_new_tokens: int, context: int) -> None:
    if prompt_len == 0:
        raise GenerationError("the prompt is empty; give at least one character with --prompt")
    if prompt_len > context:
        raise GenerationError(
            f"the prompt is {prompt_len} tokens but the model's context is {context} tokens; "
            "shorten the prompt"
        )
    if prompt_len + max_new_tokens > context:
        raise GenerationError(
            f"the prompt ({prompt_len} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
            f"model's context of {context} tokens; lower --max-new-tokens to at most "
            f"{context - prompt_len} or shorten the prompt"
        )


@torch.no_grad()
def generate(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int,
             sampling: Sampling | None = None, on_token: Callable[[int], None] | None = None,
             seed: int | None = None, decode_step: Callable | None = None,
             stop_id: int | None = None) -> list[int]:
    """Sample up to ``max_new_tokens`` after ``prompt_ids`` (batch 1); returns the new ids.

    ``on_token`` is called with each id as soon as it is sampled (for streaming output).
    ``decode_step`` replaces :func:`decode_one_token` (e.g. a ``torch.compile``d copy of it).
    Generation stops early at ``stop_id`` (the tokenizer's end-of-text), which is not returned.
    The KV cache stays set up afterwards for the next call (training forwards ignore it);
    ``model.clear_cache()`` frees it.
    """
    sampling = (sampling or Sampling()).validate()
    check_fits(len(prompt_ids), max_new_tokens, model.cfg.max_seq_len)
    device = model.tok_emb.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    decode_step = decode_step or decode_one_token
    was_training = model.training
    model.eval()
    # Keep the cache between calls when it is large enough (gpt-fast): the same tensors, so a
    # compiled (CUDA-graph) decode step is not re-recorded for every generation.
    needed = len(prompt_ids) + max_new_tokens
    shape = model.cache_shape()
    if shape is not None and shape[0] == 1 and shape[1] >= needed:
        model.reset_cache()
    else:
        model.setup_cache(batch_size=1, max_len=needed)
    try:
        logits = prefill(model, torch.tensor([prompt_ids], device=device))
        out: list[int] = []
        pos = torch.tensor([len(prompt_ids)], device=device)
        for _ in range(max_new_tokens):
            token = sample(logits, sampling, generator)
            token_id = int(token.item())
            if token_id == stop_id:
                break
            out.append(token_id)
            if on_token is not None:
                on_token(token_id)
            if len(out) == max_new_tokens:
                break
            logits = decode_step(model, token, pos)
            pos += 1
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def decode_tokens_per_s(model: TransformerLM, prompt_len: int = 16, new_tokens: int = 64,
                        decode_step: Callable | None = None, warmup_tokens: int = 4) -> float:
    """Batch-1 greedy decode speed: new tokens per second after the prefill.

    The prompt is random token ids (content does not change the work done). One short
    generation first warms up allocators and, if ``decode_step`` is compiled, compiles it.
    """
    device = model.tok_emb.weight.device
    prompt_len = min(prompt_len, model.cfg.max_seq_len // 2)
    new_tokens = min(new_tokens, model.cfg.max_seq_len - prompt_len - 1)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=gen).tolist()
    greedy = Sampling(temperature=0.0)
    generate(model, prompt, warmup_tokens, greedy, decode_step=decode_step)
    timestamps: list[float] = []

    def stamp(_: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timestamps.append(time.perf_counter())

    generate(model, prompt, new_tokens + 1, greedy, on_token=stamp, decode_step=decode_step)
    # From the first sampled token (end of prefill) to the last: new_tokens decode steps.
    return new_tokens / (timestamps[-1] - timestamps[0])
