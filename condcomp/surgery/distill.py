"""Knowledge distillation: a trained teacher run's softened probabilities as a second target
of a student's training (``condcomp distill``; the ``[distill]`` table of the run config).

The student minimises (Hinton et al. 2015, sec. 2)::

    alpha * CE(student, data) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)

with ``p^T = softmax(logits / T)``, the KL the mean over the tokens that have a target. The
gradient of the soft term scales as ``1 / T^2``; the ``T^2`` keeps it at the hard term's scale
whatever ``T`` (with ``T = 1`` it is the plain KL). Switch Transformer (Fedus et al. 2021,
sec. 5, Tables 6-7) distils a sparse teacher into a dense student with ``alpha = 0.75`` (0.25
of the teacher's probabilities), the student initialised with the teacher's non-expert weights
(``init_from_teacher = "shared"``): it keeps about 30% of the sparse model's quality gain at
1/20 of its parameters.

The teacher is any run with the student's vocabulary and tokenizer, whatever its families: it
is frozen (no gradient, in no optimizer, in no checkpoint: it is not a module of the student)
and runs in eval mode (dropless MoE routing, MoD's causal routing), as validation and
generation run it, under ``torch.no_grad`` in the caller's autocast (the student's), on at
most ``teacher_chunk`` sequences at a time.

Shapes: B sequences, b of them in one teacher chunk, T positions, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from condcomp import registry
from condcomp.config import DistillConfig, RunConfig
from condcomp.data import Tokenizer, load_tokenizer
from condcomp.errors import CondcompError, ConfigError
from condcomp.model import TransformerLM
from condcomp.runs import CONFIG_FILE, TOKENIZER_DIR, load_run, read_config

IGNORE = -100  # the targets the model's cross-entropy ignores; the KL ignores them too


@dataclass
class DistillLoss:
    """One micro-batch's distillation loss."""

    objective: torch.Tensor  # alpha * ce + (1 - alpha) * T^2 * kl: what the student minimises
    ce: torch.Tensor  # the student's cross-entropy on the data (detached)
    kl: torch.Tensor  # KL(p_teacher^T || p_student^T), mean over the tokens (detached)


@dataclass
class SharedWeights:
    """What ``init_from_teacher = "shared"`` did, each entry a tensor name (state-dict key)."""

    copied: list[str]  # the student's tensors set to the teacher's
    left: list[str]  # the student's tensors left as initialised, each with why
    unused: list[str]  # the teacher's tensors the student has no place for


class Distiller:
    """The frozen teacher and the distillation loss of a student's training step."""

    def __init__(self, teacher: TransformerLM, options: DistillConfig) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.options = options

    def loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, logits_BTV: torch.Tensor,
             ce: torch.Tensor) -> DistillLoss:
        """``alpha * ce + (1 - alpha) * T^2 * KL`` for the student's ``logits_BTV`` on
        ``tokens_BT`` and its cross-entropy ``ce`` against ``targets_BT`` (the model's loss)."""
        alpha, T = self.options.alpha, self.options.temperature
        kl = self.kl(tokens_BT, targets_BT, logits_BTV)
        # Hinton et al. 2015, sec. 2: the soft targets' term times T^2.
        objective = alpha * ce + (1.0 - alpha) * T * T * kl
        return DistillLoss(objective, ce.detach(), kl.detach())

    def kl(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, logits_BTV: torch.Tensor
           ) -> torch.Tensor:
        """``KL(p_teacher^T || p_student^T)`` summed over the vocabulary, averaged over the
        tokens whose target is not ignored, with its gradient to ``logits_BTV``; the teacher
        runs on ``teacher_chunk`` sequences at a time (:class:`_ChunkedKL`)."""
        return _ChunkedKL.apply(logits_BTV, tokens_BT, targets_BT != IGNORE, self.teacher,
                                self.options.temperature, self.options.teacher_chunk)

    def kl_reference(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor,
                     logits_BTV: torch.Tensor) -> torch.Tensor:
        """:meth:`kl` by plain autograd over the whole micro-batch, which keeps the teacher's
        and the student's log-probabilities of every token for the backward: the reference
        the chunked computation is held equal to, forward and backward."""
        T = self.options.temperature
        with torch.no_grad():
            teacher_logp_BTV = F.log_softmax(self.teacher(tokens_BT).logits.float() / T, dim=-1)
        student_logp_BTV = F.log_softmax(logits_BTV.float() / T, dim=-1)
        kl_BT = F.kl_div(student_logp_BTV, teacher_logp_BTV, reduction="none",
                         log_target=True).sum(dim=-1)
        counted_BT = targets_BT != IGNORE
        return torch.where(counted_BT, kl_BT, 0.0).sum() / counted_BT.sum()

    def init_student(self, student: nn.Module, log: Callable[[str], None]) -> SharedWeights:
        """The student's tensors that the teacher has, by name and shape, set to the
        teacher's; every tensor copied, left or unused named in ``log``."""
        shared = copy_shared_weights(self.teacher, student)
        for what, names in (("copied from the teacher", shared.copied),
                            ("left as initialised", shared.left),
                            ("of the teacher not used", shared.unused)):
            log(f"distill.init_from_teacher = 'shared': {len(names)} tensor(s) {what}"
                + (f": {', '.join(names)}" if names else ""))
        return shared


class _ChunkedKL(torch.autograd.Function):
    """The mean KL over the counted tokens, computed ``chunk`` sequences at a time (0: all).

    Autograd would keep the teacher's and the student's log-probabilities of the whole
    micro-batch for the backward. This keeps only the KL's gradient to the student's logits,
    ``(softmax(s / T) - p_teacher^T) / T`` per counted token (the derivative of Hinton et al.
    2015's soft term, before its T^2), in the logits' dtype, written chunk by chunk: at most
    one chunk's teacher activations, logits and probabilities exist at a time. The chunks'
    sums are divided once by the whole count, so the result is the micro-batch's mean
    whatever the chunking. Forward runs without gradients (an autograd Function's does), in
    the caller's autocast.
    """

    @staticmethod
    def forward(ctx: Any, logits_BTV: torch.Tensor, tokens_BT: torch.Tensor,
                counted_BT: torch.Tensor, teacher: TransformerLM, T: float, chunk: int
                ) -> torch.Tensor:
        B = tokens_BT.shape[0]
        chunk = chunk or B
        grad_BTV = torch.empty_like(logits_BTV)
        total = logits_BTV.new_zeros((), dtype=torch.float32)
        for lo in range(0, B, chunk):
            hi = min(lo + chunk, B)
            teacher_logp_bTV = F.log_softmax(teacher(tokens_BT[lo:hi]).logits.float() / T, dim=-1)
            student_logp_bTV = F.log_softmax(logits_BTV[lo:hi].float() / T, dim=-1)
            kl_bT = F.kl_div(student_logp_bTV, teacher_logp_bTV, reduction="none",
                             log_target=True).sum(dim=-1)
            counted_bT = counted_BT[lo:hi]
            total += torch.where(counted_bT, kl_bT, 0.0).sum()
            grad_bTV = (student_logp_bTV.exp_() - teacher_logp_bTV.exp_()) / T
            grad_BTV[lo:hi] = torch.where(counted_bT[..., None], grad_bTV, 0.0)
        count = counted_BT.sum()
        ctx.save_for_backward(grad_BTV, count)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_kl: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_BTV, count = ctx.saved_tensors
        return grad_BTV * (grad_kl / count).to(grad_BTV.dtype), None, None, None, None, None


def copy_shared_weights(teacher: nn.Module, student: nn.Module) -> SharedWeights:
    """Copy every tensor of ``teacher``'s state dict into the ``student``'s tensor of the same
    name and shape. Between a sparse teacher and a dense student of the same widths these are
    the non-expert weights (Switch sec. 5): embeddings, attention, norms, the head and the
    dense FFNs of the layers both keep dense; the experts and routers have no counterpart.
    A tied tensor (the head tied to the embedding) is one tensor, under its first name."""
    source = teacher.state_dict()
    copied, left = [], []
    with torch.no_grad():
        for name, tensor in _distinct_tensors(student):
            found = source.get(name)
            if found is None:
                left.append(f"{name} (not in the teacher)")
            elif found.shape != tensor.shape:
                left.append(f"{name} ({_shape(tensor)}; the teacher's is {_shape(found)})")
            else:
                tensor.copy_(found)
                copied.append(name)
    student_names = set(student.state_dict())
    unused = [name for name, _ in _distinct_tensors(teacher) if name not in student_names]
    return SharedWeights(copied, left, unused)


def _distinct_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state dict's tensors (the parameters themselves), a tied one under its first name
    only."""
    found, seen = [], set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            found.append((name, tensor))
    return found


def _shape(tensor: torch.Tensor) -> str:
    return f"[{', '.join(map(str, tensor.shape))}]"


# ----------------------------------------------------------------------------- the teacher run


def teacher_source(teacher: str) -> tuple[Path, Path | None]:
    """``distill.teacher`` as (run folder, checkpoint or None for its newest): a run folder,
    or a checkpoint folder inside one (``RUN/checkpoints/step_XXXXXXXX``)."""
    path = Path(teacher)
    if not (path / CONFIG_FILE).is_file() and path.parent.name == "checkpoints":
        return path.parent.parent, path
    return path, None


def check_teacher(cfg: RunConfig, tokenizer: Tokenizer) -> None:
    """Refuse a teacher the student cannot learn from, before the run folder is written: a
    missing run, another vocabulary or tokenizer, sequences longer than its context, chunks
    that would split the groups of a teacher that mixes sequences."""
    options = cfg.distill
    run_dir, _ = teacher_source(options.teacher)
    with _about_teacher(options.teacher):
        teacher_cfg = read_config(run_dir)
        teacher_tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    teacher_vocab, student_vocab = teacher_cfg.model.vocab_size, cfg.model.vocab_size
    if teacher_vocab != student_vocab:
        differs = (f"has a vocabulary of {teacher_vocab} tokens ({teacher_tokenizer.kind} "
                   f"tokenizer) and the student one of {student_vocab} ({tokenizer.kind} "
                   "tokenizer)")
    elif teacher_tokenizer.fingerprint() != tokenizer.fingerprint():
        differs = (f"has a vocabulary of {teacher_vocab} tokens as the student, but another "
                   f"tokenizer ({teacher_tokenizer.kind}; the student's {tokenizer.kind}, "
                   "trained on other text or with other settings)")
    else:
        differs = ""
    if differs:
        raise ConfigError(
            f"distill.teacher = {options.teacher!r} {differs}; the KL compares their "
            "probabilities token by token, so train the student with the teacher's "
            "data.tokenizer, data.vocab_size and corpus (and model.vocab_size = 0), or pick a "
            "teacher of the student's tokenizer")
    if cfg.train.seq_len > teacher_cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len = {cfg.train.seq_len} exceeds the teacher's "
                          f"model.max_seq_len = {teacher_cfg.model.max_seq_len} "
                          f"(distill.teacher = {options.teacher!r}); lower train.seq_len")
    # A teacher whose forward mixes the sequences of a group (Mixture of Tokens) must see
    # whole groups in every chunk, or chunking would change its probabilities.
    ffn = registry.parse_options("ffn", teacher_cfg.model.ffn)
    group_size = getattr(ffn, "group_size", None)
    if options.teacher_chunk and group_size and options.teacher_chunk % group_size:
        raise ConfigError(f"distill.teacher_chunk = {options.teacher_chunk} splits the "
                          f"teacher's groups of model.ffn.group_size = {group_size} sequences, "
                          "which its forward mixes; set teacher_chunk to a multiple of "
                          f"{group_size}, or 0 (the whole micro-batch)")


def load_distiller(cfg: RunConfig, device: torch.device) -> Distiller | None:
    """The teacher of ``cfg.distill`` on ``device`` (every process holds the whole teacher),
    from a checkpoint of either layout; ``None`` without a teacher."""
    if not cfg.distill.teacher:
        return None
    if cfg.model.loss == "fused":
        raise ConfigError("distillation reads the student's logits, which model.loss = \"fused\" "
                          "never forms; set model.loss = \"plain\"")
    run_dir, checkpoint = teacher_source(cfg.distill.teacher)
    with _about_teacher(cfg.distill.teacher):
        teacher = load_run(run_dir, checkpoint, device).model
    return Distiller(teacher, cfg.distill)


@contextlib.contextmanager
def _about_teacher(teacher: str) -> Iterator[None]:
    """Prefix the one-line error of reading the teacher run with the key that named it."""
    try:
        yield
    except CondcompError as exc:
        raise type(exc)(f"distill.teacher = {teacher!r}: {exc}") from None
