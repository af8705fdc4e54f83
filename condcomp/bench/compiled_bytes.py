"""Memory traffic of ``torch.compile``d code as inductor schedules it: a measure of the memory-
bound work in a step that needs no GPU.

For every kernel it generates, and every library kernel it calls (the matrix products
included), inductor knows the bytes of the buffers the kernel reads and writes. Summed over a
compiled forward and backward, that is the step's memory traffic when each buffer crosses
memory once per kernel. The memory-bound part of a GPU step (casts, permutations, activation
functions, norms, the residual stream) runs at about that traffic over the bandwidth, so the
counts of two layers compare their memory-bound work on a machine without a GPU. The count is
the schedule for the device compiled for: the CPU's fuses a little differently from the GPU's
(Triton), and the matrix products' own traffic says nothing of their FLOPs.

Inductor counts only when its ``inductor_metrics`` log is enabled, and only for graphs it
really compiles, so :func:`count_compiled_bytes` turns the log on (its messages dropped) and
the compile caches off for the duration of the block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from condcomp.errors import ConfigError

if TYPE_CHECKING:
    from condcomp.master_weights import MasterWeights

# torch._logging's artifact logger for inductor's per-graph metrics (torch/_inductor/compile_fx.py).
_METRICS_LOGGER = "torch._inductor.compile_fx.__inductor_metrics"


@dataclass
class ByteCount:
    """What inductor counted: bytes read and written by the kernels of every graph compiled in
    the block, and the number of kernels it generated (library calls not included)."""

    bytes: int = 0
    kernels: int = 0


@contextmanager
def count_compiled_bytes(masters: MasterWeights | None = None) -> Iterator[ByteCount]:
    """Count the memory traffic of everything compiled inside the block.

    ``masters``: the bf16-stored weights of the code counted; their gradient hooks run outside
    any compiled graph, so their bytes (:meth:`MasterWeights.hook_bytes`) are added.

    Compile and run the code inside it (a forward and a backward, say); the counts land in the
    yielded :class:`ByteCount` when the block ends. Dynamo's cache is reset on entry, so that
    code compiled before is compiled (and counted) again, and on exit, so that nothing compiled
    while counting is reused outside.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as metrics

    logger = logging.getLogger(_METRICS_LOGGER)
    saved = logger.level, logger.propagate, logger.handlers[:]
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the counts are wanted, the log lines (every kernel) are not
    logger.handlers = [logging.NullHandler()]
    count = ByteCount()
    torch._dynamo.reset()
    metrics.reset()
    try:
        with inductor_config.patch(fx_graph_cache=False), \
                functorch_config.patch(enable_autograd_cache=False):
            yield count
        count.bytes, count.kernels = metrics.num_bytes_accessed, metrics.generated_kernel_count
        compiled = count.bytes
        if masters is not None:
            count.bytes += masters.hook_bytes()
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]
        torch._dynamo.reset()
    if compiled == 0:
        raise ConfigError(f"torch {torch.__version__} reported no compiled bytes (inductor's "
                          "byte count needs a torch version that logs inductor_metrics)")
