"""``prepare_data``: from a :class:`DataConfig` to a tokenizer and two memory-mapped splits.

The steps, and how often each reads the corpus:

1. read the corpus once to decide the split and fingerprint its content (:mod:`.split`);
2. make the tokenizer, unless one is given: bytes need nothing, BPE is trained on the train
   split (one more read) and cached under ``<cache_dir>/tokenizers/<key>/``, so later runs on
   the same corpus load it instead of training again;
3. open the token cache named by (corpus fingerprint, tokenizer fingerprint, val_fraction,
   text_field), or build it (one more read) when absent.

The fingerprint is a sha256 over the content, not file sizes and times: exact (an edit that
keeps the size and mtime still counts), and nearly free because step 1 must read every
document anyway to rank it for the split. A cache hit therefore costs one read of the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from condcomp.config import DataConfig
from condcomp.data.corpora import Corpus
from condcomp.data.shards import build_shards, cache_key, open_shards
from condcomp.data.split import SplitPlan, plan_split
from condcomp.data.tokenizers import (
    TOKENIZER_FILE,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from condcomp.errors import DataError

TOKENIZER_CACHE_VERSION = 1  # bump when BPE training changes


@dataclass
class PreparedData:
    """What training and evaluation need from the data layer."""

    tokenizer: Tokenizer
    train: np.ndarray  # read-only memmap of 1-D token ids
    val: np.ndarray  # read-only memmap of 1-D token ids
    meta: dict[str, Any]  # the cache's meta.json

    @property
    def val_bytes_per_token(self) -> float:
        """UTF-8 bytes of validation text per validation token: bits/byte = loss/ln 2 / this."""
        return self.meta["val_bytes"] / self.meta["val_tokens"]


def prepare_data(
    cfg: DataConfig, tokenizer: Tokenizer | None = None, log: Callable[[str], Any] = print
) -> PreparedData:
    """Split, tokenize and cache the corpus ``cfg`` names (see the module docstring).

    ``tokenizer``: use this one as is (a resumed run or ``condcomp eval`` passes the one saved
    with the run); None makes the one ``cfg.tokenizer`` names.
    """
    cfg.validate()
    corpus = Corpus(cfg.corpus, cfg.text_field)
    plan = plan_split(corpus, cfg.val_fraction)
    if corpus.skipped_binary:
        log(f"data: skipped {corpus.skipped_binary} binary files in {cfg.corpus}")
    if corpus.not_utf8:
        log(f"data: warning: {corpus.not_utf8_message()}")
    cache_root = Path(cfg.cache_dir)
    if tokenizer is None:
        tokenizer = _make_tokenizer(cfg, corpus, plan, cache_root, log)

    key = cache_key(plan.fingerprint, tokenizer.fingerprint(), cfg.val_fraction, cfg.text_field)
    directory = cache_root / key
    shards = open_shards(directory)
    if shards is None:
        shards = build_shards(
            directory,
            plan.label(corpus),
            tokenizer,
            meta={
                "key": key,
                "corpus": cfg.corpus,
                "corpus_fingerprint": plan.fingerprint,
                "chunked": plan.chunked,
                "val_fraction": cfg.val_fraction,
                "text_field": cfg.text_field,
                "tokenizer_kind": tokenizer.kind,
                "tokenizer_fingerprint": tokenizer.fingerprint(),
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
            },
        )
        outcome = "cache miss, tokenized"
    else:
        outcome = "cache hit"
    meta = shards.meta
    log(
        f"data: {outcome} {cfg.corpus} -> {directory}: train {meta['train_tokens']:,} tokens "
        f"({meta['train_documents']:,} docs), val {meta['val_tokens']:,} tokens "
        f"({meta['val_documents']:,} docs), {tokenizer.kind} tokenizer, vocab "
        f"{tokenizer.vocab_size:,}"
    )
    return PreparedData(tokenizer=tokenizer, train=shards.train, val=shards.val, meta=meta)


def _make_tokenizer(
    cfg: DataConfig, corpus: Corpus, plan: SplitPlan, cache_root: Path, log: Callable[[str], Any]
) -> Tokenizer:
    """The byte tokenizer, or a BPE tokenizer trained on the train split (cached)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    key = hashlib.sha256(
        json.dumps(
            {
                "version": TOKENIZER_CACHE_VERSION,
                "corpus": plan.fingerprint,
                "val_fraction": cfg.val_fraction,
                "kind": cfg.tokenizer,
                "vocab_size": cfg.vocab_size,
            },
            sort_keys=True,
        ).encode("utf-8")
    ).hexdigest()[:32]
    directory = cache_root / "tokenizers" / key
    if (directory / TOKENIZER_FILE).is_file():
        try:
            return load_tokenizer(directory)
        except DataError:
            log(f"data: cached tokenizer {directory} is damaged; training again")
    log(
        f"data: training a BPE tokenizer (vocab {cfg.vocab_size:,}) on {plan.n_train:,} train "
        "documents"
    )
    tokenizer = train_tokenizer(cfg, plan.train_units(corpus))
    _save_atomically(tokenizer, directory)
    return tokenizer


def _save_atomically(tokenizer: Tokenizer, directory: Path) -> None:
    """Save into a partial folder and rename it into place, as the shards are."""
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        tokenizer.save(partial)
        shutil.rmtree(directory, ignore_errors=True)  # a damaged earlier copy
        os.rename(partial, directory)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if (directory / TOKENIZER_FILE).is_file():
            return  # another process saved the same tokenizer first
        raise DataError(
            f"cannot write the tokenizer cache {directory}: {exc.strerror or exc}; free some "
            "disk space or set data.cache_dir to a writable folder"
        ) from None
