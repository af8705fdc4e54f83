"""The data layer: corpora -> train/validation split -> tokenizer -> cached token shards -> batches.

The train loop needs three things from here::

    data = prepare_data(cfg.data)                  # or prepare_data(cfg.data, tokenizer=saved)
    batches = TrainBatches(data.train, batch_size, seq_len, seed)
    x, y = batches.get(step)                       # a pure function of (seed, step)
    for x, y in eval_batches(data.val, batch_size, seq_len, max_tokens): ...

Modules, one job each: :mod:`.corpora` (read documents), :mod:`.split` (train/val split by
document), :mod:`.tokenizers` (byte and BPE tokenizers, streaming decode), :mod:`.shards`
(token files and their cache), :mod:`.loader` (batches), :mod:`.prepare` (the pipeline).
Importing this package loads neither pyarrow nor HF tokenizers; they are imported when used.
"""

from condcomp.data.corpora import Corpus, Document
from condcomp.data.loader import TrainBatches, eval_batches
from condcomp.data.prepare import PreparedData, prepare_data
from condcomp.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    StreamDecoder,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "Document",
    "PreparedData",
    "StreamDecoder",
    "Tokenizer",
    "TrainBatches",
    "eval_batches",
    "load_tokenizer",
    "prepare_data",
    "train_tokenizer",
]
