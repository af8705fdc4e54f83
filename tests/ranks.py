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


def _forget_this_process_shardings() -> None:
    """DTensor caches each op's sharding by its input specs, whose device mesh compares equal
    to any mesh of the same shape and names, whichever rank holds it. A test that ran DTensor
    ops in this process (test_plan.py, as rank 0 of a fake process group) leaves entries whose
    mesh is rank 0's; forked ranks that hit them would place their shards as rank 0 does (DCP
    then refuses the overlap). Cleared here, before forking: clearing the C++ cache in a
    forked child crashes it."""
    from torch.distributed.tensor import DTensor

    clear = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear is not None:  # the C++ fast path's cache
        clear()
    cached = DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding
    cached = getattr(cached, "cache", cached)  # a thread-local wrapper of an lru_cache
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def run_ranks(fn, world_size: int, *args: Any) -> list[Any]:
    _forget_this_process_shardings()
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
