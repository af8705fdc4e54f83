"""Run a function on several gloo processes of this machine, for the distributed tests.

``run_ranks(fn, world_size, *args)`` forks ``world_size`` processes (fork, not spawn: a
forked worker does not import torch again, about 6 s less per test on a 2-core machine),
starts a gloo process group in each over a file store, calls ``fn(rank, world_size, *args)``
and returns what each rank returned, in rank order. A worker that raises fails the test with
its traceback. ``fn`` must be a module-level function (it is named, not pickled, under fork).
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn, world_size: int, store_path: str, results, args) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results[rank] = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args: Any) -> list[Any]:
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp, ctx.Manager() as manager:
        results = manager.dict()
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker,
                             args=(rank, fn, world_size, store_path, results, args))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        for p in procs:
            if p.is_alive():
                p.kill()
        out = []
        for rank in range(world_size):
            status, value = results.get(rank, ("error", f"rank {rank} died (exit code "
                                                        f"{procs[rank].exitcode})"))
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out.append(value)
        return out
