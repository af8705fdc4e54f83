"""The train/validation split: deterministic, by document, decided by content alone.

Every unit (a document, see below) gets a key ``sha256(name + "\\0" + text)``. Validation is
the ``ceil(val_fraction * n)`` units with the smallest keys, at least one and never all. The
split therefore depends only on the corpus, not on the tokenizer, file order or seed, and a
document is never in both splits.

Fallback for a corpus of one document: it is cut into chunks of about 64 KiB at line
boundaries (named ``NAME#0``, ``NAME#1``, ...), and the chunks are split the same way. Where no
line break comes within 128 KiB (or before the end), a chunk is cut at 64 KiB.

The pass that computes the keys also yields the corpus fingerprint (a sha256 over all keys in
corpus order) that names the token cache. Later passes re-check every key through
:meth:`SplitPlan.label`, so a corpus edited mid-run cannot produce a mislabelled cache.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from condcomp.data.corpora import Corpus, Document, has_text, iter_pieces
from condcomp.errors import DataError

CHUNK_CHARS = 64 * 1024  # fallback chunk size for a corpus of one document


def unit_key(unit: Document) -> bytes:
    """The sha256 digest that ranks a unit for the split."""
    digest = hashlib.sha256(unit.name.encode("utf-8", errors="surrogatepass"))
    digest.update(b"\0")
    digest.update(unit.text.encode("utf-8"))
    return digest.digest()


def val_count(n_units: int, val_fraction: float) -> int:
    """How many of ``n_units`` units go to validation: ceil(fraction * n), in [1, n - 1]."""
    # round() first, so 0.1 * 30 = 3.0000000000000004 counts as 3, not 4.
    wanted = math.ceil(round(val_fraction * n_units, 9))
    return min(n_units - 1, max(1, wanted))


def iter_units(corpus: Iterable[Document], chunked: bool) -> Iterator[Document]:
    """The corpus's documents, or with ``chunked`` their ~64 KiB chunks."""
    for doc in corpus:
        if not chunked:
            yield doc
            continue
        for index, piece in enumerate(iter_pieces(doc.text, CHUNK_CHARS, 2 * CHUNK_CHARS)):
            if has_text(piece):
                yield Document(f"{doc.name}#{index}", piece)


@dataclass(frozen=True)
class SplitPlan:
    """Which units of a corpus are validation units, and the corpus fingerprint."""

    keys: np.ndarray  # uint64: the first 8 bytes of each unit's key, in corpus order
    is_val: np.ndarray  # bool, one per unit
    chunked: bool  # units are chunks of a one-document corpus
    fingerprint: str  # sha256 over all unit keys, in corpus order

    @property
    def n_units(self) -> int:
        return len(self.keys)

    @property
    def n_val(self) -> int:
        return int(self.is_val.sum())

    @property
    def n_train(self) -> int:
        return self.n_units - self.n_val

    def units(self, corpus: Corpus) -> Iterator[Document]:
        return iter_units(corpus, self.chunked)

    def train_units(self, corpus: Corpus) -> Iterator[Document]:
        """The training units (what a BPE tokenizer is trained on)."""
        return (unit for unit, is_val in self.label(corpus) if not is_val)

    def label(self, corpus: Corpus) -> Iterator[tuple[Document, bool]]:
        """Each unit with ``True`` for validation, checking it is the unit that was planned."""
        digest = hashlib.sha256()
        count = 0
        for index, unit in enumerate(self.units(corpus)):
            key = unit_key(unit)
            digest.update(key)
            if index >= self.n_units or _key64(key) != self.keys[index]:
                raise _changed(corpus)
            count += 1
            yield unit, bool(self.is_val[index])
        if count != self.n_units or digest.hexdigest() != self.fingerprint:
            raise _changed(corpus)


def plan_split(corpus: Corpus, val_fraction: float) -> SplitPlan:
    """Read the corpus once and decide the split (see the module docstring)."""
    keys, fingerprint = _scan(iter_units(corpus, chunked=False))
    chunked = False
    if len(keys) < 2:
        keys, fingerprint = _scan(iter_units(corpus, chunked=True))
        chunked = True
        if len(keys) < 2:
            raise DataError(
                f"corpus too small to hold out validation data: {corpus.spec} is a single "
                f"document that does not cut into 2 chunks of about {CHUNK_CHARS // 1024} KiB; "
                "add more text or more documents"
            )
    n_val = val_count(len(keys), val_fraction)
    # A stable sort breaks ties (identical units) by corpus order, so the split stays a pure
    # function of the corpus.
    order = np.argsort(keys, kind="stable")
    is_val = np.zeros(len(keys), dtype=bool)
    is_val[order[:n_val]] = True
    return SplitPlan(keys=keys, is_val=is_val, chunked=chunked, fingerprint=fingerprint)


def _key64(key: bytes) -> int:
    return int.from_bytes(key[:8], "big")


def _scan(units: Iterable[Document]) -> tuple[np.ndarray, str]:
    # array("Q") holds 8 bytes per unit, so even tens of millions of .jsonl lines fit easily.
    keys = array("Q")
    digest = hashlib.sha256()
    for unit in units:
        key = unit_key(unit)
        digest.update(key)
        keys.append(_key64(key))
    return np.array(keys, dtype=np.uint64), digest.hexdigest()


def _changed(corpus: Corpus) -> DataError:
    return DataError(
        f"corpus {corpus.spec} changed while it was being prepared; run again once it stops "
        "changing"
    )
