"""Writing a safetensors file whose tensors arrive one after another, never all in memory.

``safetensors.torch.save_file`` serialises tensors that already exist. Converting a checkpoint
(``condcomp import-hf``) produces each tensor from the source file in turn, so with that API
the whole model must be built in memory first and then written through the page cache, whose
pages a busy host may make slow to allocate: on a 2-core virtual machine, writing a 395 MB
checkpoint after another process's load took 0.75 s where the same write after our own took
0.08 s (docs/benchmarks.md, "Importing HF models"). :class:`StreamedSafetensors` instead
writes the file as the tensors are produced:

- the header first (it needs only names, dtypes and shapes, :class:`TensorSpec`), then each
  tensor's bytes in header order;
- through two page-aligned staging buffers: the caller's thread copies a tensor (transposing it
  on the way, if it is a transposed view) into one while a writer thread writes the other;
- with ``O_DIRECT`` where the file system allows it, so the data goes from the staging buffer
  to the disk without taking page-cache pages (falling back to ordinary writes where it does
  not, e.g. tmpfs);
- hashing (SHA-256) each buffer as it is written, so the checkpoint's manifest needs no second
  read of the file.

The layout is the safetensors format (https://huggingface.co/docs/safetensors): an 8-byte
little-endian header length, the JSON header padded with spaces to a multiple of 8, then the
tensors' bytes back to back. Tensors are ordered as ``safetensors`` orders them (by dtype
size, largest first, then by name) so that each starts at a multiple of its dtype's size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
_NAME_OF_DTYPE = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of the block
_CHUNK = 16 << 20  # bytes per staging buffer (a multiple of _ALIGN)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def file_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order of the tensors in the file: largest dtype first, then by name (safetensors'
    own), so that every tensor's offset is a multiple of its dtype's size."""
    return sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))


def encode_header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """The file's first bytes: the header's length and the header, for ``specs`` in order."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        if spec.dtype not in _NAME_OF_DTYPE:
            raise ValueError(f"safetensors has no dtype for {spec.name}'s {spec.dtype}")
        header[spec.name] = {"dtype": _NAME_OF_DTYPE[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def state_specs(state: dict[str, torch.Tensor]) -> tuple[list[TensorSpec], dict[str, str]]:
    """The tensors ``safetensors.torch.save_model`` writes for a model's ``state``, in file
    order, and its metadata: tensors sharing storage (a tied head) are written once, under the
    first of their names in sorted order, and the metadata maps each other name to it, as
    ``save_model`` does (``load_model`` reads the file back into the model either way)."""
    kept: dict[tuple[Any, ...], str] = {}
    metadata: dict[str, str] = {}
    for name in sorted(state):
        tensor = state[name]
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in kept:
            metadata[name] = kept[key]
        else:
            kept[key] = name
    specs = [TensorSpec(name, state[name].dtype, tuple(state[name].shape))
             for name in state if name not in metadata]
    return file_order(specs), metadata


def _aligned_buffer(nbytes: int) -> torch.Tensor:
    raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    start = -raw.data_ptr() % _ALIGN
    return raw[start:start + nbytes]


class _DiskWriter(threading.Thread):
    """Writes and hashes the staging buffers it is handed, in order; hands each back empty."""

    def __init__(self, path: Path, free: queue.Queue[torch.Tensor]) -> None:
        super().__init__(name="safetensors-writer", daemon=True)
        self.path, self.free = path, free
        self.todo: queue.Queue[tuple[torch.Tensor, int] | None] = queue.Queue()
        self.digest = hashlib.sha256()
        self.written = 0
        self.error: BaseException | None = None
        self.fd, self.direct = self._open()

    def _open(self) -> tuple[int, bool]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)
        if direct:
            try:
                return os.open(self.path, flags | direct, 0o666), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return os.open(self.path, flags, 0o666), False

    def _reopen_buffered(self) -> None:
        os.close(self.fd)
        self.fd, self.direct = os.open(self.path, os.O_WRONLY, 0o666), False
        os.lseek(self.fd, self.written, os.SEEK_SET)

    def run(self) -> None:
        while (item := self.todo.get()) is not None:
            buffer, used = item
            try:
                if self.error is None:
                    self._write(buffer, used)
            except BaseException as exc:  # reported to the producer by finish()
                self.error = exc
            self.free.put(buffer)

    def _write(self, buffer: torch.Tensor, used: int) -> None:
        view = memoryview(buffer.numpy())
        self.digest.update(view[:used])  # hashlib releases the GIL: this overlaps the copying
        if self.direct and used % _ALIGN:
            # The end of the file: O_DIRECT writes whole blocks, so the last block goes out
            # zero-padded and finish() truncates the file to its length.
            padded = used + (-used % _ALIGN)
            buffer[used:padded].zero_()
            self._write_all(view[:padded], used)
        else:
            self._write_all(view[:used], used)

    def _write_all(self, data: memoryview, used: int) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.write(self.fd, data[done:])
            except OSError as exc:
                # Some file systems accept O_DIRECT at open and refuse it at write.
                if not (self.direct and exc.errno == errno.EINVAL and done == 0):
                    raise
                self._reopen_buffered()
                data = data[:used]
        self.written += used


class StreamedSafetensors:
    """A safetensors file written as its tensors are produced::

        with StreamedSafetensors(path, specs) as out:   # specs in file_order()
            for spec in out.specs:
                out.append(tensor_of(spec))  # or its rows in order, over several calls
            described = out.close()

    :meth:`append` takes any tensor (a transposed view included) and writes its elements in
    row-major order; the tensors of ``specs`` must arrive whole and in order, which
    :meth:`close` checks. ``close`` returns the file's size and SHA-256 once it is on disk
    (fsynced). A failure removes the partial file."""

    def __init__(self, path: str | Path, specs: list[TensorSpec],
                 metadata: dict[str, str] | None = None, chunk_bytes: int = _CHUNK) -> None:
        if chunk_bytes <= 0 or chunk_bytes % _ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {_ALIGN}")
        self.path, self.specs = Path(path), list(specs)
        header = encode_header(self.specs, metadata)
        self.size = len(header) + sum(spec.nbytes for spec in self.specs)
        self.chunk = chunk_bytes
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(2):
            self._free.put(_aligned_buffer(chunk_bytes))
        self._writer = _DiskWriter(self.path, self._free)
        self._writer.start()
        self._buffer, self._used, self._appended = self._free.get(), 0, 0
        self._closed = False
        self._append_bytes(torch.frombuffer(bytearray(header), dtype=torch.uint8))

    def __enter__(self) -> StreamedSafetensors:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def append(self, value: torch.Tensor) -> None:
        """Write ``value``'s elements next (row-major), copying straight into the staging
        buffer: a transposed view is transposed by that copy."""
        value = value.detach()
        if value.dim() == 0:
            value = value.reshape(1)
        rows = value.shape[0]
        row_bytes = value[0].numel() * value.element_size() if rows else 0
        if row_bytes == 0:
            return
        if self._used % value.element_size():  # staging buffers start block-aligned in the file
            raise ValueError("a tensor must start at a multiple of its dtype's size; "
                             "write the tensors in file_order()")
        done = 0
        while done < rows:
            take = min((self.chunk - self._used) // row_bytes, rows - done)
            if take == 0:
                # A row that crosses the buffer's end goes over as bytes: every buffer but the
                # last is written full (O_DIRECT writes whole blocks).
                self._append_bytes(value[done].contiguous().view(-1).view(torch.uint8))
                done += 1
                continue
            nbytes = take * row_bytes
            target = self._buffer[self._used:self._used + nbytes].view(value.dtype)
            target.view(take, *value.shape[1:]).copy_(value[done:done + take])
            self._used += nbytes
            self._appended += nbytes
            done += take
            if self._used == self.chunk:
                self._hand_over()

    def _append_bytes(self, data: torch.Tensor) -> None:
        at = 0
        while at < data.numel():
            n = min(self.chunk - self._used, data.numel() - at)
            self._buffer[self._used:self._used + n].copy_(data[at:at + n])
            self._used += n
            at += n
            if self._used == self.chunk:
                self._hand_over()
        self._appended += data.numel()

    def _hand_over(self) -> None:
        self._writer.todo.put((self._buffer, self._used))
        self._buffer, self._used = self._free.get(), 0
        if self._writer.error is not None:
            self.abort()

    def close(self) -> dict[str, Any]:
        """Finish the file: flush, truncate the last block's padding, fsync. Returns
        ``{"bytes": size, "sha256": hex}``, the manifest's description of the file."""
        if self._appended != self.size:
            self.abort()
            raise ValueError(f"{self.path}: {self._appended:,} bytes were written where the "
                             f"header describes {self.size:,}")
        if self._used:
            self._writer.todo.put((self._buffer, self._used))
        self._finish_writer()
        if self._writer.error is not None:
            self.abort()
        fd = self._writer.fd
        try:
            if self._writer.direct:
                os.ftruncate(fd, self.size)
            os.fsync(fd)
        except OSError:
            self.abort()
            raise
        os.close(fd)
        self._closed = True
        return {"bytes": self.size, "sha256": self._writer.digest.hexdigest()}

    def _finish_writer(self) -> None:
        if self._writer.is_alive():
            self._writer.todo.put(None)
            self._writer.join()

    def abort(self) -> None:
        """Stop writing and remove the partial file; re-raises the writer's error, if any."""
        if self._closed:
            return
        self._closed = True
        self._finish_writer()
        try:
            os.close(self._writer.fd)
        except OSError:
            pass
        self.path.unlink(missing_ok=True)
        if self._writer.error is not None:
            raise self._writer.error
