"""Tokenizers: bytes (no training) and byte-level BPE (trained with HF ``tokenizers``).

Both are saved as one ``tokenizer.json`` in a directory, which :func:`load_tokenizer` reads
back: the byte tokenizer writes ``{"kind": "byte"}``, the BPE tokenizer writes the HF
tokenizer format (told apart by its ``"model"`` key). The HF library is imported lazily, so
importing this module stays cheap.

:class:`StreamDecoder` turns generated token ids into text one token at a time.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from condcomp.data.corpora import Document, iter_pieces
from condcomp.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers as hf

    from condcomp.config import DataConfig

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
# BPE training sees documents in pieces of about this many characters, so a huge document is
# never pre-tokenized in one go; the cuts do not change the word counts (see iter_pieces).
TRAIN_PIECE_CHARS = 1 << 20
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(ABC):
    """What the rest of condcomp needs from a tokenizer.

    Attributes: ``kind`` ("byte" or "bpe"), ``vocab_size`` (ids are ``0 .. vocab_size - 1``)
    and ``eos_id`` (the end-of-document token, appended after every document in the shards).
    """

    kind: str
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without an EOS."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of several texts as integer arrays (subclasses add a faster path)."""
        return [np.asarray(self.encode(text), dtype=np.int64) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; EOS and unknown ids are dropped, invalid UTF-8 becomes U+FFFD."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hex digest that changes whenever the id of any text would change."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` into ``directory`` (created if needed)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; EOS is 256."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        # surrogateescape: bytes that were not UTF-8 where the text came from (a command line,
        # a file name; PEP 383) are encoded as the bytes they were.
        return list(text.encode("utf-8", errors="surrogateescape"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return hashlib.sha256(b"condcomp byte tokenizer v1").hexdigest()

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": self.kind, "version": 1}) + "\n", encoding="utf-8")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) backed by an HF ``tokenizers.Tokenizer``.

    The initial alphabet holds all 256 byte symbols, so any text encodes without unknowns.
    ``<|endoftext|>`` is the EOS; a literal ``<|endoftext|>`` inside a document is encoded as
    ordinary text, so corpus contents can never forge a document boundary.
    """

    kind = "bpe"

    def __init__(self, backend: hf.Tokenizer) -> None:
        eos_id = backend.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(
                f"the BPE tokenizer has no {EOS_TOKEN} token; train it with condcomp "
                "(data.tokenizer = 'bpe') rather than bringing another tokenizer.json"
            )
        # Not stored in tokenizer.json, so it is set on every load.
        backend.encode_special_tokens = True
        self._backend = backend
        self.eos_id = eos_id
        self.vocab_size = backend.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on ``texts``; the same texts in the same order give the same tokenizer."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = HFTokenizer(models.BPE())
        # No prefix space: text is encoded exactly as written, so the shards, prompts and
        # pieces of a long document all tokenize the same way.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        pieces = (piece for text in texts for piece in iter_pieces(text, TRAIN_PIECE_CHARS))
        backend.train_from_iterator(pieces, trainer=trainer)
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs on all cores inside the HF library.
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        # Canonical JSON, so the digest does not depend on how the library orders keys.
        canonical = json.dumps(json.loads(self._backend.to_str()), sort_keys=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path))


def train_tokenizer(data_cfg: DataConfig, documents: Iterable[Document | str]) -> Tokenizer:
    """The tokenizer ``data_cfg.tokenizer`` names; BPE is trained on ``documents``.

    Pass the training split only, so validation text never shapes the vocabulary.
    """
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "bpe":
        texts = (doc.text if isinstance(doc, Document) else doc for doc in documents)
        return BPETokenizer.train(texts, data_cfg.vocab_size)
    raise DataError(f"data.tokenizer = {data_cfg.tokenizer!r} is unknown; use 'byte' or 'bpe'")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Read back a tokenizer saved with :meth:`Tokenizer.save` into ``directory``."""
    path = Path(directory) / TOKENIZER_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"no tokenizer in {directory}: {path} is missing; point at a run directory or a "
            "directory written by Tokenizer.save"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read tokenizer {path}: {exc}") from None
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"tokenizer {path} is not valid JSON ({exc.msg}); it is corrupt") from None
    if isinstance(data, dict) and data.get("kind") == ByteTokenizer.kind:
        return ByteTokenizer()
    if isinstance(data, dict) and "model" in data:  # the HF tokenizers format
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_str(text)
        except Exception as exc:  # the HF library raises plain Exception subclasses
            raise DataError(f"tokenizer {path} cannot be loaded ({exc}); it is corrupt") from None
        return BPETokenizer(backend)
    raise DataError(
        f"{path} is not a condcomp tokenizer (neither {{'kind': 'byte'}} nor an HF tokenizer)"
    )


class StreamDecoder:
    """Turn token ids into text one at a time, for printing generations as they are made.

    A character may be split across tokens (a byte tokenizer emits ``€`` as three bytes), so
    :meth:`push` decodes the ids not yet fully printed and returns only the new text, holding
    back trailing U+FFFD characters: those may be an incomplete character that the next token
    completes. Once everything pending has been printed the pending ids are dropped (byte-level
    decoding is concatenative), so the cost per token stays constant. :meth:`flush` returns
    whatever is held back at the end of a generation.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pending: list[int] = []
        self._printed = 0  # characters of decode(self._pending) already returned

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes (often ``""`` or one character)."""
        self._pending.append(int(token_id))
        text = self.tokenizer.decode(self._pending)
        stable = text.rstrip(REPLACEMENT_CHAR)
        new = stable[self._printed :]
        if len(stable) == len(text):  # nothing held back: start afresh with the next token
            self._pending.clear()
            self._printed = 0
        else:
            self._printed = len(stable)
        return new

    def flush(self) -> str:
        """Return the held-back text (replacement characters for an unfinished character)."""
        text = self.tokenizer.decode(self._pending)[self._printed :]
        self._pending.clear()
        self._printed = 0
        return text
