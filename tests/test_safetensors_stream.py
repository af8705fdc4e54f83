"""The streamed safetensors writer: the file ``save_model`` writes, byte for byte, from tensors
that arrive one after another (transposed views, rows over several calls), with or without
O_DIRECT, and nothing left behind when it fails."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from condcomp import safetensors_stream
from condcomp.checkpoint import Checkpoint, save_checkpoint, verify_checkpoint
from condcomp.errors import StorageError
from condcomp.safetensors_stream import StreamedSafetensors, state_specs

CHUNK = 4096  # the smallest staging buffer: most tensors cross a buffer's end


class _Mixed(nn.Module):
    """Every case the writer must place: a tied head, several dtypes (so the order by dtype
    size matters), an empty tensor, a row larger than the staging buffer, a row across its
    end."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 7)
        self.head = nn.Linear(7, 11, bias=False)
        self.head.weight = self.emb.weight
        self.wide = nn.Parameter(torch.randn(3, 1500))  # 6000-byte rows > CHUNK
        self.grid = nn.Parameter(torch.randn(40, 30))  # its rows cross the first buffer's end
        self.proj = nn.Linear(13, 5)
        self.register_buffer("halves", torch.randn(9, 3, dtype=torch.float16))
        self.register_buffer("brains", torch.randn(5, dtype=torch.bfloat16))
        self.register_buffer("ids", torch.arange(17))
        self.register_buffer("mask", torch.rand(10) > 0.5)
        self.register_buffer("nothing", torch.zeros(0, 4))


def _stream(state: dict[str, torch.Tensor], path, split_rows: bool = False,
            transposed: bool = False) -> dict:
    specs, metadata = state_specs(state)
    with StreamedSafetensors(path, specs, metadata, chunk_bytes=CHUNK) as out:
        for spec in out.specs:
            value = state[spec.name]
            if transposed and value.dim() == 2:  # a transposed view, as the import appends
                value = value.t().contiguous().t()
            if split_rows and value.dim() >= 1 and len(value) > 1:
                out.append(value[:1])
                out.append(value[1:])
            else:
                out.append(value)
        return out.close()


@pytest.mark.parametrize("split_rows,transposed", [(False, False), (True, False), (False, True)])
def test_the_streamed_file_is_save_models_byte_for_byte(tmp_path, split_rows, transposed):
    torch.manual_seed(0)
    model = _Mixed()
    save_model(model, str(tmp_path / "reference.safetensors"))
    described = _stream(model.state_dict(), tmp_path / "streamed.safetensors", split_rows,
                        transposed)
    data = (tmp_path / "streamed.safetensors").read_bytes()
    assert data == (tmp_path / "reference.safetensors").read_bytes()
    assert described == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    loaded = load_file(str(tmp_path / "streamed.safetensors"))
    assert set(loaded) == set(model.state_dict()) - {"head.weight"}
    assert torch.equal(loaded["wide"], model.wide)


def test_without_o_direct_the_file_is_the_same(tmp_path, monkeypatch):
    torch.manual_seed(0)
    state = _Mixed().state_dict()
    with_direct = _stream(state, tmp_path / "a.safetensors")
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    assert _stream(state, tmp_path / "b.safetensors") == with_direct
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_a_write_that_refuses_o_direct_continues_without_it(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse it at the first write."""
    torch.manual_seed(0)
    state = _Mixed().state_dict()
    reference = _stream(state, tmp_path / "a.safetensors")
    real_write, refused = os.write, []

    def write(fd, data):
        if not refused and fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(safetensors_stream.os, "write", write)
    assert _stream(state, tmp_path / "b.safetensors") == reference
    assert refused or not hasattr(os, "O_DIRECT")


def test_too_few_bytes_is_refused_and_leaves_no_file(tmp_path):
    state = {"a": torch.randn(4, 4), "b": torch.randn(3)}
    specs, metadata = state_specs(state)
    out = StreamedSafetensors(tmp_path / "x.safetensors", specs, metadata, chunk_bytes=CHUNK)
    out.append(state[specs[0].name])
    with pytest.raises(ValueError, match="bytes were written where the header describes"):
        out.close()
    assert not (tmp_path / "x.safetensors").exists()


def test_a_failed_disk_write_in_a_checkpoint_is_one_storage_error(tmp_path, monkeypatch):
    """The writer thread's OSError (a full disk) reaches the caller as save_checkpoint's one
    message, and no partial checkpoint is left behind."""
    state = {"w": torch.randn(64, 64)}

    class Streamed:
        def write(self, path):
            return _stream(state, path)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_stream.os, "write", full)
    with pytest.raises(StorageError, match="No space left"):
        save_checkpoint(tmp_path, 0, Streamed(), {"step": 0}, keep_last=1)
    assert not any((tmp_path / "checkpoints").iterdir())


def test_a_streamed_checkpoint_verifies(tmp_path):
    state = {"w": torch.randn(64, 64)}

    class Streamed:
        def write(self, path):
            return _stream(state, path)

    path = save_checkpoint(tmp_path, 3, Streamed(), {"step": 3}, keep_last=1)
    verify_checkpoint(Checkpoint(path, 3), tmp_path)
    assert torch.equal(load_file(str(path / "model.safetensors"))["w"], state["w"])
