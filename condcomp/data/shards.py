"""Token shards: each split packed into one flat token file, cached by content, memory-mapped.

Layout: ``<cache_dir>/<key>/`` holds ``train.bin`` and ``val.bin`` (raw little-endian token
ids, an EOS after every document; uint16 when the vocabulary fits, else uint32) and
``meta.json`` (dtype, and per split the token, document and UTF-8 byte counts). The key hashes
everything the tokens depend on (:func:`cache_key`).

Shards are written by streaming documents and appending encoded arrays, so memory stays flat
whatever the corpus size. They are written into ``<key>.partial-<pid>/`` and renamed into
place at the end: an interrupted run leaves at most a ``*.partial-*`` folder (safe to delete),
never a cache that looks complete. A cache whose files do not match its meta.json (a crash
before the data reached the disk, say) is treated as absent and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from condcomp.data.corpora import Document, iter_pieces
from condcomp.data.tokenizers import Tokenizer
from condcomp.errors import DataError

FORMAT_VERSION = 1  # bump when the shard layout or the split rule changes
SPLITS = ("train", "val")
META_FILE = "meta.json"
ENCODE_PIECE_CHARS = 1 << 20  # a long document is encoded in pieces of about this size
FLUSH_CHARS = 8 << 20  # encode and write once this much text is buffered


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_key(
    corpus_fingerprint: str, tokenizer_fingerprint: str, val_fraction: float, text_field: str
) -> str:
    """The cache folder name for one corpus, tokenizer and split setting."""
    payload = json.dumps(
        {
            "format": FORMAT_VERSION,
            "corpus": corpus_fingerprint,
            "tokenizer": tokenizer_fingerprint,
            "val_fraction": val_fraction,
            "text_field": text_field,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


@dataclass
class Shards:
    """An opened cache folder: the two splits as read-only memmaps, and meta.json."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]


def open_shards(directory: str | Path) -> Shards | None:
    """Open a complete cache folder; None when it is absent, incomplete or damaged."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            return None
        dtype = np.dtype(meta["dtype"])
        splits = {}
        for split in SPLITS:
            n_tokens = int(meta[f"{split}_tokens"])
            path = directory / f"{split}.bin"
            if n_tokens <= 0 or path.stat().st_size != n_tokens * dtype.itemsize:
                return None
            splits[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return Shards(directory=directory, train=splits["train"], val=splits["val"], meta=meta)


def build_shards(
    directory: str | Path,
    units: Iterable[tuple[Document, bool]],
    tokenizer: Tokenizer,
    meta: dict[str, Any],
) -> Shards:
    """Tokenize ``(unit, is_val)`` pairs into a new cache folder and open it.

    ``meta`` holds what the caller wants recorded (corpus, tokenizer, split settings); the
    dtype and the per-split counts are added here.
    """
    directory = Path(directory)
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        dtype = token_dtype(tokenizer.vocab_size)
        writers = {
            split: _SplitWriter(partial / f"{split}.bin", tokenizer, dtype) for split in SPLITS
        }
        try:
            for unit, is_val in units:
                writers["val" if is_val else "train"].add(unit.text)
            for writer in writers.values():
                writer.flush()
        finally:
            for writer in writers.values():
                writer.close()
        full_meta = dict(meta, format_version=FORMAT_VERSION, dtype=dtype.name)
        for split, writer in writers.items():
            if writer.tokens == 0:
                raise DataError(
                    f"the {split} split of the corpus came out with no tokens; add more text "
                    "or more documents"
                )
            full_meta[f"{split}_tokens"] = writer.tokens
            full_meta[f"{split}_documents"] = writer.documents
            full_meta[f"{split}_bytes"] = writer.bytes
        (partial / META_FILE).write_text(
            json.dumps(full_meta, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        _publish(partial, directory)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(
            f"cannot write the token cache {directory}: {exc.strerror or exc}; free some disk "
            "space or set data.cache_dir to a writable folder"
        ) from None
    except BaseException:  # including Ctrl-C: leave no partial folder behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shards = open_shards(directory)
    if shards is None:
        raise DataError(f"the token cache {directory} was written but cannot be read back")
    return shards


class _SplitWriter:
    """Appends the tokens of one split's documents to its file, in buffered batches."""

    def __init__(self, path: Path, tokenizer: Tokenizer, dtype: np.dtype) -> None:
        self._file: BinaryIO = open(path, "wb")
        self._tokenizer = tokenizer
        self._dtype = dtype
        self._eos = np.array([tokenizer.eos_id], dtype=np.int64)
        self._pieces: list[str] = []
        self._ends_document: list[bool] = []  # an EOS follows this piece
        self._buffered_chars = 0
        self.tokens = 0
        self.documents = 0
        self.bytes = 0  # UTF-8 bytes of the text, the denominator of bits per byte

    def add(self, text: str) -> None:
        pieces = list(iter_pieces(text, ENCODE_PIECE_CHARS))
        for index, piece in enumerate(pieces):
            self._pieces.append(piece)
            self._ends_document.append(index == len(pieces) - 1)
            self._buffered_chars += len(piece)
            self.bytes += len(piece.encode("utf-8"))
        self.documents += 1
        if self._buffered_chars >= FLUSH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self._pieces:
            return
        arrays = []
        for ids, ends_document in zip(
            self._tokenizer.encode_batch(self._pieces), self._ends_document
        ):
            arrays.append(ids)
            if ends_document:
                arrays.append(self._eos)
        tokens = np.concatenate(arrays)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self._tokenizer.vocab_size):
            # A wrong id would wrap around silently in a uint16 file; refuse to write it.
            raise ValueError(f"{self._tokenizer!r} produced ids outside its vocabulary")
        tokens.astype(self._dtype, copy=False).tofile(self._file)
        self.tokens += len(tokens)
        self._pieces.clear()
        self._ends_document.clear()
        self._buffered_chars = 0

    def close(self) -> None:
        self._file.close()


def _publish(partial: Path, directory: Path) -> None:
    """Rename a finished partial folder into place (atomic on one filesystem)."""
    if directory.exists():
        if open_shards(directory) is not None:  # another process finished first: keep theirs
            shutil.rmtree(partial)
            return
        shutil.rmtree(directory)  # damaged: replace it
    try:
        os.rename(partial, directory)
    except OSError:
        if open_shards(directory) is None:
            raise
        shutil.rmtree(partial)  # lost a race to another process writing the same cache
