"""Batches of token windows, as int64 torch tensors ``(x, y)`` with ``y`` = ``x`` shifted by one.

Training draws random windows, and the batch for step ``i`` is a pure function of
``(seed, i)``: a resumed run reproduces the exact data stream from the step number alone,
with no sampler state to checkpoint. Evaluation walks the split in order instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from condcomp.errors import DataError

SEED_MASK = (1 << 64) - 1  # numpy seeds must be non-negative; a negative seed wraps around


def _windows(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` = tokens[s : s + seq_len] and ``y`` = tokens[s + 1 : s + seq_len + 1] per start."""
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)]  # reads only these tokens of a memmap
    rows = torch.from_numpy(rows.astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def _check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"the {split} split has {len(tokens):,} tokens, fewer than train.seq_len + 1 = "
            f"{seq_len + 1:,}; lower train.seq_len or use more data"
            + (" (or raise data.val_fraction)" if split == "evaluation" else "")
        )


class TrainBatches:
    """Random training windows; ``get(i)`` depends on nothing but ``(seed, i)``."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        _check_length(tokens, seq_len, "train")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed

    def _starts(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed & SEED_MASK, index & SEED_MASK])
        # The last possible start leaves room for the one-token shift of y.
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch for step ``index``: ``(x, y)``, each ``[batch_size, seq_len]`` int64."""
        return _windows(self.tokens, self._starts(index), self.seq_len)

    def rows(self, step: int, grad_accum: int, lo: int, hi: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``lo:hi`` of the global batch of optimizer step ``step``: the ``grad_accum``
        batches ``get(step * grad_accum + j)`` one after the other. A data-parallel rank
        reads its slice of every step this way (:mod:`condcomp.distributed.batching`)."""
        B = self.batch_size
        parts = []
        for j in range(lo // B, (hi - 1) // B + 1):
            starts = self._starts(step * grad_accum + j)
            parts.append(starts[max(lo - j * B, 0):min(hi - j * B, B)])
        return _windows(self.tokens, np.concatenate(parts), self.seq_len)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows from the start of a split, in order.

    Window ``k`` predicts tokens ``k * seq_len + 1 .. (k + 1) * seq_len``. There are as many
    windows as fit in the split and in ``max_tokens`` predicted tokens (None: no limit), but
    at least one; the last batch may hold fewer than ``batch_size`` windows.
    """
    _check_length(tokens, seq_len, "evaluation")
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
        yield _windows(tokens, starts, seq_len)
