"""This process's place in a distributed run: the process group, the device meshes, the rank.

``torchrun`` starts one process per device and tells each, through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...), where it stands;
:func:`init_distributed` reads that and starts the process group. A process started without
``torchrun`` gets :data:`SINGLE`, a context of one rank that runs no collective, so the train
loop has one code path.

Meshes (torchtitan's layout, ``docs/design.md``): the ``world`` ranks form one data-parallel
dimension. With expert parallelism of degree ``ep`` the same ranks are also viewed as a 2-D
mesh ``("efsdp", "ep")`` of shape ``(world / ep, ep)``: the ranks of one ``ep`` row share the
experts of a layer between them and exchange tokens; the ranks of one ``efsdp`` column hold
the same experts and average their gradients. Every rank is a data-parallel rank: it reads
its own slice of each global batch.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from condcomp.distributed.options import DistConfig
from condcomp.errors import CondcompError, ConfigError, StoppedOnMain

T = TypeVar("T")

# torchrun sets these for every worker it starts.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@dataclass
class DistContext:
    """Where this process stands. ``mesh`` is None in a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ep: int = 1
    backend: str = ""
    mesh: Any = None  # DeviceMesh ("efsdp", "ep"), the ranks as a (world / ep, ep) grid
    dp_mesh: Any = None  # DeviceMesh over all ranks, one dimension: data parallelism
    options: DistConfig = field(default_factory=DistConfig)
    owns_group: bool = False  # started by init_distributed, so destroyed by shutdown

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_mesh(self) -> Any:
        return None if self.mesh is None else self.mesh["ep"]

    @property
    def efsdp_mesh(self) -> Any:
        return None if self.mesh is None else self.mesh["efsdp"]

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` summed (or averaged, ``op="mean"``) over every rank, in place."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            if op == "mean":
                tensor.div_(self.world_size)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (a list of one in a single process)."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def other_ranks_cpu_s(self, own_s: float) -> float:
        """CPU seconds the job's other ranks on this machine used, from each rank's own
        ``own_s`` over the same interval (collective). torchrun starts them as siblings, not
        descendants, so a measure of the machine's load would count them as load on it."""
        per_rank = self.gather_object((socket.gethostname(), own_s))
        host = per_rank[self.rank][0]
        return sum(s for rank, (h, s) in enumerate(per_rank) if rank != self.rank and h == host)

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 alone (writing the run folder), its result on every rank. A
        :class:`CondcompError` it raises is raised on every rank, so no rank waits for a
        main process that stopped on a user error."""
        if not self.distributed:
            return fn()
        outcome: tuple[str, Any] | None = None
        error: CondcompError | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except CondcompError as exc:
                error, outcome = exc, ("error", str(exc))
        outcome = self.broadcast_object(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise StoppedOnMain(outcome[1])
        return outcome[1]

    def describe(self) -> dict[str, Any]:
        """The layout, for the run's record."""
        return {"world_size": self.world_size, "ep": self.ep,
                "data_parallel": self.options.data_parallel if self.distributed else "none",
                "backend": self.backend or "none"}


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARS)


def check_layout(options: DistConfig, world_size: int, device_type: str) -> None:
    """Refuse a layout that cannot run, before any process group is started."""
    if world_size % options.ep:
        raise ConfigError(f"dist.ep = {options.ep} does not divide the {world_size} processes "
                          f"of the job; launch a multiple of {options.ep} processes "
                          "(--nproc-per-node x nodes) or lower dist.ep")
    backend = resolve_backend(options.backend, device_type)
    if options.data_parallel == "fsdp" and backend == "gloo" and torch_version() < (2, 9):
        # FSDP2 on gloo before 2.9: reduce_scatter(AVG) silently sums (pytorch#162338), so
        # every gradient would be world_size times too large.
        raise ConfigError(f"dist.data_parallel = 'fsdp' on the gloo backend needs torch >= 2.9 "
                          f"(this is {torch.__version__}: its gloo reduce-scatter sums where it "
                          "should average, so gradients would be wrong); set "
                          "dist.data_parallel = 'ddp' or upgrade torch")
    if backend == "nccl" and device_type != "cuda":
        raise ConfigError("dist.backend = 'nccl' needs CUDA devices; use 'gloo' (or 'auto') on "
                          "the CPU")


def resolve_backend(backend: str, device_type: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(options: DistConfig, device_type: str) -> DistContext:
    """Start the process group when ``torchrun`` launched this process; else :data:`SINGLE`.

    ``device_type`` is ``"cpu"`` or ``"cuda"``; on CUDA each process takes the GPU of its
    ``LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        return SINGLE
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    check_layout(options, world_size, device_type)
    backend = resolve_backend(options.backend, device_type)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(seconds=options.timeout_s))
    ctx = context_for_group(options, device_type, local_rank)
    ctx.owns_group = owns_group
    return ctx


def context_for_group(options: DistConfig, device_type: str, local_rank: int = 0
                      ) -> DistContext:
    """The context of this rank in the default process group, already started (by
    :func:`init_distributed`, or by a test that started its own group)."""
    from torch.distributed.device_mesh import init_device_mesh

    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_layout(options, world_size, device_type)
    # An explicit mesh device: left to itself, FSDP would move CPU parameters to a GPU that
    # the machine has while gloo runs the collectives (pytorch#132471).
    mesh = init_device_mesh(device_type, (world_size // options.ep, options.ep),
                            mesh_dim_names=("efsdp", "ep"))
    # The flattened view is kept as returned: slicing it from the root by name is deprecated.
    dp_mesh = mesh._flatten("dp")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, ep=options.ep,
                       backend=dist.get_backend(), mesh=mesh, dp_mesh=dp_mesh,
                       options=options)


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """The device of this rank: on CUDA, the GPU of its local rank."""
    if ctx.distributed and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
